//! The inference engine: prompt preparation, admission and the engine thread,
//! over `internvl-llama`; its domain types are `internvl-core`'s, re-exported.
//!
//! No transport types here. One thread owns the context and takes work from a
//! bounded command channel; callers get results back on channels. The vision
//! encoder has a thread of its own that only the engine thread talks to, so
//! that encoding a tile does not pause running streams. The model itself is
//! read-only after loading and is shared so that tokenization and image tiling
//! run on the caller's blocking threads.

// llama.cpp's unsafe code lives in `internvl-llama` alone.
#![forbid(unsafe_code)]

mod encoder;
#[cfg(test)]
mod fault_test;
mod protocol;
mod worker;

/// In this crate's own test build only, a Generate with this seed panics
/// the engine thread at its [`FAULT_TOKEN`]th token (`fault_test.rs`).
#[cfg(test)]
const FAULT_SEED: u64 = 0xFA17_FA17;
/// See [`FAULT_SEED`].
#[cfg(test)]
const FAULT_TOKEN: u32 = 8;

use internvl_core::{constraint, error, placement, prompt, sampling, settings, types, vision};
use internvl_llama as llama;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

pub use constraint::{FormatLimits, ResponseFormat};
pub use error::EngineError;
pub use placement::{Buffer, BufferKind, Device, DeviceKind, Placement};
pub use prompt::{ChatMessage, ImageGrid, ImageInput, Part, Role, VideoInput};
pub use protocol::{Admission, EngineState, GenerateEvents, Loaded};
pub use sampling::SamplingParams;
pub use settings::{EngineSettings, FlashAttn, KvCacheType, SplitMode};
pub use types::*;
pub use vision::{DecodeLimits, TileSpec};
pub use worker::SlotPhase;

use internvl_core::media_budget::{MediaBudget, MediaHold};
use prompt::Prompt;
use protocol::{EmbedJob, GenerateJob, Job, Lifecycle};

/// ggml's devices, after adding those of `rpc_servers` (`internvl-grpc
/// devices`), with its Vulkan backend on `vulkan_devices`.
pub fn devices(rpc_servers: &[String], vulkan_devices: &[u32]) -> Result<Vec<Device>, EngineError> {
    llama::init_backend(false, vulkan_devices)?;
    llama::devices::add_rpc_servers(rpc_servers)?;
    Ok(llama::devices::devices())
}

/// Vulkan's own device list (the indices `vulkan_devices` takes), or why
/// there is none: no Vulkan in this build, or no loader on this host.
pub fn vulkan_devices() -> Result<Vec<llama::VulkanDevice>, String> {
    llama::vulkan_devices()
}

/// Serves this host's devices (those named, else every GPU, else the CPU)
/// over ggml's RPC protocol at `endpoint`, as llama.cpp's `rpc-server`
/// does, for a service elsewhere to list in `rpc_servers`. Returns only if
/// it cannot serve. `vulkan_devices` as in [`devices`].
pub fn serve_rpc(
    endpoint: &str,
    devices: &[String],
    vulkan_devices: &[u32],
    threads: usize,
) -> Result<(), EngineError> {
    llama::init_backend(true, vulkan_devices)?;
    llama::devices::serve_rpc(endpoint, devices, threads)
}

/// How long a drain waits for cut requests to stop (one decode step each).
const CUT_WAIT: Duration = Duration::from_secs(30);

/// Handle to the engine thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    commands: mpsc::Sender<Job>,
    state: watch::Receiver<EngineState>,
    stream_buffer: usize,
    stream_stall: Duration,
    lifecycle: Arc<Lifecycle>,
    media_budget: Arc<MediaBudget>,
}

