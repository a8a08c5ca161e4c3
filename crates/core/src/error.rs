//! Errors of the engine layer. The service maps each variant to one gRPC status.

use std::path::PathBuf;

/// Everything the engine can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A request field is out of range; `field` names it as the client sent it.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// Path of the offending field, e.g. `messages[0].role`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// Image bytes that cannot be decoded or exceed the limits.
    #[error("{0}")]
    InvalidImage(String),
    /// The chat template failed to render these messages.
    #[error("chat template: {0}")]
    Template(String),
    /// A model file is missing, unreadable or not what the engine needs.
    #[error("{path}: {message}")]
    ModelFile {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The directory for files derived from the model cannot be used.
    #[error("cache directory {path}: {message}")]
    CacheDir {
        /// The directory (or file in it) at fault.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A device setting that cannot work here (no such device, more
    /// `tensor_split` entries than devices, an unreachable `rpc_servers`
    /// entry); `setting` names the key.
    #[error("{setting}: {message}")]
    Offload {
        /// The configuration key at fault, e.g. `rpc_servers[1]`.
        setting: String,
        /// What is wrong, and what there is instead.
        message: String,
    },
    /// A media URL the service did not fetch, or could not; `field` names
    /// the part (`messages[0].content[1].image.url`).
    #[error("{field}: {message}")]
    Media {
        /// Path of the URL field.
        field: String,
        /// Why the service refused or failed.
        failure: MediaFailure,
        /// What happened, and which key or limit decided it.
        message: String,
    },
    /// The engine is still loading the model.
    #[error("the model is still loading")]
    NotReady,
    /// Every slot is busy and the queue is full; the client should retry.
    #[error("every sequence slot is busy and the request queue is full; retry in about {retry_after_ms} ms")]
    QueueFull {
        /// About how long until a queue place frees up.
        retry_after_ms: u64,
    },
    /// The decoded media of the requests in flight leave too little of
    /// `media_memory_mb` for this one's now; the client should retry.
    #[error("decoding this request's media needs {needed_mb} MiB more of the {limit_mb} MiB that requests in flight may hold (media_memory_mb); retry in about {retry_after_ms} ms")]
    MediaMemoryFull {
        /// What the request was about to take.
        needed_mb: u64,
        /// `media_memory_mb`.
        limit_mb: u64,
        /// About how long until a request in flight ends.
        retry_after_ms: u64,
    },
    /// The server is draining: no new work, and work past the grace period is cut.
    #[error("the server is shutting down; retry on another replica")]
    ShuttingDown,
    /// The caller's deadline passed; the sequence was freed.
    #[error("deadline exceeded after {completed} generated tokens")]
    DeadlineExceeded {
        /// Tokens generated before the deadline.
        completed: u32,
    },
    /// The caller's deadline passed before the response began (while the
    /// call was prepared or queued); nothing of it is left running.
    #[error("deadline exceeded before the response began")]
    DeadlineBeforeResponse,
    /// The client took no event of its stream for `stream_stall_secs` while
    /// events waited; the stream was ended to free its slot.
    #[error("the client took no event for {secs} s (stream_stall_secs); the stream was ended to free its slot")]
    StreamStalled {
        /// The stall time that passed.
        secs: f64,
    },
    /// The client went away; nothing is sent (internal to the engine).
    #[error("the client cancelled the request")]
    ClientGone,
    /// The engine thread has stopped (shutdown or a failed load).
    #[error("the engine has stopped")]
    Stopped,
    /// The engine thread failed (a panic) while this request was open or
    /// queued; the replica is restarting.
    #[error("the engine failed ({0}); this replica is restarting, retry on another")]
    Fault(String),
    /// llama.cpp reported a failure while running a request.
    #[error("inference failed: {0}")]
    Inference(String),
}

/// How fetching a media URL or decoding a video file went wrong, which
/// decides the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaFailure {
    /// Not a usable URL, or a scheme the service never fetches.
    Malformed,
    /// The deployment's policy refuses it (`media_allow`, `media_root`, a
    /// private address).
    Refused,
    /// More bytes than `media_max_mb`, more URLs than `media_max_fetches`,
    /// or sampled frames past `media_video_max_decoded_mb`.
    TooLarge,
    /// No answer within `media_fetch_timeout_secs`, or a decode past
    /// `media_video_timeout_secs`.
    TimedOut,
    /// The host could not be reached or answered with an error status.
    Unreachable,
    /// This deployment cannot decode it: video files are off, or its FFmpeg
    /// or sandbox does not run.
    Unavailable,
}

impl EngineError {
    /// Shorthand for [`EngineError::Offload`].
    pub fn offload(setting: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Offload {
            setting: setting.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`EngineError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The request field at fault and what is wrong with it, for the errors
    /// that name one (a transport renames the field in its own terms).
    pub fn field(&self) -> Option<(&str, &str)> {
        match self {
            Self::InvalidArgument { field, message } | Self::Media { field, message, .. }
                if !field.is_empty() =>
            {
                Some((field, message))
            }
            _ => None,
        }
    }

    /// Prefixes the field path of an invalid-argument or image error with `prefix`.
    pub fn in_field(self, prefix: &str) -> Self {
        match self {
            Self::InvalidArgument { field, message } => Self::InvalidArgument {
                field: if field.is_empty() {
                    prefix.to_string()
                } else {
                    format!("{prefix}.{field}")
                },
                message,
            },
            Self::InvalidImage(message) => Self::InvalidArgument {
                field: prefix.to_string(),
                message,
            },
            other => other,
        }
    }
}
