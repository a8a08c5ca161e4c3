//! The engine thread: loads the model, then runs continuous batching.
//!
//! The context holds `parallel` sequences (slots). Each scheduler step decodes
//! one batch carrying the next token of every generating slot plus a bounded
//! chunk of waiting prompts' text, then at most one chunk of image embeddings
//! and one chunk of an Embed input. Tiles are encoded on the vision thread
//! (`encoder.rs`) meanwhile, oldest request first, and their embeddings are
//! decoded once back. Requests enter a free slot in arrival order
//! once the KV pool has room for their whole prompt and `max_new_tokens`, so a
//! running sequence never runs out of cells.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, watch};
use tracing::{info, info_span, warn};

use super::cache::{kv_items, reusable, EmbeddingCache, KvContents, KvItem, PrefixCache};
use super::encoder::{EncodeResult, Encoded, TileEncoder};
use super::gguf_meta::{check_language_model, read_tile_spec};
use super::llama::{self, BatchToken, Context, Model, Outputs};
use super::position_rows::{self, VisionFile};
use super::prompt::{ChatTemplate, Prompt, PromptItem};
use super::sampling::{logprobs, TextStream, TokenSampler};
use super::vision::{TileHash, TiledImage};
use super::{
    Command, EmbedJob, Embedding, EngineError, EngineSettings, EngineState, FinishReason,
    GenerateEvent, GenerateJob, GenerateRequest, GeneratedToken, Lifecycle, Loaded, ModelInfo,
    ModelPaths, Pooling, Timings, TopToken, Usage,
};

/// Positions decoded per call when every position produces an output: llama.cpp
/// reserves logits for each output (n_vocab floats), so large chunks would cost
/// gigabytes with a real vocabulary.
const EMBED_CHUNK: usize = 256;

/// How long the loop sleeps when every slot waits on a slow client or on the
/// vision encoder.
const STALLED_POLL: Duration = Duration::from_millis(1);

/// Stream events carry either an event or the error that ended the stream.
pub(crate) type EventResult = Result<GenerateEvent, EngineError>;

pub(super) fn run<F>(
    settings: EngineSettings,
    resolve: F,
    commands: mpsc::Receiver<Command>,
    state: watch::Sender<EngineState>,
    lifecycle: Arc<Lifecycle>,
) where
    F: FnOnce() -> Result<ModelPaths, EngineError>,
{
    let mut worker = match Worker::load(&settings, resolve, lifecycle) {
        Ok((worker, loaded)) => {
            state.send_replace(EngineState::Ready(loaded));
            worker
        }
        Err(e) => {
            tracing::error!("model load failed: {e}");
            state.send_replace(EngineState::Failed(Arc::new(e)));
            return;
        }
    };
    worker.serve(commands);
    state.send_replace(EngineState::Stopped);
}

/// Events a stream has produced but its client has not yet taken. The engine
/// never waits on one client: a full channel keeps the events here and holds
/// back only that sequence.
struct Outbox {
    events: mpsc::Sender<EventResult>,
    pending: VecDeque<EventResult>,
}

