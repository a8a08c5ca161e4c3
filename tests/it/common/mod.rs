//! Shared test harness: the real server on 127.0.0.1:0, real gRPC clients,
//! and the reference data of the tiny fixture model.
#![allow(dead_code)]

pub mod hub;
pub mod oci;
pub mod parity;
pub mod probe;
pub mod rpc;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use internvl_grpc::config::Config;
use internvl_grpc::service::proto::{self, intern_vl_client::InternVlClient};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// HTTP/2 without tonic's channel: see [`TestServer::client_without_local_deadline`].
pub type PlainHttp2 = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tonic::body::Body,
>;

/// A running server; shut down (and joined) on drop of the runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    pub handle: JoinHandle<Result<(), internvl_grpc::ServeError>>,
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> InternVlClient<Channel> {
        InternVlClient::connect(self.url())
            .await
            .expect("connect")
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// A client that sends `grpc-timeout` without timing the call itself.
    /// tonic's channel races every call against its own copy of that timer
    /// and answers CANCELLED ("Timeout expired") when it wins, which hides
    /// what the server answered; a proxy between caller and server would
    /// have passed on the server's status, and this client does too.
    pub fn client_without_local_deadline(&self) -> InternVlClient<PlainHttp2> {
        let http2 =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http();
        InternVlClient::with_origin(http2, self.url().parse().expect("url"))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub async fn health(&self) -> HealthClient<Channel> {
        let channel = Channel::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        HealthClient::new(channel)
    }

    /// Asks the server to shut down (drain) without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            tx.send(()).expect("server still running");
        }
    }

    /// Asks the server to stop and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            tx.send(()).expect("server still running");
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.handle)
            .await
            .expect("server stops")
            .expect("server task")
            .expect("server result");
    }
}

/// One tiny converter-made model with its reference data: the files as
/// llama.cpp's converter writes them, like every published InternVL GGUF.
pub struct Family {
    /// Name in messages.
    pub name: &'static str,
    /// Folder under `tests/fixtures/`.
    pub dir: &'static str,
    /// The catalog name that serves it.
    pub preset: &'static str,
    /// Language model file in `dir`.
    pub model: &'static str,
    /// mmproj file in `dir`.
    pub mmproj: &'static str,
}

/// InternVL3 (Qwen2 language model).
pub const INTERNVL3: Family = Family {
    name: "InternVL3",
    dir: "tiny-internvl",
    preset: "tiny",
    model: "tiny-internvl3-f32.gguf",
    mmproj: "mmproj-tiny-internvl3-f32.gguf",
};

/// InternVL3.5 (Qwen3 language model).
pub const INTERNVL35: Family = Family {
    name: "InternVL3.5",
    dir: "tiny-internvl35",
    preset: "tiny-internvl3.5",
    model: "tiny-internvl35-f32.gguf",
    mmproj: "mmproj-tiny-internvl35-f32.gguf",
};

/// Both families, for tests that run the same protocol on each.
pub const FAMILIES: [&Family; 2] = [&INTERNVL3, &INTERNVL35];

impl Family {
    pub fn fixture(&self, relative: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(self.dir)
            .join(relative)
    }

    pub fn model_path(&self) -> PathBuf {
        self.fixture(self.model)
    }

    pub fn mmproj_path(&self) -> PathBuf {
        self.fixture(self.mmproj)
    }

    pub fn reference(&self) -> Value {
        serde_json::from_slice(
            &std::fs::read(self.fixture("reference.json")).expect("reference.json"),
        )
        .expect("json")
    }

    pub fn npy(&self, relative: &str) -> Vec<f32> {
        let array: ndarray::ArrayD<f32> =
            ndarray_npy::read_npy(self.fixture(relative)).expect("npy");
        array.iter().copied().collect()
    }

    /// This model, 1 thread, derived files in the test cache. One thread
    /// because the harness runs two tests at once on two cores, and ggml's
    /// threads spin while they wait: two servers of 2 threads each made
    /// `drain::` and `cancel::` take 45 s instead of 4 s, and a 3000-token
    /// stream ran past a 60 s grace in CI (stop 30). With
    /// `TEST_INTERNVL_FROM_ENV` set, `INTERNVL_*` variables change the other
    /// keys, as they do for the server: how `benches/gpu_check.sh` runs the
    /// same parity protocol with other settings on a GPU, without a rebuild.
    pub fn config(&self) -> Config {
        let base = Config {
            model: self.preset.into(),
            threads: 1,
            cache_dir: Some(test_cache_dir()),
            // The server runs inside this test binary; FFmpeg's confinement
            // is the server binary's subcommand.
            media_confine_program: Some(env!("CARGO_BIN_EXE_internvl-grpc").into()),
            ..Config::default()
        };
        if std::env::var_os("TEST_INTERNVL_FROM_ENV").is_none() {
            return base;
        }
        let fixed = [
            ("model".to_string(), base.model.clone()),
            ("threads".to_string(), base.threads.to_string()),
            (
                "cache_dir".to_string(),
                test_cache_dir().display().to_string(),
            ),
            (
                "media_confine_program".to_string(),
                env!("CARGO_BIN_EXE_internvl-grpc").to_string(),
            ),
        ];
        Config::load(None, &fixed).expect("INTERNVL_* settings")
    }
}

