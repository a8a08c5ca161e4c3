//! Engine errors as gRPC statuses: the front's code (`front/error.rs`),
//! the error's text, and the retry hint where there is one.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

use crate::engine::EngineError;
use crate::front::{code, retry_after_ms};

/// gRPC's server pushback header (gRFC A6): clients with a retry policy wait
/// this long before retrying.
const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// The status a client gets for `error`; every `EngineError` the service
/// returns goes through here.
pub fn status(error: EngineError) -> Status {
    let code = code(&error);
    let Some(ms) = retry_after_ms(&error) else {
        return Status::new(code, error.to_string());
    };
    // The hint travels twice: as pushback for retry policies, and as
    // google.rpc.RetryInfo for clients that read status details.
    let mut status = Status::with_error_details(
        code,
        error.to_string(),
        ErrorDetails::with_retry_info(Some(Duration::from_millis(ms))),
    );
    status
        .metadata_mut()
        .insert(RETRY_PUSHBACK, MetadataValue::from(ms));
    status
}
