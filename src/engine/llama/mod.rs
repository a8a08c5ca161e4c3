//! The only place that talks to llama.cpp, and the only unsafe code: each
//! block says why it is sound in a `SAFETY:` comment.
//!
//! The safe `llama-cpp-2` API cannot feed embeddings into a batch nor read the
//! vision encoder's output embeddings, both of which exact InternVL tiling needs
//! (the service encodes the reference's own tiles and places them itself). So
//! model, context and mtmd are wrapped here over `llama-cpp-sys-2` directly;
//! `llama-cpp-2` still provides backend start-up, logging and the samplers.
//! Every caller-controlled size is checked before it reaches a C function,
//! because llama.cpp asserts abort the process.

mod context;
mod ffi;
mod model;
mod mtmd;

use llama_cpp_sys_2 as sys;

use super::error::EngineError;
use super::settings::EngineSettings;
pub use super::settings::{ContextParams, ModelParams, VisionParams};
pub use context::{BatchToken, Context, Outputs};
pub use model::{quantize, Model, Quantization};
pub use mtmd::Vision;

/// Starts llama.cpp's backends once and routes its logs to `tracing`.
pub fn init_backend() -> Result<(), EngineError> {
    use std::sync::OnceLock;
    static BACKEND: OnceLock<Result<llama_cpp_2::llama_backend::LlamaBackend, String>> =
        OnceLock::new();
    let backend = BACKEND.get_or_init(|| {
        llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
        llama_cpp_2::llama_backend::LlamaBackend::init().map_err(|e| e.to_string())
    });
    backend
        .as_ref()
        .map(|_| ())
        .map_err(|e| EngineError::Inference(format!("llama.cpp backend: {e}")))
}

/// Whether this build of llama.cpp can offload layers to a GPU.
pub fn gpu_offload_supported() -> bool {
    // SAFETY: plain capability query.
    unsafe { sys::llama_supports_gpu_offload() }
}

/// The language model context's parameters, `auto` cache types resolved for
/// where the model runs (any layer offloaded counts as on the GPU).
pub fn context_params(settings: &EngineSettings) -> ContextParams {
    let on_gpu = settings.model.n_gpu_layers != 0 && gpu_offload_supported();
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
