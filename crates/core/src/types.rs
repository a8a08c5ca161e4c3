//! The engine's domain types: what callers hand in and what they get back.
//! No transport types and no llama.cpp types here.

use std::path::PathBuf;
use std::time::Instant;

use super::constraint::ResponseFormat;
use super::placement::Placement;
use super::prompt::{ChatMessage, ImageGrid, Part};
use super::sampling::SamplingParams;
use super::vision::TileSpec;

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
    /// Where the model runs, in one line ([`Placement::summary`]).
    pub offload: String,
    /// Where the model runs, as llama.cpp reported it while loading.
    pub placement: Placement,
    /// Sequences decoded together.
    pub parallel: u32,
    /// The CPU instruction sets llama.cpp's kernels use, and what this CPU
    /// has beyond them.
    pub cpu_kernels: String,
}

/// Whose cached work a request may reuse: KV cells and tile encodings are
/// shared only between requests of one partition (the service derives it
/// from the caller's API key and `cache_salt`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CachePartition(pub [u8; 32]);

/// A validated Generate call.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Most tokens to generate (> 0); [`UNTIL_CONTEXT_FULL`] = as many as
    /// the request's share of the context holds after the prompt.
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
    /// What the reply's text must be; `None` = free text.
    pub response_format: Option<ResponseFormat>,
    /// Whose cached prefixes and images it may reuse.
    pub partition: CachePartition,
}

/// `max_new_tokens` meaning "until the context is full" (the OpenAI API's
/// absent `max_tokens`): up to an equal share of the context (`n_ctx /
/// parallel`) when the prompt fits in one, else up to the whole context.
pub const UNTIL_CONTEXT_FULL: u32 = u32::MAX;

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
    /// Completion tokens the format forced, decoded without a step of their
    /// own (jump-forward).
    pub forced_tokens: u32,
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
    /// Computing `response_format` masks (part of `decode_ms`).
    pub constraint_ms: f64,
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
    /// The caller's id for this request, for logs.
    pub request_id: String,
    /// Whose cached image encodings it may reuse.
    pub partition: CachePartition,
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
