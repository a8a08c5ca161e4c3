//! The machine's physical limits beside what the model reaches, with the same
//! threads: where speed is left, and where only scheduling can win.
//!
//! - Memory read bandwidth: every thread sums its share of a buffer far larger
//!   than the caches (best of the repeats).
//! - Matrix-multiply peak: an f32 GEMM (`ndarray`, i.e. the `matrixmultiply`
//!   crate's AVX2/FMA kernels) split by rows over the threads (best of the
//!   repeats). The vision encoder's f16 weights are multiplied in f32 by
//!   ggml's CPU kernels, so this is its ceiling where those kernels are AVX2
//!   ones; ggml's AVX-512 kernels can pass it (no well-kept crate has
//!   AVX-512 GEMM kernels on stable Rust).
//! - Decode: one stream through bare llama.cpp (the service's context
//!   settings), tokens/s against bandwidth ÷ the bytes a token reads (every
//!   weight of the language model but the token embeddings, of which one row,
//!   plus the KV cells it attends over).
//! - Vision: one 448×448 tile through the encoder, GFLOP/s against the peak;
//!   FLOPs counted from the mmproj's tensor shapes (2·m·n·k per weight
//!   matrix, plus attention's two T×T×d products per block).
//!
//! `INTERNVL_BENCH_MODEL=DIR/…gguf INTERNVL_BENCH_MMPROJ=DIR/mmproj-…gguf cargo bench --bench limits`
//! (default: the bundled tiny model). Knobs: INTERNVL_BENCH_THREADS (all
//! cores), INTERNVL_BENCH_TOKENS (128), INTERNVL_BENCH_REPEATS (5),
//! INTERNVL_BENCH_BANDWIDTH_MB (2048).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use internvl_core::gguf::{self, Gguf};
use internvl_core::position_rows;
use internvl_core::sampling::argmax;
use internvl_core::settings::KvCacheType;
use internvl_grpc::config::Config;
use internvl_llama::{self as llama, Context, Model, Outputs, Vision};
use ndarray::{s, Array2};

use common::{env_or, fixtures, median, model_pair, threads};

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// GB/s read by `threads` threads summing `mb` MiB of u64, once per repeat.
fn read_bandwidth(threads: usize, mb: usize, repeats: usize) -> Vec<f64> {
    let words = mb * 1024 * 1024 / 8;
    // Every page written first, so the reads are of memory, not of the zero page.
    let buffer: Vec<u64> = (0..words as u64).map(|i| i.wrapping_mul(0x9e37)).collect();
    let per_thread = words.div_ceil(threads);
    (0..repeats)
        .map(|_| {
            let start = Instant::now();
            let sum = std::thread::scope(|scope| {
                let parts: Vec<_> = buffer
                    .chunks(per_thread)
                    .map(|part| scope.spawn(move || sum_words(part)))
                    .collect();
                parts
                    .into_iter()
                    .fold(0u64, |acc, p| acc.wrapping_add(p.join().unwrap()))
            });
            let seconds = start.elapsed().as_secs_f64();
            std::hint::black_box(sum);
            (words * 8) as f64 / seconds / 1e9
        })
        .collect()
}

/// Four independent sums, so the loop is bound by loads rather than by one
/// chain of additions (the crate itself is built at opt-level 1 in tests).
fn sum_words(words: &[u64]) -> u64 {
    let mut acc = [0u64; 4];
    let mut chunks = words.chunks_exact(4);
    for c in &mut chunks {
        acc[0] = acc[0].wrapping_add(c[0]);
        acc[1] = acc[1].wrapping_add(c[1]);
        acc[2] = acc[2].wrapping_add(c[2]);
        acc[3] = acc[3].wrapping_add(c[3]);
    }
    let rest = chunks
        .remainder()
        .iter()
        .fold(0u64, |a, &w| a.wrapping_add(w));
    acc.iter().fold(rest, |a, &w| a.wrapping_add(w))
}

