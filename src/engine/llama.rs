//! The only place that talks to llama.cpp.
//!
//! The safe `llama-cpp-2` API cannot feed embeddings into a batch nor read the
//! vision encoder's output embeddings, both of which exact InternVL tiling needs
//! (the service encodes the reference's own tiles and places them itself). So
//! model, context and mtmd are wrapped here over `llama-cpp-sys-2` directly;
//! `llama-cpp-2` still provides backend start-up, logging and the samplers.
//! Every caller-controlled size is checked before it reaches a C function,
//! because llama.cpp asserts abort the process.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

use super::EngineError;

/// How the language model is loaded and offloaded.
#[derive(Clone, Debug)]
pub struct ModelParams {
    /// Layers to offload to the GPU (-1 = all).
    pub n_gpu_layers: i32,
    /// GPU for the whole model when `split_mode` is none.
    pub main_gpu: i32,
    /// `none`, `layer` or `row`.
    pub split_mode: u32,
    /// Proportions per GPU; empty = llama.cpp's default.
    pub tensor_split: Vec<f32>,
}

/// How the inference context is sized and run.
#[derive(Clone, Debug)]
pub struct ContextParams {
    /// Context length in tokens.
    pub n_ctx: u32,
    /// Largest batch submitted to one decode.
    pub n_batch: u32,
    /// Physical micro-batch size.
    pub n_ubatch: u32,
    /// CPU threads for decoding and prefill.
    pub threads: i32,
    /// -1 auto, 0 off, 1 on.
    pub flash_attn: i32,
    /// ggml type of the K cache.
    pub type_k: u32,
    /// ggml type of the V cache.
    pub type_v: u32,
    /// Sequences decoded together (continuous-batching slots).
    pub n_seq_max: u32,
}

/// One position of a mixed token batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchToken {
    /// Token id (checked against the vocabulary before decoding).
    pub token: i32,
    /// Position within its sequence.
    pub pos: i32,
    /// Sequence (slot) it belongs to.
    pub seq: i32,
    /// Whether this position produces logits.
    pub output: bool,
}

fn path_cstring(path: &Path) -> Result<CString, EngineError> {
    CString::new(path.to_string_lossy().as_bytes()).map_err(|_| EngineError::ModelFile {
        path: path.to_path_buf(),
        message: "path contains a NUL byte".into(),
    })
}

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

