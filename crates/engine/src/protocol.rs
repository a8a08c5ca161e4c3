//! What passes between the [`Engine`](super::Engine) handle and the engine
//! thread: jobs in, stream events out, the engine's state, and the counters
//! both sides share (drain, in-flight jobs, busy slots).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::llama::Model;
use internvl_core::constraint::{Constraint, FormatCompiler};
use internvl_core::error::EngineError;
use internvl_core::media_budget::MediaHold;
use internvl_core::prompt::{ChatTemplate, Prompt, PromptBudget};
use internvl_core::types::{Embedding, GenerateEvent, GenerateRequest, ModelInfo, Pooling};
use internvl_core::vision::{DecodeLimits, TileSpec};

/// Stream events carry either an event or the error that ended the stream.
pub(crate) type EventResult = Result<GenerateEvent, EngineError>;

/// Where the engine is in its life.
#[derive(Clone)]
pub enum EngineState {
    /// Resolving and loading the model files.
    Loading,
    /// Serving.
    Ready(Arc<Loaded>),
    /// Loading failed; the message names the file.
    Failed(Arc<EngineError>),
    /// The engine thread failed while serving (a panic): nothing more will
    /// be answered, and the replica should restart.
    Faulted(Arc<EngineError>),
    /// The engine thread has ended.
    Stopped,
}

/// The read-only half of a loaded model, shared with request handlers.
pub struct Loaded {
    pub(crate) model: Arc<Model>,
    pub(crate) template: ChatTemplate,
    pub(crate) spec: TileSpec,
    pub(crate) limits: DecodeLimits,
    /// Tiles one request may have cut (`max_tiles_per_request`).
    pub(crate) max_tiles: u32,
    pub(crate) info: ModelInfo,
    pub(crate) image_context_token: i32,
    /// Compiles `response_format`s against this model's vocabulary (read
    /// when the first one arrives).
    pub(crate) formats: FormatCompiler,
}

impl Loaded {
    /// What one prompt may grow to: the request's tiles and the context.
    pub(crate) fn budget(&self) -> PromptBudget {
        PromptBudget {
            max_tiles: self.max_tiles,
            max_tokens: self.info.context_size,
        }
    }
}

/// A Generate call on its way to a slot.
pub(crate) struct GenerateJob {
    pub(crate) prompt: Prompt,
    pub(crate) request: GenerateRequest,
    /// When the call reached the engine handle (TTFT counts from here).
    pub(crate) arrived: Instant,
    /// When it was queued for a slot.
    pub(crate) enqueued: Instant,
    pub(crate) events: mpsc::Sender<EventResult>,
    pub(crate) in_flight: InFlight,
    /// The compiled `response_format`, if any.
    pub(crate) constraint: Option<Constraint>,
    /// The caller's span (the service's per-request span): the engine's log
    /// lines about this request are written inside it.
    pub(crate) span: tracing::Span,
    /// How long its client may take no event while events wait
    /// (`stream_stall_secs`).
    pub(crate) stall: Duration,
}

/// An Embed call on its way to a slot.
pub(crate) struct EmbedJob {
    pub(crate) prompts: Vec<Prompt>,
    pub(crate) pooling: Pooling,
    pub(crate) normalize: bool,
    pub(crate) deadline: Option<Instant>,
    pub(crate) reply: oneshot::Sender<Result<Vec<Embedding>, EngineError>>,
    /// Held until the reply is about to be sent (or the job dropped).
    pub(crate) _in_flight: InFlight,
    /// The caller's span, as [`GenerateJob::span`].
    pub(crate) span: tracing::Span,
}

/// A request from the moment the handle accepts it until it is over: queued
/// here as a job, then a sequence in a slot (`worker/slots.rs`).
pub(crate) enum Job {
    Generate(Box<GenerateJob>),
    Embed(EmbedJob),
}

