//! One model over several devices through ggml's RPC backend: two
//! `internvl-grpc rpc-server` processes on loopback (each serving its CPU,
//! as a GPU host would serve its GPU), and the service told of both in
//! `rpc_servers`. The layers split between them as ggml reports it, every
//! chat case keeps parity with the reference, and a device killed in the
//! middle of a stream ends that stream with a status naming it, turns health
//! NOT_SERVING and exits the process: nothing hangs.

// A binary of its own: ggml registers RPC devices for the whole process,
// and a model loaded with no `devices` list uses every one registered, so
// servers elsewhere in the `it` binary would take these (soon killed)
// devices. A deployment runs one engine per process.
#[path = "it/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::parity::*;
use common::rpc::RpcServer;
use common::*;
use internvl_grpc::service::proto;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const BOUND: Duration = Duration::from_secs(120);

/// The layers per device and the model buffers' locations that
/// GetModelInfo reports.
fn split_of(info: &proto::ModelInfo) -> (Vec<(String, u32)>, Vec<String>) {
    let placement = info.placement.as_ref().expect("placement");
    let layers = placement
        .layers
        .iter()
        .map(|l| (l.device.clone(), l.layers))
        .collect();
    let model = placement
        .buffers
        .iter()
        .filter(|b| b.kind == "model")
        .map(|b| b.location.clone())
        .collect();
    (layers, model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rpc_devices_split_the_layers_and_keep_parity() {
    let (a, b) = (RpcServer::start(), RpcServer::start());
    for family in [&INTERNVL3, &INTERNVL35] {
        let mut config = family.config();
        config.rpc_servers = vec![a.endpoint.clone(), b.endpoint.clone()];
        config.tensor_split = vec![1.0, 1.0];
        let server = start(config).await;
        let mut client = server.client().await;
        let info = client
            .get_model_info(proto::GetModelInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        let placement = info.placement.clone().unwrap();
        let (layers, model) = split_of(&info);
        eprintln!("{}: {}", family.name, info.offload);
        // ggml names RPC devices RPC0, RPC1, … in the order servers are
        // added, across the process: find this pair by their endpoints.
        let rpc: Vec<&proto::Device> = placement
            .devices
            .iter()
            .filter(|d| d.description == a.endpoint || d.description == b.endpoint)
            .collect();
        assert_eq!(rpc.len(), 2, "{:?}", placement.devices);
        assert!(rpc
            .iter()
            .all(|d| d.kind == "gpu" && d.memory_total_bytes > 0));
        assert_eq!(
            placement.layers_offloaded, placement.layers_total,
            "every layer offloaded"
        );
        let on: Vec<&str> = layers.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(
            on,
            [rpc[0].name.as_str(), rpc[1].name.as_str()],
            "{layers:?}"
        );
        let (first, second) = (layers[0].1, layers[1].1);
        assert!(first.abs_diff(second) <= 1, "half each: {layers:?}");
        for endpoint in [&a.endpoint, &b.endpoint] {
            assert!(
                model.iter().any(|m| m.contains(endpoint.as_str())),
                "weights on {endpoint}: {model:?}"
            );
        }
        let mut failures = Vec::new();
        for case in family.reference()["chat"].as_array().unwrap() {
            let checked = check_chat_case(&mut client, family, case).await;
            eprintln!("{} over RPC {}", family.name, checked.summary());
            failures.extend(checked.failures);
        }
        server.stop().await;
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_device_killed_mid_stream_fails_loudly() {
    let (a, mut b) = (RpcServer::start(), RpcServer::start());
    let (port, metrics_port) = (free_port(), free_port());
    let metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let stderr = std::env::temp_dir().join(format!("internvl-rpc-{}.log", std::process::id()));
    let mut server = serve_tiny(format!("127.0.0.1:{port}").parse().unwrap(), metrics)
        .args(["--threads", "1"])
        .args(["--rpc-servers", &format!("{},{}", a.endpoint, b.endpoint)])
        .args(["--tensor-split", "1,1"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("the binary starts");
    let url = format!("http://127.0.0.1:{port}");
    let mut watch = serving_watch(&url, &mut server, &stderr, BOUND).await;
    let mut client = proto::intern_vl_client::InternVlClient::connect(url)
        .await
        .unwrap();
    let mut request = greedy(vec![user(vec![text("count to a thousand")])], 400);
    request.ignore_eos = true;
    let mut stream = client.generate(request).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some(), "a first event");

    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let status = loop {
        match tokio::time::timeout(BOUND, stream.message()).await {
            Err(_) => panic!("the stream neither ended nor failed after its device died"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the stream ended as if nothing happened"),
            Ok(Err(status)) => break status,
        }
    };
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status.message().contains(&b.endpoint) && status.message().contains("RPC"),
        "the status names the device: {}",
        status.message()
    );
    assert!(
        !status.message().contains(&a.endpoint),
        "and only the lost one: {}",
        status.message()
    );
    let health_now = tokio::time::timeout(BOUND, watch.message())
        .await
        .expect("health changes")
        .map(|m| m.map(|m| m.status));
    assert!(
        matches!(health_now, Ok(Some(s)) if s == ServingStatus::NotServing as i32),
        "health after the loss: {health_now:?}"
    );
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = server.try_wait().unwrap() {
            break exit;
        }
        assert!(started.elapsed() < BOUND, "still running after the loss");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(!exit.success(), "exit {exit}:\n{log}");
    assert!(log.contains(&b.endpoint), "{log}");
    let _ = std::fs::remove_file(&stderr);
}
