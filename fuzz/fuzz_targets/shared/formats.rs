//! What several fuzz targets share: a format compiler over a byte
//! vocabulary, as the engine's is over a model's.

use std::sync::{Arc, OnceLock};

use internvl_core::constraint::{FormatCompiler, FormatLimits, Tokenize, Vocabulary};

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
    // Longest word first, standing in for the model's tokenizer: it lets
    // formats force tokens (`Constraint::forced`), as the engine's does.
    let words = tokens.clone();
    let tokenize: Tokenize = Arc::new(move |mut bytes: &[u8]| {
        let mut ids = Vec::new();
        while let Some((id, len)) = (0..eos as usize)
            .filter(|&t| bytes.starts_with(&words[t]))
            .map(|t| (t as u32, words[t].len()))
            .max_by_key(|&(_, len)| len)
        {
            ids.push(id);
            bytes = &bytes[len..];
        }
        ids
    });
    Vocabulary {
        tokens,
        end_of_generation: vec![eos],
        tokenize: Some(tokenize),
    }
}

/// One compiler for the process, with the service's default limits.
pub fn compiler() -> &'static FormatCompiler {
    static COMPILER: OnceLock<FormatCompiler> = OnceLock::new();
    COMPILER.get_or_init(|| FormatCompiler::new(vocabulary, FormatLimits::default()))
}
