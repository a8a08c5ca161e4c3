//! The language model: loading, vocabulary, metadata, quantization.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use internvl_core::error::EngineError;

use super::devices;
use super::ffi::{path_cstring, split_mode};
use internvl_core::settings::ModelParams;

/// Language-model quantizations [`quantize`] can write, as llama.cpp names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    /// 16-bit floats.
    F16,
    /// 8-bit blocks of 32.
    Q8_0,
    /// 4-bit k-quants, medium (llama.cpp's most downloaded mix).
    Q4KM,
}

/// Writes the language model at `src` quantized as `to` to `dst`, as
/// llama.cpp's `llama-quantize` does. Tests use it to serve the files people
/// download without shipping each quantization.
pub fn quantize(src: &Path, dst: &Path, to: Quantization) -> Result<(), EngineError> {
    let (c_src, c_dst) = (path_cstring(src)?, path_cstring(dst)?);
    // SAFETY: plain constructor of a params struct.
    let mut params = unsafe { sys::llama_model_quantize_default_params() };
    params.ftype = match to {
        Quantization::F16 => sys::LLAMA_FTYPE_MOSTLY_F16,
        Quantization::Q8_0 => sys::LLAMA_FTYPE_MOSTLY_Q8_0,
        Quantization::Q4KM => sys::LLAMA_FTYPE_MOSTLY_Q4_K_M,
    };
    params.nthread = 1;
    // SAFETY: both paths are valid C strings and `params` a valid struct; all
    // outlive the call, which only reads them.
    let rc = unsafe { sys::llama_model_quantize(c_src.as_ptr(), c_dst.as_ptr(), &params) };
    if rc != 0 {
        return Err(EngineError::ModelFile {
            path: src.to_path_buf(),
            message: format!("llama.cpp could not quantize it to {to:?} ({rc})"),
        });
    }
    Ok(())
}

