//! How a deployment runs the engine: everything needed to load and run a
//! model except where its files are, with the llama.cpp choices as plain
//! enums (converted to llama.cpp's constants in `llama/`), so configuration
//! parses them without touching the bindings.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::constraint::FormatLimits;
use super::vision::DecodeLimits;

/// Everything needed to load and run a model, except where its files are.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Loading and GPU offload of the language model.
    pub model: ModelParams,
    /// Context sizing and threads.
    pub context: ContextParams,
    /// Vision encoder placement and threads.
    pub vision: VisionParams,
    /// Limits for decoding untrusted images.
    pub decode_limits: DecodeLimits,
    /// Tiles one request's images and video frames may be cut into
    /// (`max_tiles_per_request`).
    pub max_tiles_per_request: u32,
    /// Requests waiting for a slot beyond those running.
    pub queue_depth: usize,
    /// Most prompt positions decoded per scheduler step, so running streams
    /// keep flowing while a new prompt is read.
    pub prefill_chunk: usize,
    /// Bytes of decoded media (images, tiles, video frames) that requests in
    /// flight may hold together.
    pub media_memory_bytes: u64,
    /// Events buffered per stream before the engine waits for the client.
    pub stream_buffer: usize,
    /// How long a client may take no event while its stream's events wait
    /// before the stream is ended and its slot freed.
    pub stream_stall: std::time::Duration,
    /// Bytes of encoded tiles kept for reuse (0 = none).
    pub image_cache_bytes: usize,
    /// Bytes of finished sequences' KV cells kept for prefix reuse (0 = none).
    pub prefix_cache_bytes: usize,
    /// Limits on `response_format`s.
    pub formats: FormatLimits,
    /// Tokens a `response_format` forces are streamed and decoded together
    /// with the sampled token before them, not one step each.
    pub jump_forward: bool,
    /// Where files derived from the model files are kept (the corrected
    /// mmproj, see [`position_rows`]); `None` when no directory is known.
    pub cache_dir: Option<PathBuf>,
    /// llama.cpp's information lines at INFO (else DEBUG); its warnings and
    /// errors keep their level either way.
    pub llama_info_logs: bool,
}

/// How the language model is loaded and offloaded.
#[derive(Clone, Debug)]
pub struct ModelParams {
    /// Layers to offload to the GPU (-1 = all).
    pub n_gpu_layers: i32,
    /// GPU for the whole model when `split_mode` is none.
    pub main_gpu: i32,
    /// How layers are spread over several GPUs.
    pub split_mode: SplitMode,
    /// Proportions per GPU; empty = llama.cpp's default.
    pub tensor_split: Vec<f32>,
    /// ggml devices the model may use, by name (`Vulkan0`, `CUDA1`, `RPC0`);
    /// empty = every GPU ggml found, and every RPC server's.
    pub devices: Vec<String>,
    /// `host:port` of ggml RPC servers whose devices are added.
    pub rpc_servers: Vec<String>,
    /// Indices of Vulkan's device list that ggml's Vulkan backend uses
    /// (`GGML_VK_VISIBLE_DEVICES`); empty = that variable, else ggml's
    /// choice (discrete and integrated GPUs only).
    pub vulkan_devices: Vec<u32>,
}

/// How the inference context is sized and run.
#[derive(Clone, Debug)]
pub struct ContextParams {
    /// Context length in tokens.
    pub n_ctx: u32,
    /// Largest batch submitted to one decode.
    pub n_batch: u32,
    /// Physical micro-batch size.
    pub n_ubatch: u32,
    /// CPU threads for decoding and prefill.
    pub threads: i32,
    /// Fused attention kernels.
    pub flash_attn: FlashAttn,
    /// Element type of the K cache.
    pub type_k: KvCacheType,
    /// Element type of the V cache.
    pub type_v: KvCacheType,
    /// Sequences decoded together (continuous-batching slots).
    pub n_seq_max: u32,
}

