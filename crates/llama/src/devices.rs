//! ggml's devices: which there are, adding remote ones (ggml's RPC backend),
//! choosing those the model uses, serving this host's to another process,
//! and ggml's aborts turned into an engine fault.

use std::ffi::{c_char, CStr, CString};
use std::sync::OnceLock;

use llama_cpp_sys_2 as sys;

use internvl_core::error::EngineError;
pub use internvl_core::placement::{Device, DeviceKind};

fn text(ptr: *const c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: ggml returns NUL-terminated strings owned by the device, which
    // lives as long as the process.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

fn describe(dev: sys::ggml_backend_dev_t) -> Device {
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: `dev` came from ggml's registry and is never freed; the out
    // pointers are valid for the call.
    unsafe { sys::ggml_backend_dev_memory(dev, &mut free, &mut total) };
    // SAFETY: as above.
    let kind = match unsafe { sys::ggml_backend_dev_type(dev) } {
        sys::GGML_BACKEND_DEVICE_TYPE_CPU | sys::GGML_BACKEND_DEVICE_TYPE_ACCEL => DeviceKind::Cpu,
        sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
        sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
        _ => DeviceKind::Other,
    };
    Device {
        // SAFETY: as above.
        name: text(unsafe { sys::ggml_backend_dev_name(dev) }),
        // SAFETY: as above.
        description: text(unsafe { sys::ggml_backend_dev_description(dev) }),
        kind,
        memory_total: total as u64,
        memory_free: free as u64,
    }
}

fn raw_devices() -> Vec<sys::ggml_backend_dev_t> {
    // SAFETY: plain registry queries; indices are below the count.
    (0..unsafe { sys::ggml_backend_dev_count() })
        .map(|i| unsafe { sys::ggml_backend_dev_get(i) })
        .filter(|dev| !dev.is_null())
        .collect()
}

/// Every device ggml has registered (backends started, RPC servers added).
pub fn devices() -> Vec<Device> {
    raw_devices().into_iter().map(describe).collect()
}

/// Each device's name and description, without asking it anything: safe
/// while a device's connection is gone (its memory query would wait on it).
pub fn names() -> Vec<(String, String)> {
    raw_devices()
        .into_iter()
        // SAFETY: local getters of a registered device.
        .map(|dev| unsafe {
            (
                text(sys::ggml_backend_dev_name(dev)),
                text(sys::ggml_backend_dev_description(dev)),
            )
        })
        .collect()
}

/// `chosen`, described.
pub(super) fn describe_all(chosen: &[sys::ggml_backend_dev_t]) -> Vec<Device> {
    chosen.iter().copied().map(describe).collect()
}

/// The GPU backends this build has (`Vulkan`, `CUDA`, `Metal`), whether or
/// not they found a device: every registry but the CPU's, BLAS (a CPU
/// helper) and RPC (whose devices come from `rpc_servers`).
pub(super) fn gpu_backends() -> Vec<String> {
    // SAFETY: plain registry queries; indices are below the count, and the
    // names are static strings of each registry.
    (0..unsafe { sys::ggml_backend_reg_count() })
        .map(|i| text(unsafe { sys::ggml_backend_reg_name(sys::ggml_backend_reg_get(i)) }))
        .filter(|name| !matches!(name.as_str(), "CPU" | "BLAS" | "RPC"))
        .collect()
}

/// The registry of ggml's RPC backend and one of its functions, by name.
fn rpc_function(name: &str) -> Result<*mut std::ffi::c_void, EngineError> {
    let no_rpc = || {
        EngineError::offload(
            "rpc_servers",
            "this build of llama.cpp has no RPC backend: build with GGML_RPC=ON (.cargo/config.toml sets it; a target/ built before that needs `cargo clean -p llama-cpp-sys-2` once)",
        )
    };
    // SAFETY: a lookup by a static NUL-terminated name.
    let reg = unsafe { sys::ggml_backend_reg_by_name(c"RPC".as_ptr()) };
    if reg.is_null() {
        return Err(no_rpc());
    }
    let c_name = CString::new(name).map_err(|_| no_rpc())?;
    // SAFETY: `reg` is ggml's RPC registry; the name is a valid C string.
    let f = unsafe { sys::ggml_backend_reg_get_proc_address(reg, c_name.as_ptr()) };
    if f.is_null() {
        return Err(no_rpc());
    }
    Ok(f)
}

/// Adds the devices of the `rpc-server`s at `endpoints` (`host:port`), as
/// llama-server's `--rpc` does. ggml aborts the process when it cannot
/// connect, so each endpoint is first checked with a plain connection here;
/// the error names the entry.
pub fn add_rpc_servers(endpoints: &[String]) -> Result<(), EngineError> {
    if endpoints.is_empty() {
        return Ok(());
    }
    let add = rpc_function("ggml_backend_rpc_add_server")?;
    // SAFETY: ggml documents this entry point as
    // `ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint)`.
    let add: unsafe extern "C" fn(*const c_char) -> sys::ggml_backend_reg_t =
        unsafe { std::mem::transmute(add) };
    for (i, endpoint) in endpoints.iter().enumerate() {
        let field = format!("rpc_servers[{i}]");
        let bad = |why: String| EngineError::offload(&field, format!("\"{endpoint}\": {why}"));
        check_reachable(endpoint).map_err(bad)?;
        let c_endpoint = CString::new(endpoint.as_str()).map_err(|_| bad("NUL byte".into()))?;
        // SAFETY: a valid C string; ggml copies it. The server answered a
        // connection just now (a race with its exit still aborts, which the
        // abort hook turns into a fault).
        let reg = unsafe { add(c_endpoint.as_ptr()) };
        if reg.is_null() {
            return Err(bad("the server offers no device".into()));
        }
        // SAFETY: `reg` is a registry ggml made for this endpoint; registering
        // it once makes its devices available to llama.cpp. ggml returns the
        // same registry for an endpoint added twice, so a repeat is skipped.
        unsafe {
            let count = sys::ggml_backend_reg_count();
            if !(0..count).any(|j| sys::ggml_backend_reg_get(j) == reg) {
                sys::ggml_backend_register(reg);
            }
        }
    }
    Ok(())
}

/// Whether `endpoint` (`host:port`) takes a TCP connection within 3 s.
pub fn check_reachable(endpoint: &str) -> Result<(), String> {
    use std::net::{TcpStream, ToSocketAddrs};
    let addrs: Vec<_> = endpoint
        .to_socket_addrs()
        .map_err(|e| format!("not a host:port ({e})"))?
        .collect();
    let mut last = String::from("no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3)) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(format!("no rpc-server answers ({last})"))
}

/// The devices named in `names`, in that order, for the language model
/// (llama.cpp's `devices` parameter, as llama-server's `--device`). An
/// unknown name is an error listing what there is.
pub fn by_names(names: &[String]) -> Result<Vec<sys::ggml_backend_dev_t>, EngineError> {
    find(names, false)
}

/// The devices named in `names`; the CPU among them only when `allow_cpu`.
fn find(names: &[String], allow_cpu: bool) -> Result<Vec<sys::ggml_backend_dev_t>, EngineError> {
    // Described once: an RPC device's memory query is a round trip.
    let all = described();
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            all.iter()
                .find(|(_, d)| d.name == *name && (allow_cpu || d.kind.offloads()))
                .map(|&(dev, _)| dev)
                .ok_or_else(|| {
                    let known: Vec<String> = all
                        .iter()
                        .map(|(_, d)| format!("{} ({})", d.name, d.description))
                        .collect();
                    EngineError::offload(
                        format!("devices[{i}]"),
                        format!(
                            "\"{name}\": ggml has no such GPU or RPC device (the CPU is always used); it has {}",
                            known.join(", ")
                        ),
                    )
                })
        })
        .collect()
}

