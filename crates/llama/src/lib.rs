//! `internvl-llama`: the only crate that talks to llama.cpp, and the only
//! unsafe code: each block says why it is sound in a `SAFETY:` comment.
//!
//! The safe `llama-cpp-2` API cannot feed embeddings into a batch nor read the
//! vision encoder's output embeddings, both of which exact InternVL tiling needs
//! (the service encodes the reference's own tiles and places them itself). So
//! model, context and mtmd are wrapped here over `llama-cpp-sys-2` directly;
//! `llama-cpp-2` still provides backend start-up, logging and the samplers.
//! Every caller-controlled size is checked before it reaches a C function,
//! because llama.cpp asserts abort the process.

mod backend_plugins;
mod context;
pub mod cpu_kernels;
pub mod devices;
mod ffi;
mod log;
mod model;
mod mtmd;
mod sampler;
mod vulkan;

use llama_cpp_sys_2 as sys;

pub use context::{BatchToken, Context, Outputs};
use internvl_core::error::EngineError;
use internvl_core::settings::EngineSettings;
pub use internvl_core::settings::{ContextParams, ModelParams, VisionParams};
pub use log::capture as capture_logs;
pub use model::{quantize, Model, Quantization};
pub use mtmd::Vision;
pub use sampler::TokenSampler;
pub use vulkan::{list as vulkan_devices, VulkanDevice};

/// Starts llama.cpp's backends once and routes its logs to `tracing`
/// (`info_logs`: its information lines at INFO, else DEBUG), with ggml's
/// Vulkan backend on `vulkan_devices` (indices of Vulkan's device list;
/// empty: `GGML_VK_VISIBLE_DEVICES`, else ggml's choice). The first call's
/// choices hold for the process.
pub fn init_backend(info_logs: bool, vulkan_devices: &[u32]) -> Result<(), EngineError> {
    use std::sync::OnceLock;
    static BACKEND: OnceLock<Result<llama_cpp_2::llama_backend::LlamaBackend, String>> =
        OnceLock::new();
    if BACKEND.get().is_none() {
        vulkan::choose(vulkan_devices)?;
    }
    let backend = BACKEND.get_or_init(|| {
        log::route_logs(info_logs);
        vulkan_workarounds();
        #[cfg(feature = "dynamic-backends")]
        load_backend_plugins()?;
        llama_cpp_2::llama_backend::LlamaBackend::init().map_err(|e| e.to_string())
    });
    backend
        .as_ref()
        .map(|_| ())
        .map_err(|e| EngineError::Inference(format!("llama.cpp backend: {e}")))
}

/// ggml's Vulkan backend reorders each graph's nodes to run independent ones
/// without barriers between them ("graph optimize"). With it, lavapipe
/// crashed the whole process with a segmentation fault inside the driver
/// while decoding an image prompt that followed a few text prompts: 9 runs
/// of 10, and both parity runs (docs/OFFLOAD.md has the reproduction).
/// Without it, 10 runs of 10 and a whole parity run passed; one parity run
/// with ggml's f16 math also off still crashed, so this lowers the odds and
/// is not the fix. Whether ggml or the driver is at fault is not known. Off
/// for every Vulkan device unless the deployment sets the variable itself;
/// `=0` lets ggml reorder again (ggml itself would read any value, "0" too,
/// as "disable"). ggml reads it when it creates a device, after this.
fn vulkan_workarounds() {
    const KEY: &str = "GGML_VK_DISABLE_GRAPH_OPTIMIZE";
    // Once, first in init_backend, before any llama.cpp code runs; no other
    // thread of this process reads the environment meanwhile.
    match std::env::var_os(KEY) {
        None => std::env::set_var(KEY, "1"),
        Some(value) if value == "0" => std::env::remove_var(KEY),
        Some(_) => {}
    }
}

/// The CPU backend plugin loaded at start, in a `dynamic-backends` build.
#[cfg(feature = "dynamic-backends")]
static CPU_BACKEND_FILE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Loads ggml's backends from the folder beside the executable, where a
/// deployment puts them, or else from the folder the build wrote them to
/// (tests, `cargo run`): the best CPU variant this CPU and OS run, and every
/// other backend plugin there (a GPU's). ggml's own search would also look in
/// the working directory, and picks the CPU variant from CPUID alone.
#[cfg(feature = "dynamic-backends")]
fn load_backend_plugins() -> Result<(), String> {
    use crate::backend_plugins;
    use std::path::{Path, PathBuf};
    let beside_binary = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let built = sys::BACKENDS_DIR.map(PathBuf::from);
    let folders: Vec<PathBuf> = beside_binary.into_iter().chain(built).collect();
    for folder in &folders {
        let names = std::fs::read_dir(folder)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let (cpu, others) = backend_plugins::plugins_in(names);
        if cpu.is_empty() {
            continue;
        }
        let cpu: Vec<&str> = cpu.iter().map(String::as_str).collect();
        let Some(chosen) = chosen_cpu_variant(folder, &cpu)? else {
            // ggml's own choice, which scores each variant itself, and loads
            // the other plugins.
            llama_cpp_2::llama_backend::load_backends_from_path(folder);
            return Ok(());
        };
        for plugin in std::iter::once(chosen).chain(others.iter().map(String::as_str)) {
            load_plugin(&folder.join(plugin))?;
        }
        // Called once, from init_backend's OnceLock, so the cell is empty.
        CPU_BACKEND_FILE.get_or_init(|| chosen.to_string());
        return Ok(());
    }
    Err(format!(
        "no ggml CPU backend (libggml-cpu-*.so) in {}",
        folders
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    ))
}