impl ContextParams {
    /// These parameters with `auto` cache types made concrete: `on_gpu` when
    /// every layer is on a local GPU, so no attention runs on a CPU. K: f16.
    /// V: bf16 where flash attention may run on a CPU, else f16. ggml's CPU
    /// flash-attention kernel sums an f16 V in an f16 accumulator (and
    /// llama.cpp casts an f32 V to f16 for it), which moved a 13-tile
    /// prompt's logits by up to 0.56 from the reference; any other V type it
    /// sums in f32 (0.0023). Layers left on the CPU by a partial offload run
    /// that kernel, and so may an RPC device (0.56 again over two CPU-backed
    /// RPC servers): the service cannot see what backend serves it.
    pub fn resolved(&self, on_gpu: bool) -> ContextParams {
        let flash_on_cpu = !on_gpu && self.flash_attn != FlashAttn::Off;
        let pick = |kind: KvCacheType, auto: KvCacheType| match kind {
            KvCacheType::Auto => auto,
            chosen => chosen,
        };
        let v_auto = if flash_on_cpu {
            KvCacheType::Bf16
        } else {
            KvCacheType::F16
        };
        ContextParams {
            type_k: pick(self.type_k, KvCacheType::F16),
            type_v: pick(self.type_v, v_auto),
            ..self.clone()
        }
    }
}

/// Settings of the vision encoder context.
#[derive(Clone, Debug)]
pub struct VisionParams {
    /// Run the vision encoder on the GPU.
    pub use_gpu: bool,
    /// CPU threads for the encoder.
    pub threads: i32,
    /// Fused attention kernels.
    pub flash_attn: FlashAttn,
}

/// How the language model's layers are spread over several GPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SplitMode {
    /// One GPU (`main_gpu`) holds the whole model.
    None,
    /// Whole layers per GPU.
    #[default]
    Layer,
    /// Rows of each layer split over the GPUs.
    Row,
}

/// Whether attention uses llama.cpp's fused flash-attention kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlashAttn {
    /// llama.cpp decides per device (on, on the CPU).
    #[default]
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// How FFmpeg is confined when it decodes a video file (`src/confine.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VideoSandbox {
    /// Landlock and a seccomp filter, inside bubblewrap's namespaces where
    /// this machine lets an unprivileged process make them; Landlock and
    /// seccomp alone where it does not (a pod under the runtime's default
    /// seccomp profile). Video files are off when neither can run.
    #[default]
    Auto,
    /// Landlock and a seccomp filter, never bubblewrap.
    Landlock,
    /// Resource limits only: FFmpeg reads what the server can read and
    /// reaches what it can reach.
    Off,
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvCacheType {
    /// Chosen at load by [`ContextParams::resolved`].
    #[default]
    Auto,
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit blocks.
    Q8_0,
    /// 4-bit blocks.
    Q4_0,
    /// 4-bit blocks with a minimum.
    Q4_1,
    /// 5-bit blocks.
    Q5_0,
    /// 5-bit blocks with a minimum.
    Q5_1,
    /// 4-bit non-linear blocks.
    Iq4Nl,
}

/// The one definition of each choice's names: parsing (with an error that
/// lists the allowed values, which serde's own does not), printing, serde
/// and the configuration schema all come from it. The first name is the
/// one printed; the others are accepted aliases.
macro_rules! choice_names {
    ($ty:ident { $($variant:ident => $name:literal $(| $alias:literal)*),+ $(,)? }) => {
        impl $ty {
            /// The names this choice is written as (aliases aside).
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            /// This choice's name, as the configuration writes it.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;

            fn from_str(text: &str) -> Result<Self, String> {
                match text {
                    $($name $(| $alias)* => Ok($ty::$variant),)+
                    other => Err(format!(
                        "{other:?} is not one of {}",
                        Self::NAMES.join(", ")
                    )),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.name())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl schemars::JsonSchema for $ty {
            fn inline_schema() -> bool {
                true
            }

            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($ty).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "type": "string", "enum": Self::NAMES })
            }
        }
    };
}

