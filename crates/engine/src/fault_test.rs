//! A panic on the engine thread, injected by this crate's own test build
//! only (`cfg(test)`: no build of the service, the tests' included, can
//! carry the hook): every open and queued call hears a fault and the engine
//! reports it. The service's side of a fault (health, exit status) is
//! `tests/rpc.rs`'s, with a real one: an RPC device killed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use internvl_core::prompt::{ChatMessage, Part, Role};
use internvl_core::sampling::SamplingParams;
use internvl_core::types::{EmbedRequest, GenerateRequest, ModelPaths, Pooling};

use crate::{Engine, EngineError, FAULT_SEED, FAULT_TOKEN};

fn fixture(file: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny-internvl"
    ))
    .join(file)
}

fn long(seed: u64) -> GenerateRequest {
    GenerateRequest {
        messages: vec![ChatMessage {
            role: Role::User,
            parts: vec![Part::Text("count to a thousand".into())],
        }],
        sampling: SamplingParams {
            seed: Some(seed),
            ..Default::default()
        },
        max_new_tokens: 400,
        stop: Vec::new(),
        ignore_eos: true,
        top_logprobs: 0,
        logprobs: false,
        request_id: String::new(),
        deadline: None,
        response_format: None,
        partition: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_the_engine_thread_answers_every_caller_with_a_fault() {
    let cache = tempfile::tempdir().unwrap();
    let settings = internvl_api::config::Config {
        threads: 1,
        parallel: 2,
        // One event a stream: a caller that does not read holds its
        // sequence where it is (no transport pulls events here).
        stream_buffer: 1,
        cache_dir: Some(cache.path().to_path_buf()),
        ..Default::default()
    }
    .engine_settings()
    .unwrap();
    let paths = ModelPaths {
        model: fixture("tiny-internvl3-f32.gguf"),
        mmproj: fixture("mmproj-tiny-internvl3-f32.gguf"),
    };
    let engine = Engine::spawn(settings, move || Ok(paths)).unwrap();
    engine.wait_ready().await.unwrap();

    // Two running streams, both held after a first event.
    let mut running = engine
        .generate(long(1), engine.admit().unwrap())
        .await
        .unwrap();
    assert!(running.recv().await.unwrap().is_ok());
    let mut faulty = engine
        .generate(long(FAULT_SEED), engine.admit().unwrap())
        .await
        .unwrap();
    assert!(faulty.recv().await.unwrap().is_ok());
    // A Generate and an Embed queued behind them.
    let queued = engine
        .generate(long(2), engine.admit().unwrap())
        .await
        .unwrap();
    let embed = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let request = EmbedRequest {
                inputs: vec![vec![Part::Text("queued".into())]],
                pooling: Pooling::Mean,
                normalize: false,
                deadline: None,
                request_id: String::new(),
                partition: Default::default(),
            };
            engine.embed(request, engine.admit().unwrap()).await
        })
    };
    let started = Instant::now();
    while engine.in_flight() < 4 {
        assert!(started.elapsed() < Duration::from_secs(60), "never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Reading on lets the faulty stream reach its fault.
    let mut deltas = 0;
    let ended = loop {
        match faulty.recv().await.expect("an end") {
            Ok(_) => deltas += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(ended, EngineError::Fault(ref why) if why.contains("fault injected")));
    assert!(
        deltas < FAULT_TOKEN as usize,
        "{deltas} events: past the fault"
    );
    let rest = |mut events: crate::GenerateEvents| async move {
        loop {
            match events.recv().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    };
    assert!(
        matches!(rest(running).await, Some(EngineError::Fault(_))),
        "a running stream"
    );
    assert!(
        matches!(rest(queued).await, Some(EngineError::Fault(_))),
        "a queued stream"
    );
    let embedded = tokio::time::timeout(Duration::from_secs(60), embed)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(embedded, Err(EngineError::Fault(_))),
        "a queued Embed"
    );
    // The engine says so, for the service to leave rotation and exit.
    let fault = tokio::time::timeout(Duration::from_secs(10), engine.wait_fault()).await;
    assert!(matches!(fault.as_deref(), Ok(EngineError::Fault(_))));
    // And takes no new work.
    let admitted = engine.admit().unwrap();
    assert!(engine.generate(long(3), admitted).await.is_err());
}
