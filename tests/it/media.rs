//! Images by URL: a loopback HTTP server, explicitly allowed in
//! `media_allow`, serves them; the same image by URL, by `data:` URL, by
//! `file://` under `media_root` and by bytes gives the same tokens. What the
//! policy refuses is refused naming the field and the key: a name that
//! resolves to loopback but is not itself listed, a redirect to one, a
//! `file://` outside the root (by `..` and by a symlink), a body over the
//! cap (the server sees the service stop reading), a server that trickles
//! past the fetch timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tonic::Code;

use crate::common;
use common::*;
use internvl_grpc::service::proto;

const HUGE_TOTAL: u64 = 64 * 1024 * 1024;
/// `/huge` has not finished writing.
const UNFINISHED: u64 = u64::MAX;

/// A loopback HTTP/1.1 server with one route per case; answers one request
/// per connection. Returns its port and how many body bytes its last
/// `/huge` wrote before the reader left ([`UNFINISHED`] until then).
async fn media_server(image: Arc<Vec<u8>>) -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let huge_written = Arc::new(AtomicU64::new(UNFINISHED));
    let written_by_huge = huge_written.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let image = image.clone();
            let huge_written = written_by_huge.clone();
            tokio::spawn(async move {
                let Some(head) = read_request_head(&mut socket).await else {
                    return;
                };
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let ok = |len: usize| {
                    format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n")
                };
                match path.as_str() {
                    "/image.png" => {
                        let _ = socket.write_all(ok(image.len()).as_bytes()).await;
                        let _ = socket.write_all(&image).await;
                    }
                    "/redirect-in" => {
                        let _ = socket
                            .write_all(b"HTTP/1.1 302 Found\r\nlocation: /image.png\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                    }
                    "/redirect-out" => {
                        let to = format!("http://localhost:{port}/image.png");
                        let _ = socket
                            .write_all(format!("HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes())
                            .await;
                    }
                    "/huge" => {
                        // No length announced: the service finds out by reading.
                        let _ = socket
                            .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
                            .await;
                        let chunk = vec![0u8; 256 * 1024];
                        let mut written = 0;
                        while written < HUGE_TOTAL {
                            if socket.write_all(&chunk).await.is_err() {
                                break;
                            }
                            written += chunk.len() as u64;
                        }
                        huge_written.store(written, Ordering::SeqCst);
                    }
                    "/trickle" => {
                        let _ = socket.write_all(ok(image.len()).as_bytes()).await;
                        for b in image.iter() {
                            if socket.write_all(&[*b]).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    _ => {
                        let _ = socket
                            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                            .await;
                    }
                }
            });
        }
    });
    (port, huge_written)
}

fn image_url(url: &str) -> proto::Content {
    proto::Content {
        part: Some(proto::content::Part::Image(proto::Image {
            url: url.to_string(),
            ..Default::default()
        })),
    }
}

fn ask(part: proto::Content) -> proto::GenerateRequest {
    greedy(vec![user(vec![part, text("What is shown?")])], 6)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_by_url_answer_as_by_bytes_and_refusals_name_the_field_and_key() {
    let bytes = image_bytes("small_64x48.png");
    let (port, huge_written) = media_server(Arc::new(bytes.clone())).await;
    let scratch = tempfile::Builder::new()
        .prefix("internvl-media-it-")
        .tempdir()
        .unwrap();
    let base = scratch.path();
    let root = base.join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("small.png"), &bytes).unwrap();
    std::fs::write(base.join("outside.png"), &bytes).unwrap();
    let _ = std::fs::remove_file(root.join("link.png"));
    std::os::unix::fs::symlink(base.join("outside.png"), root.join("link.png")).unwrap();

    let mut config = tiny_config();
    config.media_allow = vec![format!("http://127.0.0.1:{port}/")];
    config.media_root = Some(root.clone());
    config.media_max_mb = 2;
    config.media_fetch_timeout_secs = 1.5;
    let server = start(config).await;
    let mut client = server.client().await;

    let info = client
        .get_model_info(proto::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.media_schemes, ["data", "http", "file"]);

    // The same image four ways: the same tokens.
    let by_bytes = generate_ok(&mut client, ask(image(bytes.clone()))).await;
    let data_url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    );
    for url in [
        format!("http://127.0.0.1:{port}/image.png"),
        format!("http://127.0.0.1:{port}/redirect-in"),
        data_url,
        format!("file://{}", root.join("small.png").display()),
    ] {
        let got = generate_ok(&mut client, ask(image_url(&url))).await;
        assert_eq!(got.ids, by_bytes.ids, "{url}");
        let done = got.done.unwrap().usage.unwrap();
        assert!(done.image_tokens > 0, "{url}");
    }

    let field = "messages[0].content[0].image";
    let refused = |url: String, code: Code, words: &'static [&'static str]| (url, code, words);
    for (url, code, words) in [
        // A name that resolves to loopback is not the listed address.
        refused(
            format!("http://localhost:{port}/image.png"),
            Code::PermissionDenied,
            &["media_allow"],
        ),
        refused(
            format!("http://127.0.0.1:{port}/redirect-out"),
            Code::PermissionDenied,
            &["media_allow", "localhost"],
        ),
        refused(
            format!("http://127.0.0.1:{port}/huge"),
            Code::InvalidArgument,
            &["media_max_mb"],
        ),
        refused(
            format!("http://127.0.0.1:{port}/trickle"),
            Code::DeadlineExceeded,
            &["media_fetch_timeout_secs"],
        ),
        refused(
            format!("http://127.0.0.1:{port}/missing"),
            Code::FailedPrecondition,
            &["404"],
        ),
        refused(
            format!("file://{}/../outside.png", root.display()),
            Code::PermissionDenied,
            &["media_root"],
        ),
        refused(
            format!("file://{}", root.join("link.png").display()),
            Code::PermissionDenied,
            &["media_root"],
        ),
        refused(
            "ftp://127.0.0.1/x.png".into(),
            Code::InvalidArgument,
            &["scheme"],
        ),
        refused(
            "data:image/png;base64,AAAA".into(),
            Code::InvalidArgument,
            &["image.url", "image format"],
        ),
    ] {
        let status = client.generate(ask(image_url(&url))).await.unwrap_err();
        assert_eq!(status.code(), code, "{url}: {status:?}");
        assert!(
            status.message().contains(field),
            "{url}: {}",
            status.message()
        );
        for word in words {
            assert!(
                status
                    .message()
                    .to_lowercase()
                    .contains(&word.to_lowercase()),
                "{url}: {word} in {}",
                status.message()
            );
        }
    }
    // The service stopped reading the oversized body: the server could not
    // write it all.
    let mut written = UNFINISHED;
    for _ in 0..200 {
        written = huge_written.load(Ordering::SeqCst);
        if written != UNFINISHED {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        written < HUGE_TOTAL,
        "{written} bytes written of {HUGE_TOTAL}"
    );

    // Both sources at once.
    let both = proto::Content {
        part: Some(proto::content::Part::Image(proto::Image {
            data: bytes.clone(),
            url: format!("http://127.0.0.1:{port}/image.png"),
            ..Default::default()
        })),
    };
    let status = client.generate(ask(both)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains(field), "{}", status.message());

    // CountTokens fetches the same way.
    let counted = client
        .count_tokens(proto::CountTokensRequest {
            messages: vec![user(vec![
                image_url(&format!("http://127.0.0.1:{port}/image.png")),
                text("x"),
            ])],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(counted.image_tokens > 0);

    // A Python grpcio client sends an image URL: the tokens of the bytes.
    let stubs = python_stubs();
    let summary = run_python_client(
        "generate_client.py",
        vec![
            stubs.path().display().to_string(),
            server.addr.to_string(),
            format!("http://127.0.0.1:{port}/image.png"),
        ],
    )
    .await;
    let want = generate_ok(
        &mut client,
        greedy(
            vec![user(vec![image(bytes.clone()), text("What is shown?")])],
            12,
        ),
    )
    .await;
    assert_eq!(ids(&summary["ids"]), want.ids);
    assert!(summary["image_tokens"].as_u64().unwrap() > 0);

    // Still serving.
    generate_ok(&mut client, ask(image(bytes))).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_media_allow_no_remote_url_is_fetched() {
    let (port, _) = media_server(Arc::new(image_bytes("small_64x48.png"))).await;
    let server = start(tiny_config()).await;
    let mut client = server.client().await;
    let status = client
        .generate(ask(image_url(&format!(
            "http://127.0.0.1:{port}/image.png"
        ))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("media_allow"),
        "{}",
        status.message()
    );
    let info = client
        .get_model_info(proto::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.media_schemes, ["data"]);
    server.stop().await;
}

/// An allowed name that resolves to a loopback address is refused at the
/// lookup (the service never connects to it): only an entry naming the
/// address itself allows a private one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_name_resolving_to_loopback_is_not_connected_to() {
    let (port, _) = media_server(Arc::new(image_bytes("small_64x48.png"))).await;
    let mut config = tiny_config();
    config.media_allow = vec![format!("http://localhost:{port}/")];
    let server = start(config).await;
    let mut client = server.client().await;
    let status = client
        .generate(ask(image_url(&format!(
            "http://localhost:{port}/image.png"
        ))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("loopback")
            && status
                .message()
                .contains("messages[0].content[0].image.url"),
        "{}",
        status.message()
    );
    server.stop().await;
}

/// A request's fetches together bring no more than one message may carry
/// inline (`max_message_bytes`), whatever each URL may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_fetches_together_stay_within_max_message_bytes() {
    let bytes = image_bytes("small_64x48.png");
    let (port, _) = media_server(Arc::new(bytes.clone())).await;
    let mut config = tiny_config();
    config.media_allow = vec![format!("http://127.0.0.1:{port}/")];
    config.media_max_mb = 8;
    config.max_message_bytes = 1024 * 1024;
    let server = start(config).await;
    let mut client = server.client().await;
    let status = client
        .generate(ask(image_url(&format!("http://127.0.0.1:{port}/huge"))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("max_message_bytes"),
        "{}",
        status.message()
    );
    // Under the total, a fetch still works.
    generate_ok(
        &mut client,
        ask(image_url(&format!("http://127.0.0.1:{port}/image.png"))),
    )
    .await;
    server.stop().await;
}
