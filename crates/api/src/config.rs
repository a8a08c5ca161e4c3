//! Deployment configuration, layered: built-in defaults < TOML file
//! (`--config`) < environment (`INTERNVL_…`) < command-line flags.
//!
//! [`Config`] is the one definition of the schema: its fields are the keys,
//! their doc comments the descriptions, its `Default` the defaults, and each
//! choice's names come from its type. [`keys`] reads that definition (through
//! `schemars`), and everything else is made from it: the environment
//! variables, the `serve` flags, `config --print` and the README's table.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use internvl_core::settings::{ContextParams, ModelParams, VisionParams};
use internvl_core::{
    DecodeLimits, EngineSettings, FlashAttn, FormatLimits, KvCacheType, SplitMode, VideoSandbox,
};

/// Everything a deployment can set. Field names are the TOML keys and, upper-cased
/// with the `INTERNVL_` prefix, the environment variables.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Language model: a catalog name (`NAME[:QUANT]`, `internvl-grpc
    /// models` lists them), a local path, or `hf://owner/repo/file.gguf`.
    pub model: String,
    /// Vision encoder (mmproj): a path or `hf://…`; empty = the catalog
    /// entry's.
    pub mmproj: String,
    /// Address to serve gRPC on, e.g. `0.0.0.0:50051`.
    pub listen: String,
    /// Hugging Face cache directory; unset = `HF_HOME` or
    /// `~/.cache/huggingface/hub`.
    pub hf_cache: Option<PathBuf>,
    /// Never download; only use files already cached.
    pub offline: bool,
    /// Directory for files derived from the model files (the corrected
    /// mmproj); unset = `$XDG_CACHE_HOME/internvl-grpc` or
    /// `~/.cache/internvl-grpc`.
    pub cache_dir: Option<PathBuf>,
    /// KV cells shared by all running sequences, in tokens; also the longest
    /// one request may be (0 = the model's training context).
    pub n_ctx: u32,
    /// Sequences decoded together (continuous batching); more cost no memory
    /// beyond the shared `n_ctx` cells.
    pub parallel: u32,
    /// Most prompt positions decoded per scheduler step: smaller keeps running
    /// streams smoother while a long prompt is read, larger reads it faster.
    /// A format's forced tokens beyond the first come out of it too.
    pub prefill_chunk: u32,
    /// Tokens a `response_format` forces (a JSON Schema's keys and
    /// punctuation) are decoded in one batch with the token before them
    /// instead of one step each; the reply is the same. Not for requests that
    /// ask for log-probabilities.
    pub jump_forward: bool,
    /// Most positions per decode call.
    pub n_batch: u32,
    /// Physical micro-batch (at most `n_batch`).
    pub n_ubatch: u32,
    /// CPU threads, the decoder's and the vision encoder's each (0 = all
    /// available cores). Give each replica cores of its own.
    pub threads: u32,
    /// Language-model layers on the GPU (-1 = all).
    pub n_gpu_layers: i32,
    /// GPU for the whole model when `split_mode` is `none`.
    pub main_gpu: i32,
    /// How the language model's layers are spread over several GPUs.
    pub split_mode: SplitMode,
    /// Share of the model per GPU, e.g. `[3, 1]`.
    #[serde(deserialize_with = "one_or_many")]
    pub tensor_split: Vec<f32>,
    /// ggml devices the language model may use, by name (`Vulkan0`, `CUDA1`,
    /// `RPC0`), e.g. `["Vulkan0"]`; empty = every GPU ggml found and every RPC
    /// server's. `internvl-grpc devices` lists them; each is checked at
    /// start-up (docs/OFFLOAD.md).
    pub devices: Vec<String>,
    /// ggml RPC servers (`internvl-grpc rpc-server`) whose devices are added,
    /// e.g. `["10.0.0.2:50052"]`. The protocol has no authentication: private
    /// networks only.
    pub rpc_servers: Vec<String>,
    /// Vulkan devices ggml's Vulkan backend uses, by index in Vulkan's own
    /// list (`internvl-grpc devices` prints it), e.g. `[0]`. ggml alone takes
    /// only discrete and integrated GPUs: a software device (Mesa's
    /// lavapipe) must be named here. Empty = `GGML_VK_VISIBLE_DEVICES`, else
    /// ggml's choice.
    #[serde(deserialize_with = "one_or_many")]
    pub vulkan_devices: Vec<u32>,
    /// Run the vision encoder on the GPU.
    pub mmproj_offload: bool,
    /// Flash attention in the language model; `auto`: llama.cpp turns it on
    /// where the device supports it, the CPU included (see `cache_type_v`).
    pub flash_attn: FlashAttn,
    /// Flash attention in the vision encoder, apart from the language
    /// model's (on, as llama-server's `auto` is on the CPU; tiles stay within
    /// the vision parity tolerance with it).
    pub mmproj_flash_attn: FlashAttn,
    /// KV cache type for K; `auto` is f16.
    pub cache_type_k: KvCacheType,
    /// KV cache type for V (a quantized V needs flash attention); `auto`:
    /// bf16 where flash attention may run on a CPU (a layer on the CPU, or
    /// any on an RPC device), whose kernel sums an f16 V in f16 and loses
    /// reference parity on long image prompts, else f16. f16 there is faster
    /// but further from the reference (benches/README.md, "Against
    /// llama-server"). The start-up log's "language model context" line says
    /// what was chosen.
    pub cache_type_v: KvCacheType,
    /// Requests waiting for a free slot: at most `parallel + queue_depth` are in
    /// flight, beyond that calls get RESOURCE_EXHAUSTED with a retry hint.
    pub queue_depth: usize,
    /// Events buffered per stream.
    pub stream_buffer: usize,
    /// Seconds a streaming client may take no event while events wait for
    /// it; then its stream ends (ABORTED, or the HTTP stream's error event)
    /// and its slot and KV cells are freed for others.
    pub stream_stall_secs: f64,
    /// Largest request message in bytes.
    pub max_message_bytes: usize,
    /// Largest image width or height accepted.
    pub max_image_side: u32,
    /// Largest image area accepted, in pixels.
    pub max_image_pixels: u64,
    /// Most memory one image decoder may allocate, in MiB (`image::Limits`).
    pub max_image_alloc_mb: u64,
    /// Emit logs as JSON lines.
    pub log_json: bool,
    /// llama.cpp's information lines (model metadata, over 150 at a start)
    /// at INFO; by default they are DEBUG. Its warnings stay warnings.
    pub llama_info_logs: bool,
    /// On shutdown, seconds running requests get to finish before they are cut.
    pub drain_grace_secs: f64,
    /// MiB of encoded image tiles kept for reuse (0 = no image cache).
    pub image_cache_mb: usize,
    /// MiB of finished conversations' KV cells kept in memory so a prompt that
    /// starts the same way skips their prefill (0 = no prefix cache).
    pub prefix_cache_mb: usize,
    /// Largest `response_format` accepted, in KiB.
    pub max_format_kb: usize,
    /// Compiled `response_format`s kept for reuse.
    pub format_cache_entries: usize,
    /// Work allowed to compile one format (llguidance's initial lexer fuel);
    /// a format that needs more is refused.
    pub format_compile_fuel: u64,
    /// Work allowed per token's mask (llguidance's step lexer fuel); a
    /// sequence that needs more ends with an error.
    pub format_mask_fuel: u64,
    /// Lexer states one format may create (about 1-2 kB each).
    pub format_max_lexer_states: usize,
    /// Accepted API keys (`authorization: Bearer <key>`); empty = no authentication.
    pub api_keys: Vec<String>,
    /// A file of further API keys, one per line (blank lines and lines
    /// starting with `#` skipped), read at start: a mounted Secret keeps
    /// keys out of the command line and the environment.
    pub api_keys_file: Option<PathBuf>,
    /// Health and reflection answer without an API key (for probes and tooling).
    pub open_health_and_reflection: bool,
    /// PEM certificate chain; with `tls_key`, serve TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA whose client certificates are required (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
    /// Images plus sampled video frames per request (per input for Embed).
    pub max_images_per_request: usize,
    /// Alternatives a client may ask for per token.
    pub max_top_logprobs: u32,
    /// Stop sequences per request.
    pub max_stop_sequences: usize,
    /// Image tiles (thumbnails and video frames included) one request may
    /// be cut into, across all its messages or Embed inputs; counted as
    /// each image is tiled, so a request past it is refused before the rest
    /// is decoded. Each tile is about 600 KB while the request is prepared.
    pub max_tiles_per_request: u32,
    /// Messages per Generate or CountTokens request.
    pub max_messages: usize,
    /// Content parts per request, across all its messages or Embed inputs.
    pub max_content_parts: usize,
    /// Inputs per Embed request.
    pub max_embed_inputs: usize,
    /// Largest Tokenize text, in bytes.
    pub max_tokenize_bytes: usize,
    /// Seconds an HTTP request body may take to arrive; a body still
    /// arriving then is cut with 408. API keys are checked on the headers,
    /// before any of the body is read.
    pub http_body_timeout_secs: f64,
    /// HTTP/2 streams (calls) one connection may have open at once
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
    /// Longest deadline honoured, in seconds; also the deadline of requests without one.
    pub max_deadline_secs: f64,
    /// Address of the Prometheus endpoint (`/metrics`), e.g. `0.0.0.0:9090`; unset = off.
    pub metrics_listen: Option<String>,
    /// URL prefixes `Image.url` may fetch from, e.g.
    /// `["https://images.example.com/"]`: scheme, host and port exact, the
    /// path a prefix of whole segments. Empty = no remote fetching. A host
    /// that resolves to a loopback, private, link-local or metadata address
    /// is refused unless its entry names that address and port literally.
    pub media_allow: Vec<String>,
    /// Directory `file://` URLs may read under (after `..` and symlinks);
    /// unset = no file URLs.
    pub media_root: Option<PathBuf>,
    /// Largest media file fetched from a URL, in MiB; reading stops past it.
    pub media_max_mb: u64,
    /// Media URLs fetched per request.
    pub media_max_fetches: usize,
    /// Seconds one fetch may take, connecting included (the call's deadline
    /// bounds it too).
    pub media_fetch_timeout_secs: f64,
    /// Redirects followed per fetch; each hop is checked again.
    pub media_max_redirects: u32,
    /// The FFmpeg program that decodes video files (`Video.data`,
    /// `Video.url`): a path, or a name found on `PATH`; `ffprobe` must be
    /// beside it. Empty = video files are refused.
    pub media_ffmpeg: String,
    /// How FFmpeg is confined: `auto` = Landlock and a seccomp filter of the
    /// server's own (no network, no socket, nothing read but `/usr`, nothing
    /// written, no other process touched), inside bubblewrap's namespaces
    /// where they can be made; `landlock` = never bubblewrap; `off` =
    /// resource limits only. When the chosen confinement cannot run, video
    /// files are off, never unconfined.
    pub media_video_sandbox: VideoSandbox,
    /// The program that confines FFmpeg (`PROGRAM confine …`); unset = this
    /// server's own binary. For a test harness or a build that installs it
    /// apart.
    pub media_confine_program: Option<PathBuf>,
    /// Seconds one video file's decoding may take (the call's deadline
    /// bounds it too).
    pub media_video_timeout_secs: f64,
    /// Address space one FFmpeg process may map, in MiB.
    pub media_video_memory_mb: u64,
    /// Largest size of one video's sampled frames as RGB, in MiB.
    pub media_video_max_decoded_mb: u64,
    /// MiB of decoded media (images, their tiles, sampled video frames) that
    /// all requests in flight may hold together. A request takes its share
    /// before it decodes anything; one that does not fit now gets
    /// RESOURCE_EXHAUSTED with a retry hint, one that could never fit
    /// INVALID_ARGUMENT. Fits the shipped pods' 5 GiB beside a 2B model.
    pub media_memory_mb: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            model: "tiny".into(),
            mmproj: String::new(),
            listen: "127.0.0.1:50051".into(),
            hf_cache: None,
            offline: false,
            cache_dir: None,
            n_ctx: 8192,
            parallel: 8,
            prefill_chunk: 512,
            jump_forward: true,
            n_batch: 2048,
            n_ubatch: 512,
            threads: 0,
            n_gpu_layers: -1,
            main_gpu: 0,
            split_mode: SplitMode::Layer,
            tensor_split: Vec::new(),
            devices: Vec::new(),
            rpc_servers: Vec::new(),
            vulkan_devices: Vec::new(),
            mmproj_offload: true,
            // On the CPU flash attention skips other sequences' cells in the
            // shared KV pool, so a burst finishes sooner (benches/README.md);
            // parity holds with the bf16 V that `auto` picks for it.
            flash_attn: FlashAttn::Auto,
            mmproj_flash_attn: FlashAttn::On,
            cache_type_k: KvCacheType::Auto,
            cache_type_v: KvCacheType::Auto,
            queue_depth: 64,
            stream_buffer: 32,
            stream_stall_secs: 30.0,
            max_message_bytes: 32 * 1024 * 1024,
            max_image_side: 16_384,
            max_image_pixels: 64 * 1024 * 1024,
            max_image_alloc_mb: 512,
            log_json: false,
            llama_info_logs: false,
            drain_grace_secs: 30.0,
            image_cache_mb: 512,
            prefix_cache_mb: 512,
            max_format_kb: 64,
            format_cache_entries: FormatLimits::default().cache_entries,
            format_compile_fuel: FormatLimits::default().compile_fuel,
            format_mask_fuel: FormatLimits::default().mask_fuel,
            format_max_lexer_states: FormatLimits::default().max_lexer_states,
            api_keys: Vec::new(),
            api_keys_file: None,
            open_health_and_reflection: true,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            max_images_per_request: 16,
            max_top_logprobs: 20,
            max_stop_sequences: 16,
            max_tiles_per_request: 128,
            max_messages: 256,
            max_content_parts: 512,
            max_embed_inputs: 64,
            max_tokenize_bytes: 1024 * 1024,
            http_body_timeout_secs: 30.0,
            max_concurrent_streams: 128,
            max_deadline_secs: 600.0,
            metrics_listen: None,
            media_allow: Vec::new(),
            media_root: None,
            media_max_mb: 32,
            media_max_fetches: 16,
            media_fetch_timeout_secs: 30.0,
            media_max_redirects: 3,
            media_ffmpeg: "ffmpeg".into(),
            media_video_sandbox: VideoSandbox::Auto,
            media_confine_program: None,
            media_video_timeout_secs: 30.0,
            media_video_memory_mb: 1024,
            media_video_max_decoded_mb: 256,
            media_memory_mb: 1024,
        }
    }
}