/// A loaded language model. Read-only after loading, so it is shared between
/// the engine thread (decoding) and request handlers (tokenization), as
/// llama.cpp's own server does.
pub struct Model {
    ptr: NonNull<sys::llama_model>,
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
    /// Loads a GGUF language model.
    pub fn load(path: &Path, params: &ModelParams) -> Result<Self, EngineError> {
        let c_path = path_cstring(path)?;
        // SAFETY: plain constructor of a params struct.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.n_gpu_layers = params.n_gpu_layers;
        mp.main_gpu = params.main_gpu;
        mp.split_mode = params.split_mode;
        // SAFETY: plain getter.
        let max_devices = unsafe { sys::llama_max_devices() };
        let mut split = params.tensor_split.clone();
        if !split.is_empty() {
            if split.len() > max_devices {
                return Err(EngineError::ModelFile {
                    path: path.to_path_buf(),
                    message: format!(
                        "tensor_split has {} entries, this build supports {max_devices} devices",
                        split.len()
                    ),
                });
            }
            split.resize(max_devices, 0.0);
            mp.tensor_split = split.as_ptr();
        }
        // SAFETY: c_path is a valid C string and `split` outlives the call.
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

/// An inference context: the KV cache and the scratch batches for one model.
pub struct Context {
    ptr: NonNull<sys::llama_context>,
    token_batch: sys::llama_batch,
    embd_batch: sys::llama_batch,
    n_batch: usize,
    n_embd_inp: usize,
    n_seq_max: i32,
    /// The context's own CPU threads, kept between decodes.
    threadpool: NonNull<sys::ggml_threadpool>,
    // Declared last so the context is freed before the model it points into.
    _model: Arc<Model>,
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: batches came from llama_batch_init, the context from
        // llama_init_from_model, the threadpool from ggml_threadpool_new; each
        // is freed once, the threadpool after the context that uses it.
        unsafe {
            sys::llama_batch_free(self.token_batch);
            sys::llama_batch_free(self.embd_batch);
            sys::llama_free(self.ptr.as_ptr());
            sys::ggml_threadpool_free(self.threadpool.as_ptr());
        }
    }
}

impl Context {
    /// Creates a context (per-position outputs, no pooling: pooling is done by
    /// the engine) whose `n_seq_max` sequences share one KV pool of `n_ctx` cells.
    pub fn new(model: Arc<Model>, params: &ContextParams) -> Result<Self, EngineError> {
        // SAFETY: plain constructor of a params struct.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = params.n_ctx;
        cp.n_batch = params.n_batch;
        cp.n_ubatch = params.n_ubatch;
        cp.n_seq_max = params.n_seq_max.max(1);
        // One pool shared by all sequences: a batch mixing any sequences is one
        // micro-batch. Split per-sequence caches only batch sequences with
        // consecutive ids together, so a slot freed in the middle would split
        // every decode step into several graph runs.
        cp.kv_unified = true;
        cp.n_threads = params.threads;
        cp.n_threads_batch = params.threads;
        cp.pooling_type = sys::LLAMA_POOLING_TYPE_NONE;
        cp.flash_attn_type = params.flash_attn;
        cp.type_k = params.type_k;
        cp.type_v = params.type_v;
        cp.embeddings = false;
        // SAFETY: the model is alive for as long as the context holds its Arc.
        let raw = unsafe { sys::llama_init_from_model(model.ptr.as_ptr(), cp) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            EngineError::Inference(format!(
                "could not create a context of {} tokens (out of memory, or an unsupported KV cache type?)",
                params.n_ctx
            ))
        })?;
        // SAFETY: plain getters on a live context.
        let n_batch = unsafe { sys::llama_n_batch(ptr.as_ptr()) } as usize;
        let n_embd_inp = model.n_embd_inp() as usize;
        // SAFETY: allocation of scratch batches; freed in Drop.
        let (token_batch, embd_batch) = unsafe {
            (
                sys::llama_batch_init(n_batch as i32, 0, 1),
                sys::llama_batch_init(n_batch as i32, n_embd_inp as i32, 1),
            )
        };
        // SAFETY: plain getter on a live context.
        let n_seq_max = unsafe { sys::llama_n_seq_max(ptr.as_ptr()) } as i32;
        // A persistent pool of our own. ggml is built without OpenMP: the
        // vision encoder computes on another thread, and two OpenMP teams
        // outnumbering the cores made libgomp stop spinning between decodes,
        // which cost decoding a fifth of its speed (measured).
        // SAFETY: plain constructor of a params struct, then a pool from it.
        let threadpool = unsafe {
            let mut tp = sys::ggml_threadpool_params_default(params.threads.max(1));
            sys::ggml_threadpool_new(&mut tp)
        };
        let Some(threadpool) = NonNull::new(threadpool) else {
            // SAFETY: freeing what was created above, once.
            unsafe {
                sys::llama_batch_free(token_batch);
                sys::llama_batch_free(embd_batch);
                sys::llama_free(ptr.as_ptr());
            }
            return Err(EngineError::Inference(
                "could not start the CPU threads".into(),
            ));
        };
        // SAFETY: both live; the pool outlives the context (see Drop).
        unsafe {
            sys::llama_attach_threadpool(ptr.as_ptr(), threadpool.as_ptr(), threadpool.as_ptr())
        };
        Ok(Self {
            ptr,
            token_batch,
            embd_batch,
            n_batch,
            n_embd_inp,
            n_seq_max,
            threadpool,
            _model: model,
        })
    }

