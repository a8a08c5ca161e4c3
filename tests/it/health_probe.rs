//! `internvl-grpc health`, the container probe, run as a process against a
//! real server: exit 0 only for SERVING, a clear line otherwise.

use crate::common;

use std::process::Output;

use common::*;

async fn probe(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_internvl-grpc"))
            .arg("health")
            .args(args)
            .output()
            .expect("the binary runs")
    })
    .await
    .expect("probe task")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_follows_loading_serving_and_drain() {
    let mut server = start_unready(tiny_config()).await;
    let addr = format!("http://{}", server.addr);

    // While the model loads (or once it is loaded): only SERVING passes.
    let mut seen_serving = false;
    for _ in 0..400 {
        let out = probe(&["--addr", &addr]).await;
        let stdout = text(&out.stdout);
        if out.status.success() {
            assert_eq!(stdout, "SERVING");
            seen_serving = true;
            break;
        }
        assert_eq!(stdout, "NOT_SERVING", "{}", text(&out.stderr));
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(text(&out.stderr), "error: the server is NOT_SERVING");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(seen_serving, "the probe never saw SERVING");

    let out = probe(&["--addr", &addr, "--service", "internvl.v1.InternVL"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // host:port, as grpc-health-probe's -addr and most probes write it.
    let bare = server.addr.to_string();
    let out = probe(&["--addr", &bare]).await;
    assert!(out.status.success(), "--addr {bare}: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "SERVING");
    let out = probe(&["--addr", &addr, "--service", "no.such.Service"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: health check failed: "),
        "{stderr}"
    );
    assert!(
        stderr.contains("NotFound") || stderr.contains("not found"),
        "{stderr}"
    );

    // Draining: NOT_SERVING, so the load balancer stops sending calls here.
    server.begin_shutdown();
    let mut drained = false;
    for _ in 0..100 {
        let out = probe(&["--addr", &addr]).await;
        if !out.status.success() {
            drained = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(drained, "the probe kept passing during the drain");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_or_bad_flags_fail_with_one_line() {
    // A port nothing listens on: bind, note it, close.
    let addr = format!("127.0.0.1:{}", free_port());
    let out = probe(&["--addr", &format!("http://{addr}"), "--timeout", "2"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!("error: cannot connect to http://{addr}: ")),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let out = probe(&["--addr", &format!("https://{addr}")]).await;
    assert_eq!(
        text(&out.stderr),
        "error: an https:// address needs --tls-ca (the CA that signed the server)"
    );
    let out = probe(&["--addr", &format!("http://{addr}"), "--tls-ca", "ca.pem"]).await;
    assert_eq!(
        text(&out.stderr),
        "error: TLS flags need an https:// address"
    );
    let out = probe(&["--timeout", "0"]).await;
    assert_eq!(
        text(&out.stderr),
        "error: --timeout must be a positive number of seconds"
    );
}