/// Environment variables `INTERNVL_<KEY>` set configuration keys.
const ENV_PREFIX: &str = "INTERNVL";

/// The variables of `vars` that set configuration keys: every `INTERNVL_*`
/// one but those Kubernetes adds for a Service whose name starts with
/// `internvl` (service links: the manifests' own Service `internvl-grpc`
/// gives `INTERNVL_GRPC_SERVICE_HOST`, `INTERNVL_GRPC_PORT`, …). Anything
/// else under the prefix stays, so a misspelt key is still refused.
fn settings_in_env(
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<config::Map<String, String>, ConfigError> {
    let prefix = format!("{ENV_PREFIX}_");
    let mut settings = config::Map::new();
    for (name, value) in vars {
        let Some(name) = name.to_str() else { continue };
        if !name.to_ascii_uppercase().starts_with(&prefix) {
            continue;
        }
        let Some(value) = value.to_str() else {
            return Err(ConfigError::Load(config::ConfigError::Message(format!(
                "environment variable {name}: the value is not UTF-8"
            ))));
        };
        if !is_service_link(name, value) {
            settings.insert(name.to_string(), value.to_string());
        }
    }
    Ok(settings)
}

/// Whether `name=value` has the shape of a variable the kubelet adds for a
/// Service (`{SVC}_SERVICE_HOST`, `{SVC}_SERVICE_PORT[_{PORT_NAME}]`,
/// `{SVC}_PORT`, `{SVC}_PORT_{N}_{PROTO}[_PROTO|_PORT|_ADDR]`): name and value
/// must both fit, so a key that merely ends in `_PORT` is not dropped.
pub(crate) fn is_service_link(name: &str, value: &str) -> bool {
    let ip = |v: &str| v.parse::<std::net::IpAddr>().is_ok();
    let port = |v: &str| v.parse::<u16>().is_ok();
    let proto = |p: &str| matches!(p, "TCP" | "UDP" | "SCTP");
    // `tcp://10.0.0.1:50051`, or `[fd00::1]:50051` for IPv6; `n` the port
    // the name carries, when it carries one.
    let url = |v: &str, p: &str, n: Option<&str>| {
        let Some(rest) = v.strip_prefix(&format!("{}://", p.to_ascii_lowercase())) else {
            return false;
        };
        let Some((host, at)) = rest.rsplit_once(':') else {
            return false;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ip(host) && port(at) && n.is_none_or(|n| n == at)
    };
    let parts: Vec<&str> = name.split('_').collect();
    let n = parts.len();
    // The Service's part of the name, its first `k` words: `INTERNVL` and
    // whatever follows in the Service's name.
    let service = |k: usize| k >= 1 && parts[0].eq_ignore_ascii_case(ENV_PREFIX);
    let ends = |suffix: &[&str]| parts.ends_with(suffix) && service(n - suffix.len());
    // `{SVC}_PORT_{N}_{PROTO}` followed by `extra` more words.
    let port_entry = |extra: usize| {
        n >= 4 + extra && {
            let at = n - 3 - extra;
            parts[at] == "PORT" && port(parts[at + 1]) && proto(parts[at + 2]) && service(at)
        }
    };
    (ends(&["SERVICE", "HOST"]) && ip(value))
        || (ends(&["SERVICE", "PORT"]) && port(value))
        || (parts
            .windows(2)
            .enumerate()
            .any(|(i, w)| w == ["SERVICE", "PORT"] && service(i) && i + 2 < n)
            && port(value))
        || (ends(&["PORT"]) && ["TCP", "UDP", "SCTP"].iter().any(|p| url(value, p, None)))
        || (port_entry(0) && url(value, parts[n - 1], Some(parts[n - 2])))
        || (port_entry(1)
            && match parts[n - 1] {
                "PROTO" => value.eq_ignore_ascii_case(parts[n - 2]),
                "PORT" => value == parts[n - 3],
                "ADDR" => ip(value),
                _ => false,
            })
}

/// A configuration that cannot be used, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading or merging the layers failed.
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// Keys have values outside what they accept: every one found.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Problem>),
}

/// One key's value that is refused, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("configuration key {key}: {message}")]
pub struct Problem {
    /// The offending key.
    pub key: &'static str,
    /// What is wrong.
    pub message: String,
}

/// A list key that also takes a single value: the `config` crate reads an
/// environment variable holding one number (`INTERNVL_VULKAN_DEVICES=0`) as
/// that number, and one holding several as a list of strings.
fn one_or_many<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + std::str::FromStr,
    T::Err: std::fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item<T> {
        Value(T),
        Text(String),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        Many(Vec<Item<T>>),
        One(Item<T>),
    }
    let items = match OneOrMany::deserialize(deserializer)? {
        OneOrMany::Many(items) => items,
        OneOrMany::One(item) => vec![item],
    };
    items
        .into_iter()
        .map(|item| match item {
            Item::Value(value) => Ok(value),
            Item::Text(text) => text
                .trim()
                .parse()
                .map_err(|e| serde::de::Error::custom(format!("\"{text}\": {e}"))),
        })
        .collect()
}

