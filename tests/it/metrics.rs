//! Prometheus metrics on their own port, scraped over real HTTP.

use crate::common;

use common::*;
use internvl_grpc::service::proto;
use tokio::sync::oneshot;

fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_tokens_and_latencies_are_exported() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, metrics_addr) = (
        listener.local_addr().unwrap(),
        metrics_listener.local_addr().unwrap(),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    // One slot, so a second stream has to queue.
    let mut config = tiny_config();
    config.parallel = 1;
    let server = tokio::spawn(internvl_grpc::run_with_metrics(
        config,
        listener,
        Some(metrics_listener),
        async move {
            stopped.await.ok();
        },
    ));
    let mut client = loop {
        if let Ok(mut c) =
            proto::intern_vl_client::InternVlClient::connect(format!("http://{addr}")).await
        {
            if c.get_model_info(proto::GetModelInfoRequest {})
                .await
                .is_ok()
            {
                break c;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };

    let got = generate_ok(
        &mut client,
        greedy(vec![user(vec![text("Hello! Who are you?")])], 5),
    )
    .await;
    assert_eq!(got.ids.len(), 5);
    let refused = client
        .generate(greedy(vec![user(vec![text("hi")])], 0))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // While a stream runs: one request in flight, one active sequence.
    let mut running = client
        .generate(greedy(vec![user(vec![text("Hello! Who are you?")])], 6000))
        .await
        .unwrap()
        .into_inner();
    running.message().await.unwrap().expect("first delta");
    let during = scrape_metrics(metrics_addr).await;
    assert_eq!(value(&during, "internvl_requests_in_flight"), Some(1.0));
    assert_eq!(value(&during, "internvl_active_sequences"), Some(1.0));
    assert_eq!(value(&during, "internvl_queue_depth"), Some(0.0));
    // Its slot is decoding, or waiting for this client to read.
    let decoding = |m: &str| {
        ["generating", "held_by_client"]
            .iter()
            .map(|p| value(m, &format!("internvl_slots{{phase=\"{p}\"}}")).unwrap_or(0.0))
            .sum::<f64>()
    };
    assert_eq!(decoding(&during), 1.0, "{during}");
    // A second stream waits for the only slot.
    let queued = client
        .clone()
        .generate(greedy(vec![user(vec![text("hi")])], 5))
        .await
        .unwrap()
        .into_inner();
    let waiting = scrape_metrics(metrics_addr).await;
    assert_eq!(value(&waiting, "internvl_requests_in_flight"), Some(2.0));
    assert_eq!(value(&waiting, "internvl_active_sequences"), Some(1.0));
    assert_eq!(value(&waiting, "internvl_queue_depth"), Some(1.0));
    drop(queued);
    drop(running);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let m = scrape_metrics(metrics_addr).await;
    assert_eq!(
        value(
            &m,
            r#"internvl_requests_total{code="Ok",method="Generate",protocol="grpc"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            r#"internvl_requests_total{code="InvalidArgument",method="Generate",protocol="grpc"}"#
        ),
        Some(1.0)
    );
    assert!(
        value(
            &m,
            r#"internvl_requests_total{code="Ok",method="GetModelInfo",protocol="grpc"}"#
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(value(&m, "internvl_completion_tokens_total"), Some(5.0));
    assert_eq!(value(&m, "internvl_prompt_tokens_total"), Some(33.0));
    assert_eq!(value(&m, "internvl_ttft_seconds_count"), Some(1.0));
    assert_eq!(value(&m, "internvl_inter_token_seconds_count"), Some(1.0));
    assert_eq!(value(&m, "internvl_requests_in_flight"), Some(0.0));
    assert_eq!(value(&m, "internvl_active_sequences"), Some(0.0));
    assert_eq!(decoding(&m), 0.0);
    assert_eq!(value(&m, "internvl_queue_depth"), Some(0.0));

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
