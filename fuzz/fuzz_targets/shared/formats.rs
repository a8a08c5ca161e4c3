//! What several fuzz targets share: a format compiler over a byte
//! vocabulary, as the engine's is over a model's.

use std::sync::OnceLock;

use internvl_grpc::engine::{FormatCompiler, FormatLimits, Vocabulary};

/// Tokens: every byte, a few words, and an end token last.
pub const VOCAB: usize = 256 + 8;

fn vocabulary() -> Vocabulary {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for w in ["yes", "no", "{\"", "\": ", "true", "12", ", "] {
        tokens.push(w.as_bytes().to_vec());
    }
    tokens.push(b"\xFF<|im_end|>".to_vec());
    assert_eq!(tokens.len(), VOCAB);
    let eos = tokens.len() as u32 - 1;
    Vocabulary {
        tokens,
        end_of_generation: vec![eos],
    }
}

/// One compiler for the process, with the service's default limits.
pub fn compiler() -> &'static FormatCompiler {
    static COMPILER: OnceLock<FormatCompiler> = OnceLock::new();
    COMPILER.get_or_init(|| FormatCompiler::new(vocabulary, FormatLimits::default()))
}
