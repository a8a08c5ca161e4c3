//! A fake Hugging Face hub on loopback: what hf-hub's real client asks of
//! the real one, for `pull` and `--model NAME` without a network.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use sha2::{Digest, Sha256};

/// What the fake hub serves under one URL path: the bytes, and the content
/// hash it announces (the hub's ETag of an LFS file).
#[derive(Clone)]
pub struct Served {
    pub bytes: Vec<u8>,
    pub sha256: String,
}

/// A fake hub: `GET /{repo}/resolve/main/{file}` with the headers hf-hub
/// reads, honouring `Range`; it records every range asked for.
pub struct FakeHub {
    pub url: String,
    pub ranges: Arc<Mutex<Vec<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

pub fn hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

pub async fn fake_hub(files: HashMap<String, Served>) -> FakeHub {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let files = Arc::new(files);
    let seen = ranges.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (files, seen) = (files.clone(), seen.clone());
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let response = answer(&files, &seen, &request);
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    eprintln!("fake hub connection: {e}");
                }
            });
        }
    });
    FakeHub {
        url,
        ranges,
        _task: task,
    }
}

fn answer(
    files: &HashMap<String, Served>,
    seen: &Mutex<Vec<String>>,
    request: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let Some(served) = files.get(request.uri().path()) else {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"not found")))
            .unwrap();
    };
    let total = served.bytes.len();
    let range = request
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    seen.lock()
        .unwrap()
        .push(format!("{} {range}", request.uri().path()));
    let (start, end) = match range.strip_prefix("bytes=").and_then(|r| r.split_once('-')) {
        Some((a, b)) => (
            a.parse::<usize>().unwrap_or(0),
            b.parse::<usize>().map_or(total - 1, |e| e.min(total - 1)),
        ),
        None => (0, total - 1),
    };
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header("x-repo-commit", "0123456789abcdef0123456789abcdef01234567")
        .header("etag", format!("\"{}\"", served.sha256))
        .header("x-linked-etag", format!("\"{}\"", served.sha256))
        .header("content-range", format!("bytes {start}-{end}/{total}"))
        .body(Full::new(Bytes::copy_from_slice(
            &served.bytes[start..=end],
        )))
        .unwrap()
}

/// Where the hub serves `file` of `repo`.
pub fn url_path(repo: &str, file: &str) -> String {
    format!("/{repo}/resolve/main/{file}")
}

/// Honest bytes: announced with their own hash.
pub fn honest(bytes: &[u8]) -> Served {
    Served {
        bytes: bytes.to_vec(),
        sha256: hex(bytes),
    }
}
