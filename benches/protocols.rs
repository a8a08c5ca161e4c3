//! What each protocol adds per streamed token: the same greedy generation
//! (one stream, `INTERNVL_BENCH_TOKENS` tokens past the end-of-generation
//! token) over gRPC (tonic client) and over the OpenAI-compatible HTTP API
//! (server-sent events, HTTP/1.1, reqwest), from one in-process server,
//! alternating, `INTERNVL_BENCH_REPEATS` times each. Medians of the time
//! from the request to the last token, per token.
//!
//! `cargo bench --bench protocols` (the bundled tiny model, whose decode is
//! fast, so the transport's share shows), or with `INTERNVL_BENCH_MODEL` and
//! `INTERNVL_BENCH_MMPROJ`. Knobs: INTERNVL_BENCH_TOKENS (1000),
//! INTERNVL_BENCH_REPEATS (9), INTERNVL_BENCH_THREADS.

mod common;
#[path = "common/server.rs"]
mod server;

use std::sync::Arc;
use std::time::Instant;

use internvl_grpc::config::Config;
use internvl_grpc::service::proto::{self, intern_vl_client::InternVlClient};

use common::{env_or, median, model_pair, threads};
use server::{serve, Served};

const PROMPT: &str = "Describe the history of the bicycle in a few sentences.";

async fn over_grpc(client: &mut InternVlClient<tonic::transport::Channel>, n: u32) -> (f64, u32) {
    let request = proto::GenerateRequest {
        messages: vec![proto::Message {
            role: "user".into(),
            content: vec![proto::Content {
                part: Some(proto::content::Part::Text(PROMPT.into())),
            }],
        }],
        sampling: Some(proto::SamplingParams::default()),
        max_new_tokens: n,
        ignore_eos: true,
        ..Default::default()
    };
    let started = Instant::now();
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let mut tokens = 0;
    while let Some(message) = stream.message().await.unwrap() {
        if let Some(proto::generate_response::Event::Delta(d)) = message.event {
            tokens += d.tokens.len() as u32;
        }
    }
    (started.elapsed().as_secs_f64() * 1e3, tokens)
}

async fn over_http(client: &reqwest::Client, url: &str, n: u32) -> (f64, u32) {
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": n,
        "temperature": 0,
        "stream": true,
        "ignore_eos": true,
        "stream_options": {"include_usage": true},
    });
    let started = Instant::now();
    let mut response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let mut text = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        text.extend_from_slice(&chunk);
    }
    let took = started.elapsed().as_secs_f64() * 1e3;
    // The usage chunk's count: what the server generated for this stream.
    let text = String::from_utf8(text).unwrap();
    let tokens = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find_map(|v| v["usage"]["completion_tokens"].as_u64())
        .unwrap_or(0) as u32;
    (took, tokens)
}

#[tokio::main]
async fn main() {
    let n: u32 = env_or("INTERNVL_BENCH_TOKENS", 1000);
    let repeats: usize = env_or("INTERNVL_BENCH_REPEATS", 9);
    let (model, mmproj) = model_pair();
    let config = Config {
        model: model.display().to_string(),
        mmproj: mmproj.display().to_string(),
        threads: threads(),
        n_ctx: 8192,
        parallel: 1,
        ..Config::default()
    };
    let Served {
        addr,
        client: mut grpc,
        stop,
        server,
    } = serve(config).await;
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .http1_only()
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let url = format!("http://{addr}/v1/chat/completions");

    // One of each first: the prefix cache then serves both alike.
    over_grpc(&mut grpc, 8).await;
    over_http(&http, &url, 8).await;
    let (mut g, mut h) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let (ms, tokens) = over_grpc(&mut grpc, n).await;
        assert_eq!(tokens, n);
        g.push(ms / f64::from(n));
        let (ms, tokens) = over_http(&http, &url, n).await;
        assert_eq!(tokens, n);
        h.push(ms / f64::from(n));
    }
    let spread = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() - 1])
    };
    let (gm, hm) = (median(g.clone()), median(h.clone()));
    println!(
        "{n} tokens per stream, {repeats} streams each, alternating; ms per token \
         (median, min-max):"
    );
    println!(
        "  gRPC          {gm:.4}  ({:.4}-{:.4})",
        spread(&g).0,
        spread(&g).1
    );
    println!(
        "  HTTP (SSE)    {hm:.4}  ({:.4}-{:.4})",
        spread(&h).0,
        spread(&h).1
    );
    println!(
        "  HTTP - gRPC   {:+.4} ms per token ({:+.1} %)",
        hm - gm,
        (hm / gm - 1.0) * 100.0
    );
    stop.send(()).ok();
    server.await.unwrap().unwrap();
}
