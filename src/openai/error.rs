//! Errors as OpenAI's API writes them: the HTTP status and body of each
//! engine error, from its variant (the field it names, renamed in the API's
//! terms) and the service's one code mapping.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tonic::Code;

use crate::engine::EngineError;

/// An error as OpenAI's API writes it, with the gRPC code it came from.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) kind: &'static str,
    pub(super) code: Option<String>,
    pub(super) message: String,
    pub(super) param: Option<String>,
    pub(super) retry_after_ms: Option<u64>,
    pub(super) grpc: Code,
}

pub(super) fn not_found(name: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: Some("model_not_found".into()),
        message: format!("The model `{name}` does not exist or you do not have access to it."),
        param: Some("model".into()),
        retry_after_ms: None,
        grpc: Code::NotFound,
    }
}

pub(super) fn bad_request(param: Option<&str>, message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        kind: "invalid_request_error",
        code: None,
        message: message.into(),
        param: param.map(str::to_string),
        retry_after_ms: None,
        grpc: Code::InvalidArgument,
    }
}

/// A proto field path (`messages[0].content[1].image.url`) as the OpenAI
/// request named it (`messages[0].content[1].image_url.url`).
pub(super) fn openai_param(field: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut after_media = false;
    for segment in field.split('.') {
        let renamed = match segment {
            "image" => "image_url",
            "video" => "video_url",
            "url" | "data" if after_media => "url",
            "max_tiles" | "min_tiles" if after_media => "detail",
            other => other,
        };
        after_media = matches!(segment, "image" | "video");
        out.push(renamed.to_string());
    }
    if out.first().is_some_and(|s| s == "sampling") {
        out.remove(0);
    }
    if let Some(first) = out.first_mut() {
        if let Some(rest) = first.strip_prefix("inputs") {
            *first = format!("input{rest}");
        } else if first == "max_new_tokens" {
            *first = "max_tokens".into();
        }
    }
    out.join(".")
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        // The one mapping gRPC uses; the HTTP status follows from its code.
        let code = crate::front::code(&error);
        let retry_after_ms = crate::front::retry_after_ms(&error);
        // The field in proto terms; OpenAI's name replaces it.
        let (field, message) = match error.field() {
            Some((field, why)) => (Some(field), format!("{}: {why}", openai_param(field))),
            None => (None, error.to_string()),
        };
        let (http, kind, param) = match code {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                field.map(openai_param),
            ),
            Code::PermissionDenied => (
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                field.map(openai_param),
            ),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "invalid_request_error", None),
            Code::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", None),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", None),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout_error", None),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error", None),
            Code::Cancelled => (StatusCode::from_u16(499).expect("valid"), "cancelled", None),
            Code::Unimplemented => (StatusCode::NOT_IMPLEMENTED, "invalid_request_error", None),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        ApiError {
            status: http,
            kind,
            code: Some(format!("{code:?}")),
            message,
            param,
            retry_after_ms,
            grpc: code,
        }
    }
}

impl ApiError {
    pub(super) fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(ms) = self.retry_after_ms {
            let headers = response.headers_mut();
            // Seconds for any client; milliseconds for OpenAI's SDKs, which read it first.
            let secs = ms.div_ceil(1000).max(1);
            headers.insert("retry-after", HeaderValue::from(secs));
            headers.insert("retry-after-ms", HeaderValue::from(ms));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_fields_are_named_as_the_openai_request_names_them() {
        assert_eq!(
            openai_param("messages[0].content[1].image.url"),
            "messages[0].content[1].image_url.url"
        );
        assert_eq!(
            openai_param("messages[0].content[1].image.data"),
            "messages[0].content[1].image_url.url"
        );
        assert_eq!(
            openai_param("messages[2].content[0].video.url"),
            "messages[2].content[0].video_url.url"
        );
        assert_eq!(openai_param("max_new_tokens"), "max_tokens");
        assert_eq!(openai_param("sampling.temperature"), "temperature");
        assert_eq!(openai_param("inputs[3].content[0]"), "input[3].content[0]");
        assert_eq!(openai_param("stop[0]"), "stop[0]");
    }

    #[test]
    fn the_field_comes_from_the_variant_not_the_text() {
        // A message whose text itself holds ": " keeps its field.
        let error = ApiError::from(EngineError::invalid(
            "messages[0].content[1].image.data",
            "cannot decode image: unexpected end: of file",
        ));
        assert_eq!(
            error.param.as_deref(),
            Some("messages[0].content[1].image_url.url")
        );
        assert_eq!(
            error.message,
            "messages[0].content[1].image_url.url: cannot decode image: unexpected end: of file"
        );
        // An error without a field names none, whatever its text holds.
        let error = ApiError::from(EngineError::Template("x: y".into()));
        assert_eq!((error.status, error.param), (StatusCode::BAD_REQUEST, None));
    }
}
