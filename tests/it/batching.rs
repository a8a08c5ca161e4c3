//! Continuous batching as clients see it: concurrent streams share the engine
//! without changing each other's answers, a new request is not starved by
//! running ones, a client that stops reading holds back only itself, Embed
//! runs alongside streams, and a full queue answers RESOURCE_EXHAUSTED with a
//! retry hint.

use crate::common;

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
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let long: Vec<_> = (0..8)
        .map(|i| {
            spawn_timeline(
                client.clone(),
                greedy(
                    vec![user(vec![text(&format!("Story number {i}, please."))])],
                    4000,
                ),
                Some(started.clone()),
                Some(stopped.clone()),
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
        None,
    )
    .await
    .unwrap();
    let first = short.arrivals[0];
    assert_eq!(short.ids.len(), 4);
    stop.send(true).unwrap();
    for (i, handle) in long.into_iter().enumerate() {
        let t = handle.await.unwrap();
        let after = t.arrived_after(first);
        let before = t.arrivals.len() - after;
        eprintln!("stream {i}: {before} tokens before the newcomer's first, {after} after");
        assert!(before > 0, "stream {i} had not started");
        assert!(
            t.done.is_none_or(|done| done > first) && after > 0,
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
    // A stream nobody reads for a while, on its own connection with a 4 KiB
    // HTTP/2 window. The server takes events from the engine only as that
    // window allows, and 400 tokens with 20 alternatives each are far more
    // than it and the stream's two-event channel hold: the engine has to hold
    // it back. (Under a default 64 KiB window, plain tokens never filled it:
    // the earlier form of this test did not stall anything.)
    let mut stalled_client = proto::intern_vl_client::InternVlClient::new(
        tonic::transport::Endpoint::from_shared(server.url())
            .unwrap()
            .initial_stream_window_size(Some(4096))
            .connect()
            .await
            .unwrap(),
    );
    let mut stalled = stalled_client
        .generate(proto::GenerateRequest {
            top_logprobs: 20,
            ..greedy(hello(), 400)
        })
        .await
        .unwrap()
        .into_inner();
    stalled.message().await.unwrap().expect("first delta");
    let held = Instant::now();
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
    // Long enough for the whole stream had it not been held back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held_ms = held.elapsed().as_secs_f64() * 1e3;
    // The stalled client then gets everything, nothing lost, and the engine
    // was still decoding it when the client came back.
    let rest = collect(stalled).await.unwrap();
    assert_eq!(rest.ids.len(), 399);
    let decode_ms = rest.done.expect("done").timings.unwrap().decode_ms;
    assert!(
        decode_ms >= held_ms,
        "decoded in {decode_ms:.0} ms, within the {held_ms:.0} ms nobody read: not held back"
    );
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
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let long: Vec<_> = (0..2)
        .map(|i| {
            spawn_timeline(
                client.clone(),
                greedy(vec![user(vec![text(&format!("Tell story {i}."))])], 4000),
                Some(started.clone()),
                Some(stopped.clone()),
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
    stop.send(true).unwrap();
    for handle in long {
        let t = handle.await.unwrap();
        assert!(
            t.done.is_none_or(|done| done > answered_at) && t.arrived_after(answered_at) > 0,
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
    let request = |n| greedy(vec![user(vec![text("Hello! Who are you?")])], n);
    // One running and one queued: capacity is slots plus queue, so the third
    // is refused. The running one is long so that it still runs when the
    // third arrives; the test ends it itself below.
    let mut held = Vec::new();
    let mut refused = None;
    for n in [4000, 200, 200, 200, 200, 200] {
        match client.clone().generate(request(n)).await {
            Ok(stream) => held.push(stream.into_inner()),
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
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
    // The running one was still streaming; once its client hangs up, the
    // queued one gets the slot and completes.
    let queued = held.pop().unwrap();
    let mut running = held.pop().unwrap();
    assert!(running.message().await.unwrap().is_some());
    drop(running);
    let got = collect(queued).await.unwrap();
    assert_eq!(got.ids.len(), 200);
    server.stop().await;
}