/// Where test servers keep derived files (the corrected mmproj): one folder
/// for every test, so starts racing on it are part of what is tested.
pub fn test_cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("internvl-cache")
}

pub fn fixture_dir() -> PathBuf {
    INTERNVL3.fixture("")
}

pub fn fixture(relative: &str) -> PathBuf {
    INTERNVL3.fixture(relative)
}

/// An input image; the same bytes in both families' fixtures.
pub fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(&format!("images/{name}"))).expect("fixture image")
}

pub fn reference() -> Value {
    INTERNVL3.reference()
}

/// The tiny InternVL3 model, 1 thread.
pub fn tiny_config() -> Config {
    INTERNVL3.config()
}

/// Starts the server and waits until health says SERVING.
pub async fn start(config: Config) -> TestServer {
    let server = start_unready(config).await;
    let mut health = server.health().await;
    for _ in 0..600 {
        let status = health
            .check(HealthCheckRequest {
                service: "internvl.v1.InternVL".into(),
            })
            .await
            .map(|r| r.into_inner().status)
            .ok();
        if status == Some(ServingStatus::Serving as i32) {
            return server;
        }
        assert!(!server.handle.is_finished(), "server ended while loading");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server never became ready");
}

/// Starts the server without waiting for the model.
pub async fn start_unready(config: Config) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(internvl_grpc::run(config, listener, async move {
        // A dropped sender also means stop.
        rx.await.ok();
    }));
    TestServer {
        addr,
        shutdown: Some(tx),
        handle,
    }
}

pub fn text(t: &str) -> proto::Content {
    proto::Content {
        part: Some(proto::content::Part::Text(t.into())),
    }
}

pub fn image(data: Vec<u8>) -> proto::Content {
    proto::Content {
        part: Some(proto::content::Part::Image(proto::Image {
            data,
            max_tiles: 0,
            min_tiles: 0,
            ..Default::default()
        })),
    }
}

pub fn user(content: Vec<proto::Content>) -> proto::Message {
    proto::Message {
        role: "user".into(),
        content,
    }
}

/// Converts a reference chat case's messages into proto messages.
pub fn reference_messages(case: &Value) -> Vec<proto::Message> {
    case["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            let role = m["role"].as_str().expect("role").to_string();
            let content = match &m["content"] {
                Value::String(s) => vec![text(s)],
                Value::Array(parts) => parts
                    .iter()
                    .map(|p| match p["type"].as_str().expect("type") {
                        "text" => text(p["text"].as_str().expect("text")),
                        "image" => image(image_bytes(p["image"].as_str().expect("image"))),
                        "video" => proto::Content {
                            part: Some(proto::content::Part::Video(proto::Video {
                                frames: p["frames"]
                                    .as_array()
                                    .expect("frames")
                                    .iter()
                                    .map(|f| image_bytes(f.as_str().expect("frame")))
                                    .collect(),
                                // The fixture's `fps` is the frames' own rate
                                // (metadata); the reference sampled 8 by count.
                                num_frames: 0,
                                ..Default::default()
                            })),
                        },
                        other => panic!("unknown part type {other}"),
                    })
                    .collect(),
                other => panic!("unexpected content {other}"),
            };
            proto::Message { role, content }
        })
        .collect()
}

pub fn ids(value: &Value) -> Vec<i32> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_i64().expect("int") as i32)
        .collect()
}

pub fn npy(relative: &str) -> Vec<f32> {
    INTERNVL3.npy(relative)
}

/// Collects a Generate stream: (text, token ids, per-token top alternatives, done).
pub struct Collected {
    pub text: String,
    pub ids: Vec<i32>,
    pub tokens: Vec<proto::Token>,
    pub done: Option<proto::Done>,
}

