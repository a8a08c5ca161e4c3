//! The one mapping from engine errors to gRPC statuses.

use tonic::{Code, Status};

use crate::engine::EngineError;

impl From<EngineError> for Status {
    fn from(error: EngineError) -> Self {
        let code = match &error {
            EngineError::InvalidArgument { .. }
            | EngineError::InvalidImage(_)
            | EngineError::Template(_) => Code::InvalidArgument,
            EngineError::NotReady | EngineError::Stopped | EngineError::ShuttingDown => {
                Code::Unavailable
            }
            EngineError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            EngineError::ClientGone => Code::Cancelled,
            EngineError::QueueFull => Code::ResourceExhausted,
            EngineError::ModelFile { .. } => Code::FailedPrecondition,
            EngineError::Inference(_) => Code::Internal,
        };
        Status::new(code, error.to_string())
    }
}