impl Outbox {
    /// Hands over what the channel takes. `Err` when the client has left.
    fn flush(&mut self) -> Result<(), EngineError> {
        while let Some(event) = self.pending.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.pending.push_front(event);
                    return Ok(());
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(EngineError::ClientGone),
            }
        }
        if self.events.is_closed() {
            return Err(EngineError::ClientGone);
        }
        Ok(())
    }

    fn send(&mut self, event: EventResult) -> Result<(), EngineError> {
        self.pending.push_back(event);
        self.flush()
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// The prompt items of one input still to be decoded into a slot.
struct Prefill {
    prompt: Prompt,
    items: Vec<PromptItem>,
    next: usize,
    /// Embeddings of the tile at `items[next]` and how many of its positions
    /// are decoded, once it is being decoded.
    tile: Option<(Arc<Vec<f32>>, usize)>,
    vision_ms: f64,
    prefill_ms: f64,
    cached_tiles: u32,
}

impl Prefill {
    fn new(prompt: Prompt, items: Vec<PromptItem>, skip: usize) -> Self {
        Self {
            prompt,
            items,
            next: skip,
            tile: None,
            vision_ms: 0.0,
            prefill_ms: 0.0,
            cached_tiles: 0,
        }
    }

    fn done(&self) -> bool {
        self.next >= self.items.len()
    }

    fn front(&self) -> Option<PromptItem> {
        self.items.get(self.next).copied()
    }

    /// The image and tile index at `items[i]`, if it is a tile.
    fn tile_at(&self, i: usize) -> Option<(&TiledImage, usize)> {
        match self.items.get(i)? {
            PromptItem::Tile { piece, tile } => Some((self.prompt.tiled_image(*piece)?, *tile)),
            PromptItem::Token(_) => None,
        }
    }

    /// The hash of the tile at `items[i]`, if it is a tile.
    fn tile_hash(&self, i: usize) -> Option<TileHash> {
        self.tile_at(i).map(|(tiled, tile)| tiled.hashes[tile])
    }

    /// Whether a tile is still to be taken for decoding.
    fn needs(&self, hash: &TileHash) -> bool {
        let from = self.next + usize::from(self.tile.is_some());
        (from..self.items.len()).any(|i| self.tile_hash(i).as_ref() == Some(hash))
    }
}

/// Whether a running request has yet to take this tile.
fn awaited(slots: &[Slot], hash: &TileHash) -> bool {
    slots
        .iter()
        .filter_map(|s| s.task.as_ref()?.prefill())
        .any(|p| p.needs(hash))
}

impl Task {
    /// What is left to decode of the current input, if anything.
    fn prefill(&self) -> Option<&Prefill> {
        match self {
            Task::Generate(g) => (!g.prefill.done()).then_some(&g.prefill),
            Task::Embed(e) => e.prefill.as_ref(),
        }
    }
}

/// A Generate request in a slot.
struct GenerateTask {
    request: GenerateRequest,
    prefill: Prefill,
    prompt_tokens: u32,
    image_tokens: u32,
    arrived: Instant,
    timings: Timings,
    cached_positions: usize,
    sampler: TokenSampler,
    stream: TextStream,
    completion: u32,
    /// Sampled and sent, not yet decoded into the KV cache.
    next_token: Option<i32>,
    decode_started: Option<Instant>,
    out: Outbox,
}

/// An Embed request in a slot: its inputs one after another.
struct EmbedTask {
    job: EmbedJob,
    /// Index of the input being decoded.
    input: usize,
    prefill: Option<Prefill>,
    sum: Vec<f64>,
    last: Vec<f32>,
    count: u32,
    done: Vec<Embedding>,
}

enum Task {
    Generate(Box<GenerateTask>),
    Embed(Box<EmbedTask>),
}

/// One sequence of the context and what it holds.
struct Slot {
    seq: i32,
    kv: KvContents,
    /// Positions of a tile decoded in part, beyond `kv`.
    partial: usize,
    /// Admission order of its task: prompts are read oldest first.
    stamp: u64,
    /// When the running task was admitted.
    admitted: Instant,
    task: Option<Task>,
}

impl Slot {
    fn pos(&self) -> i32 {
        (self.kv.positions() + self.partial) as i32
    }

    /// KV cells this slot may come to hold (an idle slot holds none: its
    /// cells went to the prefix cache).
    fn reserved(&self) -> usize {
        match &self.task {
            None => self.kv.positions(),
            Some(Task::Generate(g)) => (g.prompt_tokens + g.request.max_new_tokens) as usize,
            Some(Task::Embed(e)) => e
                .job
                .prompts
                .iter()
                .map(|p| p.prompt_tokens as usize)
                .max()
                .unwrap_or(0),
        }
    }
}

struct Worker {
    model: Arc<Model>,
    context: Context,
    encoder: TileEncoder,
    /// Tiles back from the encoder that a request has not taken yet.
    encoded: HashMap<TileHash, (EncodeResult, Duration)>,
    tokens_per_tile: usize,
    lifecycle: Arc<Lifecycle>,
    embeddings: EmbeddingCache,
    slots: Vec<Slot>,
    /// Streams whose sequence is over but whose client has not taken every event.
    outboxes: Vec<Outbox>,
    /// Taken from the channel, waiting for a slot or for KV room.
    waiting: Option<Command>,
    /// Finished sequences' cells, for prompts that start the same way.
    prefixes: PrefixCache,
    prefill_chunk: usize,
    clock: u64,
    threads: DecodeThreads,
}

/// CPU threads for decoding, fewer while the vision encoder runs beside it.
/// ggml's threads wait for each other at every graph node by spinning, so a
/// thread the OS parks for the other pool's stalls all of its pool: with both
/// pools at every core of a 2-core machine, running streams crawled while a
/// tile encoded (measured in `benches/README.md`).
struct DecodeThreads {
    alone: i32,
    beside_encoder: i32,
    now: i32,
}

impl DecodeThreads {
    fn new(settings: &EngineSettings) -> Self {
        let alone = settings.context.threads.max(1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as i32);
        // An encoder on the GPU leaves the cores to decoding.
        let encoder_on_cpu = !(settings.vision.use_gpu && llama::gpu_offload_supported());
        let beside_encoder = if encoder_on_cpu {
            (cores - settings.vision.threads).clamp(1, alone)
        } else {
            alone
        };
        DecodeThreads {
            alone,
            beside_encoder,
            now: alone,
        }
    }

    /// The count to switch to, when it changes.
    fn for_encoder_idle(&mut self, idle: bool) -> Option<i32> {
        let want = if idle {
            self.alone
        } else {
            self.beside_encoder
        };
        (want != self.now).then(|| {
            self.now = want;
            want
        })
    }
}

/// Why a request must stop now, if it must: checked before every step.
fn interruption(
    lifecycle: &Lifecycle,
    client_gone: bool,
    deadline: Option<Instant>,
    completed: u32,
) -> Result<(), EngineError> {
    if client_gone {
        Err(EngineError::ClientGone)
    } else if lifecycle.aborting() {
        Err(EngineError::ShuttingDown)
    } else if deadline.is_some_and(|d| Instant::now() >= d) {
        Err(EngineError::DeadlineExceeded { completed })
    } else {
        Ok(())
    }
}

fn token_text(model: &Model, id: i32) -> String {
    String::from_utf8_lossy(&model.token_bytes(id, true)).into_owned()
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl Worker {
    fn load<F>(
        settings: &EngineSettings,
        resolve: F,
        lifecycle: Arc<Lifecycle>,
    ) -> Result<(Self, Arc<Loaded>), EngineError>
    where
        F: FnOnce() -> Result<ModelPaths, EngineError>,
    {
        let paths = resolve()?;
        check_language_model(&paths.model)?;
        let (spec, projector) = read_tile_spec(&paths.mmproj)?;
        llama::init_backend()?;
        let started = Instant::now();
        let model = Arc::new(Model::load(&paths.model, &settings.model)?);
        let file_error = |message: &str| EngineError::ModelFile {
            path: paths.model.clone(),
            message: message.to_string(),
        };
        let template_source = model
            .chat_template()
            .ok_or_else(|| file_error("has no tokenizer.chat_template"))?;
        let special = |key: &str| {
            model
                .meta(key)
                .and_then(|id| id.parse::<i32>().ok())
                .filter(|&id| model.is_valid_token(id))
                .map(|id| token_text(&model, id))
                .unwrap_or_default()
        };
        let template = ChatTemplate::new(
            template_source.clone(),
            special("tokenizer.ggml.bos_token_id"),
            special("tokenizer.ggml.eos_token_id"),
        )?;
        for marker in ["<img>", "</img>"] {
            if model.tokenize(marker, false, true)?.len() != 1 {
                return Err(file_error(&format!(
                    "vocabulary has no {marker} token: not an InternVL model"
                )));
            }
        }
        let image_context_token = match model
            .tokenize(super::prompt::IMAGE_PLACEHOLDER, false, true)?
            .as_slice()
        {
            [id] => *id,
            _ => -1,
        };
        let vision_file = position_rows::prepare(&paths.mmproj, settings.cache_dir.as_deref())?;
        if let VisionFile::Corrected {
            derived, created, ..
        } = &vision_file
        {
            info!(
                mmproj = %paths.mmproj.display(),
                corrected = %derived.display(),
                written_now = created,
                "vision position rows corrected: llama.cpp adds row i to patch i, this file keeps the class token's row first (converter layout)"
            );
        }
        let encoder = TileEncoder::start(
            vision_file.path(),
            model.clone(),
            &settings.vision,
            spec.tile_size,
        )?;
        let context = Context::new(model.clone(), &settings.context)?;
        let name = model.meta("general.name").unwrap_or_else(|| {
            paths
                .model
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        });
        let parallel = context.n_seq_max();
        let info = ModelInfo {
            name,
            architecture: model.meta("general.architecture").unwrap_or_default(),
            context_size: context.n_ctx(),
            training_context_size: model.n_ctx_train().max(0) as u32,
            vocab_size: model.n_vocab() as u32,
            embedding_size: model.n_embd() as u32,
            tiles: spec,
            projector,
            quantization: model.description(),
            chat_template: template_source,
            offload: format!(
                "n_gpu_layers={} split_mode={} main_gpu={} tensor_split={:?} mmproj_offload={} gpu_offload_supported={}",
                settings.model.n_gpu_layers,
                settings.model.split_mode,
                settings.model.main_gpu,
                settings.model.tensor_split,
                settings.vision.use_gpu,
                llama::gpu_offload_supported(),
            ),
            parallel: parallel as u32,
        };
        info!(
            model = %paths.model.display(),
            mmproj = %paths.mmproj.display(),
            n_ctx = info.context_size,
            parallel,
            load_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        let loaded = Arc::new(Loaded {
            model: model.clone(),
            template,
            spec,
            limits: settings.decode_limits,
            info,
            image_context_token,
        });
        // Each step's batch carries one token per generating slot, the rest is
        // prompt text.
        let prefill_chunk = settings
            .prefill_chunk
            .clamp(1, context.n_batch().saturating_sub(parallel).max(1));
        let worker = Worker {
            model,
            slots: (0..parallel)
                .map(|seq| Slot {
                    seq: seq as i32,
                    kv: KvContents::default(),
                    partial: 0,
                    stamp: 0,
                    admitted: Instant::now(),
                    task: None,
                })
                .collect(),
            context,
            encoder,
            encoded: HashMap::new(),
            tokens_per_tile: spec.tokens_per_tile as usize,
            lifecycle,
            embeddings: EmbeddingCache::new(settings.image_cache_bytes),
            outboxes: Vec::new(),
            waiting: None,
            prefixes: PrefixCache::new(settings.prefix_cache_bytes),
            prefill_chunk,
            clock: 0,
            threads: DecodeThreads::new(settings),
        };
        Ok((worker, loaded))
    }

    fn busy(&self) -> bool {
        self.waiting.is_some()
            || !self.outboxes.is_empty()
            || self.slots.iter().any(|s| s.task.is_some())
    }

    /// The scheduler loop; returns once every handle is gone and no work is left.
    fn serve(&mut self, mut commands: mpsc::Receiver<Command>) {
        let mut open = true;
        loop {
            if !self.busy() {
                if !open {
                    return;
                }
                match commands.blocking_recv() {
                    Some(command) => self.waiting = Some(command),
                    None => return,
                }
            }
            // Admit in arrival order while slots and KV room last.
            loop {
                if self.waiting.is_none() && open {
                    match commands.try_recv() {
                        Ok(command) => self.waiting = Some(command),
                        Err(TryRecvError::Empty) => {}
                        Err(TryRecvError::Disconnected) => open = false,
                    }
                }
                let Some(command) = self.waiting.take() else {
                    break;
                };
                if let Err(command) = self.admit(command) {
                    self.waiting = Some(command);
                    break;
                }
            }
            // Before this step streams anything, so a client that has its
            // first token sees its sequence counted.
            self.publish_active();
            if !self.step() && self.busy() {
                std::thread::sleep(STALLED_POLL);
            }
        }
    }

    /// Puts a command into a free slot, or hands it back when there is no slot
    /// or no KV room yet.
    fn admit(&mut self, command: Command) -> Result<(), Command> {
        let (need, items, kv) = match &command {
            Command::Generate(job) => {
                let items = job.prompt.items();
                let kv = kv_items(&job.prompt, &items);
                (
                    (job.prompt.prompt_tokens + job.request.max_new_tokens) as usize,
                    items,
                    kv,
                )
            }
            Command::Embed(job) => (
                job.prompts
                    .iter()
                    .map(|p| p.prompt_tokens as usize)
                    .max()
                    .unwrap_or(0),
                Vec::new(),
                Vec::new(),
            ),
        };
        // Idle slots hold nothing (finished sequences move to the prefix
        // cache), so any free slot will do; room is what running ones reserve.
        let Some(index) = self.slots.iter().position(|s| s.task.is_none()) else {
            return Err(command);
        };
        let pool = self.context.n_ctx() as usize;
        let reserved: usize = self.slots.iter().map(Slot::reserved).sum();
        if reserved + need > pool {
            return Err(command);
        }
        self.clock += 1;
        self.slots[index].stamp = self.clock;
        self.slots[index].admitted = Instant::now();
        match command {
            Command::Generate(job) => self.start_generate(index, *job, items, &kv),
            Command::Embed(job) => {
                if let Err(e) =
                    interruption(&self.lifecycle, job.reply.is_closed(), job.deadline, 0)
                {
                    if job.reply.send(Err(e)).is_err() {
                        info!("embed client left while queued");
                    }
                    self.lifecycle.finished_one();
                    return Ok(());
                }
                let n_embd = self.model.n_embd() as usize;
                self.slots[index].task = Some(Task::Embed(Box::new(EmbedTask {
                    job,
                    input: 0,
                    prefill: None,
                    sum: vec![0.0; n_embd],
                    last: vec![0.0; n_embd],
                    count: 0,
                    done: Vec::new(),
                })));
            }
        }
        Ok(())
    }

    /// Starts a generation in slot `index`, resuming after the longest prefix
    /// the slot's KV cache already holds.
    fn start_generate(
        &mut self,
        index: usize,
        job: GenerateJob,
        items: Vec<PromptItem>,
        kv: &[KvItem],
    ) {
        let GenerateJob {
            prompt,
            request,
            arrived,
            enqueued,
            events,
        } = job;
        let mut out = Outbox {
            events,
            pending: VecDeque::new(),
        };
        if let Err(e) = interruption(&self.lifecycle, out.events.is_closed(), request.deadline, 0) {
            if !matches!(e, EngineError::ClientGone) {
                out.pending.push_back(Err(e));
            }
            self.retire(out);
            return;
        }
        let (reused, cached) = self.restore_prefix(index, kv);
        let mut sampler = TokenSampler::new(&request.sampling, self.model.n_vocab());
        sampler.accept_prompt(prompt.text_tokens());
        let task = GenerateTask {
            stream: TextStream::new(request.stop.clone()),
            prompt_tokens: prompt.prompt_tokens,
            image_tokens: prompt.image_tokens,
            prefill: Prefill::new(prompt, items, reused),
            request,
            arrived,
            timings: Timings {
                queue_ms: (Instant::now() - enqueued).as_secs_f64() * 1e3,
                ..Timings::default()
            },
            cached_positions: cached,
            sampler,
            completion: 0,
            next_token: None,
            decode_started: None,
            out,
        };
        self.slots[index].task = Some(Task::Generate(Box::new(task)));
    }

    /// Gives slot `index` the longest prefix of `kv` that a running sequence
    /// holds (shared cells) or the prefix cache saved (copied back, if the
    /// pool has room for all of it while it is trimmed); returns the items
    /// and positions reused.
    fn restore_prefix(&mut self, index: usize, kv: &[KvItem]) -> (usize, usize) {
        let running = self.longest_running_prefix(index, kv);
        let saved = self.prefixes.best(kv);
        let saved_items = saved.as_ref().map_or(0, |&(_, reused)| reused);
        if let Some((source, reused)) = running.filter(|&(_, reused)| reused > saved_items) {
            // Requests arriving together with the same system prompt or image
            // decode it once.
            let mut contents = KvContents::default();
            contents.set(kv[..reused].to_vec(), self.tokens_per_tile);
            let positions = contents.positions();
            let (from, to) = (self.slots[source].seq, self.slots[index].seq);
            if self.context.share_prefix(from, to, positions) {
                self.slots[index].kv = contents;
                return (reused, positions);
            }
        }
        let Some((entry, reused)) = saved else {
            return (0, 0);
        };
        let per_tile = self.tokens_per_tile;
        let held: usize = self.slots.iter().map(|s| s.kv.positions()).sum();
        let mut contents = KvContents::default();
        contents.set(entry.items.clone(), per_tile);
        if held + contents.positions() > self.context.n_ctx() as usize {
            return (0, 0);
        }
        let seq = self.slots[index].seq;
        let restored = self.context.restore_seq(seq, &entry.state);
        let cached = contents.truncate(reused, per_tile);
        if restored.is_err() || !self.context.remove_from(seq, cached) {
            warn!("could not restore a cached prefix; decoding the prompt whole");
            self.forget(index);
            return (0, 0);
        }
        self.slots[index].kv = contents;
        (reused, cached)
    }

    /// The running generation (other than slot `index`) that holds the
    /// longest prefix of `kv`, and how many items of it.
    fn longest_running_prefix(&self, index: usize, kv: &[KvItem]) -> Option<(usize, usize)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, s)| *i != index && matches!(s.task, Some(Task::Generate(_))))
            .map(|(i, s)| (i, reusable(s.kv.items(), kv)))
            .filter(|&(_, reused)| reused > 0)
            .max_by_key(|&(_, reused)| reused)
    }

    /// Tells handles how many slots run a request.
    fn publish_active(&self) {
        self.lifecycle
            .set_active(self.slots.iter().filter(|s| s.task.is_some()).count());
    }

    /// Empties a slot's KV cache.
    fn forget(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        slot.kv.clear();
        slot.partial = 0;
        if !self.context.remove_from(slot.seq, 0) {
            warn!(
                seq = slot.seq,
                "could not clear a sequence; clearing the whole cache"
            );
            self.context.clear();
            for s in &mut self.slots {
                s.kv.clear();
                s.partial = 0;
            }
        }
    }

    /// Keeps an ended stream's undelivered events until its client takes them;
    /// the request counts as in flight until then.
    fn retire(&mut self, mut out: Outbox) {
        if out.flush().is_ok() && !out.is_empty() {
            self.outboxes.push(out);
        } else {
            self.lifecycle.finished_one();
        }
    }

    /// One scheduler step; false when nothing could move.
    fn step(&mut self) -> bool {
        let mut progress = false;
        let lifecycle = self.lifecycle.clone();
        self.outboxes.retain_mut(|out| {
            let before = out.pending.len();
            let keep = out.flush().is_ok() && !out.is_empty();
            progress |= !keep || out.pending.len() != before;
            if !keep {
                lifecycle.finished_one();
            }
            keep
        });
        progress |= self.collect_encoded();
        self.feed_encoder();
        if let Some(threads) = self.threads.for_encoder_idle(self.encoder.is_idle()) {
            self.context.set_threads(threads);
        }
        for index in 0..self.slots.len() {
            if let Err(e) = self.check(index) {
                self.end(index, Err(e));
                progress = true;
            }
        }
        progress |= self.decode_tokens();
        progress |= self.decode_image_chunk();
        progress |= self.decode_embed_chunk();
        progress
    }

    /// Cancellation, drain and deadline checks; also delivers held events.
    fn check(&mut self, index: usize) -> Result<(), EngineError> {
        match &mut self.slots[index].task {
            None => Ok(()),
            Some(Task::Generate(g)) => {
                g.out.flush()?;
                interruption(&self.lifecycle, false, g.request.deadline, g.completion)
            }
            Some(Task::Embed(e)) => {
                interruption(&self.lifecycle, e.job.reply.is_closed(), e.job.deadline, 0)
            }
        }
    }

    /// Decodes the next token of every generating slot whose client keeps up,
    /// plus as much waiting prompt text as the step allows, in one batch.
    fn decode_tokens(&mut self) -> bool {
        let mut batch = Vec::new();
        let mut members: Vec<usize> = Vec::new();
        // Generating slots first: one token each.
        for (index, slot) in self.slots.iter().enumerate() {
            if let Some(Task::Generate(g)) = &slot.task {
                if let (Some(token), true) = (g.next_token, g.out.is_empty()) {
                    batch.push(BatchToken {
                        token,
                        pos: slot.pos(),
                        seq: slot.seq,
                        output: true,
                    });
                    members.push(index);
                }
            }
        }
        // Then prompt text, oldest request first.
        let mut budget = self.prefill_chunk;
        let mut order: Vec<usize> = (0..self.slots.len()).collect();
        order.sort_by_key(|&i| self.slots[i].stamp);
        for index in order {
            if budget == 0 {
                break;
            }
            let slot = &self.slots[index];
            let Some(Task::Generate(g)) = &slot.task else {
                continue;
            };
            let p = &g.prefill;
            let mut pos = slot.pos();
            let mut taken = false;
            let mut next = p.next;
            while budget > 0 {
                let Some(&PromptItem::Token(token)) = p.items.get(next) else {
                    break;
                };
                next += 1;
                batch.push(BatchToken {
                    token,
                    pos,
                    seq: slot.seq,
                    output: next == p.items.len(),
                });
                pos += 1;
                budget -= 1;
                taken = true;
            }
            if taken {
                members.push(index);
            }
        }
        if batch.is_empty() {
            return false;
        }
        let started = Instant::now();
        let result = self.context.decode_batch(&batch);
        let elapsed = ms(started);
        if let Err(e) = result {
            warn!("batch decode failed: {e}");
            let message = match e {
                EngineError::Inference(message) => message,
                other => other.to_string(),
            };
            for index in members {
                self.end(index, Err(EngineError::Inference(message.clone())));
            }
            return true;
        }
        // Record what each member's positions now hold, then sample outputs.
        let mut cursor = 0;
        for &index in &members {
            let slot = &mut self.slots[index];
            let Some(Task::Generate(g)) = &mut slot.task else {
                continue;
            };
            let seq = slot.seq;
            let generating = g.prefill.done();
            if generating {
                g.next_token = None;
            } else {
                g.prefill.prefill_ms += elapsed;
            }
            let mut outputs = Vec::new();
            while cursor < batch.len() && batch[cursor].seq == seq {
                let entry = batch[cursor];
                if !generating {
                    g.prefill.next += 1;
                }
                slot.kv
                    .push(KvItem::Token(entry.token), self.tokens_per_tile);
                if entry.output {
                    outputs.push(cursor);
                }
                cursor += 1;
            }
            for i in outputs {
                self.sample(index, i as i32);
            }
        }
        true
    }

    /// Takes the tile the encoder finished, if any: into the image cache, and
    /// held for the requests that wait on it.
    fn collect_encoded(&mut self) -> bool {
        let Some(Encoded { hash, result, took }) = self.encoder.finished() else {
            return false;
        };
        if let Ok(embd) = &result {
            self.embeddings.insert(hash, embd.clone());
            tracing::debug!(bytes = self.embeddings.bytes(), "image cache");
        }
        if awaited(&self.slots, &hash) {
            self.encoded.insert(hash, (result, took));
        }
        true
    }

    /// Whether a tile's embeddings are at hand (cached, or back from the encoder).
    fn tile_available(&self, hash: &TileHash) -> bool {
        self.encoded.contains_key(hash) || self.embeddings.contains(hash)
    }

    /// Whether the front of this prefill is a tile that cannot be decoded yet.
    fn front_tile_pending(&self, p: &Prefill) -> bool {
        p.tile.is_none()
            && p.tile_hash(p.next)
                .is_some_and(|hash| !self.tile_available(&hash))
    }

    /// Hands the encoder the tile the oldest waiting request needs now, when
    /// it is idle. Never tiles further ahead: on a CPU, encoding one tile
    /// while the engine decodes the last one's embeddings oversubscribes the
    /// cores, and a 13-tile image took 1.20 × as long as encoding and decoding
    /// in turn (measured). Other requests' streams still decode meanwhile.
    fn feed_encoder(&mut self) {
        if !self.encoder.is_idle() {
            return;
        }
        let job = self
            .slots
            .iter()
            .filter_map(|s| Some((s.stamp, s.task.as_ref()?.prefill()?)))
            .filter(|(_, p)| self.front_tile_pending(p))
            .min_by_key(|(stamp, _)| *stamp)
            .and_then(|(_, p)| p.tile_at(p.next))
            .map(|(tiled, tile)| (tiled.hashes[tile], tiled.tiles[tile].as_raw().clone()));
        if let Some((hash, rgb)) = job {
            self.encoder.submit(hash, rgb);
        }
    }

    /// Decodes one chunk of embeddings of the tile the oldest prefilling
    /// request waits on, among those whose tile is encoded.
    fn decode_image_chunk(&mut self) -> bool {
        let Some(index) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| match &s.task {
                Some(Task::Generate(g)) => {
                    matches!(g.prefill.front(), Some(PromptItem::Tile { .. }))
                        && !self.front_tile_pending(&g.prefill)
                }
                _ => false,
            })
            .min_by_key(|(_, s)| s.stamp)
            .map(|(i, _)| i)
        else {
            return false;
        };
        match self.decode_prefill_tile(index, Outputs::Last) {
            Ok(Some((n, Outputs::Last))) => self.sample(index, n as i32 - 1),
            Ok(_) => {}
            Err(e) => self.end(index, Err(e)),
        }
        true
    }

    /// Decodes the next chunk of the tile at the front of slot `index`'s
    /// prefill: how many positions, and which of them produced outputs
    /// (`Last` only when this chunk ends the prompt).
    fn decode_prefill_tile(
        &mut self,
        index: usize,
        outputs: Outputs,
    ) -> Result<Option<(usize, Outputs)>, EngineError> {
        let n_embd = self.model.n_embd_inp() as usize;
        let chunk = match outputs {
            Outputs::All => EMBED_CHUNK.min(self.prefill_chunk),
            _ => self.prefill_chunk,
        };
        let slot = &mut self.slots[index];
        let prefill = match &mut slot.task {
            Some(Task::Generate(g)) => &mut g.prefill,
            Some(Task::Embed(e)) => match e.prefill.as_mut() {
                Some(p) => p,
                None => return Ok(None),
            },
            None => return Ok(None),
        };
        let Some(PromptItem::Tile { piece, tile }) = prefill.front() else {
            return Ok(None);
        };
        let tiled = prefill
            .prompt
            .tiled_image(piece)
            .ok_or_else(|| EngineError::Inference("prompt item is not an image".into()))?;
        let hash = tiled.hashes[tile];
        if prefill.tile.is_none() {
            // Encoded for a request that waited on it: its cost is this one's.
            let embd = if let Some((result, took)) = self.encoded.remove(&hash) {
                prefill.vision_ms += took.as_secs_f64() * 1e3;
                result.map_err(EngineError::Inference)?
            } else if let Some(embd) = self.embeddings.get(&hash) {
                prefill.cached_tiles += 1;
                embd
            } else {
                // Not encoded yet: the encoder is on it (see `feed_encoder`).
                return Ok(None);
            };
            prefill.tile = Some((embd, 0));
        }
        let Some((embd, done)) = prefill.tile.as_mut() else {
            return Ok(None);
        };
        let total = embd.len() / n_embd;
        let n = (total - *done).min(chunk);
        let part = &embd[*done * n_embd..(*done + n) * n_embd];
        let last_of_prompt = *done + n == total && prefill.next + 1 == prefill.items.len();
        let want = match outputs {
            Outputs::All => Outputs::All,
            _ if last_of_prompt => Outputs::Last,
            _ => Outputs::None,
        };
        let t = Instant::now();
        let pos = (slot.kv.positions() + slot.partial) as i32;
        self.context.decode_embeddings(part, pos, slot.seq, want)?;
        prefill.prefill_ms += ms(t);
        *done += n;
        slot.partial += n;
        if *done == total {
            prefill.tile = None;
            prefill.next += 1;
            slot.partial = 0;
            slot.kv.push(KvItem::Tile(hash), self.tokens_per_tile);
        }
        Ok(Some((n, want)))
    }

    /// Samples the token at batch output `output` for generating slot `index`,
    /// streams it, and ends the request when it is over.
    fn sample(&mut self, index: usize, output: i32) {
        let outcome = {
            let pos = self.slots[index].kv.positions() as u32;
            let Some(Task::Generate(g)) = &mut self.slots[index].task else {
                return;
            };
            match self.context.logits(output) {
                Err(e) => Some(Err(e)),
                Ok(logits) => next_token(&self.model, g, logits, pos, self.context.n_ctx()),
            }
        };
        if let Some(outcome) = outcome {
            self.end(index, outcome);
        }
    }

    /// Ends slot `index`'s request with `outcome`: the stream gets its `Done`
    /// or error, and the slot's cells move to the prefix cache.
    fn end(&mut self, index: usize, outcome: Result<FinishReason, EngineError>) {
        let slot = &mut self.slots[index];
        let Some(task) = slot.task.take() else {
            return;
        };
        self.lifecycle.record_service_time(slot.admitted.elapsed());
        // A tile decoded in part is not a reusable prefix.
        if slot.partial > 0 {
            let keep = slot.kv.positions();
            slot.partial = 0;
            if !self.context.remove_from(slot.seq, keep) {
                self.forget(index);
            }
        }
        self.publish_active();
        // A tile encoded for this request alone is not needed any more.
        if !self.encoded.is_empty() {
            let slots = &self.slots;
            self.encoded.retain(|hash, _| awaited(slots, hash));
        }
        // A failed decode leaves the sequence in an unknown state; anything
        // else is a prefix worth keeping, out of the pool.
        let keep =
            matches!(task, Task::Generate(_)) && !matches!(outcome, Err(EngineError::Inference(_)));
        self.save_prefix(index, keep);
        match task {
            Task::Generate(g) => self.end_generate(*g, outcome),
            Task::Embed(e) => {
                let result = match outcome {
                    Ok(_) => Ok(e.done),
                    Err(err) => Err(err),
                };
                if e.job.reply.send(result).is_err() {
                    info!("embed client left before the reply");
                }
                self.lifecycle.finished_one();
            }
        }
    }

    /// Moves slot `index`'s cells to the prefix cache (when `keep`) and
    /// empties the slot.
    fn save_prefix(&mut self, index: usize, keep: bool) {
        let slot = &self.slots[index];
        if keep && !slot.kv.is_empty() && self.prefixes.enabled() {
            match self.context.save_seq(slot.seq) {
                Ok(state) => {
                    let items = slot.kv.items().to_vec();
                    self.prefixes.insert(items, state);
                    tracing::debug!(
                        bytes = self.prefixes.bytes(),
                        sequences = self.prefixes.sequences(),
                        "prefix cache"
                    );
                }
                Err(e) => warn!("could not save a finished sequence: {e}"),
            }
        }
        self.forget(index);
    }

    fn end_generate(&mut self, mut g: GenerateTask, outcome: Result<FinishReason, EngineError>) {
        let span = info_span!("generate", request_id = %g.request.request_id);
        let _enter = span.enter();
        match outcome {
            Ok(finish) => {
                g.timings.vision_ms = g.prefill.vision_ms;
                g.timings.prefill_ms = g.prefill.prefill_ms;
                g.timings.decode_ms = g.decode_started.map_or(0.0, ms);
                if finish != FinishReason::StopSequence {
                    let tail = g.stream.finish();
                    if !tail.text.is_empty() {
                        g.out.pending.push_back(Ok(GenerateEvent::Delta {
                            text: tail.text,
                            tokens: Vec::new(),
                        }));
                    }
                }
                let usage = Usage {
                    prompt_tokens: g.prompt_tokens,
                    image_tokens: g.image_tokens,
                    completion_tokens: g.completion,
                    cached_tokens: g.cached_positions as u32,
                    cached_image_tiles: g.prefill.cached_tiles,
                };
                info!(?finish, ?usage, timings = ?g.timings, "generation finished");
                g.out.pending.push_back(Ok(GenerateEvent::Done {
                    finish_reason: finish,
                    usage,
                    timings: g.timings,
                }));
            }
            Err(EngineError::ClientGone) => {
                info!("client left; generation cancelled");
                g.out.pending.clear();
            }
            Err(e) => {
                warn!("generation ended: {e}");
                g.out.pending.push_back(Err(e));
            }
        }
        self.retire(g.out);
    }

    /// Decodes one chunk of the Embed request that arrived first, unless it
    /// waits on the encoder.
    fn decode_embed_chunk(&mut self) -> bool {
        let Some(index) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.task, Some(Task::Embed(_))))
            .min_by_key(|(_, s)| s.stamp)
            .map(|(i, _)| i)
        else {
            return false;
        };
        if let Some(Task::Embed(e)) = &self.slots[index].task {
            if e.prefill
                .as_ref()
                .is_some_and(|p| self.front_tile_pending(p))
            {
                return false;
            }
        }
        self.context.set_embeddings(true);
        let result = self.embed_chunk(index);
        self.context.set_embeddings(false);
        match result {
            Ok(true) => self.end(index, Ok(FinishReason::Stop)),
            Ok(false) => {}
            Err(e) => self.end(index, Err(e)),
        }
        true
    }

    /// Advances an Embed request by one chunk; true when every input is done.
    fn embed_chunk(&mut self, index: usize) -> Result<bool, EngineError> {
        let Some(Task::Embed(e)) = &mut self.slots[index].task else {
            return Ok(true);
        };
        if e.prefill.is_none() {
            let Some(prompt) = e.job.prompts.get(e.input) else {
                return Ok(true);
            };
            e.prefill = Some(Prefill::new(prompt.clone(), prompt.items(), 0));
            e.sum.iter_mut().for_each(|s| *s = 0.0);
            e.count = 0;
            // Each input starts from an empty sequence.
            self.forget(index);
        }
        let front = match &self.slots[index].task {
            Some(Task::Embed(e)) => e.prefill.as_ref().and_then(Prefill::front),
            _ => None,
        };
        let outputs = match front {
            Some(PromptItem::Tile { .. }) => self
                .decode_prefill_tile(index, Outputs::All)?
                .map_or(0, |(n, _)| n),
            Some(PromptItem::Token(_)) => {
                let slot = &mut self.slots[index];
                let Some(Task::Embed(e)) = &mut slot.task else {
                    return Ok(true);
                };
                let p = e.prefill.as_mut().expect("set above");
                let tokens: Vec<i32> = p.items[p.next..]
                    .iter()
                    .map_while(|item| match item {
                        PromptItem::Token(t) => Some(*t),
                        PromptItem::Tile { .. } => None,
                    })
                    .take(EMBED_CHUNK)
                    .collect();
                let pos = slot.kv.positions() as i32;
                self.context
                    .decode_tokens(&tokens, pos, slot.seq, Outputs::All)?;
                p.next += tokens.len();
                for &t in &tokens {
                    slot.kv.push(KvItem::Token(t), self.tokens_per_tile);
                }
                tokens.len()
            }
            None => 0,
        };
        let slot = &mut self.slots[index];
        let Some(Task::Embed(e)) = &mut slot.task else {
            return Ok(true);
        };
        for i in 0..outputs {
            let v = self.context.embeddings(i as i32)?;
            for (s, &x) in e.sum.iter_mut().zip(v) {
                *s += f64::from(x);
            }
            e.last.copy_from_slice(v);
            e.count += 1;
        }
        if e.prefill.as_ref().is_some_and(Prefill::done) {
            let prompt_tokens = e.job.prompts[e.input].prompt_tokens;
            e.prefill = None;
            e.done.push(pool(e, prompt_tokens)?);
            e.input += 1;
        }
        Ok(e.input >= e.job.prompts.len())
    }
}

