//! What the engine thread owns: the model, the context and its slots, the
//! encoder, the caches and the job waiting for room. Every step of the loop
//! (`mod.rs`) and of the files beside it is a method on [`Worker`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::outbox::Outbox;
use super::slots::Slot;
use super::threads::DecodeThreads;
use crate::encoder::{EncodeResult, TileEncoder};
use crate::llama::{Context, Model};
use crate::protocol::{Job, Lifecycle};
use internvl_core::cache::{EmbeddingCache, PrefixCache};
use internvl_core::vision::TileHash;

/// Everything the engine thread owns.
pub(super) struct Worker {
    pub(super) model: Arc<Model>,
    pub(super) context: Context,
    pub(super) encoder: TileEncoder,
    /// Tiles back from the encoder that a request has not taken yet.
    pub(super) encoded: HashMap<TileHash, (EncodeResult, Duration)>,
    pub(super) tokens_per_tile: usize,
    pub(super) lifecycle: Arc<Lifecycle>,
    pub(super) embeddings: EmbeddingCache,
    pub(super) slots: Vec<Slot>,
    /// Streams whose sequence is over but whose client has not taken every event.
    pub(super) outboxes: Vec<Outbox>,
    /// Taken from the channel, waiting for a slot or for KV room.
    pub(super) waiting: Option<Job>,
    /// Finished sequences' cells, for prompts that start the same way.
    pub(super) prefixes: PrefixCache,
    pub(super) prefill_chunk: usize,
    /// See [`internvl_core::settings::EngineSettings::jump_forward`].
    pub(super) jump_forward: bool,
    /// Admission counter: a slot's stamp orders its prompt among the others.
    pub(super) clock: u64,
    pub(super) threads: DecodeThreads,
}
