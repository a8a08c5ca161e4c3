//! Proto requests to engine requests. Every refusal names the field as the
//! client wrote it, e.g. `messages[1].content[0].image.data`.

use internvl_core::{
    ChatMessage, EmbedRequest, EngineError, GenerateRequest, ImageInput, Part, Pooling,
    ResponseFormat, Role, Sampling, SamplingParams, VideoInput, VideoSource,
};

use crate::proto;

/// Per-request limits a deployment sets (see `Config`), checked before any
/// image is decoded or anything reaches the engine.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Images plus sampled video frames per request (per input for Embed).
    pub max_images: usize,
    /// Alternatives a client may ask for per token.
    pub max_top_logprobs: u32,
    /// Stop sequences per request.
    pub max_stop_sequences: usize,
    /// Messages per Generate or CountTokens request.
    pub max_messages: usize,
    /// Content parts per request, across its messages or Embed inputs.
    pub max_content_parts: usize,
    /// Inputs per Embed request.
    pub max_embed_inputs: usize,
    /// Largest Tokenize text, in bytes.
    pub max_tokenize_bytes: usize,
    /// Longest deadline honoured; requests without one get this one.
    pub max_deadline: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_images: 16,
            max_top_logprobs: 20,
            max_stop_sequences: 16,
            max_messages: 256,
            max_content_parts: 512,
            max_embed_inputs: 64,
            max_tokenize_bytes: 1024 * 1024,
            max_deadline: std::time::Duration::from_secs(600),
        }
    }
}

/// Longest stop sequence, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Most tiles a client may ask for per image.
pub const MAX_TILES: u32 = 64;
/// Most frames a video may carry, and most a client may sample.
pub const MAX_VIDEO_FRAMES: usize = 1024;
/// Longest request id, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

type Result<T> = std::result::Result<T, EngineError>;

fn invalid(field: impl Into<String>, message: impl Into<String>) -> EngineError {
    EngineError::invalid(field, message)
}

fn role(value: &str, field: &str) -> Result<Role> {
    match value {
        "system" => Ok(Role::System),
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        other => Err(invalid(
            field,
            format!("unknown role {other:?}; expected \"system\", \"user\" or \"assistant\""),
        )),
    }
}

fn part(content: proto::Content, field: &str) -> Result<Part> {
    use proto::content::Part as P;
    match content.part {
        None => Err(invalid(field, "no part set: expected text, image or video")),
        Some(P::Text(text)) => Ok(Part::Text(text)),
        Some(P::Image(image)) => {
            if image.data.is_empty() {
                return Err(invalid(format!("{field}.image.data"), "is empty"));
            }
            for (name, value) in [
                ("max_tiles", image.max_tiles),
                ("min_tiles", image.min_tiles),
            ] {
                if value > MAX_TILES {
                    return Err(invalid(
                        format!("{field}.image.{name}"),
                        format!("{value} is above {MAX_TILES}"),
                    ));
                }
            }
            Ok(Part::Image(ImageInput {
                data: image.data,
                max_tiles: image.max_tiles,
                min_tiles: image.min_tiles,
            }))
        }
        Some(P::Video(video)) => {
            let field = format!("{field}.video");
            let sources = [
                !video.frames.is_empty(),
                !video.data.is_empty(),
                !video.url.is_empty(),
            ];
            match sources.iter().filter(|set| **set).count() {
                0 => {
                    return Err(invalid(
                        field,
                        "no frames, data or url: a video needs exactly one",
                    ))
                }
                1 => {}
                _ => {
                    return Err(invalid(
                        field,
                        "more than one of frames, data and url is set; send one",
                    ))
                }
            }
            if video.frames.len() > MAX_VIDEO_FRAMES {
                return Err(invalid(
                    format!("{field}.frames"),
                    format!(
                        "{} frames, at most {MAX_VIDEO_FRAMES} are accepted",
                        video.frames.len()
                    ),
                ));
            }
            if let Some(i) = video.frames.iter().position(Vec::is_empty) {
                return Err(invalid(format!("{field}.frames[{i}]"), "is empty"));
            }
            if video.num_frames as usize > MAX_VIDEO_FRAMES {
                return Err(invalid(
                    format!("{field}.num_frames"),
                    format!("above {MAX_VIDEO_FRAMES}"),
                ));
            }
            let sampling = Sampling {
                num_frames: video.num_frames,
                fps: video.fps,
            };
            sampling.check(&field)?;
            let source = if !video.frames.is_empty() {
                if sampling.fps > 0.0 {
                    // Checked here, not when sampling, so CountTokens refuses it too.
                    return Err(invalid(
                        format!("{field}.fps"),
                        "sampling by fps needs the video's frame rate: send the \
                         video file (data or url), or num_frames with decoded frames",
                    ));
                }
                VideoSource::Frames(video.frames)
            } else if !video.data.is_empty() {
                VideoSource::File(video.data)
            } else {
                return Err(invalid(
                    format!("{field}.url"),
                    "was not fetched: URLs are fetched by the service before validation",
                ));
            };
            Ok(Part::Video(VideoInput { source, sampling }))
        }
    }
}

