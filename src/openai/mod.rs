//! The OpenAI-compatible HTTP API, served on the gRPC port (HTTP/1.1 and
//! HTTP/2): `POST /v1/chat/completions`, `POST /v1/embeddings`,
//! `GET /v1/models`.
//!
//! A thin transport beside `service/`: each request is authenticated and its
//! body bounded ([`gate`]), read as typed structs ([`body`]), turned into the
//! proto request gRPC would carry and sent through the same [`Front`] steps
//! (bounds, admission, fetch, validation, video decoding, the engine), so
//! both protocols refuse and answer alike. Errors get the front's one code
//! mapping, then OpenAI's HTTP status and error body ([`error`]).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use tonic::Code;
use tracing::Instrument;

use crate::engine::{EngineError, FinishReason, GenerateEvent, GeneratedToken, Usage};
use crate::front::{within, ApiKeys, Caller, Front};
use crate::metrics::Metrics;
use internvl_api::proto;

mod body;
mod error;
mod gate;

use error::{bad_request, not_found, ApiError};

use body::{embed_input, ChatRequest, EmbedInputs, EmbeddingsRequest};

/// What the HTTP routes share.
#[derive(Clone)]
pub struct OpenAi {
    front: Front,
    keys: ApiKeys,
    metrics: Arc<Metrics>,
    /// `GET /v1/models`' one id; a request naming another is refused.
    model: Arc<str>,
    max_body: usize,
    body_timeout: std::time::Duration,
}

impl OpenAi {
    /// The API over `front`, answering as `model`, checking `keys`,
    /// reading bodies of at most `max_body` bytes within `body_timeout`.
    pub fn new(
        front: Front,
        keys: ApiKeys,
        metrics: Arc<Metrics>,
        model: String,
        max_body: usize,
        body_timeout: std::time::Duration,
    ) -> Self {
        Self {
            front,
            keys,
            metrics,
            model: model.into(),
            max_body,
            body_timeout,
        }
    }

    /// The routes, for the gRPC server's router: every one behind
    /// [`gate::gate`] (the key from the headers, then the bounded body).
    pub fn router(self) -> Router {
        // The gate has read the body within max_body; axum's own default
        // (2 MB) must not refuse it again.
        let limit = axum::extract::DefaultBodyLimit::disable();
        Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/models", get(models))
            .route("/v1/models/{id}", get(model))
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                gate::gate,
            ))
            .layer(limit)
            .with_state(self)
    }

    fn check_model(&self, named: Option<&str>) -> Result<(), ApiError> {
        match named {
            Some(name) if name != &*self.model => Err(not_found(name)),
            _ => Ok(()),
        }
    }
}

/// The model id a deployment's `model` key gives: a catalog name as it is
/// (without a quantization), else the model file's name without `.gguf`.
pub fn model_id(model: &str) -> String {
    if let Some(Ok(choice)) = internvl_api::catalog::find(model) {
        return choice.entry.name.clone();
    }
    let file = model.rsplit('/').next().unwrap_or(model);
    file.strip_suffix(".gguf").unwrap_or(file).to_string()
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad_request(None, format!("request body: {e}")))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---- chat completions -------------------------------------------------------

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::StopSequence => "stop",
        FinishReason::Length => "length",
        // Not sent: a cancelled stream has no reader.
        FinishReason::Cancelled => "stop",
    }
}

fn usage(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    })
}

fn token_logprob(text: &str, logprob: f32) -> Value {
    json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
}

/// OpenAI's `logprobs.content` entries for `tokens`.
fn logprobs(tokens: &[GeneratedToken]) -> Vec<Value> {
    tokens
        .iter()
        .map(|t| {
            let mut entry = token_logprob(&t.text, t.logprob);
            entry["top_logprobs"] = t
                .top
                .iter()
                .map(|a| token_logprob(&a.text, a.logprob))
                .collect();
            entry
        })
        .collect()
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// The call's span, as gRPC calls get theirs (`front/trace.rs`).
fn span(method: &'static str, headers: &HeaderMap) -> tracing::Span {
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    crate::front::trace::span_for(method, traceparent)
}

/// A body axum refused, as OpenAI's error.
fn body_error(rejection: &BytesRejection) -> ApiError {
    ApiError {
        status: rejection.status(),
        kind: "invalid_request_error",
        code: None,
        message: format!("request body: {}", rejection.body_text()),
        param: None,
        retry_after_ms: None,
        grpc: if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Code::ResourceExhausted
        } else {
            Code::InvalidArgument
        },
    }
}