    /// KV cells shared by all sequences (the longest any one sequence can be).
    pub fn n_ctx(&self) -> u32 {
        // SAFETY: plain getter.
        unsafe { sys::llama_n_ctx(self.ptr.as_ptr()) }
    }

    /// Largest number of positions one `decode_*` call accepts.
    pub fn n_batch(&self) -> usize {
        self.n_batch
    }

    /// Uses the first `threads` of the context's threadpool from the next
    /// decode on (at most as many as it was created with).
    pub fn set_threads(&mut self, threads: i32) {
        // SAFETY: the context is live; ggml caps the count at the pool's size.
        unsafe { sys::llama_set_n_threads(self.ptr.as_ptr(), threads, threads) }
    }

    /// Forgets every cached position.
    pub fn clear(&mut self) {
        // SAFETY: live context; clearing the memory is always valid.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ptr.as_ptr()), true) }
    }

    /// Width of one input embedding (floats per position of `decode_embeddings`).
    pub fn n_embd_inp(&self) -> usize {
        self.n_embd_inp
    }

    /// Sequences this context decodes together.
    pub fn n_seq_max(&self) -> usize {
        self.n_seq_max as usize
    }

    /// Forgets positions `pos..` of sequence `seq` (keeps the prefix before
    /// them); false if llama.cpp could not, or `seq` is not a slot.
    pub fn remove_from(&mut self, seq: i32, pos: usize) -> bool {
        let Ok(pos) = i32::try_from(pos) else {
            return false;
        };
        if !(0..self.n_seq_max).contains(&seq) {
            return false;
        }
        // SAFETY: live context; seq is one of its sequences.
        unsafe { sys::llama_memory_seq_rm(sys::llama_get_memory(self.ptr.as_ptr()), seq, pos, -1) }
    }

    /// Makes the empty sequence `dst` hold `src`'s cells at positions
    /// `0..positions` as well. The pool is unified, so the cells are shared,
    /// not copied: each keeps its place until neither sequence holds it.
    pub fn share_prefix(&mut self, src: i32, dst: i32, positions: usize) -> bool {
        let Ok(end) = i32::try_from(positions) else {
            return false;
        };
        let seqs = 0..self.n_seq_max;
        if src == dst || !seqs.contains(&src) || !seqs.contains(&dst) {
            return false;
        }
        // SAFETY: live context; both are its sequences.
        unsafe {
            sys::llama_memory_seq_cp(sys::llama_get_memory(self.ptr.as_ptr()), src, dst, 0, end)
        };
        true
    }

    /// A copy of sequence `seq`'s KV cells (positions, keys, values), to put
    /// back later with [`Context::restore_seq`].
    pub fn save_seq(&mut self, seq: i32) -> Result<Vec<u8>, EngineError> {
        if !(0..self.n_seq_max).contains(&seq) {
            return Err(EngineError::Inference(format!("no sequence {seq}")));
        }
        // SAFETY: live context; seq is one of its sequences.
        let size = unsafe { sys::llama_state_seq_get_size(self.ptr.as_ptr(), seq) };
        let mut buf = vec![0u8; size];
        // SAFETY: buf holds `size` bytes, the size llama.cpp asked for.
        let written = unsafe {
            sys::llama_state_seq_get_data(self.ptr.as_ptr(), buf.as_mut_ptr(), size, seq)
        };
        if written == 0 || written > size {
            return Err(EngineError::Inference(format!(
                "could not save sequence {seq}"
            )));
        }
        buf.truncate(written);
        Ok(buf)
    }

    /// Replaces sequence `seq`'s cells with ones saved by [`Context::save_seq`]
    /// from any sequence of this context.
    pub fn restore_seq(&mut self, seq: i32, state: &[u8]) -> Result<(), EngineError> {
        if !(0..self.n_seq_max).contains(&seq) {
            return Err(EngineError::Inference(format!("no sequence {seq}")));
        }
        // SAFETY: state is a buffer llama_state_seq_get_data wrote for this
        // context; llama.cpp returns 0 when it cannot place it.
        let read = unsafe {
            sys::llama_state_seq_set_data(self.ptr.as_ptr(), state.as_ptr(), state.len(), seq)
        };
        if read == 0 {
            return Err(EngineError::Inference(format!(
                "could not restore sequence {seq}"
            )));
        }
        Ok(())
    }