/// The CPU variant to load from `folder`'s `cpu` plugins: on x86-64 the best
/// this CPU and OS run; elsewhere `None`, leaving the choice to ggml.
#[cfg(feature = "dynamic-backends")]
fn chosen_cpu_variant<'a>(
    folder: &std::path::Path,
    cpu: &[&'a str],
) -> Result<Option<&'a str>, String> {
    #[cfg(target_arch = "x86_64")]
    use crate::backend_plugins;
    #[cfg(target_arch = "x86_64")]
    return backend_plugins::choose_x86_variant(cpu, backend_plugins::x86_supported)
        .map(Some)
        .ok_or_else(|| {
            format!(
                "none of the CPU backends in {} ({}) runs on this CPU",
                folder.display(),
                cpu.join(", ")
            )
        });
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (folder, cpu);
        Ok(None)
    }
}

/// Registers one ggml backend plugin. A plugin that fails to load is an
/// error: whoever put a GPU backend beside the binary expects it used, not a
/// silent fall back to the CPU.
#[cfg(feature = "dynamic-backends")]
fn load_plugin(path: &std::path::Path) -> Result<(), String> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: NUL in the path", path.display()))?;
    // SAFETY: `c_path` is a valid NUL-terminated string for the call's
    // duration. ggml dlopens the file, checks its API version and score, and
    // registers it; nothing is kept from our memory.
    let reg = unsafe { sys::ggml_backend_load(c_path.as_ptr()) };
    if reg.is_null() {
        return Err(format!(
            "{}: ggml could not load this backend (its reason is in the log line before)",
            path.display()
        ));
    }
    tracing::info!(plugin = %path.display(), "ggml backend loaded");
    Ok(())
}

/// The CPU backend plugin loaded at start (`libggml-cpu-haswell.so`), in a
/// `dynamic-backends` build on x86-64; `None` where the CPU kernels are
/// linked in, or ggml chose the variant.
pub fn cpu_backend_file() -> Option<String> {
    #[cfg(feature = "dynamic-backends")]
    return CPU_BACKEND_FILE.get().cloned();
    #[cfg(not(feature = "dynamic-backends"))]
    None
}

/// The language model context's parameters, `auto` cache types resolved for
/// where the model runs (`on_gpu`: every layer is on a local GPU).
pub fn context_params(settings: &EngineSettings, on_gpu: bool) -> ContextParams {
    settings.context.resolved(on_gpu)
}

/// llama.cpp's report of the CPU kernels it runs, e.g.
/// `CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | … | REPACK = 1 |`.
pub fn system_info() -> &'static str {
    use std::sync::OnceLock;
    static INFO: OnceLock<String> = OnceLock::new();
    INFO.get_or_init(|| {
        // SAFETY: returns a static, NUL-terminated buffer that llama.cpp
        // rebuilds on every call, so two calls at once would race; the
        // OnceLock makes this the only call in the process, and the text is
        // copied before it returns.
        unsafe {
            std::ffi::CStr::from_ptr(sys::llama_print_system_info())
                .to_string_lossy()
                .trim()
                .to_string()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::sys;

    /// The Rust GGUF check sizes tensors with its own copy of ggml's type
    /// table, so that it needs no llama.cpp; this keeps the copy true.
    #[test]
    fn ggml_types_match_the_linked_ggml() {
        let table = &internvl_core::gguf::GGML_TYPES;
        assert_eq!(table.len(), sys::GGML_TYPE_COUNT as usize, "type count");
        for (id, &(block, size)) in table.iter().enumerate() {
            // SAFETY: plain lookups in ggml's type table, `id` below its count.
            let linked = unsafe {
                (
                    sys::ggml_blck_size(id as u32) as u64,
                    sys::ggml_type_size(id as u32) as u64,
                )
            };
            assert_eq!((block, size), linked, "ggml type {id}");
        }
    }
}