/// Samples the next token from `logits` and streams it. `Some` ends the
/// request (finished, or the client left).
fn next_token(
    model: &Model,
    g: &mut GenerateTask,
    logits: &[f32],
    pos: u32,
    n_ctx: u32,
) -> Option<Result<FinishReason, EngineError>> {
    let token = g.sampler.sample(logits);
    // A softmax over the whole vocabulary per token is the largest per-token
    // cost of the service (0.3 ms at 151k tokens); only pay it when asked.
    let top_n = g.request.top_logprobs as usize;
    let (logprob, top) = if g.request.logprobs || top_n > 0 {
        logprobs(logits, token, top_n)
    } else {
        (0.0, Vec::new())
    };
    g.completion += 1;
    if g.completion == 1 {
        g.decode_started = Some(Instant::now());
    }
    if !g.request.ignore_eos && model.is_eog(token) {
        return Some(Ok(FinishReason::Stop));
    }
    let piece = model.token_bytes(token, false);
    let released = g.stream.push(&piece);
    let generated = GeneratedToken {
        id: token,
        text: String::from_utf8_lossy(&piece).into_owned(),
        logprob,
        top: top
            .into_iter()
            .map(|(id, logprob)| TopToken {
                id,
                text: String::from_utf8_lossy(&model.token_bytes(id, false)).into_owned(),
                logprob,
            })
            .collect(),
    };
    let delta = GenerateEvent::Delta {
        text: released.text,
        tokens: vec![generated],
    };
    if let Err(e) = g.out.send(Ok(delta)) {
        return Some(Err(e));
    }
    if g.completion == 1 {
        g.timings.ttft_ms = ms(g.arrived);
    }
    if released.stopped {
        return Some(Ok(FinishReason::StopSequence));
    }
    if g.completion >= g.request.max_new_tokens || pos >= n_ctx {
        return Some(Ok(FinishReason::Length));
    }
    g.next_token = Some(token);
    None
}