/// One accepted request, counted in [`Lifecycle`]'s in-flight total until
/// this is dropped: when its job is refused, or its sequence is over and its
/// last event (or Embed reply) is about to be handed over. Dropping is the
/// one way a request stops counting, so no path can forget it.
pub(crate) struct InFlight {
    lifecycle: Arc<Lifecycle>,
    /// The request's share of `media_memory_mb`, given back with its place.
    pub(crate) media: MediaHold,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.lifecycle
            .in_flight
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A request's place in flight, taken before any of its work (fetching,
/// decoding, tiling, tokenizing), so that what the engine cannot take is
/// refused while it has cost nothing. Every call that does work takes one
/// ([`crate::Engine::admit`]); Generate and Embed hand it to their job.
pub struct Admission(pub(crate) InFlight);

impl Admission {
    /// The request's share of `media_memory_mb`: a video decoded before the
    /// engine takes its frames from it.
    pub fn media(&mut self) -> &mut MediaHold {
        &mut self.0.media
    }
}

/// Counts one more request in flight if fewer than `capacity` are; false
/// when the engine is full.
pub(crate) fn take_place(in_flight: &mut usize, capacity: usize) -> bool {
    let room = *in_flight < capacity;
    if room {
        *in_flight += 1;
    }
    room
}

/// Bounds of the retry hint sent with RESOURCE_EXHAUSTED.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Wakes the engine thread when it waits with nothing to do but wait: every
/// slot held by a slow client or by the vision encoder. Rung by whatever can
/// end that wait: a client taking an event or leaving, a finished tile, a
/// new job, a drain's cut. A ring before the wait is kept, so none is lost.
#[derive(Default)]
pub(crate) struct Doorbell {
    rung: Mutex<bool>,
    bell: Condvar,
}

impl Doorbell {
    pub(crate) fn ring(&self) {
        let mut rung = self.rung.lock().unwrap_or_else(|e| e.into_inner());
        *rung = true;
        self.bell.notify_one();
    }

    /// Waits until rung (since the last wait) or `timeout` has passed;
    /// whether it was rung.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let rung = self.rung.lock().unwrap_or_else(|e| e.into_inner());
        let (mut rung, _) = self
            .bell
            .wait_timeout_while(rung, timeout, |rung| !*rung)
            .unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *rung)
    }
}

