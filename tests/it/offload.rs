//! What `GetModelInfo.placement` says is what ggml did, on whatever devices
//! this build and host have: the CPU alone in the default build; lavapipe
//! or a GPU in a `vulkan` build with a device (scripts/check-offload runs it
//! so, with full and partial offload). And device settings that cannot work
//! stop start-up with a message naming the setting, before llama.cpp sees
//! them (it would fall back to the CPU without a word, or abort).

use crate::common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::rpc::RpcServer;
use common::*;
use internvl_grpc::service::proto;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_reports_what_ggml_did() {
    for family in [&INTERNVL3, &INTERNVL35] {
        let config = family.config();
        let server = start(config.clone()).await;
        let mut client = server.client().await;
        let info = client
            .get_model_info(proto::GetModelInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        server.stop().await;
        let p = info.placement.expect("placement");
        eprintln!("{}: {}", family.name, info.offload);
        assert!(p.devices.iter().any(|d| d.kind == "cpu"), "{:?}", p.devices);
        let gpu = p
            .devices
            .iter()
            .find(|d| d.kind == "gpu" || d.kind == "igpu");
        assert!(p.layers_total > 1, "{p:?}");
        assert!(info.offload.starts_with(&format!(
            "{}/{} layers offloaded",
            p.layers_offloaded, p.layers_total
        )));
        let kv: Vec<&str> = p
            .buffers
            .iter()
            .filter(|b| b.kind == "kv_cache")
            .map(|b| b.location.as_str())
            .collect();
        let model_on = |location: &str| {
            p.buffers
                .iter()
                .any(|b| b.kind == "model" && b.location == location && b.bytes > 0)
        };
        match gpu {
            None => {
                assert_eq!(p.layers_offloaded, 0, "{p:?}");
                assert_eq!(p.vision_backend, "CPU");
                assert_eq!(kv, ["CPU"]);
                assert!(p.layers.iter().all(|l| l.device == "CPU"), "{p:?}");
            }
            Some(gpu) => {
                let wanted = if config.n_gpu_layers < 0 {
                    p.layers_total
                } else {
                    (config.n_gpu_layers as u32).min(p.layers_total)
                };
                assert_eq!(p.layers_offloaded, wanted, "{p:?}");
                assert!(model_on(&gpu.name), "weights on {}: {p:?}", gpu.name);
                let vision = if config.mmproj_offload {
                    gpu.name.as_str()
                } else {
                    "CPU"
                };
                assert_eq!(p.vision_backend, vision);
                assert!(gpu.memory_total_bytes > 0);
                if wanted == p.layers_total {
                    assert_eq!(kv, [gpu.name.as_str()], "{p:?}");
                }
            }
        }
        assert!(p.vision_model_bytes > 0);
    }
}

/// `serve` of the tiny InternVL3 with `args`, which must fail within a
/// minute; its stderr.
fn serve_fails(args: &[&str]) -> String {
    let mut command = tiny_serve_command();
    command
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("binary runs");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("{args:?} started and kept serving");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success(), "{args:?} exited 0");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn device_settings_that_cannot_work_stop_start_up_naming_the_setting() {
    let rpc = RpcServer::start();
    let unreachable = format!("127.0.0.1:{}", free_port());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--devices", "NoSuchDevice0"], "devices[0]"),
        (vec!["--rpc-servers", &unreachable], "rpc_servers[0]"),
        (vec!["--rpc-servers", "no-port"], "rpc_servers"),
        // Without Vulkan in the build, or past the end of Vulkan's list
        // (where ggml would abort the process).
        (vec!["--vulkan-devices", "7"], "vulkan_devices"),
        (
            vec!["--rpc-servers", &rpc.endpoint, "--tensor-split", "1,1,1"],
            "tensor_split",
        ),
        (
            vec![
                "--rpc-servers",
                &rpc.endpoint,
                "--split-mode",
                "none",
                "--main-gpu",
                "5",
            ],
            "main_gpu",
        ),
    ];
    for (args, setting) in &cases {
        let stderr = serve_fails(args);
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("{args:?}: no error line in\n{stderr}"));
        assert!(error.contains(setting), "{args:?}: {error}");
        assert!(
            !stderr.contains("GGML_ASSERT") && !stderr.contains("ggml aborted"),
            "{args:?} reached llama.cpp: {stderr}"
        );
    }
    if cfg!(feature = "vulkan") {
        // A Vulkan build with no device it may use (lavapipe is skipped
        // unless named) refuses to fall back to the CPU silently.
        if std::env::var_os("GGML_VK_VISIBLE_DEVICES").is_none()
            && std::env::var_os("INTERNVL_VULKAN_DEVICES").is_none()
        {
            let stderr = serve_fails(&[]);
            assert!(stderr.contains("n_gpu_layers"), "{stderr}");
        }
        // ggml's own variable is checked the same way.
        let mut command = tiny_serve_command();
        let output = command
            .args(["--listen", "127.0.0.1:0"])
            .env("GGML_VK_VISIBLE_DEVICES", "0,9")
            .env_remove("INTERNVL_VULKAN_DEVICES")
            .stdout(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success()
                && stderr.contains("GGML_VK_VISIBLE_DEVICES: no Vulkan device 9"),
            "{stderr}"
        );
    }
}
