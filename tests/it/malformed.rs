//! Malformed input: every case gets a clear status (never INTERNAL or a dead
//! process), and the server answers the next valid request.

use crate::common;

use std::io::Cursor;

use common::*;
use internvl_grpc::service::proto;
use tonic::Code;

/// What a case must get back.
enum Expect {
    /// Served normally.
    Ok,
    /// INVALID_ARGUMENT whose message starts with this field.
    Invalid(&'static str),
    /// This status code.
    Status(Code),
}

fn encode(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn rgb(w: u32, h: u32) -> image::DynamicImage {
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([x as u8, y as u8, 99])
    }))
}

fn corrupt_middle(mut bytes: Vec<u8>) -> Vec<u8> {
    let mid = bytes.len() / 2;
    let end = (mid + 64).min(bytes.len());
    for b in &mut bytes[mid..end] {
        *b ^= 0x5a;
    }
    bytes
}

fn ask(content: Vec<proto::Content>) -> proto::GenerateRequest {
    greedy(vec![user(content)], 2)
}

fn img(data: Vec<u8>) -> proto::Content {
    image(data)
}

fn video(frames: Vec<Vec<u8>>, num_frames: u32) -> proto::Content {
    proto::Content {
        part: Some(proto::content::Part::Video(proto::Video {
            frames,
            num_frames,
            ..Default::default()
        })),
    }
}

fn sampling(f: impl FnOnce(&mut proto::SamplingParams)) -> proto::GenerateRequest {
    let mut r = greedy(vec![user(vec![text("hi")])], 2);
    let mut s = proto::SamplingParams::default();
    f(&mut s);
    r.sampling = Some(s);
    r
}

/// The first 70 % of an encoded image: headers whole, pixel data cut.
fn cut(bytes: &[u8]) -> Vec<u8> {
    bytes[..bytes.len() * 7 / 10].to_vec()
}

