//! Proto ⇄ engine conversions for responses: the one place that knows both
//! the generated types and the engine's.

use crate::engine::{self, Embedding, GenerateEvent, ModelInfo, Placement, TokenCount};
use internvl_api::proto;

fn finish_reason(reason: engine::FinishReason) -> proto::FinishReason {
    match reason {
        engine::FinishReason::Stop => proto::FinishReason::Stop,
        engine::FinishReason::Length => proto::FinishReason::Length,
        engine::FinishReason::StopSequence => proto::FinishReason::StopSequence,
        engine::FinishReason::Cancelled => proto::FinishReason::Cancelled,
    }
}

/// One engine event as a stream message.
pub(super) fn response(event: GenerateEvent) -> proto::GenerateResponse {
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
                forced_tokens: usage.forced_tokens,
            }),
            timings: Some(proto::Timings {
                queue_ms: timings.queue_ms,
                vision_ms: timings.vision_ms,
                prefill_ms: timings.prefill_ms,
                decode_ms: timings.decode_ms,
                ttft_ms: timings.ttft_ms,
                constraint_ms: timings.constraint_ms,
            }),
        }),
    };
    proto::GenerateResponse { event: Some(event) }
}

/// Embed's answer.
pub(super) fn embed_response(embeddings: Vec<Embedding>) -> proto::EmbedResponse {
    let dimensions = embeddings.first().map_or(0, |e| e.values.len() as u32);
    proto::EmbedResponse {
        embeddings: embeddings
            .into_iter()
            .map(|e| proto::Embedding {
                values: e.values,
                tokens: e.tokens,
            })
            .collect(),
        dimensions,
    }
}

/// CountTokens' answer.
pub(super) fn count_response(count: TokenCount) -> proto::CountTokensResponse {
    proto::CountTokensResponse {
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
    }
}

/// GetModelInfo's answer; `media_schemes` are the fetcher's.
pub(super) fn model_info(
    info: ModelInfo,
    media_schemes: Vec<&str>,
    videos: &crate::video::VideoDecoder,
) -> proto::ModelInfo {
    let tiles = info.tiles;
    let video_files = match videos.confinement() {
        Ok((confinement, version)) => proto::VideoFiles {
            enabled: true,
            confinement: confinement.to_string(),
            detail: version.to_string(),
        },
        Err(why) => proto::VideoFiles {
            enabled: false,
            confinement: String::new(),
            detail: why.to_string(),
        },
    };
    proto::ModelInfo {
        video_files: Some(video_files),
        media_schemes: media_schemes.into_iter().map(String::from).collect(),
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
        cpu_kernels: info.cpu_kernels,
        placement: Some(placement(info.placement)),
    }
}

fn placement(p: Placement) -> proto::Placement {
    proto::Placement {
        devices: p
            .devices
            .into_iter()
            .map(|d| proto::Device {
                name: d.name,
                description: d.description,
                kind: d.kind.name().into(),
                memory_total_bytes: d.memory_total,
                memory_free_bytes: d.memory_free,
            })
            .collect(),
        layers_offloaded: p.layers_offloaded,
        layers_total: p.layers_total,
        layers: p
            .layers_per_device
            .into_iter()
            .map(|(device, layers)| proto::DeviceLayers { device, layers })
            .collect(),
        buffers: p
            .buffers
            .into_iter()
            .map(|b| proto::Buffer {
                kind: b.kind.name().into(),
                location: b.location,
                bytes: b.bytes,
            })
            .collect(),
        vision_backend: p.vision_backend,
        vision_model_bytes: p.vision_model_bytes,
    }
}
