//! What every bench reads the same way: its knobs from the environment, the
//! model pair (the bundled tiny model unless `INTERNVL_BENCH_MODEL` and
//! `INTERNVL_BENCH_MMPROJ` name others), its threads, and medians.

use std::path::PathBuf;

/// `key` from the environment, parsed; `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The bundled tiny InternVL3's folder (its images serve every bench).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-internvl")
}

/// The language model and mmproj to measure.
pub fn model_pair() -> (PathBuf, PathBuf) {
    let path = |key: &str, tiny: &str| {
        std::env::var(key)
            .map(PathBuf::from)
            .unwrap_or_else(|_| fixtures().join(tiny))
    };
    (
        path("INTERNVL_BENCH_MODEL", "tiny-internvl3-f32.gguf"),
        path("INTERNVL_BENCH_MMPROJ", "mmproj-tiny-internvl3-f32.gguf"),
    )
}

/// `INTERNVL_BENCH_THREADS`, else every core.
pub fn threads() -> u32 {
    env_or(
        "INTERNVL_BENCH_THREADS",
        std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
    )
}

/// The middle value (the upper of the two middle ones for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
