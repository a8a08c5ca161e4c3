//! Shutdown drains: health NOT_SERVING, new calls UNAVAILABLE, running streams
//! finish within the grace period or are cut with UNAVAILABLE; deadlines end
//! a stream with DEADLINE_EXCEEDED and free the engine.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use internvl_grpc::service::proto;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::HealthCheckRequest;

fn hello() -> Vec<proto::Message> {
    vec![user(vec![text("Hello! Who are you?")])]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_streams_finish_within_the_grace_period() {
    let mut config = tiny_config();
    // The bound is the grace, not a speed: in CI this stream shares two cores
    // with other servers and once took over 60 s (CI, stop 30).
    config.drain_grace_secs = 600.0;
    let mut server = start(config).await;
    let mut client = server.client().await;
    let mut health = server.health().await;

    let mut running = client
        .generate(greedy(hello(), 3000))
        .await
        .unwrap()
        .into_inner();
    running.message().await.unwrap().expect("first delta");
    server.begin_shutdown();

    // Load balancers see NOT_SERVING, new calls are refused, on the same connection.
    let mut saw_not_serving = false;
    for _ in 0..100 {
        let status = health
            .check(HealthCheckRequest {
                service: "internvl.v1.InternVL".into(),
            })
            .await
            .map(|r| r.into_inner().status);
        if status.ok() == Some(ServingStatus::NotServing as i32) {
            saw_not_serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        saw_not_serving,
        "health never turned NOT_SERVING while draining"
    );
    let refused = client.generate(greedy(hello(), 2)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // The running stream completes in full.
    let rest = collect(running).await.expect("stream completes");
    let done = rest.done.expect("done");
    assert_eq!(done.finish_reason, proto::FinishReason::Length as i32);
    assert_eq!(done.usage.unwrap().completion_tokens, 3000);

    tokio::time::timeout(Duration::from_secs(30), server.handle)
        .await
        .expect("server exits after draining")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_grace_period_are_cut_with_unavailable() {
    let mut config = tiny_config();
    config.drain_grace_secs = 0.2;
    let mut server = start(config).await;
    let mut client = server.client().await;

    let mut running = client
        .generate(greedy(hello(), 8000))
        .await
        .unwrap()
        .into_inner();
    running.message().await.unwrap().expect("first delta");
    let started = Instant::now();
    server.begin_shutdown();
    let cut = collect(running).await.err().expect("stream is cut");
    assert_eq!(cut.code(), Code::Unavailable, "{cut:?}");
    assert!(cut.message().contains("shutting down"), "{}", cut.message());
    tokio::time::timeout(Duration::from_secs(30), server.handle)
        .await
        .expect("server exits")
        .unwrap()
        .unwrap();
    eprintln!("cut and exited {:?} after shutdown", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_end_the_stream_and_free_the_engine() {
    let server = start(tiny_config()).await;
    let mut client = server.client().await;

    let mut request = tonic::Request::new(greedy(hello(), 8000));
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let outcome = match client.generate(request).await {
        Ok(stream) => collect(stream.into_inner()).await.err(),
        Err(status) => Some(status),
    };
    let status = outcome.expect("the deadline ends the stream");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // The engine's own status (not a client-side timer), after real progress.
    assert!(
        status.message().contains("generated tokens"),
        "{}",
        status.message()
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // The sequence was freed: the next request does not queue behind it.
    let next = generate_ok(&mut client, greedy(hello(), 2)).await;
    let queue_ms = next.done.unwrap().timings.unwrap().queue_ms;
    assert!(
        queue_ms < 500.0,
        "queued {queue_ms} ms behind an expired request"
    );

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_that_pass_before_the_first_token_are_deadline_exceeded() {
    let server = start(tiny_config()).await;
    let mut client = server.client_without_local_deadline();
    // A 13-tile image takes the tiny model over a second to encode, far past
    // these deadlines: they pass while the call is still being prepared,
    // before any response exists.
    let picture = || proto::Content {
        part: Some(proto::content::Part::Image(proto::Image {
            data: image_bytes("landscape_800x600.jpg"),
            max_tiles: 12,
            min_tiles: 0,
            ..Default::default()
        })),
    };
    let mut embed = tonic::Request::new(proto::EmbedRequest {
        inputs: vec![proto::EmbedInput {
            content: vec![picture()],
        }],
        ..Default::default()
    });
    embed.set_timeout(Duration::from_millis(50));
    let status = client.embed(embed).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    let mut generate = tonic::Request::new(greedy(
        vec![user(vec![picture(), text("What is this?")])],
        4,
    ));
    generate.set_timeout(Duration::from_millis(50));
    let status = match client.generate(generate).await {
        Ok(stream) => collect(stream.into_inner())
            .await
            .err()
            .expect("the deadline ends the call"),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // Nothing was left behind: a call without a deadline is served at once.
    let next = generate_ok(&mut server.client().await, greedy(hello(), 2)).await;
    assert_eq!(next.ids.len(), 2);
    server.stop().await;
}
