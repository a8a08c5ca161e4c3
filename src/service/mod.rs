//! The gRPC transport: thin tonic handlers that validate, call the engine and
//! convert. No llama.cpp types here.

pub mod auth;
mod convert;
pub mod deadline;
mod error;
pub mod trace;

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::engine::{Embedding, Engine, EngineError, GenerateEvent, GenerateEvents};
use crate::media::Fetcher;
use crate::metrics::Metrics;
use crate::video::VideoDecoder;
use auth::Caller;
pub use error::{code, retry_after_ms, status};

// The contract (proto, codec, validation) is the `internvl-api` crate's.
pub use internvl_api::{codec, proto, validation};

use proto::intern_vl_server::InternVl;

/// The `internvl.v1.InternVL` service.
#[derive(Clone)]
pub struct InternVlService {
    engine: Engine,
    limits: validation::Limits,
    metrics: Arc<Metrics>,
    media: Arc<Fetcher>,
    videos: Arc<VideoDecoder>,
}

impl InternVlService {
    /// A service answering from `engine` within `limits`, recording into
    /// `metrics`, fetching media URLs with `media` and decoding video files
    /// with `videos`.
    pub fn new(
        engine: Engine,
        limits: validation::Limits,
        metrics: Arc<Metrics>,
        media: Arc<Fetcher>,
        videos: Arc<VideoDecoder>,
    ) -> Self {
        Self {
            engine,
            limits,
            metrics,
            media,
            videos,
        }
    }

    /// The per-request limits this service checks.
    pub(crate) fn limits(&self) -> &validation::Limits {
        &self.limits
    }

    /// A Generate request from its proto form to the engine's events: its
    /// counts bounded, a place in flight taken, media URLs fetched,
    /// validated, video files decoded, queued. Every transport (gRPC here,
    /// the OpenAI-compatible HTTP API) starts a generation here, so they
    /// refuse and answer alike.
    pub(crate) async fn start_generate(
        &self,
        mut message: proto::GenerateRequest,
        caller: Caller,
        deadline: Option<Instant>,
    ) -> Result<GenerateEvents, EngineError> {
        validation::bound_messages(&message.messages, &self.limits)?;
        let mut admitted = self.engine.admit()?;
        let fetched = self.media.messages(&mut message.messages).await?;
        let relabel = |e| fetched.relabel(self.engine.hinted(e));
        let cache_salt = message.cache_salt.clone();
        let mut request = validation::generate(message, &self.limits).map_err(relabel)?;
        Span::current().record("request_id", request.request_id.as_str());
        let videos = self
            .videos
            .messages(&mut request.messages, admitted.media())
            .await;
        videos.map_err(relabel)?;
        request.deadline = deadline;
        request.partition = caller.partition(&cache_salt);
        self.engine
            .generate(request, admitted)
            .await
            .map_err(relabel)
    }

    /// [`InternVlService::start_generate`] for Embed: the embeddings.
    pub(crate) async fn run_embed(
        &self,
        mut message: proto::EmbedRequest,
        caller: Caller,
        deadline: Option<Instant>,
    ) -> Result<Vec<Embedding>, EngineError> {
        validation::bound_embed(&message.inputs, &self.limits)?;
        let mut admitted = self.engine.admit()?;
        let fetched = self.media.embed_inputs(&mut message.inputs).await?;
        let relabel = |e| fetched.relabel(self.engine.hinted(e));
        let cache_salt = message.cache_salt.clone();
        let mut request = validation::embed(message, &self.limits).map_err(relabel)?;
        Span::current().record("request_id", request.request_id.as_str());
        let videos = self
            .videos
            .embed_inputs(&mut request.inputs, admitted.media())
            .await;
        videos.map_err(relabel)?;
        request.deadline = deadline;
        request.partition = caller.partition(&cache_salt);
        self.engine.embed(request, admitted).await.map_err(relabel)
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
        let deadline =
            deadline::of(request.metadata(), request.extensions(), &self.limits).map_err(status)?;
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
        let span = trace::request_span(method, request.metadata());
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
        let span = trace::request_span("Generate", request.metadata());
        let caller = auth::caller_of(&request);
        let started = self
            .prepare(&span, request, |message, deadline| async move {
                self.start_generate(message, caller, deadline)
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
            let embeddings = self.run_embed(message, caller, deadline).await;
            let embeddings = embeddings.map_err(status)?;
            Ok(convert::embed_response(embeddings))
        })
        .await
    }

    async fn count_tokens(
        &self,
        request: Request<proto::CountTokensRequest>,
    ) -> Result<Response<proto::CountTokensResponse>, Status> {
        self.unary("CountTokens", request, |mut message, _| async move {
            validation::bound_messages(&message.messages, &self.limits).map_err(status)?;
            let mut admitted = self.engine.admit().map_err(status)?;
            let fetched = self.media.messages(&mut message.messages).await;
            let fetched = fetched.map_err(status)?;
            let relabel = |e| status(fetched.relabel(self.engine.hinted(e)));
            let mut messages =
                validation::messages(message.messages, &self.limits).map_err(relabel)?;
            let videos = self.videos.messages(&mut messages, admitted.media()).await;
            videos.map_err(relabel)?;
            Ok(convert::count_response(
                self.engine
                    .count_tokens(messages, &mut admitted)
                    .await
                    .map_err(relabel)?,
            ))
        })
        .await
    }

    async fn tokenize(
        &self,
        request: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        self.unary("Tokenize", request, |message, _| async move {
            validation::bound_tokenize(&message.text, &self.limits).map_err(status)?;
            let mut admitted = self.engine.admit().map_err(status)?;
            let ids = self.engine.tokenize(message.text, &mut admitted).await;
            let ids = ids.map_err(status)?;
            Ok(proto::TokenizeResponse { ids })
        })
        .await
    }

    async fn get_model_info(
        &self,
        request: Request<proto::GetModelInfoRequest>,
    ) -> Result<Response<proto::ModelInfo>, Status> {
        self.unary("GetModelInfo", request, |_, _| async move {
            let info = self.engine.info().map_err(status)?;
            Ok(convert::model_info(info, self.media.schemes()))
        })
        .await
    }
}
