//! The gRPC transport: thin tonic handlers that validate, call the engine and
//! convert. No llama.cpp types here.

pub mod auth;
mod error;
pub mod validation;

use std::pin::Pin;

use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::engine::{self, Engine, GenerateEvent};

/// Code generated from `proto/internvl/v1/internvl.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("internvl.v1");

    /// Encoded descriptors of the API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("internvl_descriptor");
}

use proto::intern_vl_server::InternVl;

/// The `internvl.v1.InternVL` service.
#[derive(Clone)]
pub struct InternVlService {
    engine: Engine,
    limits: validation::Limits,
}

impl InternVlService {
    /// A service answering from `engine` within `limits`.
    pub fn new(engine: Engine, limits: validation::Limits) -> Self {
        Self { engine, limits }
    }
}

fn finish_reason(reason: engine::FinishReason) -> proto::FinishReason {
    match reason {
        engine::FinishReason::Stop => proto::FinishReason::Stop,
        engine::FinishReason::Length => proto::FinishReason::Length,
        engine::FinishReason::StopSequence => proto::FinishReason::StopSequence,
        engine::FinishReason::Cancelled => proto::FinishReason::Cancelled,
    }
}

fn response(event: GenerateEvent) -> proto::GenerateResponse {
    use proto::generate_response::Event;
    let event = match event {
        GenerateEvent::Delta { text, tokens } => Event::Delta(proto::Delta {
            text,
            tokens: tokens
                .into_iter()
                .map(|t| proto::Token {
                    id: t.id,
                    text: t.text,
                    logprob: t.logprob,
                    top: t
                        .top
                        .into_iter()
                        .map(|a| proto::TopLogprob {
                            id: a.id,
                            text: a.text,
                            logprob: a.logprob,
                        })
                        .collect(),
                })
                .collect(),
        }),
        GenerateEvent::Done {
            finish_reason: reason,
            usage,
            timings,
        } => Event::Done(proto::Done {
            finish_reason: finish_reason(reason) as i32,
            usage: Some(proto::Usage {
                prompt_tokens: usage.prompt_tokens,
                image_tokens: usage.image_tokens,
                completion_tokens: usage.completion_tokens,
                cached_tokens: usage.cached_tokens,
                cached_image_tiles: usage.cached_image_tiles,
            }),
            timings: Some(proto::Timings {
                queue_ms: timings.queue_ms,
                vision_ms: timings.vision_ms,
                prefill_ms: timings.prefill_ms,
                decode_ms: timings.decode_ms,
                ttft_ms: timings.ttft_ms,
            }),
        }),
    };
    proto::GenerateResponse { event: Some(event) }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<proto::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl InternVl for InternVlService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let deadline = validation::deadline(request.metadata(), &self.limits)?;
        let mut request = validation::generate(request.into_inner(), &self.limits)?;
        request.deadline = deadline;
        let events = self.engine.generate(request).await?;
        // Dropping this stream (client gone) drops the receiver, which the
        // engine notices before its next decode step.
        let stream =
            ReceiverStream::new(events).map(|event| event.map(response).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn embed(
        &self,
        request: Request<proto::EmbedRequest>,
    ) -> Result<Response<proto::EmbedResponse>, Status> {
        let deadline = validation::deadline(request.metadata(), &self.limits)?;
        let mut request = validation::embed(request.into_inner(), &self.limits)?;
        request.deadline = deadline;
        let embeddings = self.engine.embed(request).await?;
        let dimensions = embeddings.first().map_or(0, |e| e.values.len() as u32);
        Ok(Response::new(proto::EmbedResponse {
            embeddings: embeddings
                .into_iter()
                .map(|e| proto::Embedding {
                    values: e.values,
                    tokens: e.tokens,
                })
                .collect(),
            dimensions,
        }))
    }

    async fn count_tokens(
        &self,
        request: Request<proto::CountTokensRequest>,
    ) -> Result<Response<proto::CountTokensResponse>, Status> {
        let messages = validation::messages(request.into_inner().messages, &self.limits)?;
        let count = self.engine.count_tokens(messages).await?;
        Ok(Response::new(proto::CountTokensResponse {
            prompt_tokens: count.prompt_tokens,
            image_tokens: count.image_tokens,
            images: count
                .grids
                .into_iter()
                .map(|g| proto::ImageGrid {
                    cols: g.cols,
                    rows: g.rows,
                    tiles: g.tiles,
                })
                .collect(),
            input_ids: count.input_ids,
        }))
    }

    async fn tokenize(
        &self,
        request: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        let ids = self.engine.tokenize(request.into_inner().text).await?;
        Ok(Response::new(proto::TokenizeResponse { ids }))
    }

    async fn get_model_info(
        &self,
        _request: Request<proto::GetModelInfoRequest>,
    ) -> Result<Response<proto::ModelInfo>, Status> {
        let info = self.engine.info()?;
        let tiles = info.tiles;
        Ok(Response::new(proto::ModelInfo {
            name: info.name,
            architecture: info.architecture,
            context_size: info.context_size,
            vocab_size: info.vocab_size,
            embedding_size: info.embedding_size,
            tile_size: tiles.tile_size,
            min_tiles: tiles.min_tiles,
            max_tiles: tiles.max_tiles,
            image_tokens_per_tile: tiles.tokens_per_tile,
            quantization: info.quantization,
            chat_template: info.chat_template,
            offload: info.offload,
            projector: info.projector,
            training_context_size: info.training_context_size,
        }))
    }
}
