//! Loading: resolve the model files, check them in Rust, load the language
//! model, the (corrected) vision encoder and the context.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tracing::info;

use super::admission::Queue;
use super::kv_pool::KvPool;
use super::slots::Slot;
use super::state::Worker;
use super::threads::DecodeThreads;
use super::vision_feed::VisionPipeline;
use crate::encoder::TileEncoder;
use crate::llama::cpu_kernels;
use crate::llama::{self, Context, Model};
use crate::protocol::{Lifecycle, Loaded};
use internvl_core::cache::PrefixCache;
use internvl_core::constraint::{FormatCompiler, Vocabulary};
use internvl_core::error::EngineError;
use internvl_core::gguf_meta::{check_language_model, read_tile_spec};
use internvl_core::placement::Placement;
use internvl_core::position_rows::{self, VisionFile};
use internvl_core::prompt::ChatTemplate;
use internvl_core::settings::EngineSettings;
use internvl_core::types::{ModelInfo, ModelPaths};
use internvl_core::vision::TileSpec;

fn token_text(model: &Model, id: i32) -> String {
    String::from_utf8_lossy(&model.token_bytes(id, true)).into_owned()
}

/// The vocabulary as constraints see it: each token's text, special tokens
/// marked with a leading 0xFF (as llama.cpp's llguidance sampler does), so
/// no format's text can spell them; and the model's tokenizer, through which
/// a format's forced text becomes the tokens the model would have read.
fn vocabulary(model: &Arc<Model>) -> Vocabulary {
    let n = model.n_vocab();
    let mut tokens = Vec::with_capacity(n as usize);
    let mut end_of_generation = Vec::new();
    for id in 0..n {
        if model.is_eog(id) {
            end_of_generation.push(id as u32);
        }
        let text = model.token_bytes(id, false);
        if text.is_empty() {
            let special = model.token_bytes(id, true);
            if special.is_empty() {
                tokens.push(Vec::new());
            } else {
                tokens.push([&[0xFF][..], &special].concat());
            }
        } else {
            tokens.push(text);
        }
    }
    let tokenizer = model.clone();
    Vocabulary {
        tokens,
        end_of_generation,
        tokenize: Some(Arc::new(move |bytes: &[u8]| {
            // Forced text may end inside a character: its whole characters
            // are tokenized, and the rest is left to be sampled.
            let text = match std::str::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
            };
            tokenizer
                .tokenize(text, false, false)
                .map(|ids| ids.into_iter().map(|t| t as u32).collect())
                .unwrap_or_default()
        })),
    }
}

