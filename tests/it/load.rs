//! Load from a separate client process (Python grpc.aio) on loopback, bounded
//! in requests and time. At concurrency equal to capacity (slots plus queue)
//! every call succeeds; at three times capacity the excess is refused with
//! RESOURCE_EXHAUSTED and nothing else fails. Figures are printed
//! (`--nocapture`) and recorded in the README.

use crate::common;

use common::*;
use internvl_grpc::config::Config;
use serde_json::Value;

const PARALLEL: u32 = 8;
const QUEUE: usize = 24;
const TOKENS: u32 = 16;
const TIME_LIMIT_S: u32 = 300;

async fn load(addr: String, stubs: &std::path::Path, concurrency: u32, requests: u32) -> Value {
    let mut args = vec![stubs.display().to_string(), addr];
    args.extend([concurrency, requests, TOKENS, TIME_LIMIT_S].map(|n| n.to_string()));
    let summary = run_python_client("load_client.py", args).await;
    eprintln!("{summary}");
    assert_eq!(summary["finished_in_time"], true, "{summary}");
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_served_and_overload_is_refused_cleanly() {
    let stubs = python_stubs();
    let server = start(Config {
        parallel: PARALLEL,
        queue_depth: QUEUE,
        n_ctx: PARALLEL * 512,
        ..tiny_config()
    })
    .await;
    let capacity = PARALLEL + QUEUE as u32;

    let at_capacity = load(
        server.addr.to_string(),
        stubs.path(),
        capacity,
        8 * capacity,
    )
    .await;
    let codes = at_capacity["codes"].as_object().unwrap();
    assert_eq!(codes.len(), 1, "only OK at capacity: {codes:?}");
    assert_eq!(codes["OK"], 8 * capacity);

    let overload = load(
        server.addr.to_string(),
        stubs.path(),
        3 * capacity,
        24 * capacity,
    )
    .await;
    let codes = overload["codes"].as_object().unwrap();
    let ok = codes.get("OK").and_then(Value::as_u64).unwrap_or(0);
    let refused = codes
        .get("RESOURCE_EXHAUSTED")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    assert_eq!(
        ok + refused,
        u64::from(24 * capacity),
        "only OK and RESOURCE_EXHAUSTED: {codes:?}"
    );
    assert!(ok > 0 && refused > 0, "{codes:?}");
    // How fast refusals come is a figure (printed above), not an assertion:
    // on 2 cores shared by 96 client coroutines and the decoding, refusals
    // wait for the CPU like everything else, and a cold CI run once measured
    // them 1.4 ms slower than served calls. That a refusal does not wait for a
    // place is asserted without a clock in
    // `batching::a_full_queue_answers_resource_exhausted_with_a_retry_hint`.

    // Still serving normally afterwards.
    let mut client = server.client().await;
    let after = generate_ok(&mut client, greedy(vec![user(vec![text("Hi")])], 4)).await;
    assert_eq!(after.ids.len(), 4);
    server.stop().await;
}
