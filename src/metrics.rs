//! Prometheus metrics, served on their own HTTP port (`metrics_listen`).
//!
//! Recorded by the transport from what it already sees (statuses, and the
//! usage and timings of each finished generation), so the engine stays free
//! of metrics code.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::engine::{Engine, SlotPhase, Timings, Usage};

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    ttft: Histogram,
    inter_token: Histogram,
    prefill: Histogram,
    vision: Histogram,
    queue: Histogram,
    tokens_in: IntCounter,
    tokens_out: IntCounter,
    cached_tokens: IntCounter,
    cached_tiles: IntCounter,
    in_flight: IntGauge,
    active: IntGauge,
    slots: IntGaugeVec,
    queued: IntGauge,
}

fn seconds(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid histogram")
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid counter")
}

impl Default for Metrics {
    fn default() -> Self {
        let latency = prometheus::exponential_buckets(0.005, 2.0, 16).expect("valid buckets");
        let per_token = prometheus::exponential_buckets(0.000_5, 2.0, 14).expect("valid buckets");
        let metrics = Self {
            registry: Registry::new(),
            requests: IntCounterVec::new(
                Opts::new(
                    "internvl_requests_total",
                    "Calls by protocol (grpc, http), method and final status \
                     (gRPC's name; the HTTP API's statuses come from it)",
                ),
                &["protocol", "method", "code"],
            )
            .expect("valid counter"),
            ttft: seconds(
                "internvl_ttft_seconds",
                "Arrival to first generated token",
                latency.clone(),
            ),
            inter_token: seconds(
                "internvl_inter_token_seconds",
                "Mean time per generated token after the first",
                per_token,
            ),
            prefill: seconds(
                "internvl_prefill_seconds",
                "Prompt decoding time",
                latency.clone(),
            ),
            vision: seconds(
                "internvl_vision_seconds",
                "Vision encoder time",
                latency.clone(),
            ),
            queue: seconds(
                "internvl_queue_seconds",
                "Time waiting for the engine",
                latency,
            ),
            tokens_in: counter(
                "internvl_prompt_tokens_total",
                "Prompt positions of finished generations",
            ),
            tokens_out: counter("internvl_completion_tokens_total", "Generated tokens"),
            cached_tokens: counter(
                "internvl_cached_tokens_total",
                "Prompt positions reused from the KV cache",
            ),
            cached_tiles: counter(
                "internvl_cached_image_tiles_total",
                "Image tiles reused from the image cache",
            ),
            in_flight: IntGauge::new(
                "internvl_requests_in_flight",
                "Requests queued or running in the engine",
            )
            .expect("valid gauge"),
            active: IntGauge::new(
                "internvl_active_sequences",
                "Sequences being prefilled or decoded (continuous-batching slots in use)",
            )
            .expect("valid gauge"),
            slots: IntGaugeVec::new(
                Opts::new(
                    "internvl_slots",
                    "Sequence slots by phase (idle, prefilling, awaiting_tile, generating, held_by_client, embedding)",
                ),
                &["phase"],
            )
            .expect("valid gauge"),
            queued: IntGauge::new(
                "internvl_queue_depth",
                "Requests accepted and waiting for a slot (in flight minus active)",
            )
            .expect("valid gauge"),
        };
        let r = &metrics.registry;
        let register =
            |c: Box<dyn prometheus::core::Collector>| r.register(c).expect("unique metric names");
        register(Box::new(metrics.requests.clone()));
        register(Box::new(metrics.ttft.clone()));
        register(Box::new(metrics.inter_token.clone()));
        register(Box::new(metrics.prefill.clone()));
        register(Box::new(metrics.vision.clone()));
        register(Box::new(metrics.queue.clone()));
        register(Box::new(metrics.tokens_in.clone()));
        register(Box::new(metrics.tokens_out.clone()));
        register(Box::new(metrics.cached_tokens.clone()));
        register(Box::new(metrics.cached_tiles.clone()));
        register(Box::new(metrics.in_flight.clone()));
        register(Box::new(metrics.active.clone()));
        register(Box::new(metrics.slots.clone()));
        register(Box::new(metrics.queued.clone()));
        metrics
    }
}

impl Metrics {
    /// Counts one finished RPC.
    pub fn request(&self, method: &str, code: tonic::Code) {
        self.requests
            .with_label_values(&["grpc", method, &format!("{code:?}")])
            .inc();
    }

    /// Counts one finished call of the OpenAI-compatible HTTP API, under the
    /// gRPC status its answer was mapped from.
    pub fn http_request(&self, method: &str, code: tonic::Code) {
        self.requests
            .with_label_values(&["http", method, &format!("{code:?}")])
            .inc();
    }

    /// Records a finished generation.
    pub fn generation(&self, usage: &Usage, timings: &Timings) {
        self.ttft.observe(timings.ttft_ms / 1e3);
        self.prefill.observe(timings.prefill_ms / 1e3);
        self.vision.observe(timings.vision_ms / 1e3);
        self.queue.observe(timings.queue_ms / 1e3);
        if usage.completion_tokens > 1 {
            self.inter_token
                .observe(timings.decode_ms / 1e3 / f64::from(usage.completion_tokens - 1));
        }
        self.tokens_in.inc_by(u64::from(usage.prompt_tokens));
        self.tokens_out.inc_by(u64::from(usage.completion_tokens));
        self.cached_tokens.inc_by(u64::from(usage.cached_tokens));
        self.cached_tiles
            .inc_by(u64::from(usage.cached_image_tiles));
    }

    /// The text exposition format.
    pub fn render(&self, in_flight: usize, phases: &[(SlotPhase, usize)]) -> String {
        let active_sequences: usize = phases
            .iter()
            .filter(|(phase, _)| *phase != SlotPhase::Idle)
            .map(|(_, n)| n)
            .sum();
        for (phase, n) in phases {
            self.slots.with_label_values(&[phase.name()]).set(*n as i64);
        }
        self.in_flight.set(in_flight as i64);
        self.active.set(active_sequences as i64);
        // Both are read without a lock, so a slot filling between the reads
        // could make the difference negative for an instant.
        self.queued
            .set(in_flight.saturating_sub(active_sequences) as i64);
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!("metrics encoding failed: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serves `GET /metrics` (any path answers the same) until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, engine: Engine) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("metrics accept failed: {e}");
                continue;
            }
        };
        let (metrics, engine) = (metrics.clone(), engine.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |_request: Request<hyper::body::Incoming>| {
                    let body = metrics.render(engine.in_flight(), &engine.slot_phases());
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(body)))
                                .expect("valid response"),
                        )
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}
