//! The engine thread: loads the model, then runs continuous batching.
//!
//! The context holds `parallel` sequences (slots). Each scheduler step
//! ([`Worker::step`]) delivers held events, checks every sequence for
//! cancellation, drain and deadline, feeds the vision encoder, then decodes
//! one batch carrying the next token of every generating slot plus a bounded
//! chunk of waiting prompts' text, then at most one chunk of image
//! embeddings and one chunk of an Embed input.
//!
//! One concern per file:
//! - `load.rs`: loading the model files;
//! - `admission.rs`: which waiting job enters which slot, and when;
//! - `slots.rs`: the slot table and each slot's phase;
//! - `prefix.rs`: reusing a running sequence's or the prefix cache's cells;
//! - `vision_feed.rs`: which tile the encoder gets next, decode threads;
//! - `prefill.rs`: a prompt's items still to decode, image chunks;
//! - `batch.rs`: the step's token batch;
//! - `generate.rs`, `embed.rs`: what a Generate or Embed sequence produces;
//! - `outbox.rs`: events a slow client has not taken yet.

mod admission;
mod batch;
mod embed;
mod generate;
mod load;
mod outbox;
mod prefill;
mod prefix;
mod slots;
mod vision_feed;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, watch};

use super::cache::{EmbeddingCache, PrefixCache};
use super::encoder::{EncodeResult, TileEncoder};
use super::error::EngineError;
use super::llama::{Context, Model};
use super::protocol::{EngineState, Job, Lifecycle};
use super::settings::EngineSettings;
use super::types::{FinishReason, ModelPaths};
use super::vision::TileHash;

use outbox::Outbox;
pub use slots::Phase as SlotPhase;
use slots::{Sequence, Slot};
use vision_feed::{awaited, DecodeThreads};

/// How long the loop sleeps when every slot waits on a slow client or on the
/// vision encoder.
const STALLED_POLL: Duration = Duration::from_millis(1);

/// Loads the model (announcing the outcome on `state`), then serves `jobs`
/// until every handle is gone and no work is left.
pub(super) fn run<F>(
    settings: EngineSettings,
    resolve: F,
    jobs: mpsc::Receiver<Job>,
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
    worker.serve(jobs);
    state.send_replace(EngineState::Stopped);
}

/// Everything the engine thread owns.
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
    waiting: Option<Job>,
    /// Finished sequences' cells, for prompts that start the same way.
    prefixes: PrefixCache,
    prefill_chunk: usize,
    /// Admission counter: a slot's stamp orders its prompt among the others.
    clock: u64,
    threads: DecodeThreads,
}

/// Why a request must stop now, if it must: checked before every step. A
/// client that left wins over a drain, and a drain over a deadline.
fn interruption(
    aborting: bool,
    client_gone: bool,
    deadline: Option<Instant>,
    completed: u32,
) -> Result<(), EngineError> {
    if client_gone {
        Err(EngineError::ClientGone)
    } else if aborting {
        Err(EngineError::ShuttingDown)
    } else if deadline.is_some_and(|d| Instant::now() >= d) {
        Err(EngineError::DeadlineExceeded { completed })
    } else {
        Ok(())
    }
}

