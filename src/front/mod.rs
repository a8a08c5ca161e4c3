//! The front of the service, under both transports: what every call passes
//! before and around the engine, in one place. A call is authenticated
//! ([`auth`]: its [`Caller`], whose cached work it may reuse), its counts
//! bounded, its place in flight taken ([`Engine::admit`]), then its media
//! fetched and decoded, validated and handed to the engine; failures are
//! [`EngineError`]s, which each transport turns into its own status through
//! the one [`code`] mapping. gRPC (`service/`) and the OpenAI-compatible
//! HTTP API (`openai/`) are thin peers over it, as text-embeddings-inference's
//! routers are over its `core::infer`.

pub mod auth;
mod error;
pub mod trace;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tracing::Span;

use crate::engine::{Embedding, Engine, EngineError, GenerateEvents, TokenCount};
use crate::media::Fetcher;
use crate::video::VideoDecoder;
pub use auth::{ApiKeys, Caller};
pub use error::{code, retry_after_ms};
use internvl_api::{proto, validation};

/// What both transports call.
#[derive(Clone)]
pub struct Front {
    engine: Engine,
    limits: validation::Limits,
    media: Arc<Fetcher>,
    videos: Arc<VideoDecoder>,
}

impl Front {
    /// A front answering from `engine` within `limits`, fetching media URLs
    /// with `media` and decoding video files with `videos`.
    pub fn new(
        engine: Engine,
        limits: validation::Limits,
        media: Arc<Fetcher>,
        videos: Arc<VideoDecoder>,
    ) -> Self {
        Self {
            engine,
            limits,
            media,
            videos,
        }
    }

    /// The per-request limits it checks.
    pub fn limits(&self) -> &validation::Limits {
        &self.limits
    }

    /// The engine (model information, health).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The URL schemes media may be fetched from.
    pub fn schemes(&self) -> Vec<&'static str> {
        self.media.schemes()
    }

    /// Whether video files are decoded here, and how.
    pub fn videos(&self) -> &VideoDecoder {
        &self.videos
    }

    /// A Generate request from its proto form to the engine's events: its
    /// counts bounded, a place in flight taken, media URLs fetched,
    /// validated, video files decoded, queued. Every transport (gRPC, the
    /// OpenAI-compatible HTTP API) starts a generation here, so they refuse
    /// and answer alike.
    pub async fn start_generate(
        &self,
        mut message: proto::GenerateRequest,
        caller: Caller,
        deadline: Option<Instant>,
    ) -> Result<GenerateEvents, EngineError> {
        validation::bound_messages(&message.messages, &self.limits)?;
        let mut admitted = self.engine.admit()?;
        let fetched = self.media.messages(&mut message.messages).await?;
        let relabel = |e| fetched.relabel(e);
        let cache_salt = message.cache_salt.clone();
        let mut request = validation::generate(message, &self.limits).map_err(relabel)?;
        Span::current().record("request_id", request.request_id.as_str());
        let videos = self
            .videos
            .messages(&mut request.messages, admitted.media())
            .await;
        // The engine hints its own refusals; a decoder's needs the hint here.
        videos.map_err(|e| relabel(self.engine.hinted(e)))?;
        request.deadline = deadline;
        request.partition = caller.partition(&cache_salt);
        self.engine
            .generate(request, admitted)
            .await
            .map_err(relabel)
    }

    /// [`Front::start_generate`] for Embed: the embeddings.
    pub async fn run_embed(
        &self,
        mut message: proto::EmbedRequest,
        caller: Caller,
        deadline: Option<Instant>,
    ) -> Result<Vec<Embedding>, EngineError> {
        validation::bound_embed(&message.inputs, &self.limits)?;
        let mut admitted = self.engine.admit()?;
        let fetched = self.media.embed_inputs(&mut message.inputs).await?;
        let relabel = |e| fetched.relabel(e);
        let cache_salt = message.cache_salt.clone();
        let mut request = validation::embed(message, &self.limits).map_err(relabel)?;
        Span::current().record("request_id", request.request_id.as_str());
        let videos = self
            .videos
            .embed_inputs(&mut request.inputs, admitted.media())
            .await;
        videos.map_err(|e| relabel(self.engine.hinted(e)))?;
        request.deadline = deadline;
        request.partition = caller.partition(&cache_salt);
        self.engine.embed(request, admitted).await.map_err(relabel)
    }

    /// A CountTokens request: its counts bounded, a place taken, its media
    /// fetched and decoded, its prompt built (not run).
    pub async fn count_tokens(
        &self,
        mut message: proto::CountTokensRequest,
    ) -> Result<TokenCount, EngineError> {
        validation::bound_messages(&message.messages, &self.limits)?;
        let mut admitted = self.engine.admit()?;
        let fetched = self.media.messages(&mut message.messages).await?;
        let relabel = |e| fetched.relabel(e);
        let mut messages = validation::messages(message.messages, &self.limits).map_err(relabel)?;
        let videos = self.videos.messages(&mut messages, admitted.media()).await;
        videos.map_err(|e| relabel(self.engine.hinted(e)))?;
        self.engine
            .count_tokens(messages, &mut admitted)
            .await
            .map_err(relabel)
    }

    /// A Tokenize request: its text bounded, a place taken, tokenized.
    pub async fn tokenize(&self, text: String) -> Result<Vec<i32>, EngineError> {
        validation::bound_tokenize(&text, &self.limits)?;
        let mut admitted = self.engine.admit()?;
        self.engine.tokenize(text, &mut admitted).await
    }
}

/// Runs `work` (everything before a response begins) until `deadline`; past
/// it the work is dropped, which withdraws the call from the engine.
pub async fn within<T>(
    deadline: Option<Instant>,
    work: impl Future<Output = Result<T, EngineError>>,
) -> Result<T, EngineError> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline.into(), work)
            .await
            .unwrap_or(Err(EngineError::DeadlineBeforeResponse)),
        None => work.await,
    }
}