/// `host:port` with a port number, as ggml's RPC client parses an endpoint.
fn is_host_port(endpoint: &str) -> bool {
    endpoint
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

/// What a key's value is, as the schema says, for the flags and the
/// environment to read it.
#[derive(Clone, Debug, PartialEq)]
pub enum ValueKind {
    /// `true` or `false`; a flag alone means `true`.
    Bool,
    /// Several values; the environment and flags separate them by commas.
    List,
    /// One of the names.
    Choice(Vec<String>),
    /// A number, text or path.
    Scalar,
}

/// One configuration key, as [`Config`]'s schema describes it.
#[derive(Clone, Debug)]
pub struct Key {
    /// The TOML key.
    pub name: String,
    /// What it sets (its doc comment).
    pub description: String,
    /// Its default, or `None` when unset by default.
    pub default: Option<toml::Value>,
    /// How its value is written.
    pub kind: ValueKind,
}

impl Key {
    /// The environment variable that sets it.
    pub fn env(&self) -> String {
        format!("{ENV_PREFIX}_{}", self.name.to_ascii_uppercase())
    }

    /// The `serve` flag that sets it, without the dashes.
    pub fn flag(&self) -> String {
        self.name.replace('_', "-")
    }

    /// The description's first sentence, for short help.
    pub fn summary(&self) -> &str {
        let text = self.description.as_str();
        text.find(". ").map_or(text, |end| &text[..=end])
    }

    /// The default as TOML writes it; `None` when unset.
    pub fn default_text(&self) -> Option<String> {
        self.default.as_ref().map(toml::Value::to_string)
    }
}

/// Every configuration key, in [`Config`]'s order, read from its schema.
pub fn keys() -> &'static [Key] {
    static KEYS: OnceLock<Vec<Key>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let schema = schemars::schema_for!(Config);
        let defaults = toml::Table::try_from(Config::default()).expect("the defaults serialize");
        let properties = schema
            .get("properties")
            .and_then(|p| p.as_object())
            .expect("Config's schema has properties");
        properties
            .iter()
            .map(|(name, property)| {
                let types: Vec<&str> = match property.get("type") {
                    Some(serde_json::Value::String(t)) => vec![t.as_str()],
                    Some(serde_json::Value::Array(ts)) => {
                        ts.iter().filter_map(|t| t.as_str()).collect()
                    }
                    _ => Vec::new(),
                };
                let choices = property.get("enum").and_then(|e| e.as_array());
                let kind = if let Some(choices) = choices {
                    ValueKind::Choice(
                        choices
                            .iter()
                            .filter_map(|c| c.as_str().map(str::to_string))
                            .collect(),
                    )
                } else if types.contains(&"boolean") {
                    ValueKind::Bool
                } else if types.contains(&"array") {
                    ValueKind::List
                } else {
                    ValueKind::Scalar
                };
                Key {
                    name: name.clone(),
                    description: property
                        .get("description")
                        .and_then(|d| d.as_str())
                        .unwrap_or_default()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" "),
                    default: defaults.get(name).cloned(),
                    kind,
                }
            })
            .collect()
    })
}

