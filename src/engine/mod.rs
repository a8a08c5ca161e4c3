//! The inference engine: domain types, prompt preparation and the engine thread.
//!
//! No transport types here. One thread owns the context and takes work from a
//! bounded command channel; callers get results back on channels. The vision
//! encoder has a thread of its own that only the engine thread talks to, so
//! that encoding a tile does not pause running streams. The model itself is
//! read-only after loading and is shared so that tokenization and image tiling
//! run on the caller's blocking threads.

mod cache;
pub mod digest;
mod encoder;
mod error;
pub mod gguf;
mod gguf_meta;
pub mod llama;
pub mod position_rows;
pub mod prompt;
pub mod resize;
pub mod sampling;
pub mod vision;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

pub use error::EngineError;
pub use prompt::{ChatMessage, ImageGrid, ImageInput, Part, Role, VideoInput};
pub use sampling::SamplingParams;
pub use vision::{DecodeLimits, TileSpec};

use llama::{ContextParams, Model, ModelParams, VisionParams};
use prompt::{ChatTemplate, Prompt};

/// Everything needed to load and run a model, except where its files are.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Loading and GPU offload of the language model.
    pub model: ModelParams,
    /// Context sizing and threads.
    pub context: ContextParams,
    /// Vision encoder placement and threads.
    pub vision: VisionParams,
    /// Limits for decoding untrusted images.
    pub decode_limits: DecodeLimits,
    /// Requests waiting for a slot beyond those running.
    pub queue_depth: usize,
    /// Most prompt positions decoded per scheduler step, so running streams
    /// keep flowing while a new prompt is read.
    pub prefill_chunk: usize,
    /// Events buffered per stream before the engine waits for the client.
    pub stream_buffer: usize,
    /// Bytes of encoded tiles kept for reuse (0 = none).
    pub image_cache_bytes: usize,
    /// Bytes of finished sequences' KV cells kept for prefix reuse (0 = none).
    pub prefix_cache_bytes: usize,
    /// Where files derived from the model files are kept (the corrected
    /// mmproj, see [`position_rows`]); `None` when no directory is known.
    pub cache_dir: Option<PathBuf>,
}

/// Where the two model files are on disk.
#[derive(Clone, Debug)]
pub struct ModelPaths {
    /// Language model GGUF.
    pub model: PathBuf,
    /// Vision encoder (mmproj) GGUF.
    pub mmproj: PathBuf,
}

/// What a client sees of the served model.
#[derive(Clone, Debug, Default)]
pub struct ModelInfo {
    /// `general.name` of the GGUF, else its file name.
    pub name: String,
    /// `general.architecture` of the language model.
    pub architecture: String,
    /// Context length of this deployment.
    pub context_size: u32,
    /// Context length the model was trained with.
    pub training_context_size: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Hidden size (embedding dimensions).
    pub embedding_size: u32,
    /// Tiling of the vision encoder.
    pub tiles: TileSpec,
    /// Projector type of the mmproj.
    pub projector: String,
    /// llama.cpp's description (size and quantization).
    pub quantization: String,
    /// The chat template from the GGUF.
    pub chat_template: String,
    /// Where the layers run.
    pub offload: String,
    /// Sequences decoded together.
    pub parallel: u32,
}

/// A validated Generate call.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Most tokens to generate (> 0).
    pub max_new_tokens: u32,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Keep going past the end-of-generation token.
    pub ignore_eos: bool,
    /// Alternatives reported per token.
    pub top_logprobs: u32,
    /// Report each token's log-probability (implied by `top_logprobs > 0`).
    pub logprobs: bool,
    /// Caller's id for logs.
    pub request_id: String,
    /// When the caller stops waiting (gRPC deadline).
    pub deadline: Option<Instant>,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token.
    Stop,
    /// `max_new_tokens` reached or the context is full.
    Length,
    /// A stop sequence matched.
    StopSequence,
    /// The request was cancelled.
    Cancelled,
}

/// One generated token with its probabilities.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratedToken {
    /// Token id.
    pub id: i32,
    /// Its text (lossy where the token is part of a character).
    pub text: String,
    /// Log-probability under the model (0 unless requested).
    pub logprob: f32,
    /// Most likely alternatives, best first.
    pub top: Vec<TopToken>,
}

