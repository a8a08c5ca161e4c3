//! The gRPC transport: thin tonic handlers that validate, call the engine and
//! convert. No llama.cpp types here.

pub mod auth;
pub mod codec;
pub mod deadline;
mod error;
pub mod validation;

use std::pin::Pin;

use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status};

use std::sync::Arc;

use crate::engine::{self, Engine, GenerateEvent};
use crate::metrics::Metrics;

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
    metrics: Arc<Metrics>,
}

impl InternVlService {
    /// A service answering from `engine` within `limits`, recording into `metrics`.
    pub fn new(engine: Engine, limits: validation::Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            engine,
            limits,
            metrics,
        }
    }

    /// Counts the outcome of a unary call.
    fn counted<T>(&self, method: &str, result: Result<T, Status>) -> Result<T, Status> {
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics.request(method, code);
        result
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
        let started = async {
            let deadline = deadline::of(request.metadata(), request.extensions(), &self.limits)?;
            let mut request = validation::generate(request.into_inner(), &self.limits)?;
            request.deadline = deadline;
            deadline::within(deadline, async { Ok(self.engine.generate(request).await?) }).await
        }
        .await;
        let events = match started {
            Ok(events) => events,
            Err(status) => return self.counted("Generate", Err(status)),
        };
        let metrics = self.metrics.clone();
        // Dropping this stream (client gone) drops the receiver, which the
        // engine notices before its next decode step.
        let stream = ReceiverStream::new(events).map(move |event| {
            let event = event.map_err(Status::from);
            match &event {
                Ok(GenerateEvent::Done { usage, timings, .. }) => {
                    metrics.generation(usage, timings);
                    metrics.request("Generate", tonic::Code::Ok);
                }
                Err(status) => metrics.request("Generate", status.code()),
                Ok(GenerateEvent::Delta { .. }) => {}
            }
            event.map(response)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn embed(
        &self,
        request: Request<proto::EmbedRequest>,
    ) -> Result<Response<proto::EmbedResponse>, Status> {
        let result = async {
            let deadline = deadline::of(request.metadata(), request.extensions(), &self.limits)?;
            let mut request = validation::embed(request.into_inner(), &self.limits)?;
            request.deadline = deadline;
            let embeddings =
                deadline::within(deadline, async { Ok(self.engine.embed(request).await?) }).await?;
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
        .await;
        self.counted("Embed", result)
    }

    async fn count_tokens(
        &self,
        request: Request<proto::CountTokensRequest>,
    ) -> Result<Response<proto::CountTokensResponse>, Status> {
        let result = async {
            let deadline = deadline::of(request.metadata(), request.extensions(), &self.limits)?;
            let messages = validation::messages(request.into_inner().messages, &self.limits)?;
            let count = deadline::within(deadline, async {
                Ok(self.engine.count_tokens(messages).await?)
            })
            .await?;
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
        .await;
        self.counted("CountTokens", result)
    }

    async fn tokenize(
        &self,
        request: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        let result = async {
            let ids = self.engine.tokenize(request.into_inner().text).await?;
            Ok(Response::new(proto::TokenizeResponse { ids }))
        }
        .await;
        self.counted("Tokenize", result)
    }

    async fn get_model_info(
        &self,
        _request: Request<proto::GetModelInfoRequest>,
    ) -> Result<Response<proto::ModelInfo>, Status> {
        let result = async {
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
                parallel: info.parallel,
            }))
        }
        .await;
        self.counted("GetModelInfo", result)
    }
}
