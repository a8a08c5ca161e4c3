//! Helpers the llama.cpp wrappers share: llama.cpp's constants for the
//! settings' choices, C paths, and C allocations freed on drop.

use std::ffi::CString;
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use internvl_core::error::EngineError;
use internvl_core::settings::{FlashAttn, KvCacheType, SplitMode};

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
        // `auto` is resolved at load (`ContextParams::resolved`); f16 is
        // what it means wherever it could still arrive.
        KvCacheType::F16 | KvCacheType::Auto => sys::GGML_TYPE_F16,
        KvCacheType::Bf16 => sys::GGML_TYPE_BF16,
        KvCacheType::Q8_0 => sys::GGML_TYPE_Q8_0,
        KvCacheType::Q4_0 => sys::GGML_TYPE_Q4_0,
        KvCacheType::Q4_1 => sys::GGML_TYPE_Q4_1,
        KvCacheType::Q5_0 => sys::GGML_TYPE_Q5_0,
        KvCacheType::Q5_1 => sys::GGML_TYPE_Q5_1,
        KvCacheType::Iq4Nl => sys::GGML_TYPE_IQ4_NL,
    }
}

pub(super) fn path_cstring(path: &Path) -> Result<CString, EngineError> {
    CString::new(path.to_string_lossy().as_bytes()).map_err(|_| EngineError::ModelFile {
        path: path.to_path_buf(),
        message: "path contains a NUL byte".into(),
    })
}

/// A C allocation freed with its own destructor.
pub(super) struct Owned<T>(pub(super) NonNull<T>, unsafe extern "C" fn(*mut T));

impl<T> Owned<T> {
    pub(super) fn new(ptr: *mut T, free: unsafe extern "C" fn(*mut T)) -> Option<Self> {
        NonNull::new(ptr).map(|p| Self(p, free))
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: the pointer came from the matching allocator and is freed once.
        unsafe { (self.1)(self.0.as_ptr()) }
    }
}
