//! Continuous batching as clients see it: concurrent streams share the engine
//! without changing each other's answers, a new request is not starved by
//! running ones, a client that stops reading holds back only itself, Embed
//! runs alongside streams, and a full queue answers RESOURCE_EXHAUSTED with a
//! retry hint.

mod common;

use std::time::{Duration, Instant};

use common::*;
use internvl_grpc::config::Config;
use internvl_grpc::service::proto;
use tonic_types::StatusExt;

/// `parallel` slots, and KV cells for each to hold a 4096-token request:
/// admission reserves a request's prompt plus `max_new_tokens` cells.
fn with(parallel: u32) -> Config {
    Config {
        parallel,
        n_ctx: parallel * 4096,
        ..tiny_config()
    }
}

/// Greedy with the two best alternatives, to see near-ties.
fn greedy_with_margins(messages: Vec<proto::Message>, n: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        top_logprobs: 2,
        ..greedy(messages, n)
    }
}

/// How many leading tokens must agree: up to the first position where the
/// two best candidates are within `margin` (batch shapes may round them apart).
fn decisive_prefix(tokens: &[proto::Token], margin: f32) -> usize {
    tokens
        .iter()
        .position(|t| t.top.len() >= 2 && (t.top[0].logprob - t.top[1].logprob).abs() < margin)
        .unwrap_or(tokens.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_decoded_together_answer_as_they_do_alone() {
    let server = start(with(4)).await;
    let mut client = server.client().await;
    let conversations = vec![
        vec![user(vec![text("Hello! Who are you?")])],
        vec![user(vec![text("Write a haiku about the sea.")])],
        vec![user(vec![
            image(image_bytes("landscape_800x600.jpg")),
            text("Describe the picture."),
        ])],
        vec![user(vec![text("Count from one to twenty.")])],
    ];
    let mut alone = Vec::new();
    for c in &conversations {
        alone.push(generate_ok(&mut client, greedy_with_margins(c.clone(), 24)).await);
    }
    let together: Vec<_> = conversations
        .iter()
        .map(|c| {
            let mut client = client.clone();
            let request = greedy_with_margins(c.clone(), 24);
            tokio::spawn(async move { generate_ok(&mut client, request).await })
        })
        .collect();
    let mut compared = 0;
    for (i, handle) in together.into_iter().enumerate() {
        let got = handle.await.unwrap();
        let solo = &alone[i];
        let n = decisive_prefix(&solo.tokens, 0.01);
        assert_eq!(
            got.ids[..n],
            solo.ids[..n],
            "conversation {i}: batched tokens differ before any near-tie"
        );
        for (a, b) in got.tokens[..n].iter().zip(&solo.tokens[..n]) {
            assert!(
                (a.logprob - b.logprob).abs() < 0.01,
                "conversation {i}: logprob {} batched vs {} alone",
                a.logprob,
                b.logprob
            );
        }
        compared += n;
    }
    eprintln!("compared {compared} tokens over 4 concurrent streams");
    assert!(
        compared >= 24,
        "too few decisive tokens to compare: {compared}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_request_gets_its_first_token_while_eight_streams_decode() {
    let server = start(with(9)).await;
    let client = server.client().await;
    let (started, mut running) = tokio::sync::mpsc::channel(8);
    let long: Vec<_> = (0..8)
        .map(|i| {
            spawn_timeline(
                client.clone(),
                greedy(
                    vec![user(vec![text(&format!("Story number {i}, please."))])],
                    4000,
                ),
                Some(started.clone()),
            )
        })
        .collect();
    // All eight are decoding.
    for _ in 0..8 {
        running.recv().await.unwrap();
    }
    let short = spawn_timeline(
        client.clone(),
        greedy(vec![user(vec![text("Hello! Who are you?")])], 4),
        None,
    )
    .await
    .unwrap();
    let first = short.arrivals[0];
    assert_eq!(short.ids.len(), 4);
    for (i, handle) in long.into_iter().enumerate() {
        let t = handle.await.unwrap();
        assert_eq!(t.ids.len(), 4000, "stream {i} completes");
        let before = t.arrivals.iter().filter(|&&a| a < first).count();
        let after = t.arrivals.len() - before;
        eprintln!("stream {i}: {before} tokens before the newcomer's first, {after} after");
        assert!(before > 0, "stream {i} had not started");
        assert!(
            t.done.unwrap() > first && after > 0,
            "stream {i} was not running when the newcomer got its first token"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_holds_back_only_itself() {
    let server = start(Config {
        stream_buffer: 2,
        ..with(2)
    })
    .await;
    let mut client = server.client().await;
    let hello = || vec![user(vec![text("Hello! Who are you?")])];
    // A stream nobody reads for a while: its buffer fills after two events.
    let mut stalled = client
        .generate(greedy(hello(), 400))
        .await
        .unwrap()
        .into_inner();
    stalled.message().await.unwrap().expect("first delta");
    // Others are served meanwhile.
    for _ in 0..3 {
        let got = tokio::time::timeout(
            Duration::from_secs(30),
            generate_ok(&mut client, greedy(hello(), 32)),
        )
        .await
        .expect("served while another client is not reading");
        assert_eq!(got.ids.len(), 32);
    }
    // The stalled client then gets everything, nothing lost.
    let rest = collect(stalled).await.unwrap();
    assert_eq!(rest.ids.len(), 399);
    assert!(rest.done.is_some());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embed_is_answered_while_streams_run_and_matches_embed_alone() {
    let server = start(with(3)).await;
    let mut client = server.client().await;
    let embed_request = || proto::EmbedRequest {
        inputs: vec![
            proto::EmbedInput {
                content: vec![text("A red bicycle leaning on a wall.")],
            },
            proto::EmbedInput {
                content: vec![image(image_bytes("square_448.png")), text("A picture.")],
            },
        ],
        normalize: true,
        ..Default::default()
    };
    let alone = client.embed(embed_request()).await.unwrap().into_inner();

    let (started, mut running) = tokio::sync::mpsc::channel(2);
    let long: Vec<_> = (0..2)
        .map(|i| {
            spawn_timeline(
                client.clone(),
                greedy(vec![user(vec![text(&format!("Tell story {i}."))])], 4000),
                Some(started.clone()),
            )
        })
        .collect();
    for _ in 0..2 {
        running.recv().await.unwrap();
    }
    let answered_at;
    let during = {
        let r = client.embed(embed_request()).await.unwrap().into_inner();
        answered_at = Instant::now();
        r
    };
    for handle in long {
        let t = handle.await.unwrap();
        assert!(
            t.done.unwrap() > answered_at,
            "a stream finished before Embed was answered: Embed waited for it"
        );
    }
    for (a, b) in alone.embeddings.iter().zip(&during.embeddings) {
        let cos: f32 = a.values.iter().zip(&b.values).map(|(x, y)| x * y).sum();
        assert!(cos > 0.9999, "embedding changed under load: cosine {cos}");
        assert_eq!(a.tokens, b.tokens);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_resource_exhausted_with_a_retry_hint() {
    let server = start(Config {
        queue_depth: 1,
        ..with(1)
    })
    .await;
    let client = server.client().await;
    let hello = || greedy(vec![user(vec![text("Hello! Who are you?")])], 2000);
    // One running and one queued: capacity is slots plus queue, so the third
    // is refused.
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..6 {
        match client.clone().generate(hello()).await {
            Ok(stream) => held.push(stream.into_inner()),
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = refused.expect("a call beyond slots and queue is refused");
    assert_eq!(held.len(), 2, "calls accepted");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    let pushback: u64 = status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("pushback metadata")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let retry = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo detail");
    assert_eq!(retry.as_millis() as u64, pushback);
    assert!((50..=30_000).contains(&pushback), "{pushback} ms");
    // The accepted ones all complete.
    for stream in held {
        let got = collect(stream).await.unwrap();
        assert_eq!(got.ids.len(), 2000);
    }
    server.stop().await;
}
