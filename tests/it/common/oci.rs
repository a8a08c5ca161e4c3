//! A Kubernetes container as a container runtime starts it: an OCI bundle
//! whose `config.json` is translated from the rendered pod and container
//! spec, run by `runc` (Debian's `runc`; `scripts/setup` installs it).
//!
//! What is translated, and from where:
//! - `runc spec`'s defaults, which are the runtime's own: the namespaces,
//!   the `/proc`, `/dev` and `/sys` mounts, the masked and read-only `/proc`
//!   paths, the device rules;
//! - the pod's `runAsUser`, `runAsGroup` and `fsGroup` (as a supplementary
//!   group, as the kubelet gives it);
//! - the container's `readOnlyRootFilesystem` (a read-only root),
//!   `allowPrivilegeEscalation: false` (`noNewPrivileges`), `capabilities`
//!   (`drop: ["ALL"]` leaves every set empty; `add` is not supported here);
//! - `seccompProfile: RuntimeDefault`: containers-common's `seccomp.json`
//!   (`/usr/share/containers/seccomp.json`), in the OCI form as CRI-O and
//!   Podman translate it: this machine's architectures, and each rule kept
//!   or dropped by the capabilities it is conditioned on;
//! - the container's `volumeMounts`, from the pod's `volumes`: an
//!   `emptyDir` is a folder of this test's, a `secret` a folder holding the
//!   Secret's `items`.
//!
//! What stands in for the image: the system's `/usr` read-only (with the
//! merged-`/usr` links), a few files of `/etc`, and the image's
//! `/opt/internvl-grpc` folder. The pod shares this machine's network (the
//! fake hub and the test's clients are on its loopback); no network plugin
//! runs here, so the manifests' NetworkPolicy is checked by `.ci/deploy`,
//! not enforced.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

/// Where `containers-common` keeps the runtime's default seccomp profile.
const SECCOMP_PROFILE: &str = "/usr/share/containers/seccomp.json";

/// Files of `/etc` the stand-in image carries.
const ETC: &[&str] = &[
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "ld.so.cache",
    "alternatives",
];

/// Whether `runc` can run pods here (it needs root), and why not.
pub fn usable() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("runc needs root here (rootless runc is not set up)".into());
    }
    let ok = Command::new("runc")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        return Err("no runc: run scripts/setup".into());
    }
    if !Path::new(SECCOMP_PROFILE).exists() {
        return Err(format!("no {SECCOMP_PROFILE}: run scripts/setup"));
    }
    Ok(())
}

/// `runc spec`'s configuration: the runtime's defaults.
fn runtime_defaults() -> Value {
    let dir = tempfile::tempdir().unwrap();
    let made = Command::new("runc")
        .arg("spec")
        .current_dir(dir.path())
        .status()
        .expect("runc spec");
    assert!(made.success(), "runc spec failed");
    serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap()
}

/// containers-common's profile as the OCI runtime reads it, for a process
/// holding `capabilities` on this machine's architecture.
pub fn runtime_default_seccomp(capabilities: &[String]) -> Value {
    let profile: Value =
        serde_json::from_slice(&std::fs::read(SECCOMP_PROFILE).unwrap()).expect("seccomp.json");
    let (scmp_arch, go_arch) = match std::env::consts::ARCH {
        "x86_64" => ("SCMP_ARCH_X86_64", "amd64"),
        "aarch64" => ("SCMP_ARCH_AARCH64", "arm64"),
        other => panic!("no seccomp architecture for {other}"),
    };
    let mut architectures = Vec::new();
    for entry in profile["archMap"].as_array().unwrap() {
        if entry["architecture"] == scmp_arch {
            architectures.push(entry["architecture"].clone());
            architectures.extend(
                entry["subArchitectures"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .cloned(),
            );
        }
    }
    let held = |list: &Value| -> Vec<bool> {
        list.as_array()
            .into_iter()
            .flatten()
            .map(|c| capabilities.iter().any(|h| c == h.as_str()))
            .collect()
    };
    let on_arch = |list: &Value| list.as_array().map(|a| a.iter().any(|x| x == go_arch));
    let mut syscalls = Vec::new();
    for rule in profile["syscalls"].as_array().unwrap() {
        let (includes, excludes) = (&rule["includes"], &rule["excludes"]);
        // A rule for holders of capabilities applies only if all are held;
        // one for non-holders, only if none is.
        if !held(&includes["caps"]).iter().all(|h| *h)
            || held(&excludes["caps"]).iter().any(|h| *h)
            || on_arch(&includes["arches"]) == Some(false)
            || on_arch(&excludes["arches"]) == Some(true)
        {
            continue;
        }
        let mut oci = json!({ "names": rule["names"], "action": rule["action"] });
        if let Some(args) = rule["args"].as_array().filter(|a| !a.is_empty()) {
            oci["args"] = json!(args);
        }
        if let Some(errno) = rule.get("errnoRet") {
            oci["errnoRet"] = errno.clone();
        }
        syscalls.push(oci);
    }
    json!({
        "defaultAction": profile["defaultAction"],
        "defaultErrnoRet": profile["defaultErrnoRet"],
        "architectures": architectures,
        "syscalls": syscalls,
    })
}

/// One container of a rendered pod, ready to run.
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
}

