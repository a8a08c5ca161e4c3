//! The one mapping from engine errors to gRPC statuses.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::engine::EngineError;
use internvl_core::error::MediaFailure;

/// gRPC's server pushback header (gRFC A6): clients with a retry policy wait
/// this long before retrying.
const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// The gRPC code of `error`: the one mapping, for gRPC statuses and for the
/// HTTP API's statuses alike.
pub fn code(error: &EngineError) -> Code {
    match error {
        EngineError::InvalidArgument { .. }
        | EngineError::InvalidImage(_)
        | EngineError::Template(_) => Code::InvalidArgument,
        EngineError::NotReady | EngineError::Stopped | EngineError::ShuttingDown => {
            Code::Unavailable
        }
        EngineError::DeadlineExceeded { .. } | EngineError::DeadlineBeforeResponse => {
            Code::DeadlineExceeded
        }
        EngineError::ClientGone => Code::Cancelled,
        // The client's own doing, and nothing to retry here: the replica let
        // go of what it held for it.
        EngineError::StreamStalled { .. } => Code::Aborted,
        EngineError::QueueFull { .. } | EngineError::MediaMemoryFull { .. } => {
            Code::ResourceExhausted
        }
        // A fetch that failed is the URL's fault, never this replica's: not
        // UNAVAILABLE, which clients retry and meshes count against the
        // replica.
        EngineError::Media { failure, .. } => match failure {
            MediaFailure::Malformed | MediaFailure::TooLarge => Code::InvalidArgument,
            MediaFailure::Refused => Code::PermissionDenied,
            MediaFailure::TimedOut => Code::DeadlineExceeded,
            MediaFailure::Unreachable | MediaFailure::Unavailable => Code::FailedPrecondition,
        },
        EngineError::ModelFile { .. }
        | EngineError::CacheDir { .. }
        | EngineError::Offload { .. } => Code::FailedPrecondition,
        EngineError::Inference(_) | EngineError::Fault(_) => Code::Internal,
    }
}

/// How long `error` tells its client to wait before retrying, if it does.
pub fn retry_after_ms(error: &EngineError) -> Option<u64> {
    match error {
        EngineError::QueueFull { retry_after_ms }
        | EngineError::MediaMemoryFull { retry_after_ms, .. } => Some(*retry_after_ms),
        _ => None,
    }
}

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
