//! The OpenAI-compatible HTTP API on the gRPC port, driven by OpenAI's own
//! SDKs (Python `openai` and npm `openai`, pinned by `scripts/setup`):
//! a streamed chat with an image, a JSON Schema reply (validated by the
//! client), embeddings, a bad image, a wrong key, an unknown model, a
//! stream the client abandons (the slot is freed), and the SDK's own retry
//! on 429. The same greedy request over HTTP and gRPC gives the same tokens.

use serde_json::Value;

use crate::common;
use common::*;
use internvl_grpc::service::proto;

const KEY: &str = "sk-internvl-test";

fn metrics_addr() -> std::net::SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// The greedy image question both SDKs stream, asked over gRPC: its tokens'
/// texts.
async fn grpc_tokens(server: &TestServer, max_new_tokens: u32) -> (String, Vec<String>) {
    let mut client = server.client().await;
    let mut request = tonic::Request::new(proto::GenerateRequest {
        logprobs: true,
        ignore_eos: false,
        ..greedy(
            vec![user(vec![
                image(image_bytes("square_448.png")),
                text("What is shown?"),
            ])],
            max_new_tokens,
        )
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let reply = collect(client.generate(request).await.unwrap().into_inner())
        .await
        .unwrap();
    let texts = reply.tokens.iter().map(|t| t.text.clone()).collect();
    (reply.text, texts)
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_str().expect("string").to_string())
        .collect()
}

fn check_common(summary: &Value, grpc: &(String, Vec<String>), model: &str) {
    assert_eq!(summary["model"], model, "{summary}");
    let stream = &summary["stream"];
    // Same greedy tokens as gRPC, streamed as several chunks.
    assert_eq!(strings(&stream["tokens"]), grpc.1, "{summary}");
    assert_eq!(stream["text"], grpc.0.as_str(), "{summary}");
    assert!(stream["chunks"].as_u64().unwrap() >= 3, "{summary}");
    let usage = &stream["usage"];
    assert_eq!(usage["completion_tokens"], grpc.1.len(), "{summary}");
    // The image is 256 of the prompt's tokens.
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 256, "{summary}");

    let reply = &summary["json_schema"];
    assert_eq!(reply["finish_reason"], "stop", "{summary}");

    let embeddings = &summary["embeddings"];
    assert_eq!(embeddings["dimensions"], 64, "{summary}");
    assert!((embeddings["norm"].as_f64().unwrap() - 1.0).abs() < 1e-4);
    assert_eq!(embeddings["base64_equal"], true, "{summary}");

    let bad = &summary["bad_image"];
    assert_eq!(bad["status"], 400, "{summary}");
    assert_eq!(
        bad["body"]["param"], "messages[0].content[1].image_url.url",
        "{summary}"
    );
    assert_eq!(summary["wrong_key"]["status"], 401, "{summary}");
    let unknown = &summary["unknown_model"];
    assert_eq!(unknown["status"], 404, "{summary}");
    assert_eq!(unknown["body"]["code"], "model_not_found", "{summary}");

    let abandoned = &summary["abandoned"];
    let load = |when: &str, what: &str| abandoned[when][what].as_f64();
    assert_eq!(load("running", "active"), Some(1.0), "{summary}");
    assert_eq!(
        (load("server", "in_flight"), load("server", "active")),
        (Some(0.0), Some(0.0)),
        "the abandoned stream still holds the engine 300 ms later: {summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdks_stream_validate_embed_and_see_errors() {
    let metrics = metrics_addr();
    let mut config = tiny_config();
    config.api_keys = vec![KEY.into()];
    config.metrics_listen = Some(metrics.to_string());
    let model = internvl_grpc::openai::model_id(&config.model);
    let server = start(config).await;
    let grpc = grpc_tokens(&server, 12).await;
    let args = vec![
        format!("http://{}/v1", server.addr),
        KEY.to_string(),
        fixture("images/square_448.png").display().to_string(),
        format!("http://{metrics}/metrics"),
    ];

    let python = run_python_client("openai_client.py", args.clone()).await;
    check_common(&python, &grpc, &model);
    // The embeddings extension (a chat-style input with an image) gives what
    // gRPC's Embed gives for the same parts.
    let mut client = server.client().await;
    let mut request = tonic::Request::new(proto::EmbedRequest {
        inputs: vec![proto::EmbedInput {
            content: vec![image(image_bytes("square_448.png")), text("A photo.")],
        }],
        pooling: proto::Pooling::Mean as i32,
        normalize: true,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let want = client.embed(request).await.unwrap().into_inner().embeddings;
    let got: Vec<f64> = python["image_embedding"]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want[0].values.len());
    for (g, w) in got.iter().zip(&want[0].values) {
        assert_eq!(*g as f32, *w, "HTTP and gRPC embeddings differ");
    }
    assert_eq!(
        python["image_embedding"]["prompt_tokens"].as_u64(),
        Some(u64::from(want[0].tokens))
    );
    let node = run_node_client("openai_client.mjs", "openai", args).await;
    check_common(&node, &grpc, &model);

    // Each protocol counted under its own label.
    let text = scrape_metrics(metrics).await;
    assert!(
        text.contains(
            r#"internvl_requests_total{code="Ok",method="ChatCompletions",protocol="http"}"#
        ),
        "{text}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_retries_a_429_until_a_slot_frees() {
    let metrics = metrics_addr();
    let mut config = tiny_config();
    config.parallel = 1;
    config.queue_depth = 1;
    config.metrics_listen = Some(metrics.to_string());
    let server = start(config).await;
    let refused = || async {
        let text = scrape_metrics(metrics).await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(
                    r#"internvl_requests_total{code="ResourceExhausted",method="ChatCompletions",protocol="http"} "#,
                )
            })
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let base = format!("http://{}/v1", server.addr);
    let python = run_python_client("openai_retry.py", vec![base.clone()]).await;
    // The third request met a full queue, and the SDK's retries, paced by
    // the server's retry-after-ms, got it answered.
    assert_eq!(python["third"]["finish_reason"], "length", "{python}");
    let after_python = refused().await;
    assert!(after_python >= 1.0, "no 429 was answered to Python");
    let node = run_node_client("openai_retry.mjs", "openai", vec![base]).await;
    assert_eq!(node["third"]["finish_reason"], "length", "{node}");
    assert!(
        refused().await > after_python,
        "no 429 was answered to Node"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_answers_503_and_the_sdk_retries_it() {
    let metrics = metrics_addr();
    let mut config = tiny_config();
    config.drain_grace_secs = 600.0;
    config.metrics_listen = Some(metrics.to_string());
    let mut server = start(config).await;
    // A running stream keeps the replica draining while the SDK asks.
    let mut client = server.client().await;
    let mut running = client
        .generate(greedy(vec![user(vec![text("Count.")])], 8000))
        .await
        .unwrap()
        .into_inner();
    running.message().await.unwrap().expect("first delta");
    server.begin_shutdown();
    let mut health = server.health().await;
    for _ in 0..200 {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status);
        if status.ok()
            == Some(tonic_health::pb::health_check_response::ServingStatus::NotServing as i32)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let summary = run_python_client(
        "openai_unavailable.py",
        vec![format!("http://{}/v1", server.addr)],
    )
    .await;
    assert_eq!(summary["status"], 503, "{summary}");
    assert_eq!(summary["type"], "InternalServerError", "{summary}");
    // Once, then the SDK's two retries: three 503s counted.
    let text = scrape_metrics(metrics).await;
    assert!(
        text.contains(
            r#"internvl_requests_total{code="Unavailable",method="ChatCompletions",protocol="http"} 3"#
        ),
        "{text}"
    );
    drop(running);
    tokio::time::timeout(std::time::Duration::from_secs(60), server.handle)
        .await
        .expect("the server exits once the stream is gone")
        .unwrap()
        .unwrap();
}

/// `internvl_slots{phase=…}` in a scrape.
fn slots(text: &str, phase: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("internvl_slots{{phase=\"{phase}\"}} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sse_reader_holds_back_only_its_own_stream() {
    use tokio::io::AsyncWriteExt;
    let metrics = metrics_addr();
    let mut config = tiny_config();
    config.parallel = 2;
    config.metrics_listen = Some(metrics.to_string());
    let server = start(config).await;

    // A client that asks for a long stream and never reads, with a small
    // receive buffer so that the stall reaches the server at once.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(server.addr).await.unwrap();
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        // Room left in the KV pool for the other stream (admission reserves
        // prompt + max_tokens).
        "max_tokens": 3000, "stream": true, "ignore_eos": true,
        // Big chunks (about 2 KB a token), more than the sockets' buffers hold.
        "logprobs": true, "top_logprobs": 20,
    })
    .to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(body.as_bytes()).await.unwrap();
    // Its sequence ends up waiting for it, for good: held in ten scrapes in
    // a row. Until the server's send buffer is full, a slot can be held for
    // a moment and then go on (CI once took such a moment for the stall).
    let mut in_a_row = 0;
    for _ in 0..500 {
        if slots(&scrape_metrics(metrics).await, "held_by_client") == 1.0 {
            in_a_row += 1;
            if in_a_row == 10 {
                break;
            }
        } else {
            in_a_row = 0;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        in_a_row, 10,
        "the stalled stream's slot never waited for its client"
    );

    // Another stream is answered in full meanwhile.
    let mut client = server.client().await;
    let other = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        generate_ok(&mut client, greedy(vec![user(vec![text("Hello!")])], 500)),
    )
    .await
    .unwrap_or_else(|_| panic!("the other stream is held back"));
    assert_eq!(other.ids.len(), 500);
    assert_eq!(
        slots(&scrape_metrics(metrics).await, "held_by_client"),
        1.0,
        "the stalled one is still waiting"
    );

    // The stalled client leaves: its slot is freed.
    drop(stalled);
    let mut freed = false;
    for _ in 0..200 {
        let text = scrape_metrics(metrics).await;
        if slots(&text, "held_by_client") == 0.0 && slots(&text, "generating") == 0.0 {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        freed,
        "the stalled stream's slot was not freed when it left"
    );
    server.stop().await;
}

/// `max_new_tokens` 4294967295 (what an HTTP request without `max_tokens`
/// becomes) generates until the request's share of the context is full:
/// the whole context with one slot, half of it with two, so that two such
/// requests run together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_limit_generation_fills_its_share_of_the_context() {
    for parallel in [1u32, 2] {
        let mut config = tiny_config();
        config.n_ctx = 512;
        config.parallel = parallel;
        let server = start(config).await;
        let client = server.client().await;
        let asks: Vec<_> = (0..parallel)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    let request = greedy(vec![user(vec![text("Count.")])], u32::MAX);
                    generate_ok(&mut client, request).await
                })
            })
            .collect();
        for ask in asks {
            let reply = ask.await.unwrap();
            let done = reply.done.unwrap();
            let usage = done.usage.unwrap();
            assert_eq!(done.finish_reason, proto::FinishReason::Length as i32);
            assert_eq!(
                usage.prompt_tokens + usage.completion_tokens,
                512 / parallel,
                "{parallel} slots: {usage:?}"
            );
            // Run together, not one after the other.
            if parallel == 2 {
                assert!(
                    done.timings.unwrap().queue_ms < 1000.0,
                    "the second waited for the first"
                );
            }
        }
        server.stop().await;
    }
}

/// A body past `max_message_bytes` is refused with 413 in OpenAI's error
/// body, not a bare status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_413_in_openais_shape() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = tiny_config();
    config.max_message_bytes = 64 * 1024;
    let server = start(config).await;
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "x".repeat(100_000)}],
        "max_tokens": 2,
    })
    .to_string();
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    // The server may answer before it has read all of the body.
    let _ = socket.write_all(body.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let json = &answer[answer.find('{').expect("a JSON body")..];
    let error: serde_json::Value = serde_json::from_str(json.trim()).expect(json);
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    server.stop().await;
}
