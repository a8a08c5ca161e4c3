//! Health while loading and when ready, reflection, and Generate options
//! (stop sequences, seeded sampling), over real gRPC.

use crate::common;

use std::time::Duration;

use common::*;
use internvl_grpc::service::proto;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

async fn health_status(server: &TestServer, service: &str) -> i32 {
    server
        .health()
        .await
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_while_the_model_loads() {
    // A named pipe as the model file: loading blocks on it until we write.
    let dir = std::env::temp_dir().join(format!("internvl-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("model.gguf");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());

    let mut config = tiny_config();
    config.model = fifo.display().to_string();
    config.mmproj = fixture("mmproj-tiny-internvl3-f32.gguf")
        .display()
        .to_string();
    let server = start_unready(config).await;

    for service in ["", "internvl.v1.InternVL"] {
        assert_eq!(
            health_status(&server, service).await,
            ServingStatus::NotServing as i32,
            "{service:?}"
        );
    }
    let status = server
        .client()
        .await
        .get_model_info(proto::GetModelInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // Feed the loader a file that is not a model: start-up fails, naming it.
    let path = fifo.clone();
    tokio::task::spawn_blocking(move || std::fs::write(path, b"not a gguf"))
        .await
        .unwrap()
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), server.handle)
        .await
        .expect("run ends")
        .unwrap()
        .expect_err("load fails");
    assert!(err.to_string().contains("model.gguf"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_when_ready() {
    let server = start(tiny_config()).await;
    for service in ["", "internvl.v1.InternVL"] {
        assert_eq!(
            health_status(&server, service).await,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"internvl.v1.InternVL".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let info = server
        .client()
        .await
        .get_model_info(proto::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.vocab_size, info.embedding_size, info.tile_size),
        (4026, 64, 448)
    );
    assert_eq!(
        (info.min_tiles, info.max_tiles, info.image_tokens_per_tile),
        (1, 12, 256)
    );
    assert_eq!(info.architecture, "qwen2");
    assert!(info.chat_template.contains("<IMG_CONTEXT>"));
    // A default build links AVX2 kernels without AVX-512; one with
    // `dynamic-backends` loads the best variant for this CPU (README "CPU
    // kernels").
    #[cfg(target_arch = "x86_64")]
    {
        let kernels: Vec<&str> = info
            .cpu_kernels
            .split(" (")
            .next()
            .unwrap()
            .split(' ')
            .collect();
        assert!(kernels.contains(&"AVX2"), "{}", info.cpu_kernels);
        if cfg!(feature = "dynamic-backends") {
            assert!(
                info.cpu_kernels.contains(".so, chosen at start)"),
                "{}",
                info.cpu_kernels
            );
            assert_eq!(
                kernels.contains(&"AVX512"),
                std::arch::is_x86_feature_detected!("avx512f"),
                "{}",
                info.cpu_kernels
            );
        } else {
            assert!(
                info.cpu_kernels.contains(" (built in)"),
                "{}",
                info.cpu_kernels
            );
            assert!(!kernels.contains(&"AVX512"), "{}", info.cpu_kernels);
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_and_seeded_sampling() {
    let server = start(tiny_config()).await;
    let mut client = server.client().await;
    let hello = || vec![user(vec![text("Hello! Who are you?")])];

    // The greedy reply starts "imum spiritames if…": stop at "ames".
    let mut request = greedy(hello(), 24);
    request.stop = vec!["ames".into()];
    let got = generate_ok(&mut client, request).await;
    let done = got.done.unwrap();
    assert_eq!(done.finish_reason, proto::FinishReason::StopSequence as i32);
    assert_eq!(got.text, "imum spirit");
    assert_eq!(
        done.usage.unwrap().completion_tokens as usize,
        got.ids.len()
    );

    // The same seed gives the same sample; logprobs are reported per token.
    let sampled = |seed| proto::GenerateRequest {
        sampling: Some(proto::SamplingParams {
            temperature: 1.5,
            top_k: 50,
            top_p: 0.95,
            seed: Some(seed),
            ..Default::default()
        }),
        top_logprobs: 2,
        ..greedy(hello(), 16)
    };
    let a = generate_ok(&mut client, sampled(7)).await;
    let b = generate_ok(&mut client, sampled(7)).await;
    // ignore_eos (from `greedy`): all 16 tokens come, so the checks below
    // cannot pass on an empty reply.
    assert_eq!(a.ids.len(), 16);
    assert_eq!(a.ids, b.ids);
    assert_eq!(a.tokens.len(), 16);
    assert!(a.tokens.iter().all(|t| t.logprob < 0.0 && t.top.len() == 2));
    // The sampled token's log-probability is among its alternatives' order:
    // at most the best one's.
    assert!(a
        .tokens
        .iter()
        .all(|t| t.logprob <= t.top[0].logprob + 1e-6 && t.top[0].logprob >= t.top[1].logprob));
    // logprobs alone: a probability per token, no alternatives.
    let only = generate_ok(
        &mut client,
        proto::GenerateRequest {
            logprobs: true,
            ..greedy(hello(), 4)
        },
    )
    .await;
    assert_eq!(only.tokens.len(), 4);
    assert!(only
        .tokens
        .iter()
        .all(|t| t.logprob < 0.0 && t.top.is_empty()));
    let greedy_ids = generate_ok(&mut client, greedy(hello(), 16)).await.ids;
    assert_eq!(greedy_ids.len(), 16);
    let mut samples = vec![a.ids.clone()];
    for seed in 1..6 {
        let c = generate_ok(&mut client, sampled(seed)).await;
        assert_eq!(c.ids.len(), 16, "seed {seed}");
        samples.push(c.ids);
    }
    assert!(
        samples.iter().any(|s| *s != greedy_ids),
        "temperature 1.5 never left the greedy path in 6 seeds"
    );
    // Different seeds give different samples (a seed that were ignored
    // would give one sample six times).
    samples.sort();
    samples.dedup();
    assert!(samples.len() >= 2, "six seeds gave one sample");
    server.stop().await;
}