pub async fn collect(
    mut stream: tonic::Streaming<proto::GenerateResponse>,
) -> Result<Collected, tonic::Status> {
    let mut out = Collected {
        text: String::new(),
        ids: Vec::new(),
        tokens: Vec::new(),
        done: None,
    };
    while let Some(msg) = stream.message().await? {
        match msg.event.expect("event") {
            proto::generate_response::Event::Delta(d) => {
                assert!(out.done.is_none(), "delta after done");
                out.text.push_str(&d.text);
                out.ids.extend(d.tokens.iter().map(|t| t.id));
                out.tokens.extend(d.tokens);
            }
            proto::generate_response::Event::Done(d) => {
                assert!(out.done.is_none(), "two done events");
                out.done = Some(d);
            }
        }
    }
    Ok(out)
}

/// A Generate call that must succeed, collected.
pub async fn generate_ok(
    client: &mut InternVlClient<Channel>,
    request: proto::GenerateRequest,
) -> Collected {
    collect(
        client
            .generate(request)
            .await
            .expect("generate accepted")
            .into_inner(),
    )
    .await
    .expect("stream completes")
}

pub fn greedy(messages: Vec<proto::Message>, max_new_tokens: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        messages,
        sampling: Some(proto::SamplingParams::default()),
        max_new_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Greedy with the two best alternatives, to see near-ties.
pub fn greedy_with_margins(messages: Vec<proto::Message>, n: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        top_logprobs: 2,
        ..greedy(messages, n)
    }
}

/// How many leading tokens must agree: up to the first position where the
/// two best candidates are within `margin` (batch shapes may round them apart).
pub fn decisive_prefix(tokens: &[proto::Token], margin: f32) -> usize {
    tokens
        .iter()
        .position(|t| t.top.len() >= 2 && (t.top[0].logprob - t.top[1].logprob).abs() < margin)
        .unwrap_or(tokens.len())
}

/// A PNG whose IHDR claims `width` × `height` and carries no pixels.
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = {
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(image::RgbImage::new(1, 1))
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
        out.into_inner()
    };
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32fast::hash(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// The Python that has the client tests' packages: `.venv/` made by
/// `scripts/setup`, else the system's. Fails at once, in one line, when the
/// packages are missing.
pub fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join(".venv/bin/python");
    let python = if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    };
    let ready = std::process::Command::new(&python)
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ready {
        panic!(
            "this test needs Python with grpcio and grpcio-tools ({} has none): run scripts/setup",
            python.display()
        );
    }
    python
}

/// Python grpcio stubs generated from `proto/` into a fresh directory,
/// removed when the returned handle drops.
pub fn python_stubs() -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::Builder::new()
        .prefix("internvl-py-stubs-")
        .tempdir()
        .unwrap();
    let stubs = dir.path();
    let protoc = std::process::Command::new(python())
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto"))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(root.join("proto/internvl/v1/internvl.proto"))
        .output()
        .expect("python runs");
    assert!(
        protoc.status.success(),
        "grpc_tools.protoc failed: {}",
        String::from_utf8_lossy(&protoc.stderr)
    );
    dir
}

/// Runs `tests/python/<script>` with `args` in its own process (off the async
/// runtime), requires success, and parses the JSON summary it prints.
pub async fn run_python_client(script: &str, args: Vec<String>) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let python = python();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(&script)
            .args(&args)
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("json summary")
}

/// Every Delta's arrival time, and the Done's, of one stream.
pub struct Timeline {
    pub arrivals: Vec<std::time::Instant>,
    /// None when the test hung up first (see `spawn_timeline`'s `stop`).
    pub done: Option<std::time::Instant>,
    pub ids: Vec<i32>,
}

impl Timeline {
    /// Tokens that arrived after `t`.
    pub fn arrived_after(&self, t: std::time::Instant) -> usize {
        self.arrivals.iter().filter(|&&a| a > t).count()
    }
}

