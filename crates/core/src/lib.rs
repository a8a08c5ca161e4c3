//! internvl-grpc's domain without llama.cpp: what the service checks and
//! prepares before anything reaches the model, and the types requests are
//! made of. Media decoding and tiling ([`vision`], [`resize`]), GGUF checks
//! and the position-row correction ([`gguf`], [`gguf_meta`],
//! [`position_rows`]), chat prompts ([`prompt`]), video frame sampling ([`video`]), response formats
//! ([`constraint`], [`gbnf`]), sampling settings and text streaming
//! ([`sampling`]), the image and prefix caches' keys ([`cache`]), where
//! weights go ([`placement`]) and the engine's settings ([`settings`]).
//!
//! Nothing here links llama.cpp, so the fuzz targets build without it.

// llama.cpp's unsafe code lives in `internvl-llama` alone.
#![forbid(unsafe_code)]

pub mod cache;
pub mod constraint;
pub mod digest;
pub mod error;
pub mod gbnf;
pub mod gguf;
pub mod gguf_meta;
mod json_numbers;
pub mod media_budget;
pub mod placement;
pub mod position_rows;
pub mod prompt;
pub mod resize;
pub mod sampling;
pub mod settings;
pub mod types;
pub mod video;
pub mod vision;

pub use constraint::{FormatLimits, ResponseFormat};
pub use error::EngineError;
pub use placement::{Buffer, BufferKind, Device, DeviceKind, Placement};
pub use prompt::{ChatMessage, ImageGrid, ImageInput, Part, Role, VideoInput, VideoSource};
pub use sampling::SamplingParams;
pub use settings::{EngineSettings, FlashAttn, KvCacheType, SplitMode, VideoSandbox};
pub use types::*;
pub use video::Sampling;
pub use vision::{DecodeLimits, TileSpec};