/// Every device with its description, each asked once.
fn described() -> Vec<(sys::ggml_backend_dev_t, Device)> {
    raw_devices()
        .into_iter()
        .map(|dev| (dev, describe(dev)))
        .collect()
}

/// Serves the devices named in `names` (every offloading device when empty,
/// else the CPU) to other processes over ggml's RPC protocol at `endpoint`,
/// as llama.cpp's `rpc-server` does. Runs until the process ends.
pub fn serve_rpc(endpoint: &str, names: &[String], threads: usize) -> Result<(), EngineError> {
    let start = rpc_function("ggml_backend_rpc_start_server")?;
    // SAFETY: ggml documents this entry point as `void
    // ggml_backend_rpc_start_server(const char * endpoint, const char *
    // cache_dir, size_t n_threads, size_t n_devices, ggml_backend_dev_t *
    // devices)`.
    let start: unsafe extern "C" fn(
        *const c_char,
        *const c_char,
        usize,
        usize,
        *mut sys::ggml_backend_dev_t,
    ) = unsafe { std::mem::transmute(start) };
    let mut chosen = if names.is_empty() {
        let all = described();
        let of_kind = |wanted: fn(DeviceKind) -> bool| -> Vec<sys::ggml_backend_dev_t> {
            all.iter()
                .filter(|(_, d)| wanted(d.kind))
                .map(|&(dev, _)| dev)
                .collect()
        };
        let offloading = of_kind(DeviceKind::offloads);
        if offloading.is_empty() {
            of_kind(|kind| kind == DeviceKind::Cpu)
                .into_iter()
                .take(1)
                .collect()
        } else {
            offloading
        }
    } else {
        find(names, true)?
    };
    if chosen.is_empty() {
        return Err(EngineError::offload(
            "devices",
            "ggml has no device to serve",
        ));
    }
    let c_endpoint = CString::new(endpoint)
        .map_err(|_| EngineError::offload("listen", "NUL byte in the address"))?;
    // SAFETY: valid C string and device array for the call, which serves
    // until the process ends (it returns only when it cannot listen).
    unsafe {
        start(
            c_endpoint.as_ptr(),
            std::ptr::null(),
            threads,
            chosen.len(),
            chosen.as_mut_ptr(),
        )
    };
    Err(EngineError::offload(
        "listen",
        format!("\"{endpoint}\": ggml's RPC server stopped (it could not listen there; its message is above)"),
    ))
}

