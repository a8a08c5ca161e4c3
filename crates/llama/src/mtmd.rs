//! The vision encoder (mtmd): one native-size tile in, its embeddings out.

use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

use internvl_core::error::EngineError;
use internvl_core::settings::VisionParams;

use super::ffi::{flash_attn, path_cstring, Owned};
use super::model::Model;

/// The mmproj vision encoder.
pub struct Vision {
    ptr: NonNull<sys::mtmd_context>,
    n_embd_inp: usize,
    _model: Arc<Model>,
}

impl Drop for Vision {
    fn drop(&mut self) {
        // SAFETY: created by mtmd_init_from_file, freed once.
        unsafe { sys::mtmd_free(self.ptr.as_ptr()) }
    }
}

impl Vision {
    /// Loads the mmproj file for `model`.
    pub fn load(
        path: &Path,
        model: Arc<Model>,
        params: &VisionParams,
    ) -> Result<Self, EngineError> {
        let c_path = path_cstring(path)?;
        // SAFETY: plain constructor of a params struct.
        let mut mp = unsafe { sys::mtmd_context_params_default() };
        mp.use_gpu = params.use_gpu;
        mp.n_threads = params.threads;
        mp.flash_attn_type = flash_attn(params.flash_attn);
        mp.print_timings = false;
        mp.warmup = false;
        // SAFETY: c_path is a C string; the model outlives the context via the Arc.
        let raw = unsafe { sys::mtmd_init_from_file(c_path.as_ptr(), model.ptr.as_ptr(), mp) };
        let ptr = NonNull::new(raw).ok_or_else(|| EngineError::ModelFile {
            path: path.to_path_buf(),
            message: "llama.cpp could not load this mmproj file (see the log above for why)".into(),
        })?;
        // SAFETY: live context.
        if !unsafe { sys::mtmd_support_vision(ptr.as_ptr()) } {
            // SAFETY: freeing what we just created.
            unsafe { sys::mtmd_free(ptr.as_ptr()) };
            return Err(EngineError::ModelFile {
                path: path.to_path_buf(),
                message: "this mmproj file has no vision encoder".into(),
            });
        }
        Ok(Self {
            ptr,
            n_embd_inp: model.n_embd_inp() as usize,
            _model: model,
        })
    }

    /// Encodes one tile (RGB, `side` × `side`, already the encoder's native
    /// size so mtmd neither resizes nor slices it) into `tokens_per_tile` embeddings.
    pub fn encode_tile(&mut self, rgb: &[u8], side: u32) -> Result<Vec<f32>, EngineError> {
        if rgb.len() != side as usize * side as usize * 3 || side < 2 {
            return Err(EngineError::Inference(format!(
                "tile buffer of {} bytes is not {side}x{side} RGB",
                rgb.len()
            )));
        }
        // SAFETY: rgb holds side*side*3 bytes, checked above; mtmd copies them.
        let bitmap = unsafe { sys::mtmd_bitmap_init(side, side, rgb.as_ptr()) };
        let bitmap = Owned::new(bitmap, sys::mtmd_bitmap_free)
            .ok_or_else(|| EngineError::Inference("could not allocate a bitmap".into()))?;
        // SAFETY: plain allocation.
        let chunks = Owned::new(
            unsafe { sys::mtmd_input_chunks_init() },
            sys::mtmd_input_chunks_free,
        )
        .ok_or_else(|| EngineError::Inference("could not allocate input chunks".into()))?;
        let part = sys::mtmd_input_part {
            text: std::ptr::null(),
            bitmap: bitmap.0.as_ptr(),
        };
        let parts = [&part as *const sys::mtmd_input_part];
        // SAFETY: one valid part holding a valid bitmap; output chunks are ours.
        let rc = unsafe {
            sys::mtmd_tokenize_from_parts(
                self.ptr.as_ptr(),
                chunks.0.as_ptr(),
                parts.as_ptr(),
                1,
                false,
            )
        };
        if rc != 0 {
            return Err(EngineError::Inference(format!(
                "mtmd could not preprocess a tile ({rc})"
            )));
        }
        // SAFETY: chunks is live; indices are below its size.
        let n_chunks = unsafe { sys::mtmd_input_chunks_size(chunks.0.as_ptr()) };
        let mut image_chunk = None;
        for i in 0..n_chunks {
            // SAFETY: i < n_chunks.
            let chunk = unsafe { sys::mtmd_input_chunks_get(chunks.0.as_ptr(), i) };
            // SAFETY: chunk belongs to `chunks`.
            if unsafe { sys::mtmd_input_chunk_get_type(chunk) } == sys::MTMD_INPUT_CHUNK_TYPE_IMAGE
            {
                if image_chunk.is_some() {
                    return Err(EngineError::Inference(
                        "mtmd sliced a native-size tile; the mmproj tile size does not match"
                            .into(),
                    ));
                }
                image_chunk = Some(chunk);
            }
        }
        let chunk = image_chunk
            .ok_or_else(|| EngineError::Inference("mtmd produced no image chunk".into()))?;
        // SAFETY: chunk is an image chunk of `chunks`.
        let n_tokens = unsafe { sys::mtmd_input_chunk_get_n_tokens(chunk) };
        // SAFETY: encodes the chunk; the output stays valid until the next encode.
        let rc = unsafe { sys::mtmd_encode_chunk(self.ptr.as_ptr(), chunk) };
        if rc != 0 {
            return Err(EngineError::Inference(format!(
                "vision encoder failed ({rc})"
            )));
        }
        // SAFETY: mtmd documents the output as n_tokens × n_embd_inp floats.
        let out = unsafe { sys::mtmd_get_output_embd(self.ptr.as_ptr()) };
        if out.is_null() {
            return Err(EngineError::Inference(
                "vision encoder produced no output".into(),
            ));
        }
        // SAFETY: see above.
        Ok(unsafe { std::slice::from_raw_parts(out, n_tokens * self.n_embd_inp) }.to_vec())
    }
}
