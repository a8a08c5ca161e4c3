//! Any bytes as an mmproj file: the tiling read from its metadata (checked in
//! Rust before llama.cpp's GGUF reader opens it) and the position-row
//! correction must refuse naming the file, or accept; never panic or abort,
//! and never write a derived file from one they refuse.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use internvl_core::gguf_meta::read_tile_spec;
use internvl_core::position_rows::{prepare, VisionFile};
use internvl_core::EngineError;
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("internvl-fuzz-mmproj-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let file = scratch().join("mmproj.gguf");
    let cache = scratch().join("cache");
    std::fs::write(&file, data).unwrap();
    let named = |e: EngineError| {
        let message = e.to_string();
        assert!(message.contains("mmproj.gguf") || message.contains("cache"), "{message}");
    };
    match read_tile_spec(&file) {
        Ok((spec, projector)) => {
            assert_eq!(projector, "internvl");
            assert!(spec.tile_size > 0 && spec.min_tiles >= 1 && spec.min_tiles <= spec.max_tiles);
            match prepare(&file, Some(&cache)) {
                Ok(VisionFile::Corrected { derived, .. }) => assert!(derived.exists()),
                Ok(VisionFile::AsIs(path)) => assert_eq!(path, file),
                Err(e) => named(e),
            }
        }
        Err(e) => named(e),
    }
    let _ = std::fs::remove_dir_all(&cache);
});