/// The key named `name`.
pub fn key(name: &str) -> Option<&'static Key> {
    keys().iter().find(|k| k.name == name)
}

/// `config --print`: every key with its description and default, as a TOML
/// file that loads as the defaults.
pub fn defaults_toml() -> String {
    let mut out = String::from(
        "# internvl-grpc configuration: every key, set to its default.\n\
         # Built-in defaults < this file (serve --config FILE) < environment\n\
         # (INTERNVL_<KEY>) < flags (--<key> VALUE or --set key=value).\n",
    );
    for key in keys() {
        out.push('\n');
        for line in wrap(&key.description, 76) {
            out.push_str(&format!("# {line}\n"));
        }
        if let ValueKind::Choice(choices) = &key.kind {
            out.push_str(&format!("# One of: {}.\n", choices.join(", ")));
        }
        match key.default_text() {
            Some(value) => out.push_str(&format!("{} = {value}\n", key.name)),
            None => out.push_str(&format!("# {} is unset by default.\n", key.name)),
        }
    }
    out
}

/// The README's table of keys: key, default, what it sets.
pub fn markdown_table() -> String {
    let cell = |text: &str| text.replace('|', "\\|");
    let mut out = String::from("| Key | Default | What it sets |\n|---|---|---|\n");
    for key in keys() {
        let default = key
            .default_text()
            .map_or_else(|| "unset".to_string(), |d| format!("`{}`", cell(&d)));
        let mut description = cell(&key.description);
        if let ValueKind::Choice(choices) = &key.kind {
            description.push_str(&format!(" One of: {}.", choices.join(", ")));
        }
        out.push_str(&format!("| `{}` | {default} | {description} |\n", key.name));
    }
    out
}