fn cases() -> Vec<(&'static str, proto::GenerateRequest, Expect)> {
    use Expect::*;
    let png = image_bytes("square_448.png");
    let jpeg = image_bytes("landscape_800x600.jpg");
    // Square and small: one tile each.
    let gif = encode(rgb(48, 48), image::ImageFormat::Gif);
    let webp = encode(rgb(48, 48), image::ImageFormat::WebP);
    let bmp = encode(rgb(48, 48), image::ImageFormat::Bmp);
    let tiff = encode(rgb(48, 48), image::ImageFormat::Tiff);
    let data = "messages[0].content[0].image.data";
    let with_header = |prefix: &[u8]| {
        let mut v = prefix.to_vec();
        v.extend_from_slice(&[0u8; 64]);
        v
    };
    vec![
        (
            "truncated PNG",
            ask(vec![img(png[..100].to_vec())]),
            Invalid(data),
        ),
        (
            "PNG header only",
            ask(vec![img(png[..33].to_vec())]),
            Invalid(data),
        ),
        (
            "corrupt PNG data",
            ask(vec![img(corrupt_middle(png.clone()))]),
            Invalid(data),
        ),
        (
            "truncated JPEG",
            ask(vec![img(jpeg[..300].to_vec())]),
            Invalid(data),
        ),
        // Cut inside the pixel data, past every header: Pillow (and so the
        // reference) refuses each with "image file is truncated".
        (
            "JPEG cut inside its scan",
            ask(vec![img(cut(&jpeg))]),
            Invalid(data),
        ),
        (
            "PNG cut inside its pixel data",
            ask(vec![img(cut(&png))]),
            Invalid(data),
        ),
        (
            "GIF cut inside its pixel data",
            ask(vec![img(cut(&gif))]),
            Invalid(data),
        ),
        (
            "WebP cut inside its pixel data",
            ask(vec![img(cut(&webp))]),
            Invalid(data),
        ),
        (
            "BMP cut inside its pixel data",
            ask(vec![img(cut(&bmp))]),
            Invalid(data),
        ),
        (
            "TIFF cut inside its pixel data",
            ask(vec![img(cut(&tiff))]),
            Invalid(data),
        ),
        (
            "JPEG start marker only",
            ask(vec![img(vec![0xff, 0xd8, 0xff])]),
            Invalid(data),
        ),
        (
            "truncated GIF",
            ask(vec![img(gif[..20].to_vec())]),
            Invalid(data),
        ),
        (
            "GIF magic then garbage",
            ask(vec![img(with_header(b"GIF89a\x10\x00\x10\x00"))]),
            Invalid(data),
        ),
        (
            "truncated WebP",
            ask(vec![img(webp[..24].to_vec())]),
            Invalid(data),
        ),
        (
            "WebP magic then garbage",
            ask(vec![img(with_header(b"RIFF\x40\x00\x00\x00WEBPVP8 "))]),
            Invalid(data),
        ),
        (
            "truncated BMP",
            ask(vec![img(bmp[..40].to_vec())]),
            Invalid(data),
        ),
        (
            "truncated TIFF",
            ask(vec![img(tiff[..16].to_vec())]),
            Invalid(data),
        ),
        (
            "0x0 image",
            ask(vec![img(png_claiming(0, 0))]),
            Invalid(data),
        ),
        (
            "0x10 image",
            ask(vec![img(png_claiming(0, 10))]),
            Invalid(data),
        ),
        (
            "decompression bomb header",
            ask(vec![img(png_claiming(60_000, 60_000))]),
            Invalid(data),
        ),
        (
            "side beyond the limit",
            ask(vec![img(png_claiming(100_000, 2))]),
            Invalid(data),
        ),
        (
            "WAV bytes",
            ask(vec![img(with_header(b"RIFF\x24\x08\x00\x00WAVEfmt "))]),
            Invalid(data),
        ),
        (
            "MP3 bytes",
            ask(vec![img(with_header(b"ID3\x03\x00\x00\x00\x00\x00\x21"))]),
            Invalid(data),
        ),
        (
            "FLAC bytes",
            ask(vec![img(with_header(b"fLaC\x00\x00\x00\x22"))]),
            Invalid(data),
        ),
        ("empty image bytes", ask(vec![img(vec![])]), Invalid(data)),
        (
            "1x1 image",
            ask(vec![img(encode(rgb(1, 1), image::ImageFormat::Png))]),
            Ok,
        ),
        (
            "1x2000 image",
            ask(vec![img(encode(rgb(1, 2000), image::ImageFormat::Png))]),
            Ok,
        ),
        (
            "2000x1 image",
            ask(vec![img(encode(rgb(2000, 1), image::ImageFormat::Png))]),
            Ok,
        ),
        (
            "GIF, WebP, BMP, TIFF decode",
            ask(vec![img(gif), img(webp), img(bmp), img(tiff)]),
            Ok,
        ),
        ("NUL bytes in text", ask(vec![text("a\0b\0\0c")]), Ok),
        ("empty content", greedy(vec![user(vec![])], 2), Ok),
        (
            "too many images",
            ask((0..17)
                .map(|_| img(encode(rgb(8, 8), image::ImageFormat::Png)))
                .collect()),
            Invalid("messages"),
        ),
        (
            "too many video frames",
            ask(vec![video(vec![png.clone(); 4], 40)]),
            Invalid("messages"),
        ),
        (
            "undecodable video frame",
            ask(vec![video(vec![png.clone(), b"junk".to_vec()], 2)]),
            Invalid("messages[0].content[0].video.frames[1]"),
        ),
        (
            "empty video frame",
            ask(vec![video(vec![vec![]], 1)]),
            Invalid("messages[0].content[0].video.frames[0]"),
        ),
        (
            "max_tiles beyond the cap",
            ask(vec![proto::Content {
                part: Some(proto::content::Part::Image(proto::Image {
                    data: png.clone(),
                    max_tiles: 1000,
                    min_tiles: 0,
                    ..Default::default()
                })),
            }]),
            Invalid("messages[0].content[0].image.max_tiles"),
        ),
        (
            "empty role",
            greedy(
                vec![proto::Message {
                    role: String::new(),
                    content: vec![text("hi")],
                }],
                2,
            ),
            Invalid("messages[0].role"),
        ),
        (
            "temperature NaN",
            sampling(|s| s.temperature = f32::NAN),
            Invalid("sampling.temperature"),
        ),
        (
            "temperature infinite",
            sampling(|s| s.temperature = f32::INFINITY),
            Invalid("sampling.temperature"),
        ),
        (
            "temperature 1e9",
            sampling(|s| s.temperature = 1e9),
            Invalid("sampling.temperature"),
        ),
        (
            "negative top_k",
            sampling(|s| s.top_k = -5),
            Invalid("sampling.top_k"),
        ),
        (
            "min_p above one",
            sampling(|s| s.min_p = 2.0),
            Invalid("sampling.min_p"),
        ),
        (
            "negative repeat_penalty",
            sampling(|s| s.repeat_penalty = -1.0),
            Invalid("sampling.repeat_penalty"),
        ),
        (
            "presence_penalty 1e9",
            sampling(|s| s.presence_penalty = 1e9),
            Invalid("sampling.presence_penalty"),
        ),
        (
            "huge top_k and any seed",
            sampling(|s| {
                s.temperature = 0.8;
                s.top_k = i32::MAX;
                s.seed = Some(u64::MAX)
            }),
            Ok,
        ),
        (
            "top_logprobs beyond the vocabulary",
            proto::GenerateRequest {
                top_logprobs: 1_000_000,
                ..ask(vec![text("hi")])
            },
            Invalid("top_logprobs"),
        ),
        (
            // u32::MAX itself means "until the context is full" (the HTTP
            // API's absent max_tokens); one less is just too many.
            "max_new_tokens u32::MAX - 1",
            greedy(vec![user(vec![text("hi")])], u32::MAX - 1),
            Invalid("max_new_tokens"),
        ),
        (
            "17 stop strings",
            proto::GenerateRequest {
                stop: vec!["x".into(); 17],
                ..ask(vec![text("hi")])
            },
            Invalid("stop"),
        ),
        (
            "300-byte stop string",
            proto::GenerateRequest {
                stop: vec!["y".repeat(300)],
                ..ask(vec![text("hi")])
            },
            Invalid("stop[0]"),
        ),
        (
            "1000-byte request_id",
            proto::GenerateRequest {
                request_id: "r".repeat(1000),
                ..ask(vec![text("hi")])
            },
            Invalid("request_id"),
        ),
        (
            "oversize message",
            ask(vec![img(vec![7u8; 33 << 20])]),
            Status(Code::OutOfRange),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_request_gets_a_clear_status_and_the_server_keeps_serving() {
    let server = start(tiny_config()).await;
    let mut client = server.client().await;
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (name, request, expect) in cases {
        let outcome = match client.generate(request).await {
            Ok(stream) => collect(stream.into_inner()).await.map(|_| ()),
            Err(status) => Err(status),
        };
        let ok = match (&expect, &outcome) {
            (Expect::Ok, Ok(())) => true,
            (Expect::Invalid(field), Err(s)) => {
                s.code() == Code::InvalidArgument && s.message().starts_with(&format!("{field}:"))
            }
            (Expect::Status(code), Err(s)) => s.code() == *code,
            _ => false,
        };
        if !ok {
            failures.push(format!("{name}: got {outcome:?}"));
        }
        let next = generate_ok(
            &mut client,
            greedy(vec![user(vec![text("Hello! Who are you?")])], 2),
        )
        .await;
        assert_eq!(next.ids.len(), 2, "{name}: the server stopped serving");
    }
    server.stop().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_at_the_batch_and_context_edges() {
    let mut config = tiny_config();
    config.n_ctx = 512;
    config.n_batch = 64;
    config.n_ubatch = 64;
    let server = start(config).await;
    let mut client = server.client().await;
    // Find texts whose prompts are exactly n_batch and n_batch + 1 tokens.
    let mut by_len = std::collections::BTreeMap::new();
    for words in 1..160 {
        let t = "cat ".repeat(words);
        let n = client
            .count_tokens(proto::CountTokensRequest {
                messages: vec![user(vec![text(&t)])],
            })
            .await
            .unwrap()
            .into_inner()
            .prompt_tokens;
        by_len.entry(n).or_insert(t);
    }
    for target in [64u32, 65, 128, 129] {
        let t = by_len
            .get(&target)
            .unwrap_or_else(|| panic!("no prompt of {target} tokens"));
        let got = generate_ok(&mut client, greedy(vec![user(vec![text(t)])], 4)).await;
        assert_eq!(got.ids.len(), 4, "prompt of {target} tokens");
    }
    // prompt + max_new_tokens exactly at the context: served; one more: refused.
    let t = by_len.get(&64).unwrap();
    let got = generate_ok(&mut client, greedy(vec![user(vec![text(t)])], 512 - 64)).await;
    assert_eq!(got.ids.len(), 448);
    let status = client
        .generate(greedy(vec![user(vec![text(t)])], 512 - 64 + 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("max_new_tokens:"),
        "{}",
        status.message()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoder_memory_is_bounded_by_config() {
    let server = start(internvl_grpc::config::Config {
        max_image_alloc_mb: 1,
        ..tiny_config()
    })
    .await;
    let mut client = server.client().await;
    // 1000 × 1000 RGB needs 3 MB to decode, over the 1 MiB allowed.
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(1000, 1000)
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let status = client
        .generate(greedy(
            vec![user(vec![image(png.into_inner()), text("What is this?")])],
            2,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("messages[0].content[0].image"),
        "{}",
        status.message()
    );
    // A small image still decodes.
    let small = generate_ok(
        &mut client,
        greedy(
            vec![user(vec![
                image(image_bytes("small_64x48.png")),
                text("Hi"),
            ])],
            2,
        ),
    )
    .await;
    assert_eq!(small.ids.len(), 2);
    server.stop().await;
}

/// Sends already-encoded request bytes, which a typed client cannot get wrong.
#[derive(Default)]
struct RawBytes;

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = proto::GenerateResponse;
    type Encoder = RawBytes;
    type Decoder = tonic_prost::ProstDecoder<proto::GenerateResponse>;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> Self::Decoder {
        Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_argument() {
    use prost::Message as _;
    let server = start(tiny_config()).await;
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/internvl.v1.InternVL/Generate");
    let valid = ask(vec![text("marker!!")]).encode_to_vec();
    let at = valid
        .windows(8)
        .position(|w| w == b"marker!!")
        .expect("text is in the encoding");
    let mut bad_utf8 = valid.clone();
    bad_utf8[at..at + 2].copy_from_slice(&[0xff, 0xfe]);
    let truncated = valid[..valid.len() - 3].to_vec();
    for (name, bytes, names) in [
        ("invalid UTF-8 in text", bad_utf8, "Content.part"),
        // Cut inside the last field: prost names where it stopped.
        ("truncated message", truncated, "GenerateRequest."),
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let result = grpc
            .server_streaming(tonic::Request::new(bytes), path.clone(), RawBytes)
            .await;
        let status = match result {
            Ok(stream) => match collect(stream.into_inner()).await {
                Ok(_) => panic!("{name}: served"),
                Err(status) => status,
            },
            Err(status) => status,
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().contains(names), "{name}: {status:?}");
    }
    let mut client = server.client().await;
    let next = generate_ok(&mut client, ask(vec![text("Hello! Who are you?")])).await;
    assert_eq!(next.ids.len(), 2);
    server.stop().await;
}
