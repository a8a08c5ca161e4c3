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
mod model;
mod mtmd;

use std::ffi::CString;
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::error::EngineError;
pub use super::settings::{ContextParams, ModelParams, VisionParams};
use super::settings::{FlashAttn, KvCacheType, SplitMode};
pub use context::{BatchToken, Context, Outputs};
pub use model::{quantize, Model, Quantization};
pub use mtmd::Vision;

pub(super) fn split_mode(mode: SplitMode) -> u32 {
    match mode {
        SplitMode::None => sys::LLAMA_SPLIT_MODE_NONE,
        SplitMode::Layer => sys::LLAMA_SPLIT_MODE_LAYER,
        SplitMode::Row => sys::LLAMA_SPLIT_MODE_ROW,
    }
}

pub(super) fn flash_attn(choice: FlashAttn) -> i32 {
    match choice {
        FlashAttn::Auto => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
        FlashAttn::On => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
        FlashAttn::Off => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }
}

pub(super) fn ggml_type(kind: KvCacheType) -> u32 {
    match kind {
        KvCacheType::F32 => sys::GGML_TYPE_F32,
        KvCacheType::F16 => sys::GGML_TYPE_F16,
        KvCacheType::Bf16 => sys::GGML_TYPE_BF16,
        KvCacheType::Q8_0 => sys::GGML_TYPE_Q8_0,
        KvCacheType::Q4_0 => sys::GGML_TYPE_Q4_0,
        KvCacheType::Q4_1 => sys::GGML_TYPE_Q4_1,
        KvCacheType::Q5_0 => sys::GGML_TYPE_Q5_0,
        KvCacheType::Q5_1 => sys::GGML_TYPE_Q5_1,
        KvCacheType::Iq4Nl => sys::GGML_TYPE_IQ4_NL,
    }
}

fn path_cstring(path: &Path) -> Result<CString, EngineError> {
    CString::new(path.to_string_lossy().as_bytes()).map_err(|_| EngineError::ModelFile {
        path: path.to_path_buf(),
        message: "path contains a NUL byte".into(),
    })
}

/// A C allocation freed with its own destructor.
struct Owned<T>(NonNull<T>, unsafe extern "C" fn(*mut T));

impl<T> Owned<T> {
    fn new(ptr: *mut T, free: unsafe extern "C" fn(*mut T)) -> Option<Self> {
        NonNull::new(ptr).map(|p| Self(p, free))
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: the pointer came from the matching allocator and is freed once.
        unsafe { (self.1)(self.0.as_ptr()) }
    }
}

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