/// GFLOP/s of an n×n×n f32 GEMM, its rows split over `threads`, once per repeat.
fn gemm_peak(threads: usize, n: usize, repeats: usize) -> Vec<f64> {
    let a = Array2::from_shape_fn((n, n), |(i, j)| ((i * 7 + j * 3) % 17) as f32 * 0.01);
    let b = Array2::from_shape_fn((n, n), |(i, j)| ((i * 5 + j * 11) % 13) as f32 * 0.01);
    let rows = n.div_ceil(threads);
    (0..repeats)
        .map(|_| {
            let start = Instant::now();
            std::thread::scope(|scope| {
                let parts: Vec<_> = (0..n)
                    .step_by(rows)
                    .map(|first| {
                        let a = a.slice(s![first..(first + rows).min(n), ..]);
                        let b = &b;
                        scope.spawn(move || a.dot(b))
                    })
                    .collect();
                for p in parts {
                    std::hint::black_box(p.join().unwrap());
                }
            });
            2.0 * (n as f64).powi(3) / start.elapsed().as_secs_f64() / 1e9
        })
        .collect()
}

/// Bytes of one KV cell element of `t`, blocks included.
fn kv_element_bytes(t: KvCacheType) -> f64 {
    match t {
        KvCacheType::F32 => 4.0,
        KvCacheType::F16 | KvCacheType::Bf16 | KvCacheType::Auto => 2.0,
        KvCacheType::Q8_0 => 34.0 / 32.0,
        KvCacheType::Q4_0 | KvCacheType::Iq4Nl => 18.0 / 32.0,
        KvCacheType::Q4_1 => 20.0 / 32.0,
        KvCacheType::Q5_0 => 22.0 / 32.0,
        KvCacheType::Q5_1 => 24.0 / 32.0,
    }
}

/// Bytes of weights one decoded token reads: every tensor but the token
/// embeddings, of which one row (unless they are also the output matrix).
fn weight_bytes_per_token(model: &Gguf) -> f64 {
    let tied = model.tensor("output.weight").is_none();
    model
        .tensors
        .iter()
        .map(|t| match (t.name.as_str(), tied) {
            ("token_embd.weight", false) => {
                t.bytes as f64 / t.dims.get(1).copied().unwrap_or(1) as f64
            }
            _ => t.bytes as f64,
        })
        .sum()
}

/// KV elements per position over all layers (K and V), from the projections' shapes.
fn kv_elements_per_position(model: &Gguf) -> (f64, f64) {
    let dim = |suffix: &str| -> f64 {
        model
            .tensors
            .iter()
            .filter(|t| t.name.starts_with("blk.") && t.name.ends_with(suffix))
            .map(|t| t.dims.get(1).copied().unwrap_or(0) as f64)
            .sum()
    };
    (dim(".attn_k.weight"), dim(".attn_v.weight"))
}

/// FLOPs of one tile through the encoder and projector.
fn vision_flops_per_tile(mmproj: &Gguf) -> Result<f64, String> {
    let need = |key: &str| {
        mmproj
            .int(key)
            .map(|v| v as f64)
            .ok_or_else(|| format!("the mmproj has no {key}"))
    };
    let side = need("clip.vision.image_size")? / need("clip.vision.patch_size")?;
    let patches = side * side;
    let scale = need("clip.vision.projector.scale_factor").unwrap_or(2.0);
    let d = need("clip.vision.embedding_length")?;
    let blocks = need("clip.vision.block_count")?;
    let tokens = patches + f64::from(u8::from(mmproj.tensor("v.class_embd").is_some()));
    let projected = patches / (scale * scale);
    let mut flops = 4.0 * tokens * tokens * d * blocks; // Q·Kᵀ and softmax·V
    for t in &mmproj.tensors {
        let numel: f64 = t.dims.iter().map(|&x| x as f64).product();
        flops += match t.name.as_str() {
            "v.patch_embd.weight" => 2.0 * numel * patches,
            n if t.dims.len() == 2 && n.starts_with("v.blk.") => 2.0 * numel * tokens,
            n if t.dims.len() == 2 && n.starts_with("mm.") => 2.0 * numel * projected,
            _ => 0.0,
        };
    }
    Ok(flops)
}

