//! The video decoder's confinement (`internvl-grpc confine`, src/confine.rs)
//! seen from inside: a probe (tests/python/confine_probe.py) runs where
//! FFmpeg would, started exactly as the server starts FFmpeg, and tries what
//! an exploited decoder would try first. The same probe under
//! `--limits-only` (`media_video_sandbox = off`) succeeds at those things,
//! so every refusal below is the confinement's, not the probe's.

use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::common::{probe, INTERNVL3};

const MEMORY: u64 = 2 << 30;

/// A stand-in for the pod's service-account token, outside `/usr`.
fn token() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("confine-probe/var/run/secrets/kubernetes.io/serviceaccount");
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.not-a-real-token").unwrap();
    token
}

/// The probe's findings, run as `internvl-grpc confine` runs FFmpeg: an
/// empty environment, its input on stdin as an in-memory file.
fn probe(limits_only: bool, secrets: &[PathBuf]) -> Value {
    let fd = rustix::fs::memfd_create("probe-input", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let mut input = std::fs::File::from(fd);
    input.write_all(b"a video file's bytes").unwrap();
    input.rewind().unwrap();
    // Descriptor 5 open on the model without close-on-exec, as a careless
    // parent or a C library's fopen leaves one (opened by a shell in the
    // child, so no other test's children inherit it): Landlock would not
    // stop reads through it, so the helper must close it.
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", r#"exec 5<"$0" && exec "$@""#])
        .arg(INTERNVL3.model_path())
        .arg(env!("CARGO_BIN_EXE_internvl-grpc"))
        .args(["confine", "--memory-bytes", &MEMORY.to_string()]);
    if limits_only {
        command.arg("--limits-only");
    }
    let output = command
        .args(["--", "/usr/bin/python3", "-I", "-S", "-c", &probe::script()])
        .args(secrets)
        .arg(std::process::id().to_string())
        .env_clear()
        .stdin(Stdio::from(input))
        .output()
        .expect("the binary runs");
    assert!(
        output.status.success(),
        "probe failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the probe's JSON")
}

#[test]
fn the_confined_child_has_no_network_no_secrets_and_no_neighbours() {
    let secrets = [INTERNVL3.model_path(), token()];
    let open = probe(true, &secrets);
    eprintln!("resource limits only: {open}");
    let shut = probe(false, &secrets);
    eprintln!("confined: {shut}");

    // What the unconfined probe can do, so the refusals below mean something.
    for can in [
        "socket_inet",
        "socket_unix",
        "read_secret_0",
        "read_secret_1",
        "write_beside_secret_0",
        "read_etc_passwd",
        "read_server_environ",
        "signal_server",
        "ptrace_server",
    ] {
        assert_eq!(open[can], "ok", "unconfined, {can}: {open}");
    }
    assert_eq!(open["no_new_privs"], 0, "{open}");
    // Closed either way: the descriptor the shell left open on the model.
    assert_eq!(open["inherited_fds"], serde_json::json!([]), "{open}");

    probe::assert_confined(&shut, "confined", true);
    assert_eq!(shut["rlimit_as"], MEMORY, "{shut}");
}