/// An alternative token.
#[derive(Clone, Debug, PartialEq)]
pub struct TopToken {
    /// Token id.
    pub id: i32,
    /// Its text.
    pub text: String,
    /// Log-probability under the model.
    pub logprob: f32,
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Every prompt position.
    pub prompt_tokens: u32,
    /// Image-embedding positions.
    pub image_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Prompt positions reused from the KV cache (not decoded again).
    pub cached_tokens: u32,
    /// Tiles whose encoding came from the image cache (not encoded again).
    pub cached_image_tiles: u32,
}

/// Where a request's time went, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// Waiting for the engine.
    pub queue_ms: f64,
    /// Vision encoder.
    pub vision_ms: f64,
    /// Prompt decoding.
    pub prefill_ms: f64,
    /// Token generation.
    pub decode_ms: f64,
    /// Arrival to first token.
    pub ttft_ms: f64,
}

/// An event of a Generate stream.
#[derive(Clone, Debug, PartialEq)]
pub enum GenerateEvent {
    /// New text and the tokens behind it.
    Delta {
        /// Text released by this step.
        text: String,
        /// Tokens generated by this step.
        tokens: Vec<GeneratedToken>,
    },
    /// The last event.
    Done {
        /// Why it ended.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
        /// Where the time went.
        timings: Timings,
    },
}

/// How an embedding pools the positions of its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over every position.
    Mean,
    /// The last position.
    Last,
}

/// A validated Embed call.
#[derive(Clone, Debug)]
pub struct EmbedRequest {
    /// Inputs, each a sequence of parts.
    pub inputs: Vec<Vec<Part>>,
    /// Pooling.
    pub pooling: Pooling,
    /// Scale to unit norm.
    pub normalize: bool,
    /// When the caller stops waiting (gRPC deadline).
    pub deadline: Option<Instant>,
}

/// One pooled vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    /// The vector.
    pub values: Vec<f32>,
    /// Positions pooled.
    pub tokens: u32,
}

/// Prompt size of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenCount {
    /// Every position.
    pub prompt_tokens: u32,
    /// Image-embedding positions.
    pub image_tokens: u32,
    /// Grid per image or frame.
    pub grids: Vec<ImageGrid>,
    /// Every position's token id; image-embedding positions carry the
    /// `<IMG_CONTEXT>` id (-1 when the vocabulary has none).
    pub input_ids: Vec<i32>,
}

/// Where the engine is in its life.
#[derive(Clone)]
pub enum EngineState {
    /// Resolving and loading the model files.
    Loading,
    /// Serving.
    Ready(Arc<Loaded>),
    /// Loading failed; the message names the file.
    Failed(Arc<EngineError>),
    /// The engine thread has ended.
    Stopped,
}

/// The read-only half of a loaded model, shared with request handlers.
pub struct Loaded {
    model: Arc<Model>,
    template: ChatTemplate,
    spec: TileSpec,
    limits: DecodeLimits,
    info: ModelInfo,
    image_context_token: i32,
}

pub(crate) struct GenerateJob {
    prompt: Prompt,
    request: GenerateRequest,
    arrived: Instant,
    enqueued: Instant,
    events: mpsc::Sender<worker::EventResult>,
}

pub(crate) struct EmbedJob {
    prompts: Vec<Prompt>,
    pooling: Pooling,
    normalize: bool,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Vec<Embedding>, EngineError>>,
}

pub(crate) enum Command {
    Generate(Box<GenerateJob>),
    Embed(EmbedJob),
}

/// Bounds of the retry hint sent with RESOURCE_EXHAUSTED.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How long a drain waits for cut requests to stop (one decode step each).
const CUT_WAIT: Duration = Duration::from_secs(30);

/// Drain state shared by the handles and the engine thread.
pub(crate) struct Lifecycle {
    /// No new work is accepted.
    draining: AtomicBool,
    /// Work still running is cut at its next step.
    aborting: AtomicBool,
    /// Jobs accepted and not yet finished (queued or running).
    in_flight: watch::Sender<usize>,
    /// Moving average of how long a request holds a slot, in microseconds.
    service_us: AtomicU64,
    /// Slots that run requests at once.
    parallel: u64,
    /// Requests in flight at most: slots plus queue.
    capacity: usize,
    /// Slots running a request, published whenever one fills or empties.
    active: AtomicUsize,
}

