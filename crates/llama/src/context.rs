//! The inference context: KV sequences, batches of tokens or embeddings,
//! logits and hidden states.

use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

use internvl_core::error::EngineError;
use internvl_core::settings::ContextParams;

use super::ffi::{flash_attn, ggml_type};
use super::model::Model;

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
    /// How that pool is freed (see [`ThreadpoolFns`]).
    free_threadpool: unsafe extern "C" fn(*mut sys::ggml_threadpool),
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
            (self.free_threadpool)(self.threadpool.as_ptr());
        }
    }
}

/// `ggml_threadpool_new` and `_free` belong to the CPU backend. A default
/// build links them; in a `dynamic-backends` build the CPU backend is a plugin
/// loaded at start, and they are reached through its registry, as llama.cpp's
/// own tools do.
#[derive(Clone, Copy)]
struct ThreadpoolFns {
    new: unsafe extern "C" fn(*mut sys::ggml_threadpool_params) -> *mut sys::ggml_threadpool,
    free: unsafe extern "C" fn(*mut sys::ggml_threadpool),
}

impl ThreadpoolFns {
    #[cfg(not(feature = "dynamic-backends"))]
    fn get() -> Option<Self> {
        Some(Self {
            new: sys::ggml_threadpool_new,
            free: sys::ggml_threadpool_free,
        })
    }

    /// `None` when no CPU backend is registered or it lacks either function.
    #[cfg(feature = "dynamic-backends")]
    fn get() -> Option<Self> {
        // SAFETY: registry queries on ggml's live registry. The CPU backend's
        // get_proc_address returns, for these two names, the addresses of
        // `ggml_threadpool_new` and `ggml_threadpool_free` (ggml-cpu.cpp),
        // whose C signatures are the ones the fields declare (ggml-cpu.h).
        unsafe {
            let dev = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
            if dev.is_null() {
                return None;
            }
            let reg = sys::ggml_backend_dev_backend_reg(dev);
            let new = sys::ggml_backend_reg_get_proc_address(reg, c"ggml_threadpool_new".as_ptr());
            let free =
                sys::ggml_backend_reg_get_proc_address(reg, c"ggml_threadpool_free".as_ptr());
            if new.is_null() || free.is_null() {
                return None;
            }
            Some(Self {
                new: std::mem::transmute::<
                    *mut std::ffi::c_void,
                    unsafe extern "C" fn(
                        *mut sys::ggml_threadpool_params,
                    ) -> *mut sys::ggml_threadpool,
                >(new),
                free: std::mem::transmute::<
                    *mut std::ffi::c_void,
                    unsafe extern "C" fn(*mut sys::ggml_threadpool),
                >(free),
            })
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
        cp.flash_attn_type = flash_attn(params.flash_attn);
        cp.type_k = ggml_type(params.type_k);
        cp.type_v = ggml_type(params.type_v);
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
        let pool_fns = ThreadpoolFns::get();
        // SAFETY: plain constructor of a params struct, then a pool from it
        // through the CPU backend's own function.
        let threadpool = pool_fns.map_or(std::ptr::null_mut(), |fns| unsafe {
            let mut tp = sys::ggml_threadpool_params_default(params.threads.max(1));
            (fns.new)(&mut tp)
        });
        let (Some(threadpool), Some(pool_fns)) = (NonNull::new(threadpool), pool_fns) else {
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
            free_threadpool: pool_fns.free,
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

    /// Logits at batch index `i` of the last decode, writable: a constrained
    /// sequence masks them in place rather than copying the vocabulary.
    pub fn logits_mut(&mut self, i: i32) -> Result<&mut [f32], EngineError> {
        // SAFETY: as in `logits`; null for an invalid index.
        let ptr = unsafe { sys::llama_get_logits_ith(self.ptr.as_ptr(), i) };
        if ptr.is_null() {
            return Err(EngineError::Inference(format!("no logits at output {i}")));
        }
        let n = self._model.n_vocab() as usize;
        // SAFETY: n_vocab floats per output, owned by the context, which only
        // reads them again when a later decode overwrites them; `&mut self`
        // makes this the only reference while it lives.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, n) })
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
