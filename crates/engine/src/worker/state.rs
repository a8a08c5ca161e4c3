//! What the engine thread owns: the model, the KV pool (context, what each
//! slot's cells hold, the prefix cache), the slots' sequences, the vision
//! pipeline (encoder, finished tiles, image cache) and the job waiting for
//! room. Every step of the loop
//! (`mod.rs`) and of the files beside it is a method on [`Worker`].

use std::sync::Arc;

use super::admission::Queue;
use super::kv_pool::KvPool;
use super::outbox::Outbox;
use super::slots::Slot;
use super::threads::DecodeThreads;
use super::vision_feed::VisionPipeline;
use crate::llama::{Context, Model};
use crate::protocol::{Job, Lifecycle};

/// Everything the engine thread owns.
pub(super) struct Worker {
    pub(super) model: Arc<Model>,
    /// The context's memory and what each slot's cells hold.
    pub(super) pool: KvPool<Context>,
    /// The encoder, the tiles it finished, the image cache.
    pub(super) vision: VisionPipeline,
    pub(super) lifecycle: Arc<Lifecycle>,
    pub(super) slots: Vec<Slot>,
    /// Streams whose sequence is over but whose client has not taken every event.
    pub(super) outboxes: Vec<Outbox>,
    /// The job taken from the channel that waits for a slot or for KV
    /// room, and the admission clock.
    pub(super) queue: Queue<Job>,
    pub(super) prefill_chunk: usize,
    /// See [`internvl_core::settings::EngineSettings::jump_forward`].
    pub(super) jump_forward: bool,
    pub(super) threads: DecodeThreads,
}