impl Lifecycle {
    pub(crate) fn aborting(&self) -> bool {
        self.aborting.load(Ordering::Acquire)
    }

    pub(crate) fn set_active(&self, slots: usize) {
        self.active.store(slots, Ordering::Relaxed);
    }

    pub(crate) fn finished_one(&self) {
        self.in_flight.send_modify(|n| *n = n.saturating_sub(1));
    }

    /// Folds one request's time in a slot into the moving average.
    pub(crate) fn record_service_time(&self, took: Duration) {
        let sample = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let old = self.service_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.service_us.store(new, Ordering::Relaxed);
    }

    /// About how long until a full queue moves by one: a slot frees up every
    /// average service time divided by the slots, bounded to a sane range.
    fn retry_after(&self) -> Duration {
        let per_slot = self.service_us.load(Ordering::Relaxed) / self.parallel.max(1);
        Duration::from_micros(per_slot).clamp(RETRY_MIN, RETRY_MAX)
    }
}

/// Handle to the engine thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    commands: mpsc::Sender<Command>,
    state: watch::Receiver<EngineState>,
    stream_buffer: usize,
    lifecycle: Arc<Lifecycle>,
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
        let lifecycle = Arc::new(Lifecycle {
            draining: AtomicBool::new(false),
            aborting: AtomicBool::new(false),
            in_flight: watch::Sender::new(0),
            service_us: AtomicU64::new(0),
            parallel: u64::from(settings.context.n_seq_max),
            capacity,
            active: AtomicUsize::new(0),
        });
        let worker_lifecycle = lifecycle.clone();
        std::thread::Builder::new()
            .name("internvl-engine".into())
            .spawn(move || worker::run(settings, resolve, receiver, state_tx, worker_lifecycle))
            .map_err(|e| EngineError::Inference(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            commands,
            state,
            stream_buffer,
            lifecycle,
        })
    }

    /// Requests accepted and not yet finished (queued or running).
    pub fn in_flight(&self) -> usize {
        *self.lifecycle.in_flight.borrow()
    }

    /// Sequences being prefilled or decoded now (the rest of
    /// [`Engine::in_flight`] waits for a slot or for its client).
    pub fn active_sequences(&self) -> usize {
        self.lifecycle.active.load(Ordering::Relaxed)
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
            // Each is cut at its next decode step, so this is short; the bound
            // only matters if the engine thread died holding a job.
            let cut = tokio::time::timeout(CUT_WAIT, in_flight.wait_for(|n| *n == 0)).await;
            if !matches!(cut, Ok(Ok(_))) {
                tracing::error!("requests still in flight after cutting; stopping anyway");
            }
        }
    }

    /// Watches the engine's state (loading, ready, failed, stopped).
    pub fn state(&self) -> watch::Receiver<EngineState> {
        self.state.clone()
    }

    /// Waits until the model is loaded, or returns why it never will be.
    pub async fn wait_ready(&self) -> Result<(), Arc<EngineError>> {
        let mut state = self.state.clone();
        loop {
            match &*state.borrow_and_update() {
                EngineState::Ready(_) => return Ok(()),
                EngineState::Failed(e) => return Err(e.clone()),
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
            EngineState::Failed(_) | EngineState::Stopped => Err(EngineError::Stopped),
        }
    }

    /// What is being served.
    pub fn info(&self) -> Result<ModelInfo, EngineError> {
        Ok(self.loaded()?.info.clone())
    }

    async fn chat_prompt(
        &self,
        messages: Vec<ChatMessage>,
    ) -> Result<(Arc<Loaded>, Prompt), EngineError> {
        let loaded = self.loaded()?;
        if messages.is_empty() {
            return Err(EngineError::invalid(
                "messages",
                "at least one message is required",
            ));
        }
        let l = loaded.clone();
        let prompt = tokio::task::spawn_blocking(move || {
            prompt::build_chat_prompt(&l.model, &l.template, l.spec, l.limits, &messages)
        })
        .await
        .map_err(|e| EngineError::Inference(format!("prompt preparation panicked: {e}")))??;
        Ok((loaded, prompt))
    }

    /// Counts a conversation's prompt positions without running the model.
    pub async fn count_tokens(
        &self,
        messages: Vec<ChatMessage>,
    ) -> Result<TokenCount, EngineError> {
        let (loaded, prompt) = self.chat_prompt(messages).await?;
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
    pub async fn tokenize(&self, text: String) -> Result<Vec<i32>, EngineError> {
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
    ) -> Result<mpsc::Receiver<Result<GenerateEvent, EngineError>>, EngineError> {
        let arrived = Instant::now();
        // The prompt replaces the messages; moving them avoids copying image bytes.
        let messages = std::mem::take(&mut request.messages);
        let (loaded, prompt) = self.chat_prompt(messages).await?;
        let n_ctx = loaded.info.context_size;
        if request.max_new_tokens == 0 {
            return Err(EngineError::invalid("max_new_tokens", "must be at least 1"));
        }
        if request.deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(EngineError::DeadlineExceeded { completed: 0 });
        }
        if request.max_new_tokens >= n_ctx {
            return Err(EngineError::invalid(
                "max_new_tokens",
                format!(
                    "{} is beyond the context of {n_ctx} tokens",
                    request.max_new_tokens
                ),
            ));
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
        if prompt.prompt_tokens + request.max_new_tokens > n_ctx {
            return Err(EngineError::invalid(
                "max_new_tokens",
                format!(
                    "the prompt is {} tokens; with max_new_tokens {} it exceeds the context of {n_ctx}",
                    prompt.prompt_tokens, request.max_new_tokens
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
        let (events, receiver) = mpsc::channel(self.stream_buffer);
        let job = GenerateJob {
            prompt,
            request,
            arrived,
            enqueued: Instant::now(),
            events,
        };
        self.submit(Command::Generate(Box::new(job)))?;
        Ok(receiver)
    }

    /// Pooled final hidden states of each input.
    pub async fn embed(&self, request: EmbedRequest) -> Result<Vec<Embedding>, EngineError> {
        let loaded = self.loaded()?;
        if request.inputs.is_empty() {
            return Err(EngineError::invalid(
                "inputs",
                "at least one input is required",
            ));
        }
        let l = loaded.clone();
        let inputs = request.inputs;
        let prompts = tokio::task::spawn_blocking(move || {
            inputs
                .iter()
                .enumerate()
                .map(|(i, parts)| {
                    let field = format!("inputs[{i}]");
                    let p = prompt::build_embed_prompt(&l.model, l.spec, l.limits, parts, &field)?;
                    if p.prompt_tokens == 0 {
                        return Err(EngineError::invalid(field, "input is empty"));
                    }
                    Ok(p)
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| EngineError::Inference(format!("prompt preparation panicked: {e}")))??;
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
        self.submit(Command::Embed(EmbedJob {
            prompts,
            pooling: request.pooling,
            normalize: request.normalize,
            deadline: request.deadline,
            reply,
        }))?;
        result.await.map_err(|_| EngineError::Stopped)?
    }

    fn submit(&self, command: Command) -> Result<(), EngineError> {
        if self.is_draining() {
            return Err(EngineError::ShuttingDown);
        }
        let full = || EngineError::QueueFull {
            retry_after_ms: self.lifecycle.retry_after().as_millis() as u64,
        };
        // Counted before it is queued, so a drain never sees a job in neither
        // place; and checked against capacity in the same step, so a burst of
        // calls cannot overshoot it while the engine thread is still waking.
        let capacity = self.lifecycle.capacity;
        let admitted = self.lifecycle.in_flight.send_if_modified(|n| {
            let room = *n < capacity;
            if room {
                *n += 1;
            }
            room
        });
        if !admitted {
            return Err(full());
        }
        self.commands.try_send(command).map_err(|e| {
            self.lifecycle.finished_one();
            match e {
                mpsc::error::TrySendError::Full(_) => full(),
                mpsc::error::TrySendError::Closed(_) => EngineError::Stopped,
            }
        })
    }
}
