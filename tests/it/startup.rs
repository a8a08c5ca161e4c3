//! A missing or corrupt model file fails start-up of the real binary with a
//! message naming the file and a non-zero exit.

use crate::common;

use std::process::Command;

use common::{fixture, test_cache_dir};

fn serve(model: &str, mmproj: &str) -> (bool, String) {
    serve_with_cache(model, mmproj, &common::test_cache_dir())
}

fn serve_with_cache(model: &str, mmproj: &str, cache: &std::path::Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_internvl-grpc"))
        .env("INTERNVL_CACHE_DIR", cache)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--model",
            model,
            "--mmproj",
            mmproj,
        ])
        .output()
        .expect("binary runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A directory for a test's files, removed when it drops.
fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("internvl-startup-")
        .tempdir()
        .unwrap()
}

fn scratch(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

#[test]
fn missing_and_corrupt_files_fail_start_up_naming_the_file() {
    let model = fixture("tiny-internvl3-f32.gguf").display().to_string();
    let mmproj = fixture("mmproj-tiny-internvl3-f32.gguf")
        .display()
        .to_string();
    let model_bytes = std::fs::read(&model).unwrap();
    let mmproj_bytes = std::fs::read(&mmproj).unwrap();

    let dir = scratch_dir();
    let not_gguf = scratch(&dir, "not-gguf.gguf", b"this is not a model at all");
    let truncated_model = scratch(
        &dir,
        "truncated-model.gguf",
        &model_bytes[..model_bytes.len() / 3],
    );
    let truncated_mmproj = scratch(&dir, "truncated-mmproj.gguf", &mmproj_bytes[..4096]);
    let mut lying = model_bytes.clone();
    lying[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let lying_counts = scratch(&dir, "lying-counts.gguf", &lying);
    let cases = [
        (
            "/nonexistent/model.gguf".to_string(),
            mmproj.clone(),
            "/nonexistent/model.gguf",
        ),
        (
            model.clone(),
            "/nonexistent/mmproj.gguf".to_string(),
            "/nonexistent/mmproj.gguf",
        ),
        (not_gguf.clone(), mmproj.clone(), not_gguf.as_str()),
        (
            truncated_model.clone(),
            mmproj.clone(),
            truncated_model.as_str(),
        ),
        (
            model.clone(),
            truncated_mmproj.clone(),
            truncated_mmproj.as_str(),
        ),
        // The language model given as the mmproj: a valid GGUF, but not a projector.
        (model.clone(), model.clone(), model.as_str()),
        // And the other way round.
        (mmproj.clone(), mmproj.clone(), mmproj.as_str()),
        // A tensor count no file could hold.
        (lying_counts.clone(), mmproj.clone(), lying_counts.as_str()),
    ];
    for (m, p, named) in &cases {
        let (ok, stderr) = serve(m, p);
        assert!(!ok, "start-up with {m} / {p} must fail");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(named),
            "last line {last:?} must name {named}"
        );
    }
}

#[test]
fn a_cache_directory_that_cannot_be_written_fails_start_up_naming_it() {
    let model = fixture("tiny-internvl3-f32.gguf").display().to_string();
    let mmproj = fixture("mmproj-tiny-internvl3-f32.gguf")
        .display()
        .to_string();
    // A file where the directory should be: unwritable for root as well.
    let dir = scratch_dir();
    let blocker = scratch(&dir, "cache-is-a-file", b"");
    let (ok, stderr) = serve_with_cache(&model, &mmproj, std::path::Path::new(&blocker));
    assert!(!ok, "start-up with an unusable cache must fail");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: cache directory") && last.contains(&blocker),
        "last line {last:?} must name the cache directory {blocker}"
    );
}

#[cfg(unix)]
#[test]
fn sigterm_drains_and_exits_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let mut child = Command::new(env!("CARGO_BIN_EXE_internvl-grpc"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--model",
            "tiny",
            "--log-json",
            "true",
        ])
        .env("INTERNVL_CACHE_DIR", test_cache_dir())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Wait for readiness in the JSON log.
    let mut ready = false;
    let mut corrected = 0;
    for line in lines.by_ref() {
        let line = line.unwrap();
        corrected += usize::from(line.contains("vision position rows corrected"));
        if line.contains("\"ready\"") {
            ready = true;
            break;
        }
    }
    assert!(ready, "server never logged ready");
    // The bundled model is converter-made: start-up says once that it corrects it.
    assert_eq!(corrected, 1, "one start-up line about the correction");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status:?}; log: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("draining")), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("drained")), "{rest:?}");
}

/// A replica given more threads than the CPUs it may use (here pinned to one
/// by `taskset`, as a cgroup CPU limit or a CPU set would) says so at start.
#[test]
fn more_threads_than_cpus_is_warned_of_at_start() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let mut child = Command::new("taskset")
        .args(["--cpu-list", "0", env!("CARGO_BIN_EXE_internvl-grpc")])
        .args(["serve", "--listen", "127.0.0.1:0", "--model", "tiny"])
        .args(["--threads", "2"])
        .env("INTERNVL_CACHE_DIR", test_cache_dir())
        .stderr(Stdio::piped())
        .spawn()
        .expect("taskset (util-linux) runs the binary");
    let mut warning = None;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("CPUs this process may use") {
            warning = Some(line.clone());
        }
        if line.contains("ready") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let warning = warning.expect("no warning before ready");
    assert!(
        warning.contains("WARN")
            && warning.contains("threads = 2")
            && warning.contains("may use (1)"),
        "{warning}"
    );
}