async fn chat(
    State(api): State<OpenAi>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let metrics = api.metrics.clone();
    let span = span("ChatCompletions", &headers);
    let result = start_chat(&api, caller, &headers, &body, arrived)
        .instrument(span.clone())
        .await;
    match result {
        Ok(response) => response,
        Err(error) => {
            span.record("outcome", format!("{:?}", error.grpc));
            metrics.http_request("ChatCompletions", error.grpc);
            error.into_response()
        }
    }
}

async fn start_chat(
    api: &OpenAi,
    caller: Caller,
    headers: &HeaderMap,
    body: &Result<Bytes, BytesRejection>,
    arrived: Instant,
) -> Result<Response, ApiError> {
    // The gate checked the key and read the body within its limits.
    let body = body.as_ref().map_err(body_error)?;
    let request: ChatRequest = parse(body)?;
    api.check_model(request.model.as_deref())?;
    let stream = request.stream;
    let include_usage = request
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let message = request.to_proto(request_id(headers))?;
    let want_logprobs = message.logprobs;
    let deadline = arrived.checked_add(api.front.limits().max_deadline);
    let events = within(
        deadline,
        api.front.start_generate(message, caller, deadline),
    )
    .await?;
    let id = format!("chatcmpl-{:x}", rand_id());
    let created = now_secs();
    let model = api.model.clone();
    if stream {
        Ok(sse(
            api.metrics.clone(),
            events,
            id,
            created,
            model,
            include_usage,
            want_logprobs,
        ))
    } else {
        collect(
            api.metrics.clone(),
            events,
            id,
            created,
            model,
            want_logprobs,
        )
        .await
    }
}

/// A per-process counter mixed with the time: ids only need to differ.
fn rand_id() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (t << 20) ^ u128::from(n)
}

async fn collect(
    metrics: Arc<Metrics>,
    mut events: crate::engine::GenerateEvents,
    id: String,
    created: u64,
    model: Arc<str>,
    want_logprobs: bool,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut entries = Vec::new();
    // Errors are counted by `chat`, which answers them.
    while let Some(event) = events.recv().await {
        match event.map_err(ApiError::from)? {
            GenerateEvent::Delta { text: t, tokens } => {
                text.push_str(&t);
                if want_logprobs {
                    entries.extend(logprobs(&tokens));
                }
            }
            GenerateEvent::Done {
                finish_reason: reason,
                usage: counts,
                timings,
            } => {
                metrics.generation(&counts, &timings);
                metrics.http_request("ChatCompletions", Code::Ok);
                let body = json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": created,
                    "model": &*model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": if want_logprobs { json!({"content": entries}) } else { Value::Null },
                        "finish_reason": finish_reason(reason),
                    }],
                    "usage": usage(&counts),
                });
                return Ok(axum::Json(body).into_response());
            }
        }
    }
    Err(ApiError::from(EngineError::Fault(
        "the reply stopped before its end".into(),
    )))
}

/// The streamed reply: a role chunk, a chunk per engine delta, the finish
/// chunk, the usage chunk when asked, `[DONE]`. An error after the first
/// byte is an `error` event, as OpenAI's SDKs read it. Pulled as the socket
/// takes it, so a slow reader holds back only its own sequence; dropped
/// when the client leaves, which cancels the sequence.
fn sse(
    metrics: Arc<Metrics>,
    events: crate::engine::GenerateEvents,
    id: String,
    created: u64,
    model: Arc<str>,
    include_usage: bool,
    want_logprobs: bool,
) -> Response {
    let chunk = move |delta: Value, logprobs: Value, finish: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": &*model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        })
    };
    let first = chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
        Value::Null,
    );
    // The engine's events until their end has been sent.
    struct Pending {
        events: Option<crate::engine::GenerateEvents>,
    }
    let state = Pending {
        events: Some(events),
    };
    let body = stream::unfold(state, move |mut state| {
        let metrics = metrics.clone();
        let chunk = chunk.clone();
        async move {
            let events = state.events.as_mut()?;
            let out: Vec<Value> = match events.recv().await {
                None => {
                    state.events = None;
                    let error = ApiError::from(EngineError::Fault(
                        "the reply stopped before its end".into(),
                    ));
                    metrics.http_request("ChatCompletions", error.grpc);
                    vec![error.body()]
                }
                Some(Err(error)) => {
                    state.events = None;
                    let error = ApiError::from(error);
                    metrics.http_request("ChatCompletions", error.grpc);
                    vec![error.body()]
                }
                Some(Ok(GenerateEvent::Delta { text, tokens })) => {
                    let lp = if want_logprobs {
                        json!({"content": logprobs(&tokens)})
                    } else {
                        Value::Null
                    };
                    vec![chunk(json!({"content": text}), lp, Value::Null)]
                }
                Some(Ok(GenerateEvent::Done {
                    finish_reason: reason,
                    usage: counts,
                    timings,
                })) => {
                    state.events = None;
                    metrics.generation(&counts, &timings);
                    metrics.http_request("ChatCompletions", Code::Ok);
                    let mut last =
                        vec![chunk(json!({}), Value::Null, json!(finish_reason(reason)))];
                    if include_usage {
                        let mut with_usage = chunk(json!({}), Value::Null, Value::Null);
                        with_usage["choices"] = json!([]);
                        with_usage["usage"] = usage(&counts);
                        last.push(with_usage);
                    }
                    last
                }
            };
            let events: Vec<Result<Event, std::convert::Infallible>> = out
                .into_iter()
                .map(|v| Ok(Event::default().data(v.to_string())))
                .collect();
            Some((stream::iter(events), state))
        }
    })
    .flatten();
    let body = stream::iter([Ok(Event::default().data(first.to_string()))])
        .chain(body)
        .chain(stream::iter([Ok(Event::default().data("[DONE]"))]));
    Sse::new(body).into_response()
}