fn main() {
    let (model_path, mmproj_path) = model_pair();
    let threads = threads() as usize;
    let tokens: u32 = env_or("INTERNVL_BENCH_TOKENS", 128);
    let repeats: usize = env_or("INTERNVL_BENCH_REPEATS", 5);
    let bandwidth_mb: usize = env_or("INTERNVL_BENCH_BANDWIDTH_MB", 2048);
    println!(
        "model {} | mmproj {} | threads {threads} | tokens {tokens} | repeats {repeats}",
        model_path.display(),
        mmproj_path.display()
    );

    let bw = read_bandwidth(threads, bandwidth_mb, repeats);
    let bw_one = read_bandwidth(1, bandwidth_mb, repeats);
    let peak = gemm_peak(threads, 2048, repeats);
    println!(
        "read bandwidth: {:.1} GB/s with {threads} threads (runs {}), {:.1} GB/s with 1",
        best(&bw),
        fmt(&bw),
        best(&bw_one)
    );
    println!(
        "f32 GEMM 2048³ (AVX2/FMA): {:.1} GFLOP/s with {threads} threads (runs {})",
        best(&peak),
        fmt(&peak)
    );

    let cfg = Config {
        model: model_path.display().to_string(),
        mmproj: mmproj_path.display().to_string(),
        threads: threads as u32,
        parallel: 1,
        ..Config::default()
    }
    .engine_settings()
    .unwrap();
    llama::init_backend(false, &[]).unwrap();
    println!("llama.cpp: {}", llama::system_info());
    let model = Arc::new(Model::load(&model_path, &cfg.model).unwrap());
    let params = llama::context_params(&cfg, false);
    let mut ctx = Context::new(model.clone(), &params).unwrap();
    let prompt = model
        .tokenize(
            "<|im_start|>user\nDescribe the history of the bicycle in a few sentences.<|im_end|>\n<|im_start|>assistant\n",
            false,
            true,
        )
        .unwrap();
    let mut rates = Vec::new();
    for _ in 0..repeats {
        ctx.clear();
        ctx.decode_tokens(&prompt, 0, 0, Outputs::Last).unwrap();
        let mut token = argmax(ctx.logits(-1).unwrap());
        let start = Instant::now();
        let first = prompt.len() as i32;
        for pos in first..first + tokens as i32 - 1 {
            ctx.decode_tokens(&[token], pos, 0, Outputs::Last).unwrap();
            token = argmax(ctx.logits(-1).unwrap());
        }
        rates.push(f64::from(tokens - 1) / start.elapsed().as_secs_f64());
    }
    let lm = read_header(&model_path);
    let (k, v) = kv_elements_per_position(&lm);
    let mean_position = prompt.len() as f64 + f64::from(tokens) / 2.0;
    let kv =
        mean_position * (k * kv_element_bytes(params.type_k) + v * kv_element_bytes(params.type_v));
    let per_token = weight_bytes_per_token(&lm) + kv;
    let ceiling = best(&bw) * 1e9 / per_token;
    println!(
        "decode: {:.2} tok/s median (runs {}); a token reads {:.1} MB ({:.2} MB of it KV at the mean position); \
         bandwidth ÷ bytes = {ceiling:.1} tok/s; reached {:.0} %",
        median(rates.clone()),
        fmt(&rates),
        per_token / 1e6,
        kv / 1e6,
        100.0 * median(rates) / ceiling
    );

    let served = position_rows::prepare(&mmproj_path, cfg.cache_dir.as_deref()).unwrap();
    let mut vision = Vision::load(served.path(), model.clone(), &cfg.vision).unwrap();
    let png = std::fs::read(fixtures().join("images/square_448.png")).unwrap();
    let tile = image::load_from_memory(&png).unwrap().to_rgb8();
    let mut seconds = Vec::new();
    for _ in 0..repeats {
        let start = Instant::now();
        std::hint::black_box(vision.encode_tile(tile.as_raw(), 448).unwrap());
        seconds.push(start.elapsed().as_secs_f64());
    }
    let flops = vision_flops_per_tile(&read_header(&mmproj_path)).unwrap();
    let gflop_s = flops / median(seconds.clone()) / 1e9;
    // The peak with the encoder's own thread count, where the service gives it fewer.
    let encoder_threads = cfg.vision.threads.max(1) as usize;
    let encoder_peak = if encoder_threads == threads {
        best(&peak)
    } else {
        best(&gemm_peak(encoder_threads, 2048, repeats))
    };
    println!(
        "vision: {:.0} ms per tile median (runs {}, {} encoder threads); {:.1} GFLOP per tile; \
         {gflop_s:.1} GFLOP/s; {:.0} % of the AVX2 GEMM with those threads ({encoder_peak:.1})",
        median(seconds.clone()) * 1e3,
        fmt(&seconds.iter().map(|s| s * 1e3).collect::<Vec<_>>()),
        encoder_threads,
        flops / 1e9,
        100.0 * gflop_s / encoder_peak
    );
}

fn read_header(path: &Path) -> Gguf {
    gguf::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fmt(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}
