//! The gRPC transport: thin tonic handlers over the [`Front`] (deadlines
//! from `grpc-timeout`, proto conversion, statuses). No llama.cpp types here.

pub mod auth;
mod convert;
pub mod deadline;
mod error;

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::engine::{EngineError, GenerateEvent};
use crate::front::trace::span_for;
use crate::front::Front;
use crate::metrics::Metrics;
pub use error::status;

// The contract (proto, codec, validation) is the `internvl-api` crate's.
pub use internvl_api::{codec, proto, validation};

use proto::intern_vl_server::InternVl;

/// The span of a call to `method`, with the trace id of its `traceparent`
/// metadata when that is well-formed.
fn request_span(method: &'static str, metadata: &tonic::metadata::MetadataMap) -> Span {
    span_for(
        method,
        metadata.get("traceparent").and_then(|v| v.to_str().ok()),
    )
}

/// The `internvl.v1.InternVL` service: the [`Front`] over gRPC.
#[derive(Clone)]
pub struct InternVlService {
    front: Front,
    metrics: Arc<Metrics>,
}

impl InternVlService {
    /// The service of `front`, recording into `metrics`.
    pub fn new(front: Front, metrics: Arc<Metrics>) -> Self {
        Self { front, metrics }
    }

    /// Counts the outcome of a call and records it on the call's span.
    fn counted<T>(
        &self,
        span: &Span,
        method: &str,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics.request(method, code);
        span.record("outcome", format!("{code:?}"));
        result
    }

    /// What every call does before its response begins, inside its `span`:
    /// its deadline from the call's arrival and `grpc-timeout`, then `work`
    /// (validation and the engine's part) within that deadline.
    async fn prepare<M, T, Fut>(
        &self,
        span: &Span,
        request: Request<M>,
        work: impl FnOnce(M, Option<Instant>) -> Fut,
    ) -> Result<T, Status>
    where
        Fut: Future<Output = Result<T, Status>>,
    {
        let deadline = deadline::of(
            request.metadata(),
            request.extensions(),
            self.front.limits(),
        )
        .map_err(status)?;
        deadline::within(deadline, work(request.into_inner(), deadline))
            .instrument(span.clone())
            .await
    }

    /// A unary call: [`InternVlService::prepare`], the answer, its outcome counted.
    async fn unary<M, T, Fut>(
        &self,
        method: &'static str,
        request: Request<M>,
        work: impl FnOnce(M, Option<Instant>) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Fut: Future<Output = Result<T, Status>>,
    {
        let span = request_span(method, request.metadata());
        let result = self.prepare(&span, request, work).await.map(Response::new);
        self.counted(&span, method, result)
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<proto::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl InternVl for InternVlService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let span = request_span("Generate", request.metadata());
        let caller = auth::caller_of(&request);
        let started = self
            .prepare(&span, request, |message, deadline| async move {
                self.front
                    .start_generate(message, caller, deadline)
                    .await
                    .map_err(status)
            })
            .await;
        let events = match started {
            Ok(events) => events,
            Err(status) => return self.counted(&span, "Generate", Err(status)),
        };
        let metrics = self.metrics.clone();
        // Whether the stream carried its end (`Done` or an error).
        let ended = Arc::new(AtomicBool::new(false));
        let saw_end = ended.clone();
        // Dropping this stream (client gone) drops the receiver, which the
        // engine notices before its next decode step.
        let stream = events.map(move |event| {
            let event = event.map_err(status);
            match &event {
                Ok(GenerateEvent::Done { usage, timings, .. }) => {
                    saw_end.store(true, Ordering::Relaxed);
                    metrics.generation(usage, timings);
                    metrics.request("Generate", tonic::Code::Ok);
                    span.record("outcome", "Ok");
                    span.record("prompt_tokens", usage.prompt_tokens);
                    span.record("completion_tokens", usage.completion_tokens);
                }
                Err(status) => {
                    saw_end.store(true, Ordering::Relaxed);
                    metrics.request("Generate", status.code());
                    span.record("outcome", format!("{:?}", status.code()));
                }
                Ok(GenerateEvent::Delta { .. }) => {}
            }
            event.map(convert::response)
        });
        // A channel closed without an end means the engine died mid-reply:
        // the client gets INTERNAL, never an OK on a truncated reply.
        let metrics = self.metrics.clone();
        let missing_end = std::iter::from_fn(move || {
            (!ended.swap(true, Ordering::Relaxed)).then(|| {
                let status = status(EngineError::Fault(
                    "the reply stopped before its end".into(),
                ));
                metrics.request("Generate", status.code());
                Err(status)
            })
        });
        let stream = stream.chain(tokio_stream::iter(missing_end));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn embed(
        &self,
        request: Request<proto::EmbedRequest>,
    ) -> Result<Response<proto::EmbedResponse>, Status> {
        let caller = auth::caller_of(&request);
        self.unary("Embed", request, |message, deadline| async move {
            let embeddings = self.front.run_embed(message, caller, deadline).await;
            let embeddings = embeddings.map_err(status)?;
            Ok(convert::embed_response(embeddings))
        })
        .await
    }

    async fn count_tokens(
        &self,
        request: Request<proto::CountTokensRequest>,
    ) -> Result<Response<proto::CountTokensResponse>, Status> {
        self.unary("CountTokens", request, |message, _| async move {
            let count = self.front.count_tokens(message).await.map_err(status)?;
            Ok(convert::count_response(count))
        })
        .await
    }

    async fn tokenize(
        &self,
        request: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        self.unary("Tokenize", request, |message, _| async move {
            let ids = self.front.tokenize(message.text).await.map_err(status)?;
            Ok(proto::TokenizeResponse { ids })
        })
        .await
    }

    async fn get_model_info(
        &self,
        request: Request<proto::GetModelInfoRequest>,
    ) -> Result<Response<proto::ModelInfo>, Status> {
        self.unary("GetModelInfo", request, |_, _| async move {
            let info = self.front.engine().info().map_err(status)?;
            Ok(convert::model_info(
                info,
                self.front.schemes(),
                self.front.videos(),
            ))
        })
        .await
    }
}
