//! Any text as a configuration file, as flags (its `key=value` lines whose
//! key exists, as `--set` takes them) and as a catalog entry: loading refuses
//! with a message or gives a configuration the engine accepts; never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use internvl_api::catalog;
use internvl_api::config::{self, Config};
use libfuzzer_sys::fuzz_target;

fn file() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| std::env::temp_dir().join(format!("internvl-fuzz-{}.toml", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    std::fs::write(file(), text).unwrap();
    let flags: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(key, _)| config::key(key).is_some())
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    for flags in [&[][..], &flags[..]] {
        match Config::load_with_env(Some(file()), flags, std::iter::empty()) {
            Ok(config) => assert!(config.engine_settings().is_ok()),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    if let Err(message) = catalog::parse_entry(text) {
        assert!(!message.is_empty());
    }
});