/// Streams `request` in a task, recording arrivals; `started` fires after the
/// fifth token. Once `stop` turns true the task reads one more token (so a
/// stream still running shows a token after that moment) and hangs up: tests
/// of "streams keep running while X" end when X is seen, not after a fixed
/// number of tokens that a slow machine takes minutes to decode.
pub fn spawn_timeline(
    mut client: InternVlClient<Channel>,
    request: proto::GenerateRequest,
    started: Option<tokio::sync::mpsc::Sender<()>>,
    mut stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> tokio::task::JoinHandle<Timeline> {
    tokio::spawn(async move {
        let mut stream = client.generate(request).await.unwrap().into_inner();
        let mut t = Timeline {
            arrivals: Vec::new(),
            done: None,
            ids: Vec::new(),
        };
        // How many tokens had arrived when `stop` was seen.
        let mut stopped_at: Option<usize> = None;
        loop {
            let next = match stop.as_mut().filter(|_| stopped_at.is_none()) {
                // `Streaming::message` is cancel safe.
                Some(stop) => tokio::select! {
                    next = stream.message() => next,
                    _ = stop.wait_for(|&s| s) => {
                        stopped_at = Some(t.arrivals.len());
                        continue;
                    }
                },
                None => stream.message().await,
            };
            let Some(msg) = next.unwrap() else { break };
            match msg.event.unwrap() {
                proto::generate_response::Event::Delta(d) => {
                    t.arrivals.push(std::time::Instant::now());
                    t.ids.extend(d.tokens.iter().map(|x| x.id));
                    if t.arrivals.len() == 5 {
                        if let Some(started) = &started {
                            started.send(()).await.unwrap();
                        }
                    }
                    if stopped_at.is_some_and(|n| t.arrivals.len() > n) {
                        break;
                    }
                }
                proto::generate_response::Event::Done(_) => {
                    t.done = Some(std::time::Instant::now())
                }
            }
        }
        t
    })
}

/// A loopback port nothing listens on now (bound, noted, released), for a
/// process that must be told its port.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The Prometheus text a metrics endpoint serves, over plain HTTP.
pub async fn scrape_metrics(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// `internvl-grpc serve` of the tiny InternVL3 (the real binary, its own
/// process) with its cache, stdin closed; the caller adds where it listens
/// and its settings, and spawns it.
pub fn tiny_serve_command() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_internvl-grpc"));
    command
        .arg("serve")
        .arg("--model")
        .arg(INTERNVL3.model_path())
        .arg("--mmproj")
        .arg(INTERNVL3.mmproj_path())
        .arg("--cache-dir")
        .arg(test_cache_dir())
        .stdin(std::process::Stdio::null());
    command
}

/// [`tiny_serve_command`] on `listen` with its metrics on `metrics`.
pub fn serve_tiny(listen: SocketAddr, metrics: SocketAddr) -> std::process::Command {
    let mut command = tiny_serve_command();
    command
        .args(["--listen", &listen.to_string()])
        .args(["--metrics-listen", &metrics.to_string()]);
    command
}

/// Waits until the server process at `url` answers SERVING (within
/// `bound`, without exiting), then opens a health Watch and checks that its
/// first status is SERVING too. Failures show the server's `stderr` file.
pub async fn serving_watch(
    url: &str,
    server: &mut std::process::Child,
    stderr: &Path,
    bound: Duration,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let started = std::time::Instant::now();
    let mut health = loop {
        if let Ok(channel) = Channel::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
        {
            let mut health = HealthClient::new(channel);
            let status = health
                .check(HealthCheckRequest::default())
                .await
                .map(|r| r.into_inner().status)
                .ok();
            if status == Some(ServingStatus::Serving as i32) {
                break health;
            }
        }
        let log = std::fs::read_to_string(stderr).unwrap_or_default();
        assert!(started.elapsed() < bound, "never SERVING:\n{log}");
        assert!(
            server.try_wait().unwrap().is_none(),
            "exited while loading:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    watch
}

/// Runs `tests/node/<script>` with `args` and parses the JSON it prints;
/// fails at once, in one line, when Node or the `package` that
/// `scripts/setup` installs for it is missing.
pub async fn run_node_client(script: &str, package: &str, args: Vec<String>) -> Value {
    let node_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    if !node_dir.join("node_modules").join(package).exists() {
        panic!("this test needs tests/node/node_modules ({package}): run scripts/setup");
    }
    let script = node_dir.join(script);
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(script)
            .args(&args)
            .output()
    })
    .await
    .expect("node task")
    .unwrap_or_else(|e| panic!("this test needs node ({e}): run scripts/setup"));
    assert!(
        output.status.success(),
        "node client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the node client prints JSON")
}

/// A loopback HTTP/1.1 server answering every request with `body`; its port.
pub async fn serve_bytes(body: std::sync::Arc<Vec<u8>>) -> u16 {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                if read_request_head(&mut socket).await.is_none() {
                    return;
                }
                let ok = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(ok.as_bytes()).await;
                let _ = socket.write_all(&body).await;
            });
        }
    });
    port
}

/// An HTTP/1.1 request's head, read byte by byte up to its blank line (the
/// loopback servers answer one request per connection); `None` if the
/// client left first.
pub async fn read_request_head(socket: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if socket.read(&mut byte).await.unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}
