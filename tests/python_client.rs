//! A client in another language: Python grpcio stubs generated from `proto/`
//! during the test stream a Generate call from the real server.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_streams_generate() {
    let stubs = python_stubs();

    let server = start(tiny_config()).await;
    let addr = server.addr.to_string();
    let summary = run_python_client(
        "generate_client.py",
        vec![stubs.display().to_string(), addr],
    )
    .await;

    let case = reference()["chat"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "text_hello")
        .unwrap()
        .clone();
    let want = ids(&case["greedy_ids"]);
    let got = ids(&summary["ids"]);
    assert_eq!(got.len(), 12);
    assert_eq!(summary["completion_tokens"], 12);
    assert_eq!(summary["prompt_tokens"], case["input_ids_len"]);
    assert_eq!(summary["finish_reason"], "FINISH_REASON_LENGTH");
    assert!(
        summary["deltas"].as_u64().unwrap() >= 2,
        "streamed in several messages"
    );
    // Up to the reference's first near-tie (step 6 for this case).
    let tie = case["greedy_margins"]
        .as_array()
        .unwrap()
        .iter()
        .position(|m| m.as_f64().unwrap() < 0.1)
        .unwrap();
    assert_eq!(&got[..tie], &want[..tie]);
    assert!(
        summary["text"].as_str().unwrap().starts_with("imum spirit"),
        "{}",
        summary["text"]
    );
    server.stop().await;
    std::fs::remove_dir_all(stubs).ok();
}