/// Refuses device settings that cannot work with the devices the model
/// would use (`used`), before llama.cpp sees them; `gpu_backends` are the
/// GPU backends this build has (`Vulkan`, `CUDA`), whether or not they found
/// a device.
fn check_offload(
    params: &ModelParams,
    used: &[devices::Device],
    gpu_backends: &[String],
) -> Result<(), EngineError> {
    let names = || {
        used.iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if used.is_empty() {
        if params.n_gpu_layers != 0 && !gpu_backends.is_empty() {
            return Err(EngineError::offload(
                "n_gpu_layers",
                format!(
                    "{} asks for offload and this build has {}, but ggml found no device to use. \
                     A CPU-type Vulkan device (lavapipe) is only used when named in vulkan_devices (`internvl-grpc devices` lists them). \
                     Set n_gpu_layers = 0 to run on the CPU",
                    params.n_gpu_layers,
                    gpu_backends.join(", ")
                ),
            ));
        }
        return Ok(());
    }
    if !params.tensor_split.is_empty() && params.tensor_split.len() != used.len() {
        return Err(EngineError::offload(
            "tensor_split",
            format!(
                "{} entries for {} devices ({}); give one share per device",
                params.tensor_split.len(),
                used.len(),
                names()
            ),
        ));
    }
    if !params.tensor_split.is_empty() && params.tensor_split.iter().all(|&s| s == 0.0) {
        return Err(EngineError::offload(
            "tensor_split",
            "every share is 0; at least one device must hold layers",
        ));
    }
    // With `none` main_gpu holds the model, with `row` its small tensors.
    if params.split_mode != internvl_core::settings::SplitMode::Layer
        && (params.main_gpu < 0 || params.main_gpu as usize >= used.len())
    {
        return Err(EngineError::offload(
            "main_gpu",
            format!(
                "{} with split_mode {:?}, but the devices are {} ({}), numbered from 0",
                params.main_gpu,
                params.split_mode,
                used.len(),
                names()
            ),
        ));
    }
    Ok(())
}

/// A loaded language model. Read-only after loading, so it is shared between
/// the engine thread (decoding) and request handlers (tokenization), as
/// llama.cpp's own server does.
pub struct Model {
    pub(super) ptr: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
}

// SAFETY: llama_model and its vocab are immutable after loading; llama.cpp's
// tokenizer and metadata getters are safe to call from several threads.
unsafe impl Send for Model {}
// SAFETY: see above.
unsafe impl Sync for Model {}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: the pointer came from llama_model_load_from_file and is freed once.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

impl Model {
    /// Loads a GGUF language model on the devices `params` asks for, after
    /// checking that they exist: llama.cpp would otherwise fall back to the
    /// CPU without a word, or abort.
    pub fn load(path: &Path, params: &ModelParams) -> Result<Self, EngineError> {
        let c_path = path_cstring(path)?;
        // SAFETY: plain constructor of a params struct.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.n_gpu_layers = params.n_gpu_layers;
        mp.main_gpu = params.main_gpu;
        mp.split_mode = split_mode(params.split_mode);
        devices::add_rpc_servers(&params.rpc_servers)?;
        // The devices llama.cpp will use: those named, else every GPU.
        let mut chosen = devices::by_names(&params.devices)?;
        let used: Vec<devices::Device> = if chosen.is_empty() {
            devices::devices()
                .into_iter()
                .filter(|d| d.kind.offloads())
                .collect()
        } else {
            devices::describe_all(&chosen)
        };
        check_offload(params, &used, &devices::gpu_backends())?;
        // SAFETY: plain getter.
        let max_devices = unsafe { sys::llama_max_devices() };
        let mut split = params.tensor_split.clone();
        if !split.is_empty() {
            if split.len() > max_devices {
                return Err(EngineError::offload(
                    "tensor_split",
                    format!(
                        "{} entries, this build supports {max_devices} devices",
                        split.len()
                    ),
                ));
            }
            split.resize(max_devices, 0.0);
            mp.tensor_split = split.as_ptr();
        }
        if !chosen.is_empty() {
            // llama.cpp reads the list up to a null entry.
            chosen.push(std::ptr::null_mut());
            mp.devices = chosen.as_mut_ptr();
        }
        // SAFETY: c_path is a valid C string; `split` and `chosen` outlive the call.
        let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mp) };
        let ptr = NonNull::new(raw).ok_or_else(|| EngineError::ModelFile {
            path: path.to_path_buf(),
            message: "llama.cpp could not load this model file (see the log above for why)".into(),
        })?;
        // SAFETY: ptr is a live model.
        let vocab = unsafe { sys::llama_model_get_vocab(ptr.as_ptr()) };
        let vocab = NonNull::new(vocab.cast_mut()).ok_or_else(|| EngineError::ModelFile {
            path: path.to_path_buf(),
            message: "model has no vocabulary".into(),
        })?;
        Ok(Self { ptr, vocab })
    }

    /// Tokenizes `text`; special tokens written in the text are recognised when
    /// `parse_special`, as Hugging Face tokenizers do for added tokens.
    pub fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<i32>, EngineError> {
        let len = i32::try_from(text.len())
            .map_err(|_| EngineError::invalid("messages", "text is too long to tokenize"))?;
        let mut tokens = vec![0i32; text.len() + 8];
        loop {
            // SAFETY: text and tokens are valid for the lengths passed.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab.as_ptr(),
                    text.as_ptr().cast(),
                    len,
                    tokens.as_mut_ptr(),
                    tokens.len() as i32,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                tokens.truncate(n as usize);
                return Ok(tokens);
            }
            if n == i32::MIN {
                return Err(EngineError::invalid(
                    "messages",
                    "text is too long to tokenize",
                ));
            }
            tokens.resize((-n) as usize, 0);
        }
    }

    /// The bytes a token stands for (control tokens render as their text when `special`).
    pub fn token_bytes(&self, token: i32, special: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: buf is valid for its length; token ids are checked by llama.cpp
            // against the vocabulary only through an assert, so callers pass ids the
            // model itself produced or that `is_valid_token` accepted.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab.as_ptr(),
                    token,
                    buf.as_mut_ptr().cast(),
                    buf.len() as i32,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }

    /// Whether `token` is a valid id of this vocabulary.
    pub fn is_valid_token(&self, token: i32) -> bool {
        token >= 0 && token < self.n_vocab()
    }

    /// Whether `token` ends generation (end-of-turn or end-of-text).
    pub fn is_eog(&self, token: i32) -> bool {
        // SAFETY: read-only vocab query.
        unsafe { sys::llama_vocab_is_eog(self.vocab.as_ptr(), token) }
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> i32 {
        // SAFETY: read-only vocab query.
        unsafe { sys::llama_vocab_n_tokens(self.vocab.as_ptr()) }
    }

    /// Hidden size (the size of an output embedding).
    pub fn n_embd(&self) -> i32 {
        // SAFETY: read-only model query.
        unsafe { sys::llama_model_n_embd(self.ptr.as_ptr()) }
    }

    /// Width of one input embedding (what the projector must produce).
    pub fn n_embd_inp(&self) -> i32 {
        // SAFETY: read-only model query.
        unsafe { sys::llama_model_n_embd_inp(self.ptr.as_ptr()) }
    }

    /// Context length the model was trained with.
    pub fn n_ctx_train(&self) -> i32 {
        // SAFETY: read-only model query.
        unsafe { sys::llama_model_n_ctx_train(self.ptr.as_ptr()) }
    }

    /// A string metadata value of the GGUF, if present.
    pub fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: key is a C string; buf is valid for its length.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.ptr.as_ptr(),
                    key.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                return None;
            }
            if (n as usize) < buf.len() {
                buf.truncate(n as usize);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n as usize + 1, 0);
        }
    }

    /// The chat template stored in the GGUF (`tokenizer.chat_template`).
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: returns a pointer owned by the model, or null.
        let ptr = unsafe { sys::llama_model_chat_template(self.ptr.as_ptr(), std::ptr::null()) };
        if ptr.is_null() {
            return None;
        }
        // SAFETY: non-null, NUL-terminated, lives as long as the model.
        Some(
            unsafe { CStr::from_ptr(ptr) }
                .to_string_lossy()
                .into_owned(),
        )
    }

    /// llama.cpp's one-line description (architecture, size, quantization).
    pub fn description(&self) -> String {
        let mut buf = vec![0u8; 256];
        // SAFETY: buf is valid for its length.
        let n =
            unsafe { sys::llama_model_desc(self.ptr.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        buf.truncate(n.clamp(0, 255) as usize);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl internvl_core::prompt::TextTokenizer for Model {
    fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<i32>, EngineError> {
        Model::tokenize(self, text, add_special, parse_special)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{Device, DeviceKind};
    use internvl_core::settings::SplitMode;

    fn params(
        n_gpu_layers: i32,
        split_mode: SplitMode,
        main_gpu: i32,
        split: &[f32],
    ) -> ModelParams {
        ModelParams {
            n_gpu_layers,
            main_gpu,
            split_mode,
            tensor_split: split.to_vec(),
            devices: vec![],
            rpc_servers: vec![],
            vulkan_devices: vec![],
        }
    }

    fn gpu(name: &str) -> Device {
        Device {
            name: name.into(),
            description: format!("{name} card"),
            kind: DeviceKind::Gpu,
            memory_total: 1 << 30,
            memory_free: 1 << 30,
        }
    }

    fn setting(result: Result<(), EngineError>) -> String {
        match result {
            Err(EngineError::Offload { setting, .. }) => setting,
            other => panic!("expected an offload error, got {other:?}"),
        }
    }

    #[test]
    fn offload_without_a_device_fails_only_where_a_gpu_backend_was_built() {
        let vulkan = ["Vulkan".to_string()];
        let all = params(-1, SplitMode::Layer, 0, &[]);
        assert_eq!(setting(check_offload(&all, &[], &vulkan)), "n_gpu_layers");
        // The CPU build's default (-1) runs on the CPU, as it always has.
        assert!(check_offload(&all, &[], &[]).is_ok());
        // So does a GPU build told to.
        assert!(check_offload(&params(0, SplitMode::Layer, 0, &[]), &[], &vulkan).is_ok());
    }

    #[test]
    fn tensor_split_needs_one_share_per_device() {
        let two = [gpu("RPC0"), gpu("RPC1")];
        let ok = params(-1, SplitMode::Layer, 0, &[1.0, 1.0]);
        assert!(check_offload(&ok, &two, &[]).is_ok());
        let three = params(-1, SplitMode::Layer, 0, &[1.0, 1.0, 1.0]);
        assert_eq!(setting(check_offload(&three, &two, &[])), "tensor_split");
        let zeros = params(-1, SplitMode::Layer, 0, &[0.0, 0.0]);
        assert_eq!(setting(check_offload(&zeros, &two, &[])), "tensor_split");
    }

    #[test]
    fn main_gpu_must_name_a_device_when_one_holds_the_model() {
        let one = [gpu("Vulkan0")];
        assert!(check_offload(&params(-1, SplitMode::None, 0, &[]), &one, &[]).is_ok());
        assert_eq!(
            setting(check_offload(
                &params(-1, SplitMode::None, 1, &[]),
                &one,
                &[]
            )),
            "main_gpu"
        );
        // Split by layer, main_gpu is not where the model lives.
        assert!(check_offload(&params(-1, SplitMode::Layer, 3, &[]), &one, &[]).is_ok());
    }
}