    /// Whether the next decodes also extract per-position hidden states.
    pub fn set_embeddings(&mut self, on: bool) {
        // SAFETY: live context.
        unsafe { sys::llama_set_embeddings(self.ptr.as_ptr(), on) }
    }

    /// Whether the next decodes use a causal mask.
    pub fn set_causal(&mut self, causal: bool) {
        // SAFETY: live context.
        unsafe { sys::llama_set_causal_attn(self.ptr.as_ptr(), causal) }
    }

    fn check_span(&self, n: usize, pos: i32, seq: i32) -> Result<(), EngineError> {
        if !(0..self.n_seq_max).contains(&seq) {
            return Err(EngineError::Inference(format!(
                "sequence {seq} outside 0..{}",
                self.n_seq_max
            )));
        }
        if n == 0 || n > self.n_batch {
            return Err(EngineError::Inference(format!(
                "batch of {n} positions outside 1..={}",
                self.n_batch
            )));
        }
        if pos < 0 || pos as u64 + n as u64 > u64::from(self.n_ctx()) {
            return Err(EngineError::Inference(format!(
                "positions {pos}..{} exceed the context of {}",
                pos as u64 + n as u64,
                self.n_ctx()
            )));
        }
        Ok(())
    }

    /// Decodes `tokens` of sequence `seq` at positions `pos..`; `outputs`
    /// selects which positions produce logits/embeddings.
    pub fn decode_tokens(
        &mut self,
        tokens: &[i32],
        pos: i32,
        seq: i32,
        outputs: Outputs,
    ) -> Result<(), EngineError> {
        let batch: Vec<BatchToken> = tokens
            .iter()
            .enumerate()
            .map(|(i, &token)| BatchToken {
                token,
                pos: pos + i as i32,
                seq,
                output: outputs.wants(i, tokens.len()),
            })
            .collect();
        self.decode_batch(&batch)
    }

    /// Decodes positions of any sequences in one call; the logits of output
    /// `i` of the batch are then at [`Context::logits`]`(i)`.
    pub fn decode_batch(&mut self, tokens: &[BatchToken]) -> Result<(), EngineError> {
        if tokens.is_empty() || tokens.len() > self.n_batch {
            return Err(EngineError::Inference(format!(
                "batch of {} positions outside 1..={}",
                tokens.len(),
                self.n_batch
            )));
        }
        let n_vocab = self._model.n_vocab();
        for t in tokens {
            self.check_span(1, t.pos, t.seq)?;
            if !(0..n_vocab).contains(&t.token) {
                return Err(EngineError::Inference(format!(
                    "token id {} outside the vocabulary of {n_vocab}",
                    t.token
                )));
            }
        }
        let b = &mut self.token_batch;
        b.n_tokens = tokens.len() as i32;
        for (i, t) in tokens.iter().enumerate() {
            // SAFETY: i < n_batch, the capacity the batch was allocated with,
            // and each position has room for one sequence id.
            unsafe {
                *b.token.add(i) = t.token;
                *b.pos.add(i) = t.pos;
                *b.n_seq_id.add(i) = 1;
                **b.seq_id.add(i) = t.seq;
                *b.logits.add(i) = t.output as i8;
            }
        }
        self.run(true)
    }