/// The pooled (and maybe normalized) vector of a finished Embed input.
fn pool(e: &EmbedTask, prompt_tokens: u32) -> Result<Embedding, EngineError> {
    if e.count != prompt_tokens {
        return Err(EngineError::Inference(format!(
            "pooled {} positions of a {prompt_tokens}-position input",
            e.count
        )));
    }
    let mut values: Vec<f32> = match e.job.pooling {
        Pooling::Mean => e
            .sum
            .iter()
            .map(|s| (s / f64::from(e.count)) as f32)
            .collect(),
        Pooling::Last => e.last.clone(),
    };
    if e.job.normalize {
        let norm = values
            .iter()
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            values
                .iter_mut()
                .for_each(|v| *v = (f64::from(*v) / norm) as f32);
        }
    }
    Ok(Embedding {
        values,
        tokens: e.count,
    })
}

#[cfg(test)]
mod tests {
    use super::DecodeThreads;

    #[test]
    fn decode_threads_change_only_when_the_encoder_starts_or_stops() {
        let mut threads = DecodeThreads {
            alone: 2,
            beside_encoder: 1,
            now: 2,
        };
        assert_eq!(threads.for_encoder_idle(true), None);
        assert_eq!(threads.for_encoder_idle(false), Some(1));
        assert_eq!(threads.for_encoder_idle(false), None);
        assert_eq!(threads.for_encoder_idle(true), Some(2));
    }
}