/// Resolves once the engine has faulted, with why; never otherwise.
pub(crate) async fn faulted(mut state: watch::Receiver<EngineState>) -> EngineError {
    loop {
        if let EngineState::Faulted(e) = &*state.borrow_and_update() {
            return match e.as_ref() {
                EngineError::Fault(why) => EngineError::Fault(why.clone()),
                other => EngineError::Fault(other.to_string()),
            };
        }
        if state.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

type Faulted = Pin<Box<dyn std::future::Future<Output = EngineError> + Send>>;

/// A Generate call's events, ending with `Done` or an error. Taking an event
/// or dropping this (the client left) wakes the engine thread, which may be
/// waiting for exactly that. A fault ends it even when the engine thread
/// cannot: a ggml abort leaves that thread (or one it waits on) asleep.
pub struct GenerateEvents {
    events: mpsc::Receiver<EventResult>,
    bell: Arc<Doorbell>,
    fault: Faulted,
    ended: bool,
}

impl GenerateEvents {
    pub(crate) fn new(
        events: mpsc::Receiver<EventResult>,
        bell: Arc<Doorbell>,
        state: watch::Receiver<EngineState>,
    ) -> Self {
        Self {
            events,
            bell,
            fault: Box::pin(faulted(state)),
            ended: false,
        }
    }

    /// The next event; `None` once the stream is over.
    pub async fn recv(&mut self) -> Option<EventResult> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<EventResult>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let event = self.events.poll_recv(cx);
        if event.is_ready() {
            self.bell.ring();
            return event;
        }
        match self.fault.as_mut().poll(cx) {
            Poll::Ready(why) => {
                self.ended = true;
                Poll::Ready(Some(Err(why)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl tokio_stream::Stream for GenerateEvents {
    type Item = EventResult;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EventResult>> {
        self.get_mut().poll_event(cx)
    }
}

impl Drop for GenerateEvents {
    fn drop(&mut self) {
        self.events.close();
        self.bell.ring();
    }
}

/// Drain state shared by the handles and the engine thread.
pub(crate) struct Lifecycle {
    /// No new work is accepted.
    pub(crate) draining: AtomicBool,
    /// Work still running is cut at its next step.
    pub(crate) aborting: AtomicBool,
    /// Jobs accepted and not yet finished (queued or running).
    pub(crate) in_flight: watch::Sender<usize>,
    /// Moving average of how long a request holds a slot, in microseconds.
    service_us: AtomicU64,
    /// When the soonest running request is expected to end, in microseconds
    /// after `epoch` (0: nothing tells), as the engine thread last saw it.
    next_free_us: AtomicU64,
    epoch: Instant,
    /// Slots that run requests at once.
    parallel: u64,
    /// Requests in flight at most: slots plus queue.
    pub(crate) capacity: usize,
    /// Slots per phase (`worker::slots::Phase` order), published whenever
    /// one changes.
    phases: [AtomicUsize; PHASES],
    /// Wakes the engine thread from a stall.
    pub(crate) bell: Arc<Doorbell>,
}

/// Number of slot phases counted in [`Lifecycle`].
pub(crate) const PHASES: usize = 6;

impl Lifecycle {
    /// Shared state for `parallel` slots and `capacity` requests in flight.
    pub(crate) fn new(parallel: u32, capacity: usize) -> Self {
        Self {
            draining: AtomicBool::new(false),
            aborting: AtomicBool::new(false),
            in_flight: watch::Sender::new(0),
            service_us: AtomicU64::new(0),
            next_free_us: AtomicU64::new(0),
            epoch: Instant::now(),
            parallel: u64::from(parallel),
            capacity,
            phases: Default::default(),
            bell: Arc::default(),
        }
    }

    /// Counts a request in flight if there is room; its token stops counting
    /// it when dropped.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<InFlight> {
        self.in_flight
            .send_if_modified(|n| take_place(n, self.capacity))
            .then(|| InFlight {
                lifecycle: self.clone(),
                media: MediaHold::unbounded(),
            })
    }

    pub(crate) fn aborting(&self) -> bool {
        self.aborting.load(Ordering::Acquire)
    }

    /// Publishes how many slots are in each phase.
    pub(crate) fn set_phases(&self, counts: [usize; PHASES]) {
        for (slot, n) in self.phases.iter().zip(counts) {
            slot.store(n, Ordering::Relaxed);
        }
    }

    /// Slots per phase, as last published.
    pub(crate) fn phases(&self) -> [usize; PHASES] {
        std::array::from_fn(|i| self.phases[i].load(Ordering::Relaxed))
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

    /// How long requests have held a slot, on average; `None` before the first ends.
    pub(crate) fn typical_service(&self) -> Option<Duration> {
        match self.service_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Records how soon the engine thread expects a running request to end
    /// (`worker::slots::next_free`).
    pub(crate) fn set_next_free(&self, within: Option<Duration>) {
        let at = within.map_or(0, |d| {
            let at = self.epoch.elapsed() + d;
            (at.as_micros().min(u128::from(u64::MAX)) as u64).max(1)
        });
        self.next_free_us.store(at, Ordering::Relaxed);
    }

    /// About how long until a full queue moves by one: until the soonest
    /// running request is expected to end, or, where nothing tells, the
    /// average service time divided by the slots; bounded to a sane range.
    /// Clients wait what it says (OpenAI's SDKs exactly this long, then give
    /// up after two more refusals), so it errs late: half again and
    /// `RETRY_MIN` past the expected end. The estimate is the pace so far,
    /// and on a loaded machine the pace slows: in the SDK retry test, with
    /// two spinning processes on two cores, the holder's rest took about
    /// twice the first estimate (1.3 s for 0.64 s); later hints, made on
    /// the slower pace, caught up.
    pub(crate) fn retry_after(&self) -> Duration {
        let expected = match self.next_free_us.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_micros(at).saturating_sub(self.epoch.elapsed())),
        }
        .map(|d| d + d / 2 + RETRY_MIN);
        let hint = expected.unwrap_or_else(|| {
            Duration::from_micros(self.service_us.load(Ordering::Relaxed) / self.parallel.max(1))
        });
        hint.clamp(RETRY_MIN, RETRY_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_before_the_wait_is_not_lost() {
        let bell = Doorbell::default();
        bell.ring();
        let started = Instant::now();
        assert!(bell.wait(Duration::from_secs(5)));
        assert!(started.elapsed() < Duration::from_secs(1));
        // Taken by that wait: the next one times out.
        assert!(!bell.wait(Duration::from_millis(10)));
    }

    #[test]
    fn taking_an_event_or_leaving_rings() {
        let bell = Arc::new(Doorbell::default());
        let (tx, rx) = mpsc::channel(1);
        let (_state, watch) = watch::channel(EngineState::Loading);
        let mut events = GenerateEvents::new(rx, bell.clone(), watch);
        tx.try_send(Err(EngineError::Stopped)).unwrap();
        assert!(!bell.wait(Duration::ZERO), "sending alone does not ring");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(runtime.block_on(events.recv()).is_some());
        assert!(bell.wait(Duration::ZERO), "taking rang");
        drop(events);
        assert!(bell.wait(Duration::ZERO), "leaving rang");
        assert!(tx.is_closed());
    }

    #[test]
    fn a_fault_ends_a_stream_the_engine_thread_cannot_answer() {
        let bell = Arc::new(Doorbell::default());
        // The engine thread holds the sender and never sends again.
        let (_tx, rx) = mpsc::channel(1);
        let (state, watch) = watch::channel(EngineState::Loading);
        let mut events = GenerateEvents::new(rx, bell, watch);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let waiting = tokio::time::timeout(Duration::from_millis(50), events.recv()).await;
            assert!(waiting.is_err(), "nothing to say before the fault");
            state.send_replace(EngineState::Faulted(Arc::new(EngineError::Fault(
                "RPC1 (127.0.0.1:50053) does not answer".into(),
            ))));
            match events.recv().await {
                Some(Err(EngineError::Fault(why))) => assert!(why.contains("RPC1"), "{why}"),
                other => panic!("expected the fault, got {:?}", other.map(|r| r.is_ok())),
            }
            assert!(events.recv().await.is_none(), "and then the stream is over");
        });
    }

    #[test]
    fn places_are_taken_up_to_the_capacity() {
        let mut n = 0;
        assert!(take_place(&mut n, 2));
        assert!(take_place(&mut n, 2));
        assert!(!take_place(&mut n, 2));
        assert_eq!(n, 2);
    }

    #[test]
    fn a_dropped_token_frees_its_place() {
        let lifecycle = Arc::new(Lifecycle::new(1, 2));
        let a = lifecycle.admit().expect("room");
        let b = lifecycle.admit().expect("room");
        assert!(lifecycle.admit().is_none(), "full");
        drop(a);
        assert_eq!(*lifecycle.in_flight.borrow(), 1);
        assert!(lifecycle.admit().is_some());
        drop(b);
    }

    #[test]
    fn the_retry_hint_follows_service_time_within_bounds() {
        let lifecycle = Lifecycle::new(4, 8);
        assert_eq!(lifecycle.retry_after(), RETRY_MIN);
        lifecycle.record_service_time(Duration::from_secs(2));
        assert_eq!(lifecycle.retry_after(), Duration::from_millis(500));
        lifecycle.record_service_time(Duration::from_secs(3600));
        assert!(lifecycle.retry_after() <= RETRY_MAX);
    }

    #[test]
    fn the_retry_hint_is_the_expected_end_of_a_running_request_where_known() {
        let lifecycle = Lifecycle::new(4, 8);
        lifecycle.record_service_time(Duration::from_millis(40));
        lifecycle.set_next_free(Some(Duration::from_secs(5)));
        // 5 s, half again and RETRY_MIN.
        let hint = lifecycle.retry_after();
        assert!(
            hint > Duration::from_millis(7400) && hint <= Duration::from_millis(7550),
            "{hint:?}"
        );
        // Counted from when it was published, not from when it is read.
        std::thread::sleep(Duration::from_millis(200));
        assert!(lifecycle.retry_after() <= Duration::from_millis(7300));
        lifecycle.set_next_free(None);
        assert_eq!(
            lifecycle.retry_after(),
            RETRY_MIN,
            "40 ms / 4 slots, bounded"
        );
        lifecycle.set_next_free(Some(Duration::from_secs(3600)));
        assert_eq!(lifecycle.retry_after(), RETRY_MAX);
    }
}