impl Engine {
    /// Starts the engine thread: it resolves the model files with `resolve`
    /// (which may download), loads them, then serves commands.
    pub fn spawn<F>(settings: EngineSettings, resolve: F) -> Result<Self, EngineError>
    where
        F: FnOnce() -> Result<ModelPaths, EngineError> + Send + 'static,
    {
        // Admission is decided by `capacity` in `submit`; the channel only
        // needs room for everything admitted.
        let capacity = settings.queue_depth + settings.context.n_seq_max as usize;
        let (commands, receiver) = mpsc::channel(capacity + 1);
        let (state_tx, state) = watch::channel(EngineState::Loading);
        let stream_buffer = settings.stream_buffer.max(1);
        let stream_stall = settings.stream_stall;
        let media_budget = MediaBudget::new(settings.media_memory_bytes);
        let lifecycle = Arc::new(Lifecycle::new(settings.context.n_seq_max, capacity));
        let worker_lifecycle = lifecycle.clone();
        std::thread::Builder::new()
            .name("internvl-engine".into())
            .spawn(move || worker::run(settings, resolve, receiver, state_tx, worker_lifecycle))
            .map_err(|e| EngineError::Inference(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            commands,
            state,
            stream_buffer,
            stream_stall,
            lifecycle,
            media_budget,
        })
    }

    /// Requests accepted and not yet finished (queued or running).
    pub fn in_flight(&self) -> usize {
        *self.lifecycle.in_flight.borrow()
    }

    /// How many slots are in each phase now.
    pub fn slot_phases(&self) -> Vec<(SlotPhase, usize)> {
        SlotPhase::ALL
            .into_iter()
            .zip(self.lifecycle.phases())
            .collect()
    }

    /// Whether [`Engine::drain`] has begun.
    pub fn is_draining(&self) -> bool {
        self.lifecycle.draining.load(Ordering::Acquire)
    }

    /// Stops taking work, lets accepted work finish for up to `grace`, then
    /// cuts what is left (those callers get [`EngineError::ShuttingDown`]).
    /// Returns once nothing is in flight.
    pub async fn drain(&self, grace: Duration) {
        self.lifecycle.draining.store(true, Ordering::Release);
        let mut in_flight = self.lifecycle.in_flight.subscribe();
        let idle = tokio::time::timeout(grace, in_flight.wait_for(|n| *n == 0))
            .await
            .is_ok();
        if !idle {
            tracing::warn!(
                requests = *in_flight.borrow(),
                grace_ms = grace.as_millis() as u64,
                "grace period over; cutting the requests still running"
            );
            self.lifecycle.aborting.store(true, Ordering::Release);
            self.lifecycle.bell.ring();
            // Each is cut at its next decode step, so this is short; the bound
            // only matters if the engine thread died holding a job.
            let cut = tokio::time::timeout(CUT_WAIT, in_flight.wait_for(|n| *n == 0)).await;
            if !matches!(cut, Ok(Ok(_))) {
                tracing::error!("requests still in flight after cutting; stopping anyway");
            }
        }
    }

    /// Waits until the model is loaded, or returns why it never will be.
    pub async fn wait_ready(&self) -> Result<(), Arc<EngineError>> {
        let mut state = self.state.clone();
        loop {
            match &*state.borrow_and_update() {
                EngineState::Ready(_) => return Ok(()),
                EngineState::Failed(e) | EngineState::Faulted(e) => return Err(e.clone()),
                EngineState::Stopped => return Err(Arc::new(EngineError::Stopped)),
                EngineState::Loading => {}
            }
            if state.changed().await.is_err() {
                return Err(Arc::new(EngineError::Stopped));
            }
        }
    }

    fn loaded(&self) -> Result<Arc<Loaded>, EngineError> {
        match &*self.state.borrow() {
            EngineState::Ready(loaded) => Ok(loaded.clone()),
            EngineState::Loading => Err(EngineError::NotReady),
            EngineState::Failed(_) | EngineState::Faulted(_) | EngineState::Stopped => {
                Err(EngineError::Stopped)
            }
        }
    }

