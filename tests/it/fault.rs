//! An engine that dies fails loudly: the real binary, built with the
//! test-only `fault-injection` feature (a Generate with `FAULT_SEED` panics
//! the engine thread at its `FAULT_TOKEN`th token), with two running streams, a
//! queued Generate and a queued Embed. Every one of them ends with INTERNAL,
//! health turns NOT_SERVING, and the process exits non-zero so that its
//! orchestrator restarts it.

use crate::common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use internvl_grpc::engine::{FAULT_SEED, FAULT_TOKEN};
use internvl_grpc::service::proto;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const BOUND: Duration = Duration::from_secs(60);

fn long(seed: u64) -> proto::GenerateRequest {
    let mut request = greedy(vec![user(vec![text("count to a thousand")])], 400);
    request.sampling = Some(proto::SamplingParams {
        seed: Some(seed),
        ..Default::default()
    });
    // Twenty alternatives a token fill a 4 KiB window in a few events.
    request.top_logprobs = 20;
    request
}

/// A client on a connection of its own whose 4 KiB HTTP/2 window holds a
/// stream it does not read after a few events (batching.rs's way).
async fn holding_client(
    url: &str,
) -> proto::intern_vl_client::InternVlClient<tonic::transport::Channel> {
    proto::intern_vl_client::InternVlClient::new(
        tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .initial_stream_window_size(Some(4096))
            .connect()
            .await
            .unwrap(),
    )
}

/// The rest of a stream: how many more deltas, and the status it ended with.
async fn rest(stream: &mut tonic::Streaming<proto::GenerateResponse>) -> (usize, Result<(), Code>) {
    let mut deltas = 0;
    loop {
        match tokio::time::timeout(BOUND, stream.message()).await {
            Err(_) => panic!("the stream neither ended nor failed"),
            Ok(Ok(Some(message))) => match message.event {
                Some(proto::generate_response::Event::Delta(_)) => deltas += 1,
                other => panic!("unexpected event {other:?}"),
            },
            Ok(Ok(None)) => return (deltas, Ok(())),
            Ok(Err(status)) => return (deltas, Err(status.code())),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_panic_ends_every_call_with_internal_and_the_process_non_zero() {
    let (port, metrics_port) = (free_port(), free_port());
    let metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let stderr = std::env::temp_dir().join(format!("internvl-fault-{}.log", std::process::id()));
    let mut server = serve_tiny(format!("127.0.0.1:{port}").parse().unwrap(), metrics)
        .args(["--parallel", "2", "--threads", "2"])
        // One event per stream in flight: a client that does not read holds
        // its sequence (and its slot) where it is.
        .env("INTERNVL_STREAM_BUFFER", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("the binary starts");
    let url = format!("http://127.0.0.1:{port}");
    let mut watch = serving_watch(&url, &mut server, &stderr, BOUND).await;

    let client =
        internvl_grpc::service::proto::intern_vl_client::InternVlClient::connect(url.clone())
            .await
            .unwrap();
    // Two running streams, both held by their clients after a first token
    // (the faulty one long before its fault).
    let mut running = holding_client(&url)
        .await
        .generate(long(1))
        .await
        .unwrap()
        .into_inner();
    assert!(running.message().await.unwrap().is_some());
    let mut faulty = holding_client(&url)
        .await
        .generate(long(FAULT_SEED))
        .await
        .unwrap()
        .into_inner();
    assert!(faulty.message().await.unwrap().is_some());
    // Two calls queued behind them.
    let mut queued = client.clone().generate(long(2)).await.unwrap().into_inner();
    let embed = {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .embed(proto::EmbedRequest {
                    inputs: vec![proto::EmbedInput {
                        content: vec![text("queued")],
                    }],
                    ..Default::default()
                })
                .await
        })
    };
    let started = Instant::now();
    while !scrape_metrics(metrics)
        .await
        .contains("internvl_requests_in_flight 4")
    {
        assert!(started.elapsed() < BOUND, "the calls never queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Reading on lets the faulty stream reach its fault.
    let (deltas, end) = rest(&mut faulty).await;
    assert_eq!(end, Err(Code::Internal), "after {deltas} more deltas");
    assert!(
        deltas < FAULT_TOKEN as usize,
        "{deltas} deltas after the first: past the fault"
    );
    let (_, end) = rest(&mut running).await;
    assert_eq!(end, Err(Code::Internal), "a running stream");
    let (deltas, end) = rest(&mut queued).await;
    assert_eq!((deltas, end), (0, Err(Code::Internal)), "a queued stream");
    let embedded = tokio::time::timeout(BOUND, embed).await.unwrap().unwrap();
    assert_eq!(
        embedded.map(|_| ()).map_err(|s| s.code()),
        Err(Code::Internal),
        "a queued Embed"
    );
    // Out of rotation at once.
    let status = tokio::time::timeout(BOUND, watch.message())
        .await
        .expect("health changes")
        .map(|m| m.map(|m| m.status));
    assert!(
        matches!(status, Ok(Some(s)) if s == ServingStatus::NotServing as i32),
        "health after the fault: {status:?}"
    );
    // And gone, with an error the orchestrator sees.
    let started = Instant::now();
    let exit = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < BOUND, "still running after the fault");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(!exit.success(), "exit {exit} after an engine fault:\n{log}");
    assert!(log.contains("fault injected"), "{log}");
    let _ = std::fs::remove_file(&stderr);
}
