//! The engine thread: loads the model, then runs one command at a time.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tracing::{info, info_span, warn};

use super::cache::{prompt_items, EmbeddingCache, KvContents, KvItem};
use super::gguf_meta::{check_header, read_tile_spec};
use super::llama::{self, Context, Model, Outputs, Vision};
use super::prompt::{ChatTemplate, Piece, Prompt};
use super::sampling::{logprobs, TextStream, TokenSampler};
use super::{
    Command, EmbedJob, Embedding, EngineError, EngineSettings, EngineState, FinishReason,
    GenerateEvent, GenerateJob, GeneratedToken, Lifecycle, Loaded, ModelInfo, ModelPaths, Pooling,
    Timings, TopToken, Usage,
};

/// Positions decoded per call when every position produces an output: llama.cpp
/// reserves logits for each output (n_vocab floats), so large chunks would cost
/// gigabytes with a real vocabulary.
const EMBED_CHUNK: usize = 256;

/// Stream events carry either an event or the error that ended the stream.
pub(crate) type EventResult = Result<GenerateEvent, EngineError>;

pub(super) fn run<F>(
    settings: EngineSettings,
    resolve: F,
    mut commands: mpsc::Receiver<Command>,
    state: watch::Sender<EngineState>,
    lifecycle: Arc<Lifecycle>,
) where
    F: FnOnce() -> Result<ModelPaths, EngineError>,
{
    let mut worker = match Worker::load(&settings, resolve, lifecycle.clone()) {
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
    while let Some(command) = commands.blocking_recv() {
        match command {
            Command::Generate(job) => worker.generate(*job),
            Command::Embed(job) => worker.embed(job),
        }
        lifecycle.finished_one();
    }
    state.send_replace(EngineState::Stopped);
}

struct Worker {
    model: Arc<Model>,
    context: Context,
    vision: Vision,
    tile_size: u32,
    tokens_per_tile: usize,
    lifecycle: Arc<Lifecycle>,
    embeddings: EmbeddingCache,
    kv: KvContents,
}

/// What a prefill did.
#[derive(Default)]
struct PrefillStats {
    vision_ms: f64,
    prefill_ms: f64,
    cached_tiles: u32,
}

/// Why a request must stop now, if it must: checked before every decode step.
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
        check_header(&paths.model)?;
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
        let vision = Vision::load(&paths.mmproj, model.clone(), &settings.vision)?;
        let context = Context::new(model.clone(), &settings.context)?;
        let name = model.meta("general.name").unwrap_or_else(|| {
            paths
                .model
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        });
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
        };
        info!(
            model = %paths.model.display(),
            mmproj = %paths.mmproj.display(),
            n_ctx = info.context_size,
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
        let worker = Worker {
            model,
            context,
            vision,
            tile_size: spec.tile_size,
            tokens_per_tile: spec.tokens_per_tile as usize,
            lifecycle,
            embeddings: EmbeddingCache::new(settings.image_cache_bytes),
            kv: KvContents::default(),
        };
        Ok((worker, loaded))
    }

    /// Decodes the prompt after its first `skip` items (already in the KV
    /// cache), calling `on_outputs(context, n)` after each decode with
    /// `Outputs::All`. Stops with the error `interrupted()` returns before any
    /// tile or chunk. Every decoded item is recorded in `self.kv`.
    fn prefill(
        &mut self,
        prompt: &Prompt,
        skip: usize,
        outputs: Outputs,
        chunk: usize,
        interrupted: &dyn Fn() -> Result<(), EngineError>,
        on_outputs: &mut dyn FnMut(&Context, usize) -> Result<(), EngineError>,
    ) -> Result<PrefillStats, EngineError> {
        let mut stats = PrefillStats::default();
        let mut skip = skip;
        let mut pos = self.kv.positions() as i32;
        let n_pieces = prompt.pieces.len();
        let n_embd = self.model.n_embd_inp() as usize;
        for (i, piece) in prompt.pieces.iter().enumerate() {
            let last_piece = i + 1 == n_pieces;
            match piece {
                Piece::Tokens(tokens) => {
                    let rest = &tokens[skip.min(tokens.len())..];
                    skip -= tokens.len() - rest.len();
                    let n_chunks = rest.len().div_ceil(chunk);
                    for (c, part) in rest.chunks(chunk).enumerate() {
                        interrupted()?;
                        let want = match outputs {
                            Outputs::All => Outputs::All,
                            _ if last_piece && c + 1 == n_chunks => Outputs::Last,
                            _ => Outputs::None,
                        };
                        let t = Instant::now();
                        self.context.decode_tokens(part, pos, want)?;
                        stats.prefill_ms += ms(t);
                        pos += part.len() as i32;
                        for &token in part {
                            self.kv.push(KvItem::Token(token), self.tokens_per_tile);
                        }
                        if want == Outputs::All {
                            on_outputs(&self.context, part.len())?;
                        }
                    }
                }
                Piece::Image(tiled) => {
                    let first = skip.min(tiled.tiles.len());
                    skip -= first;
                    for (tile, hash) in tiled.tiles.iter().zip(&tiled.hashes).skip(first) {
                        interrupted()?;
                        let embd = match self.embeddings.get(hash) {
                            Some(embd) => {
                                stats.cached_tiles += 1;
                                embd
                            }
                            None => {
                                let t = Instant::now();
                                let embd = Arc::new(
                                    self.vision.encode_tile(tile.as_raw(), self.tile_size)?,
                                );
                                stats.vision_ms += ms(t);
                                self.embeddings.insert(*hash, embd.clone());
                                tracing::debug!(bytes = self.embeddings.bytes(), "image cache");
                                embd
                            }
                        };
                        let t = Instant::now();
                        for part in embd.chunks(chunk * n_embd) {
                            let n = part.len() / n_embd;
                            self.context.decode_embeddings(part, pos, outputs)?;
                            pos += n as i32;
                            if outputs == Outputs::All {
                                on_outputs(&self.context, n)?;
                            }
                        }
                        self.kv.push(KvItem::Tile(*hash), self.tokens_per_tile);
                        stats.prefill_ms += ms(t);
                    }
                }
            }
        }
        Ok(stats)
    }

    /// Forgets the KV cache and what it held.
    fn reset_kv(&mut self) {
        self.context.clear();
        self.kv.clear();
    }

    fn generate(&mut self, job: GenerateJob) {
        let span = info_span!("generate", request_id = %job.request.request_id);
        let _enter = span.enter();
        let events = job.events.clone();
        match self.try_generate(job) {
            Ok(done) => info!(?done, "generation finished"),
            // The KV cache is consistent with `self.kv` up to the last decode.
            Err(EngineError::ClientGone) => info!("client left; generation cancelled"),
            Err(e) => {
                // A failed or cut decode leaves the cache in an unknown state.
                self.reset_kv();
                warn!("generation ended: {e}");
                if events.blocking_send(Err(e)).is_err() {
                    info!("client left before the error could be sent");
                }
            }
        }
    }

    /// Runs one generation; [`EngineError::ClientGone`] when the client went away.
    fn try_generate(
        &mut self,
        job: GenerateJob,
    ) -> Result<(FinishReason, Usage, Timings), EngineError> {
        let GenerateJob {
            prompt,
            request,
            arrived,
            enqueued,
            events,
        } = job;
        let started = Instant::now();
        let mut timings = Timings {
            queue_ms: (started - enqueued).as_secs_f64() * 1e3,
            ..Timings::default()
        };
        // Resume after the longest prefix the KV cache already holds.
        let items = prompt_items(&prompt);
        let mut reused = self.kv.reusable(&items);
        let mut cached_positions = self.kv.truncate(reused, self.tokens_per_tile);
        if !self.context.remove_from(cached_positions) {
            self.reset_kv();
            reused = 0;
            cached_positions = 0;
        }
        let lifecycle = self.lifecycle.clone();
        let deadline = request.deadline;
        let interrupted =
            |completed| interruption(&lifecycle, events.is_closed(), deadline, completed);
        let n_batch = self.context.n_batch();
        let stats = self.prefill(
            &prompt,
            reused,
            Outputs::Last,
            n_batch,
            &|| interrupted(0),
            &mut |_, _| Ok(()),
        )?;
        timings.vision_ms = stats.vision_ms;
        timings.prefill_ms = stats.prefill_ms;

        let mut sampler = TokenSampler::new(&request.sampling, self.model.n_vocab());
        sampler.accept_prompt(prompt.text_tokens());
        let mut stream = TextStream::new(request.stop.clone());
        let n_ctx = self.context.n_ctx() as i32;
        let mut pos = prompt.prompt_tokens as i32;
        let mut completion = 0u32;
        let decode_started = Instant::now();
        let top_n = request.top_logprobs as usize;
        let want_logprobs = request.logprobs || top_n > 0;
        let finish = loop {
            let logits = self.context.logits(-1)?;
            let token = sampler.sample(logits);
            // A softmax over the whole vocabulary per token is the largest
            // per-token cost of the service (0.3 ms at 151k tokens); only pay it
            // when the client asked.
            let (logprob, top) = if want_logprobs {
                logprobs(logits, token, top_n)
            } else {
                (0.0, Vec::new())
            };
            completion += 1;
            if !request.ignore_eos && self.model.is_eog(token) {
                break FinishReason::Stop;
            }
            let piece = self.model.token_bytes(token, false);
            let released = stream.push(&piece);
            let generated = GeneratedToken {
                id: token,
                text: String::from_utf8_lossy(&piece).into_owned(),
                logprob,
                top: top
                    .into_iter()
                    .map(|(id, logprob)| TopToken {
                        id,
                        text: String::from_utf8_lossy(&self.model.token_bytes(id, false))
                            .into_owned(),
                        logprob,
                    })
                    .collect(),
            };
            let delta = GenerateEvent::Delta {
                text: released.text,
                tokens: vec![generated],
            };
            if events.blocking_send(Ok(delta)).is_err() {
                return Err(EngineError::ClientGone);
            }
            if completion == 1 {
                timings.ttft_ms = arrived.elapsed().as_secs_f64() * 1e3;
            }
            if released.stopped {
                break FinishReason::StopSequence;
            }
            if completion >= request.max_new_tokens || pos >= n_ctx {
                break FinishReason::Length;
            }
            interrupted(completion)?;
            self.context.decode_tokens(&[token], pos, Outputs::Last)?;
            self.kv.push(KvItem::Token(token), self.tokens_per_tile);
            pos += 1;
        };
        timings.decode_ms = ms(decode_started);
        if finish != FinishReason::StopSequence {
            let tail = stream.finish();
            if !tail.text.is_empty()
                && events
                    .blocking_send(Ok(GenerateEvent::Delta {
                        text: tail.text,
                        tokens: Vec::new(),
                    }))
                    .is_err()
            {
                return Err(EngineError::ClientGone);
            }
        }
        let usage = Usage {
            prompt_tokens: prompt.prompt_tokens,
            image_tokens: prompt.image_tokens,
            completion_tokens: completion,
            cached_tokens: cached_positions as u32,
            cached_image_tiles: stats.cached_tiles,
        };
        let done = GenerateEvent::Done {
            finish_reason: finish,
            usage,
            timings,
        };
        if events.blocking_send(Ok(done)).is_err() {
            return Err(EngineError::ClientGone);
        }
        Ok((finish, usage, timings))
    }

    fn embed(&mut self, job: EmbedJob) {
        let lifecycle = self.lifecycle.clone();
        let interrupted = || interruption(&lifecycle, job.reply.is_closed(), job.deadline, 0);
        // Each input starts from an empty cache (`embed_one`); the generation
        // prefix is gone after this, so forget it once at the end.
        self.context.set_embeddings(true);
        let outcome: Result<Vec<Embedding>, EngineError> = job
            .prompts
            .iter()
            .map(|prompt| self.embed_one(prompt, job.pooling, job.normalize, &interrupted))
            .collect();
        self.context.set_embeddings(false);
        self.reset_kv();
        if job.reply.send(outcome).is_err() {
            info!("embed client left before the reply");
        }
    }

    fn embed_one(
        &mut self,
        prompt: &Prompt,
        pooling: Pooling,
        normalize: bool,
        interrupted: &dyn Fn() -> Result<(), EngineError>,
    ) -> Result<Embedding, EngineError> {
        let n_embd = self.model.n_embd() as usize;
        let mut sum = vec![0f64; n_embd];
        let mut last = vec![0f32; n_embd];
        let mut count = 0u32;
        self.reset_kv();
        self.prefill(
            prompt,
            0,
            Outputs::All,
            EMBED_CHUNK,
            interrupted,
            &mut |ctx, n| {
                for i in 0..n {
                    let e = ctx.embeddings(i as i32)?;
                    for (s, &v) in sum.iter_mut().zip(e) {
                        *s += f64::from(v);
                    }
                    last.copy_from_slice(e);
                    count += 1;
                }
                Ok(())
            },
        )?;

        if count != prompt.prompt_tokens {
            return Err(EngineError::Inference(format!(
                "pooled {count} positions of a {}-position input",
                prompt.prompt_tokens
            )));
        }
        let mut values: Vec<f32> = match pooling {
            Pooling::Mean => sum.iter().map(|s| (s / f64::from(count)) as f32).collect(),
            Pooling::Last => last,
        };
        if normalize {
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
            tokens: count,
        })
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}
