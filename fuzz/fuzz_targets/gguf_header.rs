//! Any bytes as a model file: the Rust GGUF check must refuse or accept, never
//! panic, and never accept a tensor table pointing outside the file.
#![no_main]

use internvl_core::gguf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = gguf::parse(data, data.len() as u64) {
        for t in &file.tensors {
            assert!(t.offset + t.bytes <= data.len() as u64);
        }
        let _ = gguf::check_language_model(&file);
    }
});
