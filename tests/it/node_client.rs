//! A client in a third language: Node's `@grpc/grpc-js` loading `proto/` at
//! run time (with `@grpc/proto-loader`), as a Node backend would, against the
//! real server: a streamed Generate with an image, one with a video file,
//! Embed, cancelling a stream,
//! a refused request, a deadline, and `response_format`.

use crate::common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// Runs `tests/node/client.js` against `addr`.
async fn run_grpc_js_client(addr: String, metrics: std::net::SocketAddr) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let args = vec![
        root.join("proto").display().to_string(),
        addr,
        fixture("images/square_448.png").display().to_string(),
        format!("http://{metrics}/metrics"),
        root.join("tests/fixtures/video/clip.mp4")
            .display()
            .to_string(),
    ];
    run_node_client("client.js", "@grpc/grpc-js", args).await
}

/// Requests in flight and slots in use, as the server's metrics say.
async fn server_load(metrics: std::net::SocketAddr) -> (u64, u64) {
    let text = scrape_metrics(metrics).await;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}")) as u64
    };
    (
        value("internvl_requests_in_flight"),
        value("internvl_active_sequences"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_grpc_js_client_streams_embeds_cancels_and_sees_errors() {
    let metrics_port = free_port();
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let server = start(internvl_grpc::config::Config {
        metrics_listen: Some(metrics.to_string()),
        ..tiny_config()
    })
    .await;
    let summary = run_grpc_js_client(server.addr.to_string(), metrics).await;
    // CANCELLED and DEADLINE_EXCEEDED are grpc-js's own words; what the
    // server did is what its metrics said 300 ms after the client gave up:
    // the 8000-token streams (seconds of decoding each) had stopped.
    for call in ["cancelled", "deadline"] {
        let server = &summary[call]["server"];
        assert_eq!(
            (server["in_flight"].as_u64(), server["active"].as_u64()),
            (Some(0), Some(0)),
            "{call}: requests in flight and slots in use 300 ms later: {summary}"
        );
    }
    let left = server_load(metrics).await;
    assert_eq!(
        left,
        (0, 0),
        "requests in flight and slots in use at the end"
    );

    // The same greedy tokens a Rust client gets.
    let mut client = server.client().await;
    let mut request = greedy(
        vec![user(vec![
            image(image_bytes("square_448.png")),
            text("What is shown?"),
        ])],
        12,
    );
    request.request_id = "rust-client".into();
    let want = generate_ok(&mut client, request).await;
    let generate = &summary["generate"];
    assert_eq!(ids(&generate["ids"]), want.ids, "{summary}");
    assert_eq!(generate["text"], want.text.as_str());
    assert!(
        generate["deltas"].as_u64().unwrap() >= 2,
        "streamed, not one message"
    );
    assert_eq!(generate["done"]["finish_reason"], "FINISH_REASON_LENGTH");
    assert_eq!(generate["done"]["image_tokens"], 256);

    // The video file, decoded by the server, gets the tokens that PyAV's
    // frames of it get from a Rust client sending them as images.
    let frames = (0..16)
        .map(|i| {
            let path = format!("tests/fixtures/video/pyav/clip_mp4/frame_{i:02}.png");
            std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
        })
        .collect();
    let from_frames = generate_ok(
        &mut client,
        greedy(
            vec![user(vec![
                internvl_grpc::service::proto::Content {
                    part: Some(internvl_grpc::service::proto::content::Part::Video(
                        internvl_grpc::service::proto::Video {
                            frames,
                            num_frames: 8,
                            ..Default::default()
                        },
                    )),
                },
                text("What happens in the video?"),
            ])],
            8,
        ),
    )
    .await;
    let video = &summary["video"];
    assert_eq!(ids(&video["ids"]), from_frames.ids, "{summary}");
    assert_eq!(video["done"]["image_tokens"], 8 * 256, "{summary}");

    let embed = &summary["embed"];
    assert_eq!(embed["count"], 1, "{summary}");
    assert_eq!(embed["dimensions"], 64);
    assert!((embed["norm"].as_f64().unwrap() - 1.0).abs() < 1e-4);

    let cancelled = &summary["cancelled"];
    assert_eq!(cancelled["error"]["code"], "CANCELLED", "{summary}");
    assert!(cancelled["done"].is_null());

    let refused = &summary["refused"];
    assert_eq!(refused["error"]["code"], "INVALID_ARGUMENT", "{summary}");
    assert_eq!(
        refused["error"]["details"],
        "max_new_tokens: must be at least 1"
    );

    // The deadline (200 ms) ends a 2000-token stream.
    assert_eq!(
        summary["deadline"]["code"], "DEADLINE_EXCEEDED",
        "{summary}"
    );

    let constrained = &summary["constrained"];
    assert!(
        ["yes", "no"].contains(&constrained["text"].as_str().unwrap()),
        "{summary}"
    );
    assert_eq!(constrained["done"]["finish_reason"], "FINISH_REASON_STOP");

    server.stop().await;
}
