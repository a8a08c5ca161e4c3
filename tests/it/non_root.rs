//! The binary as the container images run it: a user of its own (not root)
//! that can write nothing but its cache directory. It serves, passes the
//! health probe, and with an unwritable cache stops at once, naming it.
//!
//! Needs root to switch users (`setpriv`, util-linux); run as another user it
//! already is non-root and runs as itself.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The nobody user: owns nothing, so every root-owned file is read-only to it.
const NOBODY: &str = "65534";

fn as_nobody(program: &Path) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn serve(cache: &Path, port: u16) -> Command {
    let mut c = as_nobody(Path::new(env!("CARGO_BIN_EXE_internvl-grpc")));
    c.arg("serve")
        .arg("--model")
        .arg(INTERNVL3.model_path())
        .arg("--mmproj")
        .arg(INTERNVL3.mmproj_path())
        .arg("--cache-dir")
        .arg(cache)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_remove("HOME")
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null());
    c
}

#[test]
fn serves_as_an_unprivileged_user_writing_only_its_cache() {
    let dir = std::env::temp_dir().join(format!("internvl-nonroot-{}", std::process::id()));
    let cache = dir.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    // World-writable for the test only, as a volume owned by the image's user.
    for d in [&dir, &cache] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let port = free_port();
    let mut server = serve(&cache, port)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let probe = || {
        as_nobody(Path::new(env!("CARGO_BIN_EXE_internvl-grpc")))
            .args(["health", "--addr", &format!("http://127.0.0.1:{port}")])
            .output()
            .unwrap()
    };
    let mut serving = false;
    for _ in 0..300 {
        if probe().status.success() {
            serving = true;
            break;
        }
        assert!(server.try_wait().unwrap().is_none(), "the server exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    let status = server.wait().unwrap();
    assert!(serving, "never SERVING as an unprivileged user");
    assert!(status.success(), "drained and exited 0: {status:?}");
    // What it wrote: the corrected mmproj (and its hash memo), in the cache.
    let written: Vec<String> = std::fs::read_dir(cache.join("mmproj"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        written.iter().any(|n| n.ends_with("-rows1.gguf")),
        "the corrected mmproj is in the cache: {written:?}"
    );

    // A cache directory it may not write: start-up stops, naming it.
    let locked = dir.join("locked");
    std::fs::create_dir_all(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    let out = serve(&locked, free_port()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(!out.status.success());
    assert!(
        last.starts_with("error: cache directory") && last.contains(&*locked.to_string_lossy()),
        "{last}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