/// Milliseconds since `since`.
fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl Worker {
    fn busy(&self) -> bool {
        self.waiting.is_some()
            || !self.outboxes.is_empty()
            || self.slots.iter().any(|s| s.sequence.is_some())
    }

    /// The scheduler loop; returns once every handle is gone and no work is left.
    fn serve(&mut self, mut jobs: mpsc::Receiver<Job>) {
        let mut open = true;
        loop {
            if !self.busy() {
                if !open {
                    return;
                }
                match jobs.blocking_recv() {
                    Some(job) => self.waiting = Some(job),
                    None => return,
                }
            }
            let mut next = || {
                if !open {
                    return None;
                }
                match jobs.try_recv() {
                    Ok(job) => Some(job),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        None
                    }
                }
            };
            let mut waiting = self.waiting.take();
            admission::admit_in_order(&mut waiting, &mut next, |job| self.admit(job));
            self.waiting = waiting;
            // Before this step streams anything, so a client that has its
            // first token sees its sequence counted.
            self.publish_phases();
            if !self.step() && self.busy() {
                std::thread::sleep(STALLED_POLL);
            }
        }
    }

    /// One scheduler step; false when nothing could move.
    fn step(&mut self) -> bool {
        let mut progress = false;
        self.outboxes.retain_mut(|out| {
            let before = out.pending.len();
            // Dropping a delivered (or abandoned) outbox ends its request.
            let keep = out.flush().is_ok() && !out.is_empty();
            progress |= !keep || out.pending.len() != before;
            keep
        });
        progress |= self.collect_encoded();
        self.feed_encoder();
        if let Some(threads) = self.threads.for_encoder_idle(self.encoder.is_idle()) {
            self.context.set_threads(threads);
        }
        for index in 0..self.slots.len() {
            if let Err(e) = self.deliver_and_check(index) {
                self.finish(index, Err(e));
                progress = true;
            }
        }
        progress |= self.decode_tokens();
        progress |= self.decode_image_chunk();
        progress |= self.decode_embed_chunk();
        progress
    }

    /// Hands a running stream's held events to its client, then checks for
    /// cancellation, drain and deadline.
    fn deliver_and_check(&mut self, index: usize) -> Result<(), EngineError> {
        let aborting = self.lifecycle.aborting();
        match &mut self.slots[index].sequence {
            None => Ok(()),
            Some(Sequence::Generate(g)) => {
                g.out.flush()?;
                interruption(aborting, false, g.request.deadline, g.completion)
            }
            Some(Sequence::Embed(e)) => {
                interruption(aborting, e.job.reply.is_closed(), e.job.deadline, 0)
            }
        }
    }

    /// The one way a sequence ends: slot `index`'s request gets `outcome`
    /// (its stream a `Done` or an error, its Embed caller the vectors or an
    /// error), and the slot's cells move to the prefix cache.
    fn finish(&mut self, index: usize, outcome: Result<FinishReason, EngineError>) {
        let slot = &mut self.slots[index];
        let Some(sequence) = slot.sequence.take() else {
            return;
        };
        self.lifecycle.record_service_time(slot.admitted.elapsed());
        // A tile decoded in part is not a reusable prefix.
        if slot.partial > 0 {
            let keep = slot.kv.positions();
            slot.partial = 0;
            if !self.context.remove_from(slot.seq, keep) {
                self.clear_slot(index);
            }
        }
        self.publish_phases();
        // A tile encoded for this request alone is not needed any more.
        if !self.encoded.is_empty() {
            let slots = &self.slots;
            self.encoded.retain(|hash, _| awaited(slots, hash));
        }
        // A failed decode leaves the sequence in an unknown state; anything
        // else is a prefix worth keeping, out of the pool.
        let keep = matches!(sequence, Sequence::Generate(_))
            && !matches!(outcome, Err(EngineError::Inference(_)));
        self.save_prefix(index, keep);
        match sequence {
            Sequence::Generate(g) => {
                let out = generate::close(*g, outcome);
                self.linger(out);
            }
            Sequence::Embed(e) => embed::close(*e, outcome),
        }
    }

    /// Keeps an ended stream's undelivered events until its client takes
    /// them; the request counts as in flight until its outbox is dropped.
    fn linger(&mut self, mut out: Outbox) {
        if out.flush().is_ok() && !out.is_empty() {
            self.outboxes.push(out);
        }
    }

    /// Tells handles, logs and metrics how many slots are in each phase.
    fn publish_phases(&self) {
        let counts = slots::phase_counts(&self.slots, |hash| self.tile_available(hash));
        if counts != self.lifecycle.phases() {
            tracing::debug!(
                ?counts,
                "slot phases (Idle, Prefilling, AwaitingTile, Generating, HeldByClient, Embedding)"
            );
        }
        self.lifecycle.set_phases(counts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gone_client_outranks_a_drain_and_a_drain_a_deadline() {
        let past = Some(Instant::now() - Duration::from_secs(1));
        assert!(matches!(
            interruption(true, true, past, 3),
            Err(EngineError::ClientGone)
        ));
        assert!(matches!(
            interruption(true, false, past, 3),
            Err(EngineError::ShuttingDown)
        ));
        assert!(matches!(
            interruption(false, false, past, 3),
            Err(EngineError::DeadlineExceeded { completed: 3 })
        ));
    }

    #[test]
    fn a_future_or_absent_deadline_lets_a_request_run() {
        let future = Some(Instant::now() + Duration::from_secs(60));
        assert!(interruption(false, false, future, 0).is_ok());
        assert!(interruption(false, false, None, 0).is_ok());
    }
}