    /// Waits until the engine, once ready, stops serving for a reason other
    /// than a drain: a fault (its error), or the thread's end.
    pub async fn wait_fault(&self) -> Arc<EngineError> {
        let mut state = self.state.clone();
        loop {
            match &*state.borrow_and_update() {
                EngineState::Faulted(e) => return e.clone(),
                EngineState::Stopped => return Arc::new(EngineError::Stopped),
                EngineState::Loading | EngineState::Ready(_) | EngineState::Failed(_) => {}
            }
            if state.changed().await.is_err() {
                return Arc::new(EngineError::Fault("the engine thread ended".into()));
            }
        }
    }

    /// What is being served.
    pub fn info(&self) -> Result<ModelInfo, EngineError> {
        Ok(self.loaded()?.info.clone())
    }

    /// Builds the prompt of `messages` on a blocking thread, its decoded
    /// media taken from `media`, which then keeps only what the prompt's
    /// tiles hold.
    async fn chat_prompt(
        &self,
        messages: Vec<ChatMessage>,
        media: &mut MediaHold,
    ) -> Result<(Arc<Loaded>, Prompt), EngineError> {
        let loaded = self.loaded()?;
        if messages.is_empty() {
            return Err(EngineError::invalid(
                "messages",
                "at least one message is required",
            ));
        }
        let l = loaded.clone();
        let mut hold = std::mem::take(media);
        let (prompt, hold) = tokio::task::spawn_blocking(move || {
            let budget = l.budget();
            let prompt = prompt::build_chat_prompt(
                &*l.model,
                &l.template,
                l.spec,
                l.limits,
                budget,
                &mut hold,
                &messages,
            );
            (prompt, hold)
        })
        .await
        .map_err(|e| EngineError::Inference(format!("prompt preparation panicked: {e}")))?;
        *media = hold;
        let prompt = prompt.map_err(|e| self.hinted(e))?;
        media.keep_only(u64::from(prompt.tiles()) * prompt::tile_bytes(&loaded.spec));
        Ok((loaded, prompt))
    }

    /// `error` with the retry hint filled in where it carries one.
    pub fn hinted(&self, error: EngineError) -> EngineError {
        match error {
            EngineError::MediaMemoryFull {
                needed_mb,
                limit_mb,
                ..
            } => EngineError::MediaMemoryFull {
                needed_mb,
                limit_mb,
                retry_after_ms: self.lifecycle.retry_after().as_millis() as u64,
            },
            other => other,
        }
    }

    /// A place in flight for a request about to do work, or RESOURCE_EXHAUSTED
    /// (with a retry hint) while the engine is full, UNAVAILABLE while it
    /// drains. Taken first, before the request's media are fetched or
    /// decoded: its place is held until it is answered, with the request's
    /// share of `media_memory_mb` ([`Admission::media`]).
    ///
    /// Counted before it is queued, so a drain never sees a job in neither
    /// place; and checked against capacity in the same step, so a burst of
    /// calls cannot overshoot it while the engine thread is still waking.
    pub fn admit(&self) -> Result<Admission, EngineError> {
        if self.is_draining() {
            return Err(EngineError::ShuttingDown);
        }
        let mut place = self.lifecycle.admit().ok_or_else(|| self.full())?;
        place.media = MediaHold::new(&self.media_budget);
        Ok(Admission(place))
    }

    /// Counts a conversation's prompt positions without running the model.
    pub async fn count_tokens(
        &self,
        messages: Vec<ChatMessage>,
        admitted: &mut Admission,
    ) -> Result<TokenCount, EngineError> {
        let (loaded, prompt) = self.chat_prompt(messages, admitted.media()).await?;
        let per_tile = loaded.spec.tokens_per_tile as usize;
        let input_ids = prompt
            .items()
            .into_iter()
            .flat_map(|item| match item {
                prompt::PromptItem::Token(token) => std::iter::repeat_n(token, 1),
                prompt::PromptItem::Tile { .. } => {
                    std::iter::repeat_n(loaded.image_context_token, per_tile)
                }
            })
            .collect();
        Ok(TokenCount {
            prompt_tokens: prompt.prompt_tokens,
            image_tokens: prompt.image_tokens,
            grids: prompt.grids,
            input_ids,
        })
    }