    /// Decodes input embeddings (`n × n_embd_inp` floats) of sequence `seq`
    /// at positions `pos..`.
    pub fn decode_embeddings(
        &mut self,
        embd: &[f32],
        pos: i32,
        seq: i32,
        outputs: Outputs,
    ) -> Result<(), EngineError> {
        if !embd.len().is_multiple_of(self.n_embd_inp) {
            return Err(EngineError::Inference(format!(
                "embedding buffer of {} floats is not a multiple of {}",
                embd.len(),
                self.n_embd_inp
            )));
        }
        let n = embd.len() / self.n_embd_inp;
        self.check_span(n, pos, seq)?;
        let b = &mut self.embd_batch;
        b.n_tokens = n as i32;
        // SAFETY: the batch holds n_batch × n_embd_inp floats and n <= n_batch.
        unsafe { std::ptr::copy_nonoverlapping(embd.as_ptr(), b.embd, embd.len()) };
        for i in 0..n {
            // SAFETY: i < n_batch.
            unsafe {
                *b.pos.add(i) = pos + i as i32;
                *b.n_seq_id.add(i) = 1;
                **b.seq_id.add(i) = seq;
                *b.logits.add(i) = outputs.wants(i, n) as i8;
            }
        }
        self.run(false)
    }

    fn run(&mut self, tokens: bool) -> Result<(), EngineError> {
        let batch = if tokens {
            self.token_batch
        } else {
            self.embd_batch
        };
        // SAFETY: the batch was filled above within its capacity.
        let rc = unsafe { sys::llama_decode(self.ptr.as_ptr(), batch) };
        match rc {
            0 => Ok(()),
            1 => Err(EngineError::Inference(
                "no room left in the KV cache".into(),
            )),
            2 => Err(EngineError::Inference("decode aborted".into())),
            rc => Err(EngineError::Inference(format!(
                "llama_decode failed ({rc})"
            ))),
        }
    }

    /// Logits at batch index `i` of the last decode (-1 = the last output).
    pub fn logits(&self, i: i32) -> Result<&[f32], EngineError> {
        // SAFETY: llama_get_logits_ith returns null for an invalid index (no abort).
        let ptr = unsafe { sys::llama_get_logits_ith(self.ptr.as_ptr(), i) };
        if ptr.is_null() {
            return Err(EngineError::Inference(format!("no logits at output {i}")));
        }
        let n = self._model.n_vocab() as usize;
        // SAFETY: llama.cpp keeps n_vocab floats per output until the next decode,
        // and `&self` prevents a decode while the slice lives.
        Ok(unsafe { std::slice::from_raw_parts(ptr, n) })
    }

    /// Final hidden state (after the final norm) at output `i` of the last decode.
    pub fn embeddings(&self, i: i32) -> Result<&[f32], EngineError> {
        // SAFETY: returns null for an invalid index.
        let ptr = unsafe { sys::llama_get_embeddings_ith(self.ptr.as_ptr(), i) };
        if ptr.is_null() {
            return Err(EngineError::Inference(format!(
                "no embeddings at output {i}"
            )));
        }
        let n = self._model.n_embd() as usize;
        // SAFETY: n_embd floats per output until the next decode; `&self` guards it.
        Ok(unsafe { std::slice::from_raw_parts(ptr, n) })
    }
}

/// Which positions of a decode produce outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outputs {
    /// No outputs.
    None,
    /// Only the last position of this batch.
    Last,
    /// Every position of this batch.
    All,
}

impl Outputs {
    fn wants(self, i: usize, n: usize) -> bool {
        match self {
            Outputs::None => false,
            Outputs::Last => i + 1 == n,
            Outputs::All => true,
        }
    }
}

/// Settings of the vision encoder context.
#[derive(Clone, Debug)]
pub struct VisionParams {
    /// Run the vision encoder on the GPU.
    pub use_gpu: bool,
    /// CPU threads for the encoder.
    pub threads: i32,
    /// -1 auto, 0 off, 1 on.
    pub flash_attn: i32,
}

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
        mp.flash_attn_type = params.flash_attn;
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

    /// Whether image positions must be decoded without a causal mask.
    pub fn non_causal(&self) -> bool {
        // SAFETY: null chunk means "an image chunk" per the API.
        unsafe { sys::mtmd_decode_use_non_causal(self.ptr.as_ptr(), std::ptr::null()) }
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
