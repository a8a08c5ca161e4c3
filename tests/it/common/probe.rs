//! The confinement probe (tests/python/confine_probe.py): its script, and
//! what it must find inside FFmpeg's confinement. `confine.rs` runs it
//! here, `kubelet.rs` in the runc pod; both hold it to the same rules.

use std::path::Path;

use serde_json::Value;

/// The probe's script, passed inline: under Landlock the file is unreadable.
pub fn script() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/confine_probe.py");
    std::fs::read_to_string(path).unwrap()
}

/// Asserts what the probe `found` inside the confinement (`context` names
/// the run). `has_tmp`: the root has a `/tmp` to try writing (a pod's
/// read-only root has none, and ENOENT there proves nothing).
pub fn assert_confined(found: &Value, context: &str, has_tmp: bool) {
    // Refused by the seccomp filter: sockets, other processes, namespaces.
    for refused in [
        "socket_inet",
        "socket_inet6",
        "socket_unix",
        "connect_loopback",
        "signal_server",
        "signal_everyone",
        "ptrace_server",
        "unshare_user",
        "unshare_net",
    ] {
        assert_eq!(found[refused], "EPERM", "{context}, {refused}: {found}");
    }
    // Refused by Landlock: the secrets, anything written, anything outside
    // /usr (other processes' /proc files included).
    let mut landlock = vec![
        "read_secret_0",
        "read_secret_1",
        "write_beside_secret_0",
        "read_etc_passwd",
        "read_server_environ",
        "read_server_memory",
    ];
    if has_tmp {
        landlock.push("write_tmp");
    }
    for refused in landlock {
        assert_eq!(found[refused], "EACCES", "{context}, {refused}: {found}");
    }
    // What decoding needs still works.
    for can in ["read_usr", "read_stdin", "read_dev_stdin"] {
        assert_eq!(found[can], "ok", "{context}, {can}: {found}");
    }
    assert_eq!(
        found["inherited_fds"],
        serde_json::json!([]),
        "{context}: {found}"
    );
    assert_eq!(found["no_new_privs"], 1, "{context}: {found}");
    assert_eq!(found["seccomp_mode"], 2, "{context}: {found}");
    assert_eq!(found["rlimit_core"], 0, "{context}: {found}");
    assert_eq!(found["rlimit_fsize"], 0, "{context}: {found}");
}