    /// Token ids of plain text, special tokens recognised.
    pub async fn tokenize(
        &self,
        text: String,
        _admitted: &mut Admission,
    ) -> Result<Vec<i32>, EngineError> {
        let loaded = self.loaded()?;
        tokio::task::spawn_blocking(move || loaded.model.tokenize(&text, false, true))
            .await
            .map_err(|e| EngineError::Inference(format!("tokenization panicked: {e}")))?
    }

    /// Queues a generation; events arrive on the returned channel, ending with
    /// `Done` or an error. Dropping the receiver cancels the generation at the
    /// next decode step.
    pub async fn generate(
        &self,
        mut request: GenerateRequest,
        mut admitted: Admission,
    ) -> Result<GenerateEvents, EngineError> {
        let arrived = Instant::now();
        // Cheapest first: what needs neither the format compiled nor an
        // image decoded is refused before either.
        let loaded = self.loaded()?;
        let n_ctx = loaded.info.context_size;
        let parallel = loaded.info.parallel.max(1);
        if request.max_new_tokens == 0 {
            return Err(EngineError::invalid("max_new_tokens", "must be at least 1"));
        }
        let until_full = request.max_new_tokens == UNTIL_CONTEXT_FULL;
        if request.max_new_tokens >= n_ctx && !until_full {
            return Err(EngineError::invalid(
                "max_new_tokens",
                format!(
                    "{} is beyond the context of {n_ctx} tokens",
                    request.max_new_tokens
                ),
            ));
        }
        if request.top_logprobs > loaded.info.vocab_size {
            return Err(EngineError::invalid(
                "top_logprobs",
                format!(
                    "{} is beyond the vocabulary of {}",
                    request.top_logprobs, loaded.info.vocab_size
                ),
            ));
        }
        // The prompt replaces the messages; moving them avoids copying image bytes.
        let messages = std::mem::take(&mut request.messages);
        // A bad format is refused before any image is decoded.
        let constraint = match request.response_format.clone() {
            None => None,
            Some(format) => {
                let compiled = tokio::task::spawn_blocking(move || loaded.formats.compile(&format))
                    .await
                    .map_err(|e| {
                        EngineError::Inference(format!("format compilation panicked: {e}"))
                    })??;
                Some(compiled)
            }
        };
        let (_, mut prompt) = self.chat_prompt(messages, admitted.media()).await?;
        prompt.partition(&request.partition);
        if request.deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(EngineError::DeadlineExceeded { completed: 0 });
        }
        if prompt.prompt_tokens >= n_ctx {
            return Err(EngineError::invalid(
                "messages",
                format!(
                    "the prompt is {} tokens ({} of them image tokens), the context holds {n_ctx}",
                    prompt.prompt_tokens, prompt.image_tokens
                ),
            ));
        }
        if until_full {
            // An equal share of the shared KV pool when the prompt fits in
            // one: admission reserves prompt + max_new_tokens, so the whole
            // context would keep every other request waiting.
            let share = n_ctx / parallel;
            let room = if prompt.prompt_tokens < share {
                share
            } else {
                n_ctx
            };
            request.max_new_tokens = room - prompt.prompt_tokens;
        }
        if prompt.prompt_tokens + request.max_new_tokens > n_ctx {
            return Err(EngineError::invalid(
                "max_new_tokens",
                format!(
                    "the prompt is {} tokens; with max_new_tokens {} it exceeds the context of {n_ctx}",
                    prompt.prompt_tokens, request.max_new_tokens
                ),
            ));
        }
        // One place beyond the buffer, kept for the end of a stream whose
        // client stopped reading (`Outbox`).
        let (events, receiver) = mpsc::channel(self.stream_buffer + 1);
        let in_flight = admitted.0;
        let job = GenerateJob {
            prompt,
            request,
            arrived,
            enqueued: Instant::now(),
            events,
            in_flight,
            constraint,
            span: tracing::Span::current(),
            stall: self.stream_stall,
        };
        self.submit(Job::Generate(Box::new(job)))?;
        Ok(GenerateEvents::new(
            receiver,
            self.lifecycle.bell.clone(),
            self.state.clone(),
        ))
    }

    /// Pooled final hidden states of each input.
    pub async fn embed(
        &self,
        request: EmbedRequest,
        mut admitted: Admission,
    ) -> Result<Vec<Embedding>, EngineError> {
        let loaded = self.loaded()?;
        if request.inputs.is_empty() {
            return Err(EngineError::invalid(
                "inputs",
                "at least one input is required",
            ));
        }
        let l = loaded.clone();
        let inputs = request.inputs;
        let partition = request.partition;
        let mut hold = std::mem::take(admitted.media());
        let (prompts, hold) = tokio::task::spawn_blocking(move || {
            // The request's tiles are counted across its inputs: each input
            // may use what the ones before it left.
            let mut budget = l.budget();
            let prompts = inputs
                .iter()
                .enumerate()
                .map(|(i, parts)| {
                    let field = format!("inputs[{i}]");
                    let p = prompt::build_embed_prompt(
                        &*l.model, l.spec, l.limits, budget, &mut hold, parts, &field,
                    )?;
                    if p.prompt_tokens == 0 {
                        return Err(EngineError::invalid(field, "input is empty"));
                    }
                    budget.max_tiles = budget.max_tiles.saturating_sub(p.tiles());
                    let mut p = p;
                    p.partition(&partition);
                    Ok(p)
                })
                .collect::<Result<Vec<_>, _>>();
            (prompts, hold)
        })
        .await
        .map_err(|e| EngineError::Inference(format!("prompt preparation panicked: {e}")))?;
        *admitted.media() = hold;
        let prompts = prompts.map_err(|e| self.hinted(e))?;
        let tiles: u32 = prompts.iter().map(Prompt::tiles).sum();
        admitted
            .media()
            .keep_only(u64::from(tiles) * prompt::tile_bytes(&loaded.spec));
        let n_ctx = loaded.info.context_size;
        if let Some((i, p)) = prompts
            .iter()
            .enumerate()
            .find(|(_, p)| p.prompt_tokens > n_ctx)
        {
            return Err(EngineError::invalid(
                format!("inputs[{i}]"),
                format!(
                    "the input is {} tokens, the context holds {n_ctx}",
                    p.prompt_tokens
                ),
            ));
        }
        let (reply, result) = oneshot::channel();
        let in_flight = admitted.0;
        self.submit(Job::Embed(EmbedJob {
            prompts,
            pooling: request.pooling,
            normalize: request.normalize,
            deadline: request.deadline,
            reply,
            _in_flight: in_flight,
            span: tracing::Span::current(),
        }))?;
        // Every path that ends a job answers it; a dropped reply means the
        // engine thread ended without doing so. A fault answers for an
        // engine thread that cannot (asleep after a ggml abort).
        tokio::select! {
            reply = result => reply
                .map_err(|_| EngineError::Fault("the engine ended without answering".into()))?,
            why = protocol::faulted(self.state.clone()) => Err(why),
        }
    }

    fn full(&self) -> EngineError {
        EngineError::QueueFull {
            retry_after_ms: self.lifecycle.retry_after().as_millis() as u64,
        }
    }

    /// Hands a job to the engine thread; a refused job drops its place.
    fn submit(&self, job: Job) -> Result<(), EngineError> {
        self.commands.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => self.full(),
            mpsc::error::TrySendError::Closed(_) => EngineError::Stopped,
        })?;
        // The engine thread may be waiting with every slot stalled; the new
        // job may fit beside them.
        self.lifecycle.bell.ring();
        Ok(())
    }
}
