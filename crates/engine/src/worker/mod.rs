//! The engine thread: loads the model, then runs continuous batching.
//!
//! The context holds `parallel` sequences (slots). Each scheduler step
//! ([`Worker::step`]) delivers held events, checks every sequence for
//! cancellation, drain and deadline, feeds the vision encoder, then decodes
//! one batch carrying the next token of every generating slot plus a bounded
//! chunk of waiting prompts' text, then at most one chunk of image
//! embeddings and one chunk of an Embed input.
//!
//! One concern per file. What a slot holds, knowing nothing of the worker:
//! - `slots.rs`: the slot table and each slot's phase;
//! - `prefill.rs`: a prompt's items still to decode;
//! - `generate.rs`, `embed.rs`: what a Generate or Embed sequence produces;
//! - `outbox.rs`: events a slow client has not taken yet;
//! - `threads.rs`: decode threads beside the encoder;
//! - `clock.rs`: deadlines, cancellation, durations.
//!
//! What the worker (`state.rs`) does, each file adding its methods:
//! - `load.rs`: loading the model files;
//! - `admission.rs`: which waiting job enters which slot, and when;
//! - `prefix.rs`: reusing a running sequence's or the prefix cache's cells;
//! - `vision_feed.rs`: the vision pipeline (encoder, finished tiles, image
//!   cache, unit-tested with a stand-in encoder) and which tile it gets next;
//! - `batch.rs`: the step's token batch, and sampling its outputs;
//! - `image_chunk.rs`: a chunk of image embeddings;
//! - `embed_chunk.rs`: a chunk of an Embed request.

mod admission;
mod batch;
mod clock;
mod embed;
mod embed_chunk;
mod generate;
mod image_chunk;
mod kv_pool;
mod load;
mod outbox;
mod prefill;
mod prefix;
mod slots;
mod state;
mod threads;
mod vision_feed;

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, watch};

use super::llama;
use super::protocol::{EngineState, Job, Lifecycle};
use internvl_core::error::EngineError;
use internvl_core::settings::EngineSettings;
use internvl_core::types::{FinishReason, ModelPaths};

use clock::interruption;
use outbox::Outbox;
pub use slots::Phase as SlotPhase;
use slots::Sequence;
use state::Worker;
use vision_feed::awaited;

/// Longest wait when every slot waits on a slow client or on the vision
/// encoder: the doorbell (`protocol::Doorbell`) ends it sooner, and a
/// deadline ends it on time; this bound only limits what a wake-up that
/// nothing rang (a missed event) could cost.
const STALLED_WAIT: Duration = Duration::from_millis(100);

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
    let state = Arc::new(state);
    fault_on_ggml_abort(&state, settings.model.rpc_servers.clone());
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
    let mut jobs = jobs;
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.serve(&mut jobs)));
    match served {
        Ok(()) => {
            state.send_replace(EngineState::Stopped);
        }
        Err(panic) => {
            let why = panic_text(panic.as_ref());
            tracing::error!("the engine thread failed: {why}");
            // Handles refuse new work from here on; then every caller still
            // waiting hears why.
            state.send_replace(EngineState::Faulted(Arc::new(EngineError::Fault(
                why.clone(),
            ))));
            worker.fail_everything(&why, &mut jobs);
        }
    }
}

/// An engine to fault when ggml aborts, and its RPC servers (to say which
/// one is gone).
struct AbortSink {
    state: Weak<watch::Sender<EngineState>>,
    rpc_servers: Vec<String>,
}

/// Every engine in this process (one, but for tests).
static ABORT_SINKS: Mutex<Vec<AbortSink>> = Mutex::new(Vec::new());

/// Makes a ggml abort fault this engine, instead of ending the process
/// with SIGABRT and every client's stream with a reset connection: ggml's
/// asserts (a Vulkan device lost, an RPC server gone) then reach each caller
/// as INTERNAL with ggml's reason, health turns NOT_SERVING, and the server
/// exits on its own terms (`lib.rs`).
fn fault_on_ggml_abort(state: &Arc<watch::Sender<EngineState>>, rpc_servers: Vec<String>) {
    let mut sinks = ABORT_SINKS.lock().unwrap_or_else(|e| e.into_inner());
    sinks.retain(|sink| sink.state.strong_count() > 0);
    sinks.push(AbortSink {
        state: Arc::downgrade(state),
        rpc_servers,
    });
    llama::devices::on_abort(|message| {
        let sinks = ABORT_SINKS.lock().unwrap_or_else(|e| e.into_inner());
        for sink in sinks.iter() {
            if let Some(state) = sink.state.upgrade() {
                let why = with_lost_devices(message, &sink.rpc_servers);
                tracing::error!("the engine failed: {why}");
                state.send_replace(EngineState::Faulted(Arc::new(EngineError::Fault(why))));
            }
        }
    });
}

/// How long to wait before probing the endpoints a second time when the
/// first probe found every one alive.
const SECOND_PROBE_AFTER: Duration = Duration::from_millis(500);