fn parts(content: Vec<proto::Content>, field: &str) -> Result<Vec<Part>> {
    content
        .into_iter()
        .enumerate()
        .map(|(i, c)| part(c, &format!("{field}.content[{i}]")))
        .collect()
}

/// `n` things of `field` against their limit, named by its key.
fn at_most(field: &str, n: usize, max: usize, key: &str) -> Result<()> {
    if n > max {
        return Err(invalid(
            field,
            format!("{n} of them, at most {max} ({key})"),
        ));
    }
    Ok(())
}

/// What the messages of a Generate or CountTokens call count (messages,
/// content parts, images and video frames), checked before any URL is
/// fetched or anything decoded: the cheapest refusals first.
pub fn bound_messages(messages: &[proto::Message], limits: &Limits) -> Result<()> {
    at_most(
        "messages",
        messages.len(),
        limits.max_messages,
        "max_messages",
    )?;
    let parts = messages.iter().map(|m| m.content.len()).sum();
    at_most(
        "messages",
        parts,
        limits.max_content_parts,
        "max_content_parts",
    )?;
    bound_media(
        messages.iter().flat_map(|m| m.content.iter()),
        "messages",
        limits,
    )
}

/// What an Embed call counts (inputs, content parts, and images and video
/// frames per input), checked as [`bound_messages`] is.
pub fn bound_embed(inputs: &[proto::EmbedInput], limits: &Limits) -> Result<()> {
    at_most(
        "inputs",
        inputs.len(),
        limits.max_embed_inputs,
        "max_embed_inputs",
    )?;
    let parts = inputs.iter().map(|i| i.content.len()).sum();
    at_most(
        "inputs",
        parts,
        limits.max_content_parts,
        "max_content_parts",
    )?;
    for (i, input) in inputs.iter().enumerate() {
        bound_media(input.content.iter(), &format!("inputs[{i}]"), limits)?;
    }
    Ok(())
}

/// A Tokenize text's size.
pub fn bound_tokenize(text: &str, limits: &Limits) -> Result<()> {
    if text.len() > limits.max_tokenize_bytes {
        return Err(invalid(
            "text",
            format!(
                "{} bytes, at most {} (max_tokenize_bytes)",
                text.len(),
                limits.max_tokenize_bytes
            ),
        ));
    }
    Ok(())
}

/// Images and video frames among proto parts (each at least one tile),
/// counted as [`internvl_core::VideoInput::frames_hint`] counts them once
/// validated.
fn bound_media<'a>(
    content: impl Iterator<Item = &'a proto::Content>,
    field: &str,
    limits: &Limits,
) -> Result<()> {
    use internvl_core::video::DEFAULT_FRAMES;
    use proto::content::Part as P;
    let n: usize = content
        .map(|c| match &c.part {
            Some(P::Image(_)) => 1,
            Some(P::Video(v)) if v.num_frames > 0 => v.num_frames as usize,
            Some(P::Video(v)) if !v.frames.is_empty() => {
                v.frames.len().min(DEFAULT_FRAMES as usize)
            }
            Some(P::Video(_)) => DEFAULT_FRAMES as usize,
            _ => 0,
        })
        .fold(0usize, usize::saturating_add);
    if n > limits.max_images {
        return Err(invalid(
            field,
            format!(
                "{n} images and video frames, at most {} per request",
                limits.max_images
            ),
        ));
    }
    Ok(())
}