// ---- embeddings ---------------------------------------------------------------

async fn embeddings(
    State(api): State<OpenAi>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let span = span("Embeddings", &headers);
    let result = run_embeddings(&api, caller, &body, arrived)
        .instrument(span.clone())
        .await;
    let code = result.as_ref().map_or_else(|e| e.grpc, |_| Code::Ok);
    span.record("outcome", format!("{code:?}"));
    api.metrics.http_request("Embeddings", code);
    match result {
        Ok(body) => axum::Json(body).into_response(),
        Err(error) => error.into_response(),
    }
}

async fn run_embeddings(
    api: &OpenAi,
    caller: Caller,
    body: &Result<Bytes, BytesRejection>,
    arrived: Instant,
) -> Result<Value, ApiError> {
    // The gate checked the key and read the body within its limits.
    let body = body.as_ref().map_err(body_error)?;
    let request: EmbeddingsRequest = parse(body)?;
    api.check_model(request.model.as_deref())?;
    if request.dimensions.is_some() {
        return Err(bad_request(
            Some("dimensions"),
            "dimensions is not supported: the model's size is fixed",
        ));
    }
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(bad_request(
                Some("encoding_format"),
                format!("{other:?}: expected \"float\" or \"base64\""),
            ))
        }
    };
    let inputs = match &request.input {
        EmbedInputs::Many(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| embed_input(item, &format!("input[{i}]")))
            .collect::<Result<Vec<_>, _>>()?,
        EmbedInputs::One(item) => vec![embed_input(item, "input")?],
        EmbedInputs::TokenIds => {
            return Err(bad_request(
                Some("input"),
                "token ids are not taken as input; send text",
            ))
        }
    };
    let message = proto::EmbedRequest {
        inputs,
        pooling: proto::Pooling::Mean as i32,
        normalize: true,
        cache_salt: request.cache_salt.clone(),
        ..Default::default()
    };
    let deadline = arrived.checked_add(api.front.limits().max_deadline);
    let embeddings = within(deadline, api.front.run_embed(message, caller, deadline)).await?;
    let tokens: u32 = embeddings.iter().map(|e| e.tokens).sum();
    let data: Vec<Value> = embeddings
        .into_iter()
        .enumerate()
        .map(|(index, e)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = e.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(e.values)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(json!({
        "object": "list",
        "data": data,
        "model": &*api.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
}

// ---- models -------------------------------------------------------------------

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "internvl-grpc"})
}

async fn models(State(api): State<OpenAi>) -> Response {
    api.metrics.http_request("Models", Code::Ok);
    axum::Json(json!({"object": "list", "data": [model_object(&api.model)]})).into_response()
}

async fn model(State(api): State<OpenAi>, Path(id): Path<String>) -> Response {
    let result = api.check_model(Some(&id));
    api.metrics.http_request(
        "Models",
        result.as_ref().map_or_else(|e| e.grpc, |_| Code::Ok),
    );
    match result {
        Ok(()) => axum::Json(model_object(&api.model)).into_response(),
        Err(error) => error.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_catalog_names_or_file_names() {
        assert_eq!(
            model_id("/models/tiny-internvl3-f32.gguf"),
            "tiny-internvl3-f32"
        );
        assert_eq!(model_id("some-model"), "some-model");
    }
}