/// What to do when ggml aborts: called once, with ggml's message.
type AbortHook = Box<dyn Fn(&str) + Send + Sync>;
static ABORT_HOOK: OnceLock<AbortHook> = OnceLock::new();

/// ggml calls this instead of printing before it aborts the process. The
/// thread that failed (the engine's, the vision encoder's, or one of ggml's
/// own, such as an RPC connection's) never returns into ggml: it reports the
/// failure to the hook and sleeps, so `abort()` is not reached, and the
/// service fails every request with ggml's reason and exits on its own
/// terms (`lib.rs`). Threads waiting on it wait too, which is why the service
/// answers streams without the engine thread (`GenerateEvents`).
extern "C" fn on_ggml_abort(message: *const c_char) {
    let message = text(message);
    // Nothing may unwind into C.
    let reported = std::panic::catch_unwind(|| {
        tracing::error!(target: "llama.cpp", "ggml aborted: {message}");
        if let Some(hook) = ABORT_HOOK.get() {
            hook(&message);
        }
    });
    if reported.is_err() || ABORT_HOOK.get().is_none() {
        // No one to tell: fall through to ggml's abort, as before.
        eprintln!("ggml aborted: {message}");
        return;
    }
    loop {
        std::thread::park();
    }
}

/// Installs `hook` as what happens when ggml aborts (the first call wins).
pub fn on_abort(hook: impl Fn(&str) + Send + Sync + 'static) {
    if ABORT_HOOK.set(Box::new(hook)).is_ok() {
        // SAFETY: `on_ggml_abort` matches `ggml_abort_callback_t` and does
        // not unwind.
        unsafe { sys::ggml_set_abort_callback(Some(on_ggml_abort)) };
    }
}
