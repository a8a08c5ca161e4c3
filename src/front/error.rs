//! The one mapping from engine errors to status codes, which both
//! transports use: gRPC's statuses carry it, and the HTTP API's statuses
//! follow from it. The codes are gRPC's names for the kinds of failure
//! (the metrics count both protocols under them).

use tonic::Code;

use crate::engine::EngineError;
use internvl_core::error::MediaFailure;

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