/// Messages of a Generate or CountTokens request (the engine refuses an empty list).
pub fn messages(messages: Vec<proto::Message>, limits: &Limits) -> Result<Vec<ChatMessage>> {
    bound_messages(&messages, limits)?;
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let field = format!("messages[{i}]");
            Ok(ChatMessage {
                role: role(&m.role, &format!("{field}.role"))?,
                parts: parts(m.content, &field)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(messages)
}

fn finite_range(field: &str, value: f32, min: f32, max: f32) -> Result<()> {
    if !value.is_finite() || value < min || value > max {
        return Err(invalid(field, format!("{value} is outside {min}..={max}")));
    }
    Ok(())
}

fn sampling(params: Option<proto::SamplingParams>) -> Result<SamplingParams> {
    let p = params.unwrap_or_default();
    finite_range("sampling.temperature", p.temperature, 0.0, 100.0)?;
    finite_range("sampling.top_p", p.top_p, 0.0, 1.0)?;
    finite_range("sampling.min_p", p.min_p, 0.0, 1.0)?;
    finite_range("sampling.repeat_penalty", p.repeat_penalty, 0.0, 100.0)?;
    finite_range(
        "sampling.presence_penalty",
        p.presence_penalty,
        -100.0,
        100.0,
    )?;
    finite_range(
        "sampling.frequency_penalty",
        p.frequency_penalty,
        -100.0,
        100.0,
    )?;
    if p.top_k < 0 {
        return Err(invalid(
            "sampling.top_k",
            format!("{} is negative", p.top_k),
        ));
    }
    Ok(SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        min_p: p.min_p,
        repeat_penalty: p.repeat_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
    })
}

/// A Generate request; `max_new_tokens` and everything that depends on the
/// model (context, vocabulary) are checked by the engine.
pub fn generate(request: proto::GenerateRequest, limits: &Limits) -> Result<GenerateRequest> {
    if request.top_logprobs > limits.max_top_logprobs {
        return Err(invalid(
            "top_logprobs",
            format!(
                "{} is above {}",
                request.top_logprobs, limits.max_top_logprobs
            ),
        ));
    }
    if request.stop.len() > limits.max_stop_sequences {
        return Err(invalid(
            "stop",
            format!(
                "{} sequences, at most {}",
                request.stop.len(),
                limits.max_stop_sequences
            ),
        ));
    }
    for (i, stop) in request.stop.iter().enumerate() {
        if stop.is_empty() || stop.len() > MAX_STOP_BYTES {
            return Err(invalid(
                format!("stop[{i}]"),
                format!("must be 1..={MAX_STOP_BYTES} bytes"),
            ));
        }
    }
    check_label("request_id", &request.request_id)?;
    check_label("cache_salt", &request.cache_salt)?;
    Ok(GenerateRequest {
        sampling: sampling(request.sampling)?,
        messages: messages(request.messages, limits)?,
        max_new_tokens: request.max_new_tokens,
        stop: request.stop,
        ignore_eos: request.ignore_eos,
        top_logprobs: request.top_logprobs,
        logprobs: request.logprobs,
        request_id: request.request_id,
        deadline: None,
        response_format: request.response_format.map(response_format).transpose()?,
        // The service sets it from the caller and `cache_salt`.
        partition: Default::default(),
    })
}

/// A `response_format`; its content is checked when the engine compiles it.
fn response_format(format: proto::ResponseFormat) -> Result<ResponseFormat> {
    use proto::response_format::Format;
    Ok(match format.format {
        None => {
            return Err(invalid(
                "response_format",
                "set, but none of json_schema, json_object, regex, grammar, choice is",
            ))
        }
        Some(Format::JsonSchema(schema)) => ResponseFormat::JsonSchema(schema),
        Some(Format::JsonObject(_)) => ResponseFormat::JsonObject,
        Some(Format::Regex(rx)) => ResponseFormat::Regex(rx),
        Some(Format::Grammar(gbnf)) => ResponseFormat::Grammar(gbnf),
        Some(Format::Choice(choice)) => ResponseFormat::Choice(choice.options),
    })
}

/// A short label of the caller's: `request_id` goes into every log line
/// of its request, `cache_salt` is hashed once per request; both bounded.
fn check_label(field: &str, value: &str) -> Result<()> {
    if value.len() > MAX_REQUEST_ID_BYTES {
        return Err(invalid(
            field,
            format!("longer than {MAX_REQUEST_ID_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// An Embed request (the engine refuses an empty list of inputs).
pub fn embed(request: proto::EmbedRequest, limits: &Limits) -> Result<EmbedRequest> {
    let pooling = match proto::Pooling::try_from(request.pooling) {
        Ok(proto::Pooling::Mean) => Pooling::Mean,
        Ok(proto::Pooling::Last) => Pooling::Last,
        Err(_) => {
            return Err(invalid(
                "pooling",
                format!("unknown pooling {}", request.pooling),
            ))
        }
    };
    bound_embed(&request.inputs, limits)?;
    let inputs = request
        .inputs
        .into_iter()
        .enumerate()
        .map(|(i, input)| {
            let field = format!("inputs[{i}]");
            if input.content.is_empty() {
                return Err(invalid(field, "input has no content"));
            }
            parts(input.content, &field)
        })
        .collect::<Result<Vec<_>>>()?;
    check_label("request_id", &request.request_id)?;
    check_label("cache_salt", &request.cache_salt)?;
    Ok(EmbedRequest {
        inputs,
        pooling,
        normalize: request.normalize,
        deadline: None,
        request_id: request.request_id,
        partition: Default::default(),
    })
}