/// The pod-level facts a container's bundle needs.
pub struct Pod<'a> {
    /// The rendered `spec.template.spec`.
    pub spec: &'a Value,
    /// The image's `/opt/internvl-grpc` on this machine.
    pub image: &'a Path,
    /// Each `emptyDir` volume's folder, by volume name.
    pub empty_dirs: &'a HashMap<String, PathBuf>,
    /// Each Secret's data, by Secret name: key → contents.
    pub secrets: &'a HashMap<String, HashMap<String, String>>,
    /// Where bundles and Secret folders are made.
    pub work: &'a Path,
}

impl Pod<'_> {
    /// `container` (a rendered container spec) with `env` (resolved) and
    /// `args` (expanded) as an OCI bundle named `id`.
    pub fn bundle(
        &self,
        id: &str,
        container: &Value,
        env: &[(String, String)],
        args: &[String],
    ) -> Container {
        let bundle = self.work.join(id);
        let _ = std::fs::remove_dir_all(&bundle);
        let rootfs = bundle.join("rootfs");
        for dir in ["usr", "etc", "proc", "dev", "sys", "opt/internvl-grpc"] {
            std::fs::create_dir_all(rootfs.join(dir)).unwrap();
        }
        for link in ["bin", "lib", "lib64", "sbin"] {
            if Path::new("/").join(link).is_symlink() {
                std::os::unix::fs::symlink(format!("usr/{link}"), rootfs.join(link)).unwrap();
            }
        }
        for file in ETC {
            let from = Path::new("/etc").join(file);
            if from.exists() {
                let copied = Command::new("cp")
                    .arg("-a")
                    .arg(&from)
                    .arg(rootfs.join("etc"))
                    .status()
                    .unwrap();
                assert!(copied.success(), "cp -a {}", from.display());
            }
        }

        let security = &self.spec["securityContext"];
        let own = &container["securityContext"];
        let uid = security["runAsUser"].as_u64().expect("runAsUser");
        let gid = security["runAsGroup"].as_u64().expect("runAsGroup");
        let mut groups = vec![];
        if let Some(fs_group) = security["fsGroup"].as_u64() {
            groups.push(fs_group);
        }
        assert_eq!(
            own["capabilities"]["drop"],
            json!(["ALL"]),
            "this translation drops every capability or none"
        );
        assert!(
            own["capabilities"]["add"].is_null(),
            "capabilities.add is not translated"
        );
        assert_eq!(
            security["seccompProfile"]["type"], "RuntimeDefault",
            "this translation knows RuntimeDefault only"
        );

        let mut config = runtime_defaults();
        config["root"] =
            json!({ "path": "rootfs", "readonly": own["readOnlyRootFilesystem"] == true });
        config["hostname"] = json!("internvl-grpc");
        let process = &mut config["process"];
        process["terminal"] = json!(false);
        process["user"] = json!({ "uid": uid, "gid": gid, "additionalGids": groups });
        process["args"] = json!(
            std::iter::once("/opt/internvl-grpc/internvl-grpc".to_string())
                .chain(args.iter().cloned())
                .collect::<Vec<_>>()
        );
        process["env"] = json!(env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>());
        process["cwd"] = json!("/");
        process["noNewPrivileges"] = json!(own["allowPrivilegeEscalation"] == false);
        for set in [
            "bounding",
            "effective",
            "inheritable",
            "permitted",
            "ambient",
        ] {
            process["capabilities"][set] = json!([]);
        }

        let mounts = config["mounts"].as_array_mut().unwrap();
        let bind = |source: &Path, destination: &str, read_only: bool| {
            json!({
                "destination": destination,
                "type": "bind",
                "source": source,
                "options": ["rbind", if read_only { "ro" } else { "rw" }, "nosuid", "nodev"],
            })
        };
        mounts.push(bind(Path::new("/usr"), "/usr", true));
        mounts.push(bind(self.image, "/opt/internvl-grpc", true));
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let name = mount["name"].as_str().unwrap();
            let path = mount["mountPath"].as_str().unwrap();
            let read_only = mount["readOnly"] == true;
            let volume = self.spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("no volume {name}"));
            let source = if volume.get("emptyDir").is_some() {
                self.empty_dirs[name].clone()
            } else if let Some(secret) = volume.get("secret") {
                self.secret_folder(secret, gid)
            } else {
                panic!("a volume kind this translation does not know: {volume}");
            };
            mounts.push(bind(&source, path, read_only));
        }

        let linux = &mut config["linux"];
        // The host's network: the fake hub and the clients are on loopback.
        linux["namespaces"] = json!(linux["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["type"] != "network")
            .cloned()
            .collect::<Vec<_>>());
        linux["seccomp"] = runtime_default_seccomp(&[]);
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&config).unwrap(),
        )
        .unwrap();
        Container {
            id: id.to_string(),
            bundle,
        }
    }

    /// A Secret volume as the kubelet writes it: each item's key at its
    /// path, `defaultMode`, owned by the pod's group.
    fn secret_folder(&self, volume: &Value, gid: u64) -> PathBuf {
        let name = volume["secretName"].as_str().unwrap();
        let data = self.secrets.get(name).unwrap_or_else(|| {
            panic!("the pod needs Secret {name}; the test creates none by that name")
        });
        let folder = self.work.join(format!("secret-{name}"));
        let _ = std::fs::remove_dir_all(&folder);
        std::fs::create_dir_all(&folder).unwrap();
        let mode = volume["defaultMode"].as_u64().unwrap_or(0o644) as u32;
        let items: Vec<(String, String)> = match volume["items"].as_array() {
            Some(items) => items
                .iter()
                .map(|i| {
                    (
                        i["key"].as_str().unwrap().into(),
                        i["path"].as_str().unwrap().into(),
                    )
                })
                .collect(),
            None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
        };
        for (key, path) in items {
            let file = folder.join(&path);
            std::fs::write(&file, &data[&key]).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::chown(&file, Some(0), Some(gid as u32)).unwrap();
        }
        folder
    }
}

impl Container {
    /// `runc run`, in the foreground: the container's process is runc's
    /// child, its exit status runc's, and signals to runc reach it.
    pub fn run(&self) -> Command {
        let mut command = Command::new("runc");
        command
            .args(["run", "--bundle"])
            .arg(&self.bundle)
            .arg(&self.id);
        command
    }

    /// `runc exec` of `args` in the running container, as its user.
    pub fn exec(&self, uid: u64, gid: u64, args: &[&str]) -> std::process::Output {
        Command::new("runc")
            .args(["exec", "--user", &format!("{uid}:{gid}"), &self.id])
            .args(args)
            .output()
            .expect("runc exec")
    }

    /// The container's first process, as this machine numbers it.
    pub fn pid(&self) -> u32 {
        let state = Command::new("runc")
            .args(["state", &self.id])
            .output()
            .expect("runc state");
        let state: Value = serde_json::from_slice(&state.stdout).expect("runc state's JSON");
        state["pid"].as_u64().expect("a running container's pid") as u32
    }

    /// `runc kill` with `signal`.
    pub fn kill(&self, signal: &str) -> bool {
        Command::new("runc")
            .args(["kill", &self.id, signal])
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.id])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.bundle);
    }
}