/// Words of `text` in lines of at most `width` characters (a longer word
/// has a line of its own).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(line) if line.len() + 1 + word.len() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// A source of `(key, value text)` pairs read as the environment is: the
/// same number, boolean and comma-separated list parsing for `INTERNVL_*`
/// variables and for flags.
fn text_source(pairs: config::Map<String, String>) -> config::Environment {
    let mut source = config::Environment::with_prefix(ENV_PREFIX)
        .source(Some(pairs))
        .try_parsing(true)
        .list_separator(",");
    for key in keys().iter().filter(|k| k.kind == ValueKind::List) {
        source = source.with_list_parse_key(&key.name);
    }
    source
}

impl Config {
    /// The per-request limits the service enforces.
    pub fn request_limits(&self) -> crate::validation::Limits {
        crate::validation::Limits {
            max_images: self.max_images_per_request,
            max_top_logprobs: self.max_top_logprobs,
            max_stop_sequences: self.max_stop_sequences,
            max_messages: self.max_messages,
            max_content_parts: self.max_content_parts,
            max_embed_inputs: self.max_embed_inputs,
            max_tokenize_bytes: self.max_tokenize_bytes,
            max_deadline: std::time::Duration::from_secs_f64(self.max_deadline_secs),
        }
    }

    /// Every accepted API key: `api_keys` and those of `api_keys_file`.
    pub fn all_api_keys(&self) -> Result<Vec<String>, ConfigError> {
        let mut keys = self.api_keys.clone();
        keys.extend(self.file_api_keys().map_err(|why| {
            ConfigError::Invalid(vec![Problem {
                key: "api_keys_file",
                message: format!(
                    "{}: {why}",
                    self.api_keys_file
                        .as_deref()
                        .unwrap_or(Path::new(""))
                        .display()
                ),
            }])
        })?);
        Ok(keys)
    }

    /// The keys of `api_keys_file` (none when unset).
    fn file_api_keys(&self) -> Result<Vec<String>, String> {
        let Some(path) = &self.api_keys_file else {
            return Ok(Vec::new());
        };
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let keys: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect();
        if keys.is_empty() {
            return Err("holds no key".into());
        }
        Ok(keys)
    }