impl Worker {
    /// Resolves and checks the files, then loads the language model, the
    /// vision encoder and the context, in that order: the context's settings
    /// depend on where the model's layers went.
    pub(super) fn load<F>(
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
        llama::init_backend(settings.llama_info_logs, &settings.model.vulkan_devices)?;
        let started = Instant::now();
        let (model, mut load_log) =
            llama::capture_logs(|| Model::load(&paths.model, &settings.model));
        let model = Arc::new(model?);
        let (template, template_source) = chat_template(&model, &paths.model)?;
        let formats = {
            let model = model.clone();
            FormatCompiler::new(move || vocabulary(&model), settings.formats.clone())
        };
        let image_context_token = match model
            .tokenize(internvl_core::prompt::IMAGE_PLACEHOLDER, false, true)?
            .as_slice()
        {
            [id] => *id,
            _ => -1,
        };
        let (encoder, vision_log) =
            start_encoder(&paths.mmproj, &model, settings, spec, &lifecycle)?;
        load_log.extend(vision_log);
        let (context, context_log) = new_context(&model, settings, &load_log);
        let context = context?;
        load_log.extend(context_log);
        let placement = Placement {
            devices: llama::devices::devices(),
            ..Placement::from_log(&load_log)
        };
        let parallel = context.n_seq_max();
        let info = ModelInfo {
            tiles: spec,
            projector,
            chat_template: template_source,
            offload: placement.summary(),
            placement: placement.clone(),
            ..describe(&model, &paths, &context)
        };
        info!(
            model = %paths.model.display(),
            mmproj = %paths.mmproj.display(),
            n_ctx = info.context_size,
            parallel,
            cpu_kernels = %info.cpu_kernels,
            offload = %info.offload,
            load_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        let loaded = Arc::new(Loaded {
            model: model.clone(),
            template,
            spec,
            limits: settings.decode_limits,
            max_tiles: settings.max_tiles_per_request,
            info,
            image_context_token,
            formats,
        });
        // Each step's batch carries one token per generating slot, the rest is
        // prompt text.
        let prefill_chunk = settings
            .prefill_chunk
            .clamp(1, context.n_batch().saturating_sub(parallel).max(1));
        let worker = Worker {
            model,
            slots: (0..parallel).map(|_| Slot::new()).collect(),
            pool: KvPool::new(
                context,
                parallel,
                spec.tokens_per_tile as usize,
                PrefixCache::new(settings.prefix_cache_bytes),
            ),
            vision: VisionPipeline::new(encoder, settings.image_cache_bytes),
            lifecycle,
            outboxes: Vec::new(),
            queue: Queue::default(),
            prefill_chunk,
            jump_forward: settings.jump_forward,
            threads: DecodeThreads::new(
                settings,
                matches!(placement.vision_backend.as_str(), "" | "CPU"),
            ),
        };
        Ok((worker, loaded))
    }
}

/// The model file's chat template (and its source), with the BOS and EOS
/// texts it names. An InternVL vocabulary has `<img>` and `</img>` as single
/// tokens; a file without them is refused here, naming it.
fn chat_template(model: &Model, path: &Path) -> Result<(ChatTemplate, String), EngineError> {
    let file_error = |message: &str| EngineError::ModelFile {
        path: path.to_path_buf(),
        message: message.to_string(),
    };
    let source = model
        .chat_template()
        .ok_or_else(|| file_error("has no tokenizer.chat_template"))?;
    let special = |key: &str| {
        model
            .meta(key)
            .and_then(|id| id.parse::<i32>().ok())
            .filter(|&id| model.is_valid_token(id))
            .map(|id| token_text(model, id))
            .unwrap_or_default()
    };
    let template = ChatTemplate::new(
        source.clone(),
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
    Ok((template, source))
}

/// The vision encoder's thread on `mmproj`, or on its copy with the position
/// rows in llama.cpp's order where the converter's layout needs that; and
/// llama.cpp's load lines.
fn start_encoder(
    mmproj: &Path,
    model: &Arc<Model>,
    settings: &EngineSettings,
    spec: TileSpec,
    lifecycle: &Lifecycle,
) -> Result<(TileEncoder, Vec<String>), EngineError> {
    let vision_file = position_rows::prepare(mmproj, settings.cache_dir.as_deref())?;
    if let VisionFile::Corrected {
        derived, created, ..
    } = &vision_file
    {
        info!(
            mmproj = %mmproj.display(),
            corrected = %derived.display(),
            written_now = created,
            "vision position rows corrected: llama.cpp adds row i to patch i, this file keeps the class token's row first (converter layout)"
        );
    }
    TileEncoder::start(
        vision_file.path(),
        model.clone(),
        &settings.vision,
        spec.tile_size,
        lifecycle.bell.clone(),
    )
}

/// The language model's context, its settings chosen by where the load
/// lines say the layers went; and llama.cpp's lines while creating it.
fn new_context(
    model: &Arc<Model>,
    settings: &EngineSettings,
    load_log: &[String],
) -> (Result<Context, EngineError>, Vec<String>) {
    let on_gpu = Placement::from_log(load_log).all_layers_on_local_gpus();
    let params = llama::context_params(settings, on_gpu);
    info!(
        flash_attn = ?params.flash_attn,
        cache_type_k = ?params.type_k,
        cache_type_v = ?params.type_v,
        "language model context"
    );
    llama::capture_logs(|| Context::new(model.clone(), &params))
}

/// What the model and context say of themselves; the caller adds the tiles,
/// the template and the placement.
fn describe(model: &Model, paths: &ModelPaths, context: &Context) -> ModelInfo {
    let name = model.meta("general.name").unwrap_or_else(|| {
        paths
            .model
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    });
    ModelInfo {
        name,
        architecture: model.meta("general.architecture").unwrap_or_default(),
        context_size: context.n_ctx(),
        training_context_size: model.n_ctx_train().max(0) as u32,
        vocab_size: model.n_vocab() as u32,
        embedding_size: model.n_embd() as u32,
        quantization: model.description(),
        parallel: context.n_seq_max() as u32,
        cpu_kernels: cpu_kernels::describe(
            llama::system_info(),
            llama::cpu_backend_file().as_deref(),
        ),
        ..ModelInfo::default()
    }
}
