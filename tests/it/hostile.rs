//! Hostile and careless callers against the real binary, its memory read
//! from `/proc`: each attack is answered with a status naming the field or
//! limit, within a bound on the server's peak RSS (reset before the attack
//! through `/proc/PID/clear_refs`) or on the time to answer, and the server
//! keeps serving. The peaks printed with `--nocapture` are the README's.

use crate::common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use internvl_grpc::service::proto;
use proto::intern_vl_client::InternVlClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::Code;

const KEY_A: &str = "key-of-tenant-a";
const KEY_B: &str = "key-of-tenant-b";

/// The real binary serving the tiny model with two API keys and `settings`.
struct Replica {
    child: Child,
    addr: SocketAddr,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Replica {
    async fn start(settings: &[(&str, &str)]) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let stderr = dir.path().join("stderr");
        let mut command = tiny_serve_command();
        command
            .args(["--listen", &addr.to_string(), "--threads", "1"])
            .args(["--set", &format!("api_keys={KEY_A},{KEY_B}")]);
        for (key, value) in settings {
            command.args(["--set", &format!("{key}={value}")]);
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("the server binary starts");
        let url = format!("http://{addr}");
        serving_watch(&url, &mut child, &stderr, Duration::from_secs(120)).await;
        Replica {
            child,
            addr,
            stderr,
            _dir: dir,
        }
    }

    async fn client(&self) -> InternVlClient<Channel> {
        InternVlClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in {status}"))
    }

    /// Starts a peak measurement: the peak RSS is set back to the RSS now.
    fn reset_peak(&self) -> u64 {
        std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5").unwrap();
        self.status_kib("VmRSS:")
    }

    /// How far the peak RSS rose above `base` (KiB), in MiB.
    fn growth_mib(&self, base: u64) -> f64 {
        self.status_kib("VmHWM:").saturating_sub(base) as f64 / 1024.0
    }

    fn assert_alive(&mut self) {
        let log = || std::fs::read_to_string(&self.stderr).unwrap_or_default();
        assert!(self.child.try_wait().unwrap().is_none(), "died:\n{}", log());
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keyed<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

/// The field a refusal names (`field: why`).
fn field_of(status: &tonic::Status) -> &str {
    status.message().split_once(": ").map_or("", |(f, _)| f)
}

/// A real PNG of `width` x `height` black pixels.
fn png(width: u32, height: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image::RgbImage::new(width, height))
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn video_part(data: Vec<u8>, fps: f32) -> proto::Content {
    proto::Content {
        part: Some(proto::content::Part::Video(proto::Video {
            data,
            fps,
            ..Default::default()
        })),
    }
}

/// The fixture MP4 (16 frames at 4 fps, 64 KB) with its `stts` box
/// claiming `samples` frames instead.
fn mp4_claiming(samples: u32) -> Vec<u8> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/video/clip.mp4");
    let mut data = std::fs::read(path).unwrap();
    let at = data
        .windows(4)
        .position(|w| w == b"stts")
        .expect("an stts box");
    // version and flags, entry count 1, then the first entry's sample count.
    assert_eq!(&data[at + 8..at + 12], &1u32.to_be_bytes());
    data[at + 12..at + 16].copy_from_slice(&samples.to_be_bytes());
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_that_lies_about_its_frames_costs_nothing() {
    let mut replica = Replica::start(&[]).await;
    let mut client = replica.client().await;
    // 500,000,000 claimed frames sampled at 1 per second of a 4 fps video:
    // 125,000,000 indices (1 GB) were allocated before the count was checked.
    let base = replica.reset_peak();
    let started = Instant::now();
    let status = client
        .count_tokens(keyed(
            proto::CountTokensRequest {
                messages: vec![user(vec![video_part(mp4_claiming(500_000_000), 1.0)])],
            },
            KEY_A,
        ))
        .await
        .expect_err("far more frames than a request may sample");
    let grew = replica.growth_mib(base);
    println!(
        "lying stts: {:?} in {:?}, peak RSS +{grew:.0} MiB: {}",
        status.code(),
        started.elapsed(),
        status.message()
    );
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(field_of(&status), "messages[0].content[0].video.fps");
    assert!(grew < 64.0, "peak RSS rose {grew:.0} MiB");
    replica.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiles_are_bounded_per_request_and_counted_as_they_are_cut() {
    let mut replica = Replica::start(&[("max_tiles_per_request", "24")]).await;
    // 64x1 pixels at the model's max_tiles (12): 13 tiles (7.5 MiB of tile
    // pixels) from 70 bytes of PNG, sixteen times per request, six requests
    // at once. (Before, max_tiles went to 64: 65 tiles an image.)
    let wide = png(64, 1);
    let part = || proto::Content {
        part: Some(proto::content::Part::Image(proto::Image {
            data: wide.clone(),
            max_tiles: 12,
            ..Default::default()
        })),
    };
    let base = replica.reset_peak();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let request = proto::CountTokensRequest {
            messages: vec![user((0..16).map(|_| part()).collect())],
        };
        let addr = replica.addr;
        calls.spawn(async move {
            let mut client = InternVlClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            client.count_tokens(keyed(request, KEY_A)).await
        });
    }
    let answers = calls.join_all().await;
    let grew = replica.growth_mib(base);
    println!("tile amplification: peak RSS +{grew:.0} MiB");
    for answer in answers {
        let status = answer.expect_err("26 tiles is past 24");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(field_of(&status), "messages[0].content[1].image");
        assert!(
            status.message().contains("max_tiles_per_request"),
            "{status:?}"
        );
    }
    assert!(grew < 128.0, "peak RSS rose {grew:.0} MiB");
    // More tiles than the model takes are refused by name.
    let mut client = replica.client().await;
    let mut beyond = part();
    if let Some(proto::content::Part::Image(image)) = &mut beyond.part {
        image.max_tiles = 64;
    }
    let status = client
        .count_tokens(keyed(
            proto::CountTokensRequest {
                messages: vec![user(vec![beyond])],
            },
            KEY_A,
        ))
        .await
        .expect_err("64 tiles for a 12-tile model");
    assert_eq!(field_of(&status), "messages[0].content[0].image.max_tiles");
    replica.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_inputs_and_tokenize_text_are_bounded() {
    let mut replica = Replica::start(&[]).await;
    let mut client = replica.client().await;
    let small = png(32, 32);
    let input = || proto::EmbedInput {
        content: (0..16).map(|_| image(small.clone())).collect(),
    };
    let base = replica.reset_peak();
    // 100 inputs of 16 images: each input within max_images, the request not.
    let status = client
        .embed(keyed(
            proto::EmbedRequest {
                inputs: (0..100).map(|_| input()).collect(),
                ..Default::default()
            },
            KEY_A,
        ))
        .await
        .expect_err("100 inputs");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(field_of(&status), "inputs");
    // 30 such inputs pass those counts (480 parts); their tiles do not (one
    // per image here: 480, and 128 per request by default).
    let status = client
        .embed(keyed(
            proto::EmbedRequest {
                inputs: (0..30).map(|_| input()).collect(),
                ..Default::default()
            },
            KEY_A,
        ))
        .await
        .expect_err("480 tiles");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("max_tiles_per_request"),
        "{status:?}"
    );
    // 16 MiB of text to tokenize.
    let status = client
        .tokenize(keyed(
            proto::TokenizeRequest {
                text: "a ".repeat(8 << 20),
            },
            KEY_A,
        ))
        .await
        .expect_err("16 MiB of text");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(field_of(&status), "text");
    let grew = replica.growth_mib(base);
    println!("embed inputs and tokenize bytes: peak RSS +{grew:.0} MiB");
    // The 16 MiB message itself is read and decoded (max_message_bytes).
    assert!(grew < 128.0, "peak RSS rose {grew:.0} MiB");
    replica.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_fields_are_counted_before_they_are_decoded() {
    let mut replica = Replica::start(&[]).await;
    let mut client = replica.client().await;
    // 19.5 MiB of empty content parts: 2 bytes each on the wire, about 80
    // in memory once decoded.
    let parts = 10_000_000;
    let request = proto::CountTokensRequest {
        messages: vec![user(vec![proto::Content::default(); parts])],
    };
    let base = replica.reset_peak();
    let status = client
        .count_tokens(keyed(request, KEY_A))
        .await
        .expect_err("ten million parts");
    let grew = replica.growth_mib(base);
    println!(
        "empty content parts: peak RSS +{grew:.0} MiB: {}",
        status.message()
    );
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(field_of(&status), "content");
    // The message itself is read (19.5 MiB), not decoded.
    assert!(grew < 96.0, "peak RSS rose {grew:.0} MiB");
    replica.assert_alive();
}

/// What one caller learns of another's prompt: the `cached_tokens` of its
/// guesses.
async fn cached_tokens(
    client: &mut InternVlClient<Channel>,
    prompt: &str,
    key: &str,
    salt: &str,
) -> u32 {
    let mut request = greedy(vec![user(vec![text(prompt)])], 1);
    request.cache_salt = salt.into();
    let mut stream = client
        .generate(keyed(request, key))
        .await
        .unwrap()
        .into_inner();
    loop {
        let message = stream.message().await.unwrap().expect("a Done");
        if let Some(proto::generate_response::Event::Done(done)) = message.event {
            return done.usage.unwrap().cached_tokens;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_key_cannot_read_a_prompt_from_cached_tokens() {
    let replica = Replica::start(&[]).await;
    let mut client = replica.client().await;
    let secret = "The launch code is 7351. Remember it and tell nobody.";
    cached_tokens(&mut client, secret, KEY_A, "").await;
    // B's right and wrong guesses look the same. Each is B's first visit
    // (a salt of its own), so B's own earlier guesses do not count: before
    // partitions the right one got 24 here and the wrong one 23.
    let right = cached_tokens(&mut client, "The launch code is 7", KEY_B, "guess-1").await;
    let wrong = cached_tokens(&mut client, "The launch code is 1", KEY_B, "guess-2").await;
    assert_eq!(right, wrong, "another key's guess tells right from wrong");
    // A's own next turn still reuses A's prefix.
    let own = cached_tokens(&mut client, "The launch code is 7351. And", KEY_A, "").await;
    assert!(
        own > right,
        "A's own prefix is reused: {own} against {right}"
    );
    // One key shared by tenants: a salt of its own keeps each apart.
    let salted = cached_tokens(&mut client, secret, KEY_A, "tenant-2").await;
    assert_eq!(salted, 0, "another salt reused A's cells");
    let same_salt = cached_tokens(&mut client, secret, KEY_A, "tenant-2").await;
    assert!(same_salt > 0, "the same salt reuses its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_key_cannot_tell_whether_an_image_was_sent() {
    let replica = Replica::start(&[]).await;
    let mut client = replica.client().await;
    let photo = image_bytes("square_448.png");
    let ask = |key: &str| {
        keyed(
            greedy(
                vec![user(vec![image(photo.clone()), text("What is it?")])],
                1,
            ),
            key,
        )
    };
    let reused = |done: Option<proto::Done>| {
        let usage = done.unwrap().usage.unwrap();
        (usage.cached_tokens, usage.cached_image_tiles)
    };
    let first = collect(client.generate(ask(KEY_A)).await.unwrap().into_inner())
        .await
        .unwrap();
    assert_eq!(reused(first.done), (0, 0));
    // Before partitions B got A's cells (cached_tokens) for the same
    // conversation, or A's tile encodings (cached_image_tiles) for another.
    let other = collect(client.generate(ask(KEY_B)).await.unwrap().into_inner())
        .await
        .unwrap();
    assert_eq!(reused(other.done), (0, 0), "B learns that A sent it");
    // A's own image is reused: its encodings, below a prefix that differs.
    let mut again = ask(KEY_A);
    again.get_mut().messages.insert(
        0,
        proto::Message {
            role: "system".into(),
            content: vec![text("Be brief.")],
        },
    );
    let own = collect(client.generate(again).await.unwrap().into_inner())
        .await
        .unwrap();
    assert!(reused(own.done).1 > 0, "A's own image is reused");
}

/// Sends `head` and `body` on a raw connection and waits up to `bound` for
/// the status line.
async fn raw_http(addr: SocketAddr, head: &str, body: &[u8], bound: Duration) -> Option<String> {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(body).await.unwrap();
    let mut answer = vec![0u8; 256];
    let read = tokio::time::timeout(bound, socket.read(&mut answer)).await;
    let n = read.ok()?.ok()?;
    Some(
        String::from_utf8_lossy(&answer[..n])
            .lines()
            .next()?
            .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_body_is_read_only_for_a_key_and_only_for_so_long() {
    let replica = Replica::start(&[("http_body_timeout_secs", "2")]).await;
    let head = |auth: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
             content-length: 30000000\r\n{auth}\r\n"
        )
    };
    // No key, a 30 MB body declared, 10 bytes sent, then nothing.
    let started = Instant::now();
    let status = raw_http(
        replica.addr,
        &head(""),
        b"{\"model\":",
        Duration::from_secs(5),
    )
    .await;
    println!(
        "no key, stalled body: {status:?} after {:?}",
        started.elapsed()
    );
    assert!(
        status.as_deref().is_some_and(|s| s.contains(" 401 ")),
        "{status:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    // A key, the same stalled body: cut at the body timeout.
    let keyed = head(&format!("authorization: Bearer {KEY_A}\r\n"));
    let started = Instant::now();
    let status = raw_http(
        replica.addr,
        &keyed,
        b"{\"model\":",
        Duration::from_secs(10),
    )
    .await;
    println!(
        "keyed, stalled body: {status:?} after {:?}",
        started.elapsed()
    );
    assert!(
        status.as_deref().is_some_and(|s| s.contains(" 408 ")),
        "{status:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_body_of_untyped_values_is_refused_at_its_first() {
    let replica = Replica::start(&[]).await;
    // 27 MiB of `[0,0,0,…]` as a message's content parts: read as untyped
    // JSON values, 1.4 GiB before any check.
    let zeros = "0,".repeat(14 << 20);
    let body = format!("{{\"messages\":[{{\"role\":\"user\",\"content\":[{zeros}0]}}]}}");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
         authorization: Bearer {KEY_A}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let base = replica.reset_peak();
    let status = raw_http(
        replica.addr,
        &head,
        body.as_bytes(),
        Duration::from_secs(30),
    )
    .await;
    let grew = replica.growth_mib(base);
    println!("27 MiB of zeros as parts: {status:?}, peak RSS +{grew:.0} MiB");
    assert!(
        status.as_deref().is_some_and(|s| s.contains(" 400 ")),
        "{status:?}"
    );
    // The body itself is held (27 MiB, then its buffer), nothing of it decoded.
    assert!(grew < 128.0, "peak RSS rose {grew:.0} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_stop_reading_let_their_slots_go() {
    let replica = Replica::start(&[
        ("parallel", "2"),
        ("queue_depth", "2"),
        ("stream_buffer", "2"),
        ("stream_stall_secs", "2"),
    ])
    .await;
    // Two streams on connections with a 4 KiB window whose clients never
    // read: both slots held (batching.rs's way to stall a stream).
    let mut held = Vec::new();
    for _ in 0..2 {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", replica.addr))
            .unwrap()
            .initial_stream_window_size(Some(4096))
            .connect()
            .await
            .unwrap();
        let mut stalled = InternVlClient::new(channel);
        let request = proto::GenerateRequest {
            top_logprobs: 20,
            ..greedy(vec![user(vec![text("Count to a thousand.")])], 4000)
        };
        let stream = stalled
            .generate(keyed(request, KEY_A))
            .await
            .unwrap()
            .into_inner();
        held.push((stalled, stream));
    }
    // A third caller is served once the stall time has let them go, not
    // after their 600 s deadline.
    let mut client = replica.client().await;
    let started = Instant::now();
    let request = keyed(greedy(vec![user(vec![text("Hello!")])], 8), KEY_B);
    let served = tokio::time::timeout(Duration::from_secs(60), async {
        collect(client.generate(request).await.unwrap().into_inner()).await
    })
    .await
    .expect("served within a minute")
    .unwrap();
    assert_eq!(served.ids.len(), 8);
    println!(
        "served after {:?} beside two unread streams",
        started.elapsed()
    );
    // The readers, back at last, get what was buffered and then why it ended.
    for (_, mut stream) in held {
        let ended = loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("ended without a status"),
                Err(status) => break status,
            }
        };
        assert_eq!(ended.code(), Code::Aborted, "{ended:?}");
        assert!(ended.message().contains("stream_stall_secs"), "{ended:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_files_under_media_root_are_refused_at_once() {
    let root = tempfile::tempdir().unwrap();
    let fifo = root.path().join("pipe.png");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let root_path = root.path().display().to_string();
    let replica = Replica::start(&[("media_root", &root_path)]).await;
    let mut client = replica.client().await;
    let started = Instant::now();
    let request = proto::CountTokensRequest {
        messages: vec![user(vec![proto::Content {
            part: Some(proto::content::Part::Image(proto::Image {
                url: format!("file://{}", fifo.display()),
                ..Default::default()
            })),
        }])],
    };
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        client.count_tokens(keyed(request, KEY_A)),
    )
    .await
    .expect("answered, not blocked on the FIFO");
    let status = answer.expect_err("a FIFO");
    println!(
        "FIFO: {:?} after {:?}: {}",
        status.code(),
        started.elapsed(),
        status.message()
    );
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(field_of(&status), "messages[0].content[0].image.url");
    assert!(status.message().contains("FIFO"), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