    /// The limits on decoded images and video frames.
    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_side: self.max_image_side,
            max_pixels: self.max_image_pixels,
            max_alloc: self.max_image_alloc_mb.saturating_mul(1024 * 1024),
        }
    }

    /// The media fetch policy of `media_allow` and `media_root`.
    pub fn media_policy(&self) -> Result<crate::media::MediaPolicy, String> {
        crate::media::MediaPolicy::new(&self.media_allow, self.media_root.as_deref())
    }

    /// This configuration as a TOML file (unset keys left out).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a configuration serializes")
    }

    /// Merges the layers and validates the result. `overrides` are the
    /// `(key, value)` pairs the command line set, values as written.
    pub fn load(file: Option<&Path>, overrides: &[(String, String)]) -> Result<Self, ConfigError> {
        Self::load_with_env(file, overrides, std::env::vars_os())
    }

    /// [`Config::load`] with `env` in place of the process's environment.
    pub fn load_with_env(
        file: Option<&Path>,
        overrides: &[(String, String)],
        env: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> Result<Self, ConfigError> {
        let mut builder =
            config::Config::builder().add_source(config::Config::try_from(&Config::default())?);
        if let Some(file) = file {
            builder = builder.add_source(
                config::File::from(file)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let flags = overrides
            .iter()
            .map(|(key, value)| {
                (
                    format!("{ENV_PREFIX}_{}", key.to_ascii_uppercase()),
                    value.clone(),
                )
            })
            .collect();
        let config: Config = builder
            .add_source(text_source(settings_in_env(env)?))
            .add_source(text_source(flags))
            .build()?
            .try_deserialize()?;
        config.validate()?;
        Ok(config)
    }

    /// Every rule the values must keep, apart from converting them: all the
    /// problems found, each naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, key: &'static str, message: String| {
            if !ok {
                problems.push(Problem { key, message });
            }
        };
        check(self.n_batch > 0, "n_batch", "must be at least 1".into());
        check(
            self.n_ubatch > 0 && self.n_ubatch <= self.n_batch,
            "n_ubatch",
            format!(
                "need 0 < n_ubatch ({}) <= n_batch ({})",
                self.n_ubatch, self.n_batch
            ),
        );
        check(
            self.tensor_split.iter().all(|s| s.is_finite() && *s >= 0.0),
            "tensor_split",
            "shares must be finite and non-negative".into(),
        );
        if let Some(i) = self.rpc_servers.iter().position(|e| !is_host_port(e)) {
            check(
                false,
                "rpc_servers",
                format!("entry {i}, \"{}\", is not host:port", self.rpc_servers[i]),
            );
        }
        if let Some(i) = self.devices.iter().position(|d| d.trim().is_empty()) {
            check(
                false,
                "devices",
                format!("entry {i} is empty; a device has a name"),
            );
        }
        check(
            self.drain_grace_secs.is_finite() && self.drain_grace_secs >= 0.0,
            "drain_grace_secs",
            "must be a finite, non-negative number of seconds".into(),
        );
        check(
            self.tls_cert.is_some() == self.tls_key.is_some(),
            if self.tls_cert.is_some() {
                "tls_key"
            } else {
                "tls_cert"
            },
            "tls_cert and tls_key go together".into(),
        );
        check(
            self.tls_client_ca.is_none() || self.tls_cert.is_some(),
            "tls_client_ca",
            "mutual TLS needs tls_cert and tls_key".into(),
        );
        check(
            self.api_keys.iter().all(|k| !k.is_empty()),
            "api_keys",
            "an API key cannot be empty".into(),
        );
        check(
            self.max_deadline_secs.is_finite() && self.max_deadline_secs > 0.0,
            "max_deadline_secs",
            "must be a positive number of seconds".into(),
        );
        check(
            self.stream_stall_secs.is_finite() && self.stream_stall_secs > 0.0,
            "stream_stall_secs",
            "must be a positive number of seconds".into(),
        );
        check(
            self.http_body_timeout_secs.is_finite() && self.http_body_timeout_secs > 0.0,
            "http_body_timeout_secs",
            "must be a positive number of seconds".into(),
        );
        for (value, key) in [
            (self.max_tiles_per_request as usize, "max_tiles_per_request"),
            (self.max_messages, "max_messages"),
            (self.max_content_parts, "max_content_parts"),
            (self.max_embed_inputs, "max_embed_inputs"),
            (self.max_tokenize_bytes, "max_tokenize_bytes"),
            (
                self.max_concurrent_streams as usize,
                "max_concurrent_streams",
            ),
        ] {
            check(value > 0, key, "must be at least 1".into());
        }
        if let Some(file) = &self.api_keys_file {
            if let Err(why) = self.file_api_keys() {
                check(false, "api_keys_file", format!("{}: {why}", file.display()));
            }
        }
        check(
            self.max_image_alloc_mb > 0,
            "max_image_alloc_mb",
            "must be at least 1".into(),
        );
        check(
            (1..=64).contains(&self.parallel),
            "parallel",
            "must be between 1 and 64".into(),
        );
        check(
            self.prefill_chunk > 0,
            "prefill_chunk",
            "must be at least 1".into(),
        );
        check(
            self.queue_depth > 0,
            "queue_depth",
            "must be at least 1".into(),
        );
        check(
            self.stream_buffer > 0,
            "stream_buffer",
            "must be at least 1".into(),
        );
        if let Err(message) = self.media_policy() {
            check(false, "media_allow", message);
        }
        if let Some(root) = &self.media_root {
            check(
                root.is_dir(),
                "media_root",
                format!("{} is not a directory", root.display()),
            );
        }
        check(
            self.media_max_mb > 0,
            "media_max_mb",
            "must be at least 1".into(),
        );
        check(
            self.media_fetch_timeout_secs.is_finite() && self.media_fetch_timeout_secs > 0.0,
            "media_fetch_timeout_secs",
            "must be a positive number of seconds".into(),
        );
        check(
            self.media_video_timeout_secs.is_finite() && self.media_video_timeout_secs > 0.0,
            "media_video_timeout_secs",
            "must be a positive number of seconds".into(),
        );
        for (value, key) in [
            (self.media_video_memory_mb, "media_video_memory_mb"),
            (
                self.media_video_max_decoded_mb,
                "media_video_max_decoded_mb",
            ),
            (self.media_memory_mb, "media_memory_mb"),
        ] {
            check(value > 0, key, "must be at least 1".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The engine's view of this configuration, once [`Config::validate`]
    /// accepts it.
    pub fn engine_settings(&self) -> Result<EngineSettings, ConfigError> {
        self.validate()?;
        Ok(self.to_engine_settings())
    }

    /// Why `threads` is too many for the `cpus` this process may run on
    /// (`std::thread::available_parallelism`, which reads the cgroup's CPU
    /// limit), if it is. Not an error: the model still runs, far slower.
    pub fn threads_warning(&self, cpus: usize) -> Option<String> {
        (self.threads as usize > cpus).then(|| {
            format!(
                "threads = {} is more than the CPUs this process may use ({cpus}): ggml's \
                 threads spin while they wait for each other, so each step stalls \
                 until the extra ones are scheduled; set threads to at most {cpus} \
                 (0 takes them all)",
                self.threads
            )
        })
    }

    /// Conversion only: `validate` has kept the rules.
    fn to_engine_settings(&self) -> EngineSettings {
        let threads = if self.threads == 0 {
            std::thread::available_parallelism().map_or(4, |n| n.get()) as i32
        } else {
            self.threads as i32
        };
        EngineSettings {
            model: ModelParams {
                n_gpu_layers: self.n_gpu_layers,
                main_gpu: self.main_gpu,
                split_mode: self.split_mode,
                tensor_split: self.tensor_split.clone(),
                devices: self.devices.clone(),
                rpc_servers: self.rpc_servers.clone(),
                vulkan_devices: self.vulkan_devices.clone(),
            },
            context: ContextParams {
                n_ctx: self.n_ctx,
                n_batch: self.n_batch,
                n_ubatch: self.n_ubatch,
                threads,
                flash_attn: self.flash_attn,
                type_k: self.cache_type_k,
                type_v: self.cache_type_v,
                n_seq_max: self.parallel,
            },
            vision: VisionParams {
                use_gpu: self.mmproj_offload,
                threads,
                flash_attn: self.mmproj_flash_attn,
            },
            decode_limits: self.decode_limits(),
            max_tiles_per_request: self.max_tiles_per_request,
            queue_depth: self.queue_depth,
            prefill_chunk: self.prefill_chunk as usize,
            jump_forward: self.jump_forward,
            stream_buffer: self.stream_buffer,
            stream_stall: std::time::Duration::from_secs_f64(self.stream_stall_secs),
            media_memory_bytes: self.media_memory_mb.saturating_mul(1024 * 1024),
            image_cache_bytes: self.image_cache_mb.saturating_mul(1024 * 1024),
            prefix_cache_bytes: self.prefix_cache_mb.saturating_mul(1024 * 1024),
            formats: FormatLimits {
                max_bytes: self.max_format_kb.saturating_mul(1024),
                cache_entries: self.format_cache_entries,
                compile_fuel: self.format_compile_fuel,
                mask_fuel: self.format_mask_fuel,
                max_lexer_states: self.format_max_lexer_states,
            },
            cache_dir: self
                .cache_dir
                .clone()
                .filter(|d| !d.as_os_str().is_empty())
                .or_else(internvl_core::position_rows::default_cache_dir),
            llama_info_logs: self.llama_info_logs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn no_env() -> impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)> {
        std::iter::empty()
    }

    #[test]
    fn more_threads_than_cpus_is_warned_of() {
        let mut c = Config::default();
        assert_eq!(c.threads_warning(2), None, "0 takes what there is");
        c.threads = 2;
        assert_eq!(c.threads_warning(2), None);
        c.threads = 3;
        let why = c.threads_warning(2).expect("3 threads on 2 CPUs");
        assert!(
            why.contains("threads = 3") && why.contains("may use (2)"),
            "{why}"
        );
    }

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "n_ctx = 1024\nn_batch = 1024\nthreads = 3\n").unwrap();
        // Environment beats the file; flags beat the environment.
        std::env::set_var("INTERNVL_N_BATCH", "600");
        std::env::set_var("INTERNVL_THREADS", "5");
        let c = Config::load(Some(&file), &set(&[("threads", "7")])).unwrap();
        std::env::remove_var("INTERNVL_N_BATCH");
        std::env::remove_var("INTERNVL_THREADS");
        assert_eq!((c.n_ctx, c.n_batch, c.threads), (1024, 600, 7));
        assert_eq!(c.n_ubatch, Config::default().n_ubatch);
    }

    #[test]
    fn list_keys_from_the_environment_take_one_value_or_several() {
        let load = |vars: &[(&str, &str)]| {
            let env = vars.iter().map(|(k, v)| (k.into(), v.into()));
            Config::load_with_env(None, &[], env)
        };
        let c = load(&[
            ("INTERNVL_VULKAN_DEVICES", "0"),
            ("INTERNVL_TENSOR_SPLIT", "2"),
        ])
        .unwrap();
        assert_eq!((c.vulkan_devices, c.tensor_split), (vec![0], vec![2.0]));
        let c = load(&[
            ("INTERNVL_VULKAN_DEVICES", "1,0"),
            ("INTERNVL_TENSOR_SPLIT", "3,1"),
        ])
        .unwrap();
        assert_eq!(
            (c.vulkan_devices, c.tensor_split),
            (vec![1, 0], vec![3.0, 1.0])
        );
        let e = load(&[("INTERNVL_VULKAN_DEVICES", "gpu")]).unwrap_err();
        assert!(e.to_string().contains("vulkan_devices"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::load_with_env(None, &set(&[("split_mode", "diagonal")]), no_env())
            .unwrap_err()
            .to_string();
        assert!(err.contains("split_mode"), "{err}");
        assert!(
            err.contains("layer") && err.contains("row"),
            "names the choices: {err}"
        );
        let err = Config::load_with_env(None, &set(&[("cache_type_v", "q3")]), no_env())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cache_type_v") && err.contains("q8_0"),
            "{err}"
        );
    }

    /// What the kubelet adds for a Service `name` with ports `(name, port)`
    /// at `ip` (pkg/kubelet/envvars), as `(variable, value)`.
    fn service_links(name: &str, ip: &str, ports: &[(&str, u16)]) -> Vec<(String, String)> {
        let svc = name.to_ascii_uppercase().replace('-', "_");
        let mut vars = vec![
            (format!("{svc}_SERVICE_HOST"), ip.to_string()),
            (format!("{svc}_SERVICE_PORT"), ports[0].1.to_string()),
            (format!("{svc}_PORT"), format!("tcp://{ip}:{}", ports[0].1)),
        ];
        for (port_name, port) in ports {
            let p = format!("{svc}_PORT_{port}_TCP");
            vars.push((
                format!(
                    "{svc}_SERVICE_PORT_{}",
                    port_name.to_ascii_uppercase().replace('-', "_")
                ),
                port.to_string(),
            ));
            vars.push((p.clone(), format!("tcp://{ip}:{port}")));
            vars.push((format!("{p}_PROTO"), "tcp".into()));
            vars.push((format!("{p}_PORT"), port.to_string()));
            vars.push((format!("{p}_ADDR"), ip.to_string()));
        }
        vars
    }

    fn env_of(vars: &[(String, String)]) -> Result<config::Map<String, String>, ConfigError> {
        settings_in_env(vars.iter().map(|(k, v)| (k.into(), v.into())))
    }

    #[test]
    fn kubernetes_service_links_are_not_settings() {
        for (name, ip) in [
            ("internvl-grpc", "10.96.12.7"),
            ("internvl", "10.0.0.1"),
            ("internvl-grpc-metrics-2", "fd00::12"),
        ] {
            let mut vars = service_links(name, ip, &[("grpc", 50051), ("metrics", 9090)]);
            vars.push(("INTERNVL_THREADS".into(), "4".into()));
            vars.push(("KUBERNETES_SERVICE_HOST".into(), "10.96.0.1".into()));
            let kept = env_of(&vars).unwrap();
            assert_eq!(
                kept.keys().collect::<Vec<_>>(),
                ["INTERNVL_THREADS"],
                "{name}: {kept:?}"
            );
        }
    }

    #[test]
    fn a_misspelt_key_is_still_refused_beside_service_links() {
        let mut vars = service_links("internvl-grpc", "10.96.12.7", &[("grpc", 50051)]);
        // Names of the service-link shape with values that are not.
        vars.push(("INTERNVL_GRPC_SERVICE_PORT_X".into(), "many".into()));
        vars.push(("INTERNVL_THREAD".into(), "4".into()));
        let kept = env_of(&vars).unwrap();
        let mut names: Vec<_> = kept.keys().collect();
        names.sort();
        assert_eq!(names, ["INTERNVL_GRPC_SERVICE_PORT_X", "INTERNVL_THREAD"]);
        // Beside service links alone, the misspelt key is what is refused.
        let mut vars = service_links("internvl-grpc", "10.96.12.7", &[("grpc", 50051)]);
        vars.push(("INTERNVL_MAX_IMAGES_PER_REQUST".into(), "3".into()));
        let env = vars.iter().map(|(k, v)| (k.into(), v.into()));
        let err = Config::load_with_env(None, &[], env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_images_per_requst"), "{err}");
        // The same links with the right keys load.
        let mut vars = service_links("internvl-grpc", "10.96.12.7", &[("grpc", 50051)]);
        vars.push(("INTERNVL_THREADS".into(), "3".into()));
        let env = vars.iter().map(|(k, v)| (k.into(), v.into()));
        assert_eq!(Config::load_with_env(None, &[], env).unwrap().threads, 3);
    }

    #[test]
    fn no_key_has_the_shape_of_a_service_link() {
        let keys = serde_json::to_value(Config::default()).unwrap();
        for key in keys.as_object().unwrap().keys() {
            let name = format!("INTERNVL_{}", key.to_ascii_uppercase());
            for value in ["10.0.0.1", "50051", "tcp://10.0.0.1:50051", "tcp"] {
                assert!(!is_service_link(&name, value), "{name}={value}");
            }
        }
    }

    #[test]
    fn the_schema_has_every_key_with_a_description_and_its_kind() {
        let fields = serde_json::to_value(Config::default()).unwrap();
        let fields: Vec<&String> = fields.as_object().unwrap().keys().collect();
        let names: Vec<&String> = keys().iter().map(|k| &k.name).collect();
        assert_eq!(names, fields);
        for key in keys() {
            assert!(
                key.description.len() > 10,
                "{} has no description",
                key.name
            );
        }
        let kind = |name: &str| key(name).unwrap().kind.clone();
        assert_eq!(
            kind("split_mode"),
            ValueKind::Choice(vec!["none".into(), "layer".into(), "row".into()])
        );
        assert_eq!(kind("offline"), ValueKind::Bool);
        assert_eq!(kind("tensor_split"), ValueKind::List);
        assert_eq!(kind("vulkan_devices"), ValueKind::List);
        assert_eq!(kind("n_gpu_layers"), ValueKind::Scalar);
        assert_eq!(kind("hf_cache"), ValueKind::Scalar);
        assert_eq!(key("hf_cache").unwrap().default_text(), None);
        assert_eq!(key("n_ctx").unwrap().default_text().unwrap(), "8192");
        assert_eq!(key("n_ctx").unwrap().env(), "INTERNVL_N_CTX");
        assert_eq!(key("n_ctx").unwrap().flag(), "n-ctx");
    }

    #[test]
    fn the_printed_defaults_load_as_the_defaults() {
        let printed = defaults_toml();
        for key in keys() {
            assert!(printed.contains(&key.name), "{} is not printed", key.name);
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("defaults.toml");
        std::fs::write(&file, &printed).unwrap();
        let loaded = Config::load_with_env(Some(&file), &[], no_env());
        assert_eq!(loaded.unwrap(), Config::default());
    }

    /// The README's table is made by `internvl-grpc config --print --markdown`.
    #[test]
    fn the_readme_table_is_the_schemas() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
                .unwrap();
        let start = "<!-- config-table: made by `internvl-grpc config --print --markdown` -->\n";
        let at = readme.find(start).expect("README has the table's marker") + start.len();
        let end = readme[at..]
            .find("<!-- /config-table -->")
            .expect("end marker")
            + at;
        assert!(
            readme[at..end] == markdown_table(),
            "README.md's configuration table differs from the schema: replace it with \
             the output of `cargo run -- config --print --markdown`"
        );
    }

    #[test]
    fn flags_read_values_as_the_environment_does() {
        let c = Config::load_with_env(
            None,
            &set(&[
                ("tensor_split", "3,1"),
                ("vulkan_devices", "0"),
                ("flash_attn", "off"),
                ("n_gpu_layers", "-1"),
                ("offline", "true"),
                ("api_keys", "a,b"),
            ]),
            no_env(),
        )
        .unwrap();
        assert_eq!(c.tensor_split, vec![3.0, 1.0]);
        assert_eq!(c.vulkan_devices, vec![0]);
        assert_eq!(c.flash_attn, FlashAttn::Off);
        assert_eq!(c.n_gpu_layers, -1);
        assert!(c.offline);
        assert_eq!(c.api_keys, ["a", "b"]);
        let err = Config::load_with_env(None, &set(&[("n_ctxx", "1")]), no_env()).unwrap_err();
        assert!(err.to_string().contains("n_ctxx"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_under_its_own_key() {
        let keys_of = |c: Config| -> Vec<&'static str> {
            match c.validate() {
                Err(ConfigError::Invalid(problems)) => problems.iter().map(|p| p.key).collect(),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            keys_of(Config {
                stream_buffer: 0,
                ..Config::default()
            }),
            ["stream_buffer"]
        );
        let all_wrong = Config {
            n_batch: 0,
            tensor_split: vec![f32::NAN],
            rpc_servers: vec!["nohost".into()],
            devices: vec![" ".into()],
            drain_grace_secs: -1.0,
            tls_key: Some("k.pem".into()),
            tls_client_ca: Some("ca.pem".into()),
            api_keys: vec![String::new()],
            max_deadline_secs: 0.0,
            max_image_alloc_mb: 0,
            parallel: 65,
            prefill_chunk: 0,
            queue_depth: 0,
            stream_buffer: 0,
            ..Config::default()
        };
        let found = keys_of(all_wrong);
        assert_eq!(found.len(), 15, "{found:?}");
        for name in found {
            assert!(key(name).is_some(), "{name} is no key");
        }
        assert!(Config::default().validate().is_ok());
    }
}