/// The fuzzers' GGUF seeds (fuzz/seeds, written by fuzz/make_seeds.py) are
/// whole files that pass every check, so fuzzing starts on the success path
/// rather than at the first refusal.
#[test]
fn the_fuzz_seeds_pass_the_checks_they_start_from() {
    use internvl_core::gguf;
    use internvl_core::gguf_meta::read_tile_spec;
    use internvl_core::position_rows::{prepare, VisionFile};

    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let language = gguf::read(&seeds.join("gguf_header/minimal-language-model.gguf")).unwrap();
    gguf::check_language_model(&language).unwrap();
    let mmproj = seeds.join("mmproj_header/minimal-internvl-mmproj.gguf");
    let (spec, projector) = read_tile_spec(&mmproj).unwrap();
    assert_eq!((projector.as_str(), spec.tile_size), ("internvl", 28));
    let cache = test_cache_dir().join("fuzz-seed");
    let prepared = prepare(&mmproj, Some(&cache)).unwrap();
    assert!(
        matches!(prepared, VisionFile::Corrected { .. }),
        "{prepared:?}"
    );
}

/// A request is one span in the JSON log: the engine's line about it (the
/// generation's end) carries the call's method, its `request_id` and the
/// trace id of the `traceparent` a mesh sent; a malformed `traceparent` is
/// ignored and the call still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_one_span_carrying_its_id_and_the_meshs_trace_id() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    use internvl_grpc::service::proto;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (port, metrics) = (common::free_port(), common::free_port());
    let mut child = common::serve_tiny(
        format!("127.0.0.1:{port}").parse().unwrap(),
        format!("127.0.0.1:{metrics}").parse().unwrap(),
    )
    .args(["--log-json", "true"])
    .stderr(Stdio::piped())
    .spawn()
    .expect("binary runs");
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = |what: &str| {
        lines
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no log line while waiting for {what}"))
    };
    while !next_line("ready").contains("\"ready\"") {}

    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = proto::intern_vl_client::InternVlClient::new(channel);
    let traced_request = |id: &str, traceparent: &str| {
        let mut request = common::greedy(vec![common::user(vec![common::text("Hello!")])], 3);
        request.request_id = id.into();
        let mut request = tonic::Request::new(request);
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
        request
    };
    for (id, traceparent, trace) in [
        (
            "span-test-1",
            format!("00-{TRACE}-00f067aa0ba902b7-01"),
            Some(TRACE),
        ),
        ("span-test-2", "00-not-a-trace-01".to_string(), None),
    ] {
        let stream = client
            .generate(traced_request(id, &traceparent))
            .await
            .unwrap();
        common::collect(stream.into_inner()).await.unwrap();
        let line = loop {
            let line = next_line("the generation's end");
            if line.contains("generation finished") {
                break line;
            }
        };
        let line: serde_json::Value = serde_json::from_str(&line).unwrap();
        let request = line["spans"]
            .as_array()
            .and_then(|spans| spans.iter().find(|s| s["name"] == "request"))
            .unwrap_or_else(|| panic!("the engine's line is inside the request span: {line}"));
        assert_eq!(request["method"], "Generate", "{line}");
        assert_eq!(request["request_id"], id, "{line}");
        assert_eq!(request["trace_id"].as_str(), trace, "{line}");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Every configuration key is a flag of `serve`, made from the schema; a
/// flag, `--set` and the environment all reach the configuration; and a
/// wrong value stops the start naming its key, every wrong key at once,
/// before any model is read.
#[test]
fn every_key_is_a_flag_and_wrong_values_are_named() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let output = Command::new(env!("CARGO_BIN_EXE_internvl-grpc"))
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("binary runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, help, _) = run(&["serve", "--help"], &[]);
    assert!(ok);
    for key in internvl_grpc::config::keys() {
        let flag = format!("--{} ", key.flag());
        assert!(help.contains(&flag), "serve --help lacks {flag}");
    }
    let (ok, merged, err) = run(
        &[
            "config",
            "--check",
            "--n-ctx",
            "1024",
            "--set",
            "split_mode=row",
            "--offline",
            "--n-gpu-layers",
            "-1",
        ],
        &[("INTERNVL_THREADS", "3"), ("INTERNVL_API_KEYS", "s3cret")],
    );
    assert!(ok, "{err}");
    assert!(!merged.contains("s3cret"), "an API key printed: {merged}");
    for line in [
        "n_ctx = 1024",
        "split_mode = \"row\"",
        "offline = true",
        "n_gpu_layers = -1",
        "threads = 3",
    ] {
        assert!(merged.lines().any(|l| l == line), "{line} in {merged}");
    }
    let (ok, _, err) = run(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--model",
            "/nonexistent.gguf",
            "--stream-buffer",
            "0",
            "--n-ubatch",
            "4096",
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("stream_buffer") && err.contains("n_ubatch"),
        "{err}"
    );
    assert!(
        !err.contains("nonexistent"),
        "refused before the model: {err}"
    );
    let (ok, _, err) = run(&["serve", "--n-ctx", "1", "--set", "n_ctx=2"], &[]);
    assert!(!ok && err.contains("n_ctx is set twice"), "{err}");
}
