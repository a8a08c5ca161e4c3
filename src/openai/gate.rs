//! What every HTTP call passes before its handler runs: the API key, read
//! from the headers alone, then the body, bounded in size and in time.
//!
//! axum's extractors read the whole body before a handler can look at the
//! headers, so a caller without a key could make the server take 32 MiB,
//! or hold a connection open by sending a body slowly, before it heard 401.
//! Here the key is checked first and the body is read under
//! `http_body_timeout_secs` and `max_message_bytes`; the handler gets the
//! bytes and the [`Caller`].

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tonic::Code;

use super::{ApiError, OpenAi};

/// The metric name of an HTTP path.
fn method(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "ChatCompletions",
        "/v1/embeddings" => "Embeddings",
        _ => "Models",
    }
}

fn refused(status: StatusCode, grpc: Code, code: Option<&str>, message: String) -> ApiError {
    ApiError {
        status,
        kind: "invalid_request_error",
        code: code.map(str::to_string),
        message,
        param: None,
        retry_after_ms: None,
        grpc,
    }
}

/// The middleware: 401 from the headers, 413 for a body declared or found
/// too large, 408 for one that does not arrive within the timeout.
pub(super) async fn gate(State(api): State<OpenAi>, request: Request, next: Next) -> Response {
    let name = method(request.uri().path());
    match admit(&api, request).await {
        Ok(request) => next.run(request).await,
        Err(error) => {
            api.metrics.http_request(name, error.grpc);
            error.into_response()
        }
    }
}

async fn admit(api: &OpenAi, request: Request) -> Result<Request, ApiError> {
    let header = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let caller = api.keys.caller(header).map_err(|why| {
        refused(
            StatusCode::UNAUTHORIZED,
            Code::Unauthenticated,
            Some("invalid_api_key"),
            why.to_string(),
        )
    })?;
    let too_large = || {
        refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::ResourceExhausted,
            None,
            format!(
                "request body: larger than {} bytes (max_message_bytes)",
                api.max_body
            ),
        )
    };
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > api.max_body as u64) {
        return Err(too_large());
    }
    let (mut parts, body) = request.into_parts();
    let read = tokio::time::timeout(api.body_timeout, axum::body::to_bytes(body, api.max_body));
    let bytes = match read.await {
        Err(_) => {
            return Err(refused(
                StatusCode::REQUEST_TIMEOUT,
                Code::DeadlineExceeded,
                None,
                format!(
                    "request body: not received within {} s (http_body_timeout_secs)",
                    api.body_timeout.as_secs_f64()
                ),
            ))
        }
        Ok(Err(e)) => {
            if past_limit(e) {
                return Err(too_large());
            }
            return Err(refused(
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
                None,
                "request body: could not be read".into(),
            ));
        }
        Ok(Ok(bytes)) => bytes,
    };
    parts.extensions.insert(caller);
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// Whether reading a body failed because it passed its limit (a body that
/// declared no length, or less than it sent).
fn past_limit(error: axum::Error) -> bool {
    error.into_inner().is::<http_body_util::LengthLimitError>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_past_its_limit_is_told_from_other_failures() {
        let over = axum::body::to_bytes(Body::from(vec![0u8; 10]), 5);
        let over = tokio::runtime::Runtime::new().unwrap().block_on(over);
        assert!(past_limit(over.unwrap_err()));
        assert!(!past_limit(axum::Error::new(std::io::Error::other(
            "reset"
        ))));
    }
}