choice_names!(SplitMode { None => "none", Layer => "layer", Row => "row" });
choice_names!(FlashAttn { Auto => "auto", On => "on" | "true", Off => "off" | "false" });
// "true" and "false" are what the key took when it was a switch.
choice_names!(VideoSandbox { Auto => "auto" | "true", Landlock => "landlock", Off => "off" | "false" });
choice_names!(KvCacheType {
    Auto => "auto",
    F32 => "f32",
    F16 => "f16",
    Bf16 => "bf16",
    Q8_0 => "q8_0",
    Q4_0 => "q4_0",
    Q4_1 => "q4_1",
    Q5_0 => "q5_0",
    Q5_1 => "q5_1",
    Iq4Nl => "iq4_nl",
});

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Keys {
        split_mode: SplitMode,
        flash_attn: FlashAttn,
        cache_type_k: KvCacheType,
    }

    #[test]
    fn choices_parse_by_their_llama_cpp_names() {
        let keys: Keys = toml::from_str(
            "split_mode = \"row\"\nflash_attn = \"false\"\ncache_type_k = \"iq4_nl\"",
        )
        .unwrap();
        assert_eq!(keys.split_mode, SplitMode::Row);
        assert_eq!(keys.flash_attn, FlashAttn::Off);
        assert_eq!(keys.cache_type_k, KvCacheType::Iq4Nl);
    }

    #[test]
    fn names_parse_and_unknown_ones_list_the_choices() {
        assert_eq!("true".parse::<FlashAttn>(), Ok(FlashAttn::On));
        assert_eq!("q5_1".parse::<KvCacheType>(), Ok(KvCacheType::Q5_1));
        let err = "q3".parse::<KvCacheType>().unwrap_err();
        assert!(err.contains("\"q3\"") && err.contains("iq4_nl"), "{err}");
    }

    #[test]
    fn every_name_parses_back_to_its_choice() {
        macro_rules! round_trip {
            ($ty:ty) => {
                for name in <$ty>::NAMES {
                    let choice: $ty = name.parse().unwrap();
                    assert_eq!(choice.name(), *name);
                    assert_eq!(serde_json::to_value(choice).unwrap(), *name);
                }
            };
        }
        round_trip!(SplitMode);
        round_trip!(FlashAttn);
        round_trip!(KvCacheType);
    }

    #[test]
    fn an_unknown_choice_lists_the_allowed_ones() {
        let err = toml::from_str::<Keys>(
            "split_mode = \"diagonal\"\nflash_attn = \"on\"\ncache_type_k = \"f16\"",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("none") && err.contains("layer") && err.contains("row"),
            "{err}"
        );
    }

    fn context(flash_attn: FlashAttn, type_k: KvCacheType, type_v: KvCacheType) -> ContextParams {
        ContextParams {
            n_ctx: 8192,
            n_batch: 2048,
            n_ubatch: 512,
            threads: 2,
            flash_attn,
            type_k,
            type_v,
            n_seq_max: 8,
        }
    }

    #[test]
    fn auto_cache_types_keep_flash_attention_on_the_cpu_summing_v_in_f32() {
        use KvCacheType::*;
        let types = |p: ContextParams| (p.type_k, p.type_v);
        for flash in [FlashAttn::Auto, FlashAttn::On] {
            let auto = context(flash, Auto, Auto);
            assert_eq!(
                types(auto.resolved(false)),
                (F16, Bf16),
                "{flash:?} on the CPU"
            );
            assert_eq!(types(auto.resolved(true)), (F16, F16), "{flash:?} on a GPU");
        }
        let off = context(FlashAttn::Off, Auto, Auto);
        assert_eq!(types(off.resolved(false)), (F16, F16));
        // What a deployment sets is kept.
        let chosen = context(FlashAttn::On, Q8_0, F16);
        assert_eq!(types(chosen.resolved(false)), (Q8_0, F16));
    }
}