/// ggml's abort `message`, and which of `rpc_servers` no longer answers
/// (ggml's own message does not say). Asks ggml only for names: a memory
/// query would wait on the very connection that failed.
///
/// A killed rpc-server's connection can close before its listening socket
/// does, and a probe in between finds it alive: one run in fourteen of the
/// rpc test on a loaded machine, where a second probe 100 ms later found it
/// gone. So a second probe follows a moment later, and no more: a live
/// rpc-server serves one client (us) and leaves probes in an accept queue
/// of two, so a third probe would wait out its timeout and call it lost.
fn with_lost_devices(message: &str, rpc_servers: &[String]) -> String {
    let devices = llama::devices::names();
    let probe = || -> Vec<&String> {
        rpc_servers
            .iter()
            .filter(|endpoint| llama::devices::check_reachable(endpoint).is_err())
            .collect()
    };
    let mut gone = probe();
    if gone.is_empty() && !rpc_servers.is_empty() {
        std::thread::sleep(SECOND_PROBE_AFTER);
        gone = probe();
    }
    let lost: Vec<String> = gone
        .into_iter()
        .map(|endpoint| {
            let names: Vec<&str> = devices
                .iter()
                .filter(|(_, description)| *description == *endpoint)
                .map(|(name, _)| name.as_str())
                .collect();
            format!("device {} at {endpoint}", names.join("+"))
        })
        .collect();
    let message = message.trim();
    if lost.is_empty() {
        format!("ggml: {message}")
    } else {
        format!("ggml: {message}; RPC {} no longer answers", lost.join(", "))
    }
}

/// A panic's message, as `std` prints it.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl Worker {
    fn busy(&self) -> bool {
        self.queue.head().is_some()
            || !self.outboxes.is_empty()
            || self.slots.iter().any(|s| s.sequence.is_some())
    }

    /// After the loop panicked: every running sequence, every lingering
    /// stream and every queued job gets [`EngineError::Fault`] where its
    /// channel has room (a stream whose client is behind ends without it,
    /// and its handler reports the missing end). Touches no llama.cpp state.
    fn fail_everything(&mut self, why: &str, jobs: &mut mpsc::Receiver<Job>) {
        let fault = || EngineError::Fault(why.to_string());
        for slot in &mut self.slots {
            match slot.sequence.take() {
                Some(Sequence::Generate(mut g)) => {
                    // In the place the stream kept for its end, so a client
                    // that is behind hears it too.
                    g.out.end_with(fault());
                }
                Some(Sequence::Embed(e)) => {
                    let _ = e.job.reply.send(Err(fault()));
                }
                None => {}
            }
        }
        // Streams already over hand over what their channel takes.
        for mut out in self.outboxes.drain(..) {
            let _ = out.flush();
        }
        jobs.close();
        let mut queued: Vec<Job> = self.queue.take_head().into_iter().collect();
        while let Ok(job) = jobs.try_recv() {
            queued.push(job);
        }
        for job in queued {
            match job {
                // A queued stream's channel is empty: the error fits.
                Job::Generate(g) => {
                    let _ = g.events.try_send(Err(fault()));
                }
                Job::Embed(e) => {
                    let _ = e.reply.send(Err(fault()));
                }
            }
        }
    }

    /// The scheduler loop; returns once every handle is gone and no work is left.
    fn serve(&mut self, jobs: &mut mpsc::Receiver<Job>) {
        let mut open = true;
        loop {
            if !self.busy() {
                if !open {
                    return;
                }
                match jobs.blocking_recv() {
                    Some(job) => self.queue.receive(job),
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
            // Out of `self` while `admit` borrows the rest of it.
            let mut queue = std::mem::take(&mut self.queue);
            queue.admit(&mut next, |job, stamp| self.admit(job, stamp));
            self.queue = queue;
            // Before this step streams anything, so a client that has its
            // first token sees its sequence counted.
            self.publish_phases();
            if !self.step() && self.busy() {
                let wait = self.next_deadline().map_or(STALLED_WAIT, |d| {
                    d.saturating_duration_since(Instant::now())
                        .min(STALLED_WAIT)
                });
                self.lifecycle.bell.wait(wait);
            }
        }
    }

    /// The earliest deadline of a running or waiting request.
    fn next_deadline(&self) -> Option<Instant> {
        let running = self.slots.iter().filter_map(|s| match &s.sequence {
            Some(Sequence::Generate(g)) => g.request.deadline,
            Some(Sequence::Embed(e)) => e.job.deadline,
            None => None,
        });
        let waiting = match self.queue.head() {
            Some(Job::Generate(g)) => g.request.deadline,
            Some(Job::Embed(e)) => e.deadline,
            None => None,
        };
        running.chain(waiting).min()
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
        if let Some(threads) = self.threads.for_encoder_idle(self.vision.is_idle()) {
            self.pool.memory_mut().set_threads(threads);
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
        self.pool.drop_partial(index);
        self.publish_phases();
        // A tile encoded for this request alone is not needed any more.
        let slots = &self.slots;
        self.vision.forget_unawaited(|hash| awaited(slots, hash));
        // A failed decode leaves the sequence in an unknown state; anything
        // else is a prefix worth keeping, out of the pool.
        let keep = matches!(sequence, Sequence::Generate(_))
            && !matches!(outcome, Err(EngineError::Inference(_)));
        self.pool.save(index, keep);
        match sequence {
            Sequence::Generate(g) => {
                let out = generate::close(*g, outcome);
                self.linger(out);
            }
            Sequence::Embed(e) => embed::close(*e, outcome),
        }
    }

    /// Keeps an ended stream's undelivered events until its client takes
    /// them; the request counts as in flight until its last event is handed over.
    fn linger(&mut self, mut out: Outbox) {
        if out.flush().is_ok() && !out.is_empty() {
            self.outboxes.push(out);
        }
    }

    /// Tells handles, logs and metrics how many slots are in each phase,
    /// and the handles how soon a place in flight may free (their retry hint).
    fn publish_phases(&self) {
        let running = self.slots.iter().filter_map(slots::Slot::progress);
        self.lifecycle
            .set_next_free(slots::next_free(running, self.lifecycle.typical_service()));
        let counts = slots::phase_counts(&self.slots, |hash| self.vision.available(hash));
        if counts != self.lifecycle.phases() {
            tracing::debug!(
                ?counts,
                "slot phases (Idle, Prefilling, AwaitingTile, Generating, HeldByClient, Embedding)"
            );
        }
        self.lifecycle.set_phases(counts);
    }
}
