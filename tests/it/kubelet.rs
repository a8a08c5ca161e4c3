//! The pods of `deploy/kubernetes/` started as a kubelet starts them, for
//! each overlay: the rendered Deployment's init container (`pull`, against a
//! fake hub on loopback), then the server container, each with
//! - the image's environment (`deploy/docker/Dockerfile`'s `ENV`), then the
//!   container's `env` resolved as the kubelet does (values, ConfigMap keys,
//!   `requests.cpu`), `$(VAR)` expanded in `args`;
//! - the service-link variables the kubelet adds for every Service the
//!   overlay renders (whatever `enableServiceLinks` says: a namespace can
//!   still have them, and the binary must start either way);
//! - the image's `/opt/internvl-grpc`: the binary, ggml's libraries and CPU
//!   plugins in one folder, as the Dockerfile copies them, and nothing of the
//!   build folder (the binary must find them beside itself);
//! - the pod's user and group, a read-only root and the `models` volume
//!   writable (bubblewrap, where the machine allows user namespaces; else
//!   `setpriv` to that user, root still writable).
//!
//! Then the startup, readiness and liveness probes as written (gRPC health,
//! the probe's service name, its timeout, within `periodSeconds ×
//! failureThreshold`), and SIGTERM, which must end the server with status 0
//! within `terminationGracePeriodSeconds`.
//!
//! Two changes to what the overlay renders, both outside the pod: the
//! ConfigMap's model is one the fake hub serves (the tiny InternVL3 under
//! `internvl3-1b`'s names: the real files cannot be downloaded here), and
//! `HF_ENDPOINT` points at that hub (the internet's stand-in).
//!
//! The ports are the manifests' own (50051 and 9090) on this machine's
//! network, so the overlays run one after the other in one test.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::hub::*;
use common::*;
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// The catalog model the fake hub serves in place of the overlay's.
const SERVED_MODEL: &str = "internvl3-1b";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl kustomize` of an overlay, as JSON documents (PyYAML from the
/// test virtual environment reads kustomize's YAML).
fn render(overlay: &str) -> Vec<Value> {
    let dir = repo_root().join("deploy/kubernetes/overlays").join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("kubectl runs (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut python = Command::new(python())
        .args([
            "-c",
            "import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python");
    use std::io::Write;
    python.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let json = python.wait_with_output().unwrap();
    assert!(json.status.success());
    serde_json::from_slice(&json.stdout).expect("rendered JSON")
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// `ENV` of the runtime image: the last stage's `ENV` lines.
fn image_env() -> Vec<(String, String)> {
    let dockerfile = std::fs::read_to_string(repo_root().join("deploy/docker/Dockerfile")).unwrap();
    let last_stage = dockerfile.rsplit("\nFROM ").next().unwrap();
    let joined = last_stage.replace("\\\n", " ");
    let mut env = Vec::new();
    for line in joined.lines() {
        if let Some(rest) = line.trim().strip_prefix("ENV ") {
            for pair in rest.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("ENV K=V");
                env.push((k.to_string(), v.to_string()));
            }
        }
    }
    assert!(!env.is_empty(), "the image sets its settings");
    env
}

/// The variables the kubelet adds for `services` (pkg/kubelet/envvars):
/// headless Services get none; the first port is the Service's own.
fn service_links(services: &[&Value]) -> Vec<(String, String)> {
    let mut vars = vec![
        (
            "KUBERNETES_SERVICE_HOST".to_string(),
            "10.96.0.1".to_string(),
        ),
        ("KUBERNETES_SERVICE_PORT".to_string(), "443".to_string()),
        (
            "KUBERNETES_PORT".to_string(),
            "tcp://10.96.0.1:443".to_string(),
        ),
    ];
    for (i, service) in services.iter().enumerate() {
        if service["spec"]["clusterIP"] == "None" {
            continue;
        }
        let ip = format!("10.96.7.{}", i + 10);
        let name = service["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_ascii_uppercase()
            .replace('-', "_");
        let ports = service["spec"]["ports"].as_array().unwrap();
        let first = ports[0]["port"].as_u64().unwrap();
        vars.push((format!("{name}_SERVICE_HOST"), ip.clone()));
        vars.push((format!("{name}_SERVICE_PORT"), first.to_string()));
        vars.push((format!("{name}_PORT"), format!("tcp://{ip}:{first}")));
        for port in ports {
            let number = port["port"].as_u64().unwrap();
            let proto = port["protocol"].as_str().unwrap_or("TCP");
            if let Some(port_name) = port["name"].as_str() {
                vars.push((
                    format!(
                        "{name}_SERVICE_PORT_{}",
                        port_name.to_ascii_uppercase().replace('-', "_")
                    ),
                    number.to_string(),
                ));
            }
            let p = format!("{name}_PORT_{number}_{proto}");
            vars.push((
                p.clone(),
                format!("{}://{ip}:{number}", proto.to_lowercase()),
            ));
            vars.push((format!("{p}_PROTO"), proto.to_lowercase()));
            vars.push((format!("{p}_PORT"), number.to_string()));
            vars.push((format!("{p}_ADDR"), ip.clone()));
        }
    }
    vars
}

/// A container's `env`, resolved as the kubelet does.
fn container_env(container: &Value, config_map: &Value) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = var["value"].as_str() {
            v.to_string()
        } else if let Some(key) = var["valueFrom"]["configMapKeyRef"]["key"].as_str() {
            config_map["data"][key]
                .as_str()
                .unwrap_or_else(|| panic!("ConfigMap has no {key}"))
                .to_string()
        } else if let Some(resource) = var["valueFrom"]["resourceFieldRef"]["resource"].as_str() {
            let (kind, field) = resource.split_once('.').expect("requests.cpu");
            let quantity = container["resources"][kind][field]
                .as_str()
                .expect("a resource quantity");
            // Divisor 1: whole cores, rounded up (millicores would end in m).
            let cores: f64 = match quantity.strip_suffix('m') {
                Some(milli) => milli.parse::<f64>().unwrap() / 1000.0,
                None => quantity.parse().unwrap(),
            };
            (cores.ceil() as u64).to_string()
        } else {
            panic!("an env source this test does not resolve: {var}");
        };
        env.push((name, value));
    }
    env
}

/// `$(VAR)` in an argument, from `env` (unknown references stay, as the
/// kubelet leaves them).
fn expand(arg: &str, env: &[(String, String)]) -> String {
    let mut out = arg.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// Whether bubblewrap can make user namespaces here.
fn bwrap_works() -> bool {
    Command::new("bwrap")
        .args([
            "--ro-bind",
            "/",
            "/",
            "--unshare-user",
            "--uid",
            "10001",
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `/opt/internvl-grpc` as `deploy/docker/Dockerfile` lays it out: the
/// binary, ggml's shared libraries and its CPU plugins in one folder (the
/// binary finds them beside itself). Returns the binary's path in `dir`.
fn image_folder(dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let binary = dir.join("internvl-grpc");
    std::fs::copy(env!("CARGO_BIN_EXE_internvl-grpc"), &binary).unwrap();
    // A default build's libraries (`out/lib`) and plugins (`out/backends`);
    // a `--no-default-features` build links them in and has neither.
    if let Some(backends) = llama_cpp_sys_2::BACKENDS_DIR.map(Path::new) {
        let lib = backends.with_file_name("lib");
        for folder in [lib.as_path(), backends] {
            for entry in std::fs::read_dir(folder).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if name.starts_with("lib") && name.contains(".so") {
                    std::fs::copy(&path, dir.join(&name)).unwrap();
                }
            }
        }
    }
    binary
}

/// The image's folder in the pod's sandbox at `/opt/internvl-grpc`: its user
/// and group, a read-only root with the system's files and the image's,
/// `models` writable at `/models`.
fn in_pod(
    binary: &Path,
    uid: u64,
    gid: u64,
    models: &Path,
    read_only_root: bool,
    env: &[(String, String)],
    args: &[String],
) -> Command {
    let mut command = if bwrap_works() {
        let mut c = Command::new("bwrap");
        c.args([
            "--tmpfs",
            "/",
            "--ro-bind",
            "/usr",
            "/usr",
            "--ro-bind",
            "/etc",
            "/etc",
        ]);
        for link in ["lib", "lib64", "bin", "sbin"] {
            if Path::new("/").join(link).is_symlink() {
                c.args(["--symlink", &format!("usr/{link}"), &format!("/{link}")]);
            } else if Path::new("/").join(link).exists() {
                c.args(["--ro-bind", &format!("/{link}"), &format!("/{link}")]);
            }
        }
        c.arg("--ro-bind")
            .arg(binary.parent().unwrap())
            .arg("/opt/internvl-grpc");
        c.args(["--dev", "/dev", "--proc", "/proc"]);
        c.arg("--bind").arg(models).arg("/models");
        if read_only_root {
            c.args(["--remount-ro", "/"]);
        }
        c.args([
            "--unshare-user",
            "--uid",
            &uid.to_string(),
            "--gid",
            &gid.to_string(),
        ]);
        c.args(["--die-with-parent", "--clearenv"]);
        for (k, v) in env {
            c.args(["--setenv", k, v]);
        }
        c.arg("/opt/internvl-grpc/internvl-grpc");
        c
    } else {
        eprintln!("kubelet test: no user namespaces here; setpriv without a read-only root");
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
        ]);
        c.arg(binary).env_clear().envs(env.iter().cloned());
        c
    };
    command.args(args).stdin(Stdio::null());
    command
}

/// The PID the kubelet's runtime would signal: the server, not bwrap (which
/// does not pass SIGTERM on); `setpriv` execs, so there it is the child.
fn container_pid(child: &Child) -> u32 {
    let pid = child.id();
    let children = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(children)
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(pid)
}

/// One gRPC probe as the kubelet runs it: connect and Check within
/// `timeoutSeconds`; success only on SERVING.
async fn probe(probe: &Value) -> Result<(), String> {
    let port = probe["grpc"]["port"].as_u64().expect("a gRPC probe");
    let service = probe["grpc"]["service"].as_str().unwrap_or("").to_string();
    let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1));
    let check = async {
        let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut client = HealthClient::new(channel);
        let status = client
            .check(HealthCheckRequest { service })
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .status;
        if status == ServingStatus::Serving as i32 {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    };
    tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| "probe timed out".to_string())?
}

/// Probes until success, failing once the kubelet would have given up
/// (`periodSeconds × failureThreshold`); probes every second rather than
/// every period, so a pass takes as long as the server needs.
async fn until_success(spec: &Value, what: &str, server: &mut Child, log: &Path) {
    let period = spec["periodSeconds"].as_u64().unwrap_or(10);
    let threshold = spec["failureThreshold"].as_u64().unwrap_or(3);
    let give_up = Instant::now() + Duration::from_secs(period * threshold);
    loop {
        let outcome = probe(spec).await;
        if outcome.is_ok() {
            return;
        }
        if let Ok(Some(status)) = server.try_wait() {
            panic!(
                "the server exited ({status}) before its {what} probe passed:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < give_up,
            "{what} probe still failing after {period} s × {threshold}: {outcome:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn run_overlay(overlay: &str, hub_url: &str) {
    let docs = render(overlay);
    let deployment = of_kind(&docs, "Deployment")[0];
    let mut config_map = of_kind(&docs, "ConfigMap")[0].clone();
    config_map["data"]["model"] = SERVED_MODEL.into();
    let services = of_kind(&docs, "Service");
    let pod = &deployment["spec"]["template"]["spec"];
    let security = &pod["securityContext"];
    let (uid, gid) = (
        security["runAsUser"].as_u64().expect("runAsUser"),
        security["runAsGroup"].as_u64().expect("runAsGroup"),
    );
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    let image = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kubelet-image-{overlay}-{}", std::process::id()));
    let binary = image_folder(&image);
    let volume = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kubelet-{overlay}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&volume);
    std::fs::create_dir_all(&volume).unwrap();
    // An emptyDir the pod's fsGroup may write.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o777)).unwrap();

    // A container as the kubelet starts it: the image's and the spec's
    // environment (and the service links), `$(VAR)` expanded in its args.
    let in_container = |container: &Value| {
        let mut env = vec![
            (
                "PATH".to_string(),
                "/usr/local/bin:/usr/bin:/bin".to_string(),
            ),
            ("HOME".to_string(), "/".to_string()),
            ("HF_ENDPOINT".to_string(), hub_url.to_string()),
        ];
        env.extend(image_env());
        env.extend(service_links(&services));
        env.extend(container_env(container, &config_map));
        let args: Vec<String> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| expand(a.as_str().unwrap(), &env))
            .collect();
        let read_only = container["securityContext"]["readOnlyRootFilesystem"] == true;
        let command = in_pod(&binary, uid, gid, &volume, read_only, &env, &args);
        (command, args)
    };

    // The init container, to completion.
    let (mut init, args) = in_container(&pod["initContainers"][0]);
    let pulled = init.output().expect("the init container starts");
    assert!(
        pulled.status.success(),
        "{overlay}: init container {args:?} failed: {}",
        String::from_utf8_lossy(&pulled.stderr)
    );

    // The server, and its probes in the kubelet's order.
    let server_spec = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "server")
        .expect("a server container");
    let stderr = volume.with_extension("err");
    let mut server = in_container(server_spec)
        .0
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("the server container starts");
    for (probe, what) in [
        ("startupProbe", "startup"),
        ("readinessProbe", "readiness"),
        ("livenessProbe", "liveness"),
    ] {
        until_success(&server_spec[probe], what, &mut server, &stderr).await;
    }

    // A rollout: SIGTERM, then the grace period before the kubelet kills.
    let pid = container_pid(&server);
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(grace);
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            server.kill().ok();
            panic!("{overlay}: still running {grace} s after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let err = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(
        status.success(),
        "{overlay}: exit {status} after SIGTERM:\n{err}"
    );
    assert!(
        err.contains("drained"),
        "{overlay}: no drain in the log:\n{err}"
    );
    let _ = std::fs::remove_dir_all(&volume);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_overlays_start_probe_and_stop_as_the_kubelet_runs_them() {
    let (repo, model, mmproj) = {
        let choice = internvl_grpc::catalog::find(SERVED_MODEL).unwrap().unwrap();
        (
            choice.entry.repo.clone().unwrap(),
            choice.model.file.file.clone(),
            choice.entry.mmproj.file.clone(),
        )
    };
    let files = HashMap::from([
        (
            url_path(&repo, &model),
            honest(&std::fs::read(INTERNVL3.model_path()).unwrap()),
        ),
        (
            url_path(&repo, &mmproj),
            honest(&std::fs::read(INTERNVL3.mmproj_path()).unwrap()),
        ),
    ]);
    let hub = fake_hub(files).await;
    for overlay in ["cpu", "gpu"] {
        run_overlay(overlay, &hub.url).await;
    }
}
