//! A client in another language: Python grpcio stubs generated from `proto/`
//! during the test stream a Generate call from the real server.

use crate::common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_streams_generate() {
    let stubs = python_stubs();

    let server = start(tiny_config()).await;
    let addr = server.addr.to_string();
    let summary = run_python_client(
        "generate_client.py",
        vec![stubs.path().display().to_string(), addr],
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_asks_for_json() {
    let stubs = python_stubs();
    let server = start(tiny_config()).await;
    let schema = r#"{"type": "object", "properties": {"total": {"type": "integer", "minimum": 0, "maximum": 999}, "currency": {"enum": ["EUR", "USD"]}}, "required": ["total", "currency"], "additionalProperties": false}"#;
    let summary = run_python_client(
        "structured_client.py",
        vec![
            stubs.path().display().to_string(),
            server.addr.to_string(),
            schema.to_string(),
        ],
    )
    .await;
    assert_eq!(summary["finish_reason"], "FINISH_REASON_STOP", "{summary}");
    let reply: serde_json::Value =
        serde_json::from_str(summary["text"].as_str().unwrap()).expect("the reply is JSON");
    let validator = jsonschema::validator_for(&serde_json::from_str(schema).unwrap()).unwrap();
    assert!(validator.is_valid(&reply), "{reply}");
    assert_eq!(summary["refused"]["code"], "INVALID_ARGUMENT");
    let details = summary["refused"]["details"].as_str().unwrap();
    assert!(
        details.starts_with("response_format.json_schema: not JSON"),
        "{details}"
    );
    server.stop().await;
}
