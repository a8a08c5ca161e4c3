//! Service vs bare llama.cpp, same model, threads and batch sizes, one run.
//!
//! `cargo bench` uses the bundled tiny model. Real shapes:
//! `python3 benches/make_bench_model.py DIR --shape internvl3-1b --type q8_0`, then
//! `INTERNVL_BENCH_MODEL=DIR/…gguf INTERNVL_BENCH_MMPROJ=DIR/mmproj-…gguf cargo bench`.
//! Other knobs: INTERNVL_BENCH_THREADS (default: all cores), INTERNVL_BENCH_TOKENS (128),
//! INTERNVL_BENCH_REPEATS (3).

mod common;
#[path = "common/server.rs"]
mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use internvl_core::position_rows;
use internvl_core::sampling::argmax;
use internvl_core::vision::{decode_rgb, tile_image};
use internvl_grpc::config::Config;
use internvl_grpc::engine::{DecodeLimits, TileSpec};
use internvl_grpc::service::proto::{self, intern_vl_client::InternVlClient};
use internvl_llama::{self as llama, BatchToken, Context, Model, Outputs, Vision};

use common::{env_or, fixtures, median, model_pair, threads};
use server::{serve, Served};

struct Setup {
    model: PathBuf,
    mmproj: PathBuf,
    threads: u32,
    tokens: u32,
    repeats: usize,
}

fn setup() -> Setup {
    let (model, mmproj) = model_pair();
    Setup {
        model,
        mmproj,
        threads: threads(),
        tokens: env_or("INTERNVL_BENCH_TOKENS", 128),
        repeats: env_or("INTERNVL_BENCH_REPEATS", 3),
    }
}

fn config(s: &Setup) -> Config {
    Config {
        model: s.model.display().to_string(),
        mmproj: s.mmproj.display().to_string(),
        threads: s.threads,
        n_ctx: 8192,
        parallel: *STREAMS.iter().max().unwrap(),
        ..Config::default()
    }
}

/// Concurrent stream counts measured for aggregate decode.
const STREAMS: [u32; 4] = [1, 4, 8, 16];

const PROMPT: &str = "Describe the history of the bicycle in a few sentences.";

/// Figures of one path (service or bare), medians over the repeats.
#[derive(Default, Debug)]
struct Figures {
    text_ttft_ms: f64,
    decode_tok_s: f64,
    image_ttft_ms: f64,
    /// A 13-tile image (12 tiles plus thumbnail) plus a question, one run.
    image13_ttft_ms: f64,
    /// Summed decode tokens/s with `STREAMS[i]` sequences running together.
    aggregate_tok_s: Vec<f64>,
}

/// A fresh 1-tile image arriving while `BUSY_STREAMS` streams decode.
#[derive(Debug)]
struct UnderLoad {
    image_ttft_ms: f64,
    /// The longest any of the streams waited for a token meanwhile.
    longest_pause_ms: f64,
    /// Their summed tokens/s meanwhile.
    tok_s: f64,
    /// TTFT of another question about a 1-tile image that a running stream
    /// is about (its cells are shared, not decoded again).
    shared_image_ttft_ms: f64,
}

/// Streams decoding while an image arrives, for [`UnderLoad`].
const BUSY_STREAMS: usize = 4;

/// Peak resident memory of this process so far (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Bare batched decode: `n` sequences prefilled with `prompt`, then one token
/// of each per decode call.
fn bare_batched(ctx: &mut Context, prompt: &[i32], n: usize, tokens: u32) -> f64 {
    ctx.clear();
    let mut next = Vec::new();
    for seq in 0..n as i32 {
        ctx.decode_tokens(prompt, 0, seq, Outputs::Last).unwrap();
        next.push(argmax(ctx.logits(-1).unwrap()));
    }
    let t = Instant::now();
    for step in 0..tokens as i32 - 1 {
        let batch: Vec<BatchToken> = next
            .iter()
            .enumerate()
            .map(|(seq, &token)| BatchToken {
                token,
                pos: prompt.len() as i32 + step,
                seq: seq as i32,
                output: true,
            })
            .collect();
        ctx.decode_batch(&batch).unwrap();
        for (i, token) in next.iter_mut().enumerate() {
            *token = argmax(ctx.logits(i as i32).unwrap());
        }
    }
    (n as f64 * f64::from(tokens - 1)) / t.elapsed().as_secs_f64()
}

/// The 13-tile test image (800×600 → 4×3 grid plus thumbnail) with one pixel
/// changed, so no cache has seen it.
fn landscape13() -> Vec<u8> {
    let jpg = std::fs::read(fixtures().join("images/landscape_800x600.jpg")).unwrap();
    variant(&jpg, 7)
}

/// `<img>`, each tile encoded and its embeddings decoded, `</img>`, the
/// question, then the first token: what the service does for an image prompt.
fn bare_image_prompt(ctx: &mut Context, vision: &mut Vision, prompts: &Prompts, tiles: &[&[u8]]) {
    ctx.decode_tokens(&prompts.before_image, 0, 0, Outputs::None)
        .unwrap();
    let n_embd = ctx.n_embd_inp();
    let mut pos = prompts.before_image.len() as i32;
    for tile in tiles {
        let embd = vision.encode_tile(tile, 448).unwrap();
        for part in embd.chunks(ctx.n_batch() * n_embd) {
            ctx.decode_embeddings(part, pos, 0, Outputs::None).unwrap();
            pos += (part.len() / n_embd) as i32;
        }
    }
    ctx.decode_tokens(&prompts.after_image, pos, 0, Outputs::Last)
        .unwrap();
    argmax(ctx.logits(-1).unwrap());
}

fn bare(s: &Setup, prompts: &Prompts, tile: &[u8]) -> Figures {
    let prompt_tokens = &prompts.text;
    llama::init_backend(false, &[]).unwrap();
    let cfg = config(s).engine_settings().unwrap();
    let (model, log) = llama::capture_logs(|| Model::load(&s.model, &cfg.model));
    let model = Arc::new(model.unwrap());
    let on_gpu = internvl_grpc::engine::Placement::from_log(&log).all_layers_on_local_gpus();
    // The same (corrected) vision file the service loads.
    let served = position_rows::prepare(&s.mmproj, cfg.cache_dir.as_deref()).unwrap();
    let mut vision = Vision::load(served.path(), model.clone(), &cfg.vision).unwrap();
    // The same context the service creates (`auto` cache types resolved).
    let mut ctx = Context::new(model.clone(), &llama::context_params(&cfg, on_gpu)).unwrap();
    let mut ttft = Vec::new();
    let mut rate = Vec::new();
    let mut image = Vec::new();
    for _ in 0..s.repeats {
        ctx.clear();
        let t = Instant::now();
        ctx.decode_tokens(prompt_tokens, 0, 0, Outputs::Last)
            .unwrap();
        let mut token = argmax(ctx.logits(-1).unwrap());
        ttft.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let first_pos = prompt_tokens.len() as i32;
        for pos in first_pos..first_pos + s.tokens as i32 - 1 {
            ctx.decode_tokens(&[token], pos, 0, Outputs::Last).unwrap();
            token = argmax(ctx.logits(-1).unwrap());
        }
        rate.push(f64::from(s.tokens - 1) / t.elapsed().as_secs_f64());

        // One 448×448 tile.
        ctx.clear();
        let t = Instant::now();
        bare_image_prompt(&mut ctx, &mut vision, prompts, &[tile]);
        image.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // 13 tiles: decoding and tiling in Rust are timed too, as the service's are.
    ctx.clear();
    let bytes = landscape13();
    let t = Instant::now();
    let spec = TileSpec {
        tile_size: 448,
        min_tiles: 1,
        max_tiles: 12,
        tokens_per_tile: 0,
    };
    let limits = DecodeLimits::default();
    let tiled = tile_image(&decode_rgb(&bytes, &limits).unwrap(), &spec, 1, 12);
    assert_eq!(tiled.tiles.len(), 13);
    let tiles: Vec<&[u8]> = tiled.tiles.iter().map(|t| t.as_raw().as_slice()).collect();
    bare_image_prompt(&mut ctx, &mut vision, prompts, &tiles);
    let image13_ttft_ms = t.elapsed().as_secs_f64() * 1e3;

    let aggregate_tok_s = STREAMS
        .iter()
        .map(|&n| {
            median(
                (0..s.repeats)
                    .map(|_| bare_batched(&mut ctx, prompt_tokens, n as usize, s.tokens))
                    .collect(),
            )
        })
        .collect();
    Figures {
        text_ttft_ms: median(ttft),
        decode_tok_s: median(rate),
        image_ttft_ms: median(image),
        image13_ttft_ms,
        aggregate_tok_s,
    }
}

/// The token ids the service feeds the model for a text and a one-tile request.
struct Prompts {
    text: Vec<i32>,
    before_image: Vec<i32>,
    after_image: Vec<i32>,
}

/// `png` with one pixel changed, `seed` picking the change: an image no cache has seen.
fn variant(png: &[u8], seed: usize) -> Vec<u8> {
    let mut img = image::load_from_memory(png).unwrap().to_rgb8();
    let p = img.get_pixel_mut(seed as u32 % 448, 0);
    p.0[0] = p.0[0].wrapping_add(1 + seed as u8);
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

async fn service(s: &Setup, tile_png: Vec<u8>) -> (Figures, f64, Prompts, UnderLoad) {
    let Served {
        client,
        stop,
        server,
        ..
    } = serve(config(s)).await;
    let mut client = client.max_decoding_message_size(64 << 20);
    let request = |content: Vec<proto::Content>, n: u32| proto::GenerateRequest {
        messages: vec![proto::Message {
            role: "user".into(),
            content,
        }],
        sampling: Some(proto::SamplingParams::default()),
        max_new_tokens: n,
        ignore_eos: true,
        ..Default::default()
    };
    let text = |t: &str| proto::Content {
        part: Some(proto::content::Part::Text(t.into())),
    };
    // A system prompt that differs per repeat a few tokens in, so the KV cache
    // cannot answer for the text prompt: TTFT stays a cold measurement, as bare.
    let cold_text = |repeat: usize, n: u32| {
        let mut r = request(vec![text(PROMPT)], n);
        r.messages.insert(
            0,
            proto::Message {
                role: "system".into(),
                content: vec![text(&format!("Run {repeat}. You are a helpful assistant."))],
            },
        );
        r
    };
    let image_part = proto::Content {
        part: Some(proto::content::Part::Image(proto::Image {
            data: tile_png.clone(),
            max_tiles: 1,
            min_tiles: 1,
            ..Default::default()
        })),
    };
    let ids = |content: Vec<proto::Content>| {
        let mut client = client.clone();
        async move {
            client
                .count_tokens(proto::CountTokensRequest {
                    messages: request(content, 1).messages,
                })
                .await
                .unwrap()
                .into_inner()
                .input_ids
        }
    };
    let with_image = ids(vec![image_part.clone(), text("What is shown?")]).await;
    let image_context = *with_image
        .iter()
        .max_by_key(|&&id| with_image.iter().filter(|&&x| x == id).count())
        .unwrap();
    let first = with_image
        .iter()
        .position(|&id| id == image_context)
        .unwrap();
    let last = with_image
        .iter()
        .rposition(|&id| id == image_context)
        .unwrap();
    let prompts = Prompts {
        text: client
            .clone()
            .count_tokens(proto::CountTokensRequest {
                messages: cold_text(0, s.tokens).messages,
            })
            .await
            .unwrap()
            .into_inner()
            .input_ids,
        before_image: with_image[..first].to_vec(),
        after_image: with_image[last + 1..].to_vec(),
    };

    let mut ttft = Vec::new();
    let mut rate = Vec::new();
    let mut image = Vec::new();
    let mut repeated = Vec::new();
    for repeat in 0..s.repeats {
        let t = Instant::now();
        let mut stream = client
            .generate(cold_text(repeat, s.tokens))
            .await
            .unwrap()
            .into_inner();
        let mut first = None;
        let mut first_at = None;
        while let Some(msg) = stream.message().await.unwrap() {
            match msg.event.unwrap() {
                proto::generate_response::Event::Delta(_) => {
                    if first.is_none() {
                        first = Some(t.elapsed().as_secs_f64() * 1e3);
                        first_at = Some(Instant::now());
                    }
                }
                proto::generate_response::Event::Done(_) => {}
            }
        }
        let client_decode = first_at.unwrap().elapsed().as_secs_f64();
        ttft.push(first.unwrap());
        rate.push(f64::from(s.tokens - 1) / client_decode);

        // A fresh image each repeat (one pixel changed), so nothing is cached;
        // then the very same request again, which the caches should answer.
        let fresh = proto::Content {
            part: Some(proto::content::Part::Image(proto::Image {
                data: variant(&tile_png, repeat),
                max_tiles: 1,
                min_tiles: 1,
                ..Default::default()
            })),
        };
        for times in [&mut image, &mut repeated] {
            let t = Instant::now();
            let first = first_event_at(
                &client,
                request(vec![fresh.clone(), text("What is shown?")], 1),
            )
            .await;
            times.push((first - t).as_secs_f64() * 1e3);
        }
    }

    // 13 tiles, once: a fresh image.
    let image13_ttft_ms = {
        let big = proto::Content {
            part: Some(proto::content::Part::Image(proto::Image {
                data: landscape13(),
                max_tiles: 12,
                min_tiles: 1,
                ..Default::default()
            })),
        };
        let t = Instant::now();
        let first = first_event_at(&client, request(vec![big, text("What is shown?")], 1)).await;
        (first - t).as_secs_f64() * 1e3
    };

    // `n` streams at once. Decode throughput is counted over the window in
    // which all of them are past their first token, as tokens delivered.
    let mut aggregate_tok_s = Vec::new();
    for &n in &STREAMS {
        let mut runs = Vec::new();
        for repeat in 0..s.repeats {
            let streams: Vec<_> = (0..n as usize)
                .map(|i| {
                    let mut client = client.clone();
                    let req = cold_text(1000 + repeat * 100 + i, s.tokens);
                    tokio::spawn(async move {
                        let mut stream = client.generate(req).await.unwrap().into_inner();
                        let mut arrivals = Vec::new();
                        while let Some(msg) = stream.message().await.unwrap() {
                            if let Some(proto::generate_response::Event::Delta(_)) = msg.event {
                                arrivals.push(Instant::now());
                            }
                        }
                        arrivals
                    })
                })
                .collect();
            let mut all = Vec::new();
            for stream in streams {
                all.push(stream.await.unwrap());
            }
            let window_start = all.iter().map(|a| a[0]).max().unwrap();
            let window_end = all.iter().map(|a| *a.last().unwrap()).max().unwrap();
            let delivered = all
                .iter()
                .flat_map(|a| a.iter())
                .filter(|&&t| t > window_start)
                .count();
            runs.push(delivered as f64 / (window_end - window_start).as_secs_f64());
        }
        aggregate_tok_s.push(median(runs));
    }
    let fresh = proto::Content {
        part: Some(proto::content::Part::Image(proto::Image {
            data: variant(&tile_png, 9999),
            max_tiles: 1,
            min_tiles: 1,
            ..Default::default()
        })),
    };
    let mut under_load = image_under_load(
        &client,
        &cold_text,
        request(vec![fresh, text("What is shown?")], 1),
    )
    .await;
    let picture = proto::Content {
        part: Some(proto::content::Part::Image(proto::Image {
            data: variant(&tile_png, 7777),
            max_tiles: 1,
            min_tiles: 1,
            ..Default::default()
        })),
    };
    under_load.shared_image_ttft_ms = shared_image_ttft(
        &client,
        request(vec![picture.clone(), text("What is shown?")], 1500),
        request(vec![picture, text("Which colours are there?")], 1),
    )
    .await;
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    (
        Figures {
            text_ttft_ms: median(ttft),
            decode_tok_s: median(rate),
            image_ttft_ms: median(image),
            image13_ttft_ms,
            aggregate_tok_s,
        },
        median(repeated),
        prompts,
        under_load,
    )
}

/// Sends `request` and reads its whole stream; returns when the first event came.
async fn first_event_at(
    client: &InternVlClient<tonic::transport::Channel>,
    request: proto::GenerateRequest,
) -> Instant {
    let mut stream = client.clone().generate(request).await.unwrap().into_inner();
    stream.message().await.unwrap();
    let first = Instant::now();
    while stream.message().await.unwrap().is_some() {}
    first
}

/// An image request (not cached) while [`BUSY_STREAMS`] long streams decode:
/// its TTFT, and how the streams fare until it has its first token.
async fn image_under_load(
    client: &InternVlClient<tonic::transport::Channel>,
    cold_text: &impl Fn(usize, u32) -> proto::GenerateRequest,
    image_request: proto::GenerateRequest,
) -> UnderLoad {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (started, mut running) = tokio::sync::mpsc::channel(BUSY_STREAMS);
    let streams: Vec<_> = (0..BUSY_STREAMS)
        .map(|i| {
            let mut client = client.clone();
            let req = cold_text(5000 + i, 1500);
            let (started, mut stopped) = (started.clone(), stopped.clone());
            tokio::spawn(async move {
                let mut stream = client.generate(req).await.unwrap().into_inner();
                let mut arrivals = Vec::new();
                loop {
                    tokio::select! {
                        msg = stream.message() => match msg.unwrap() {
                            Some(_) => arrivals.push(Instant::now()),
                            None => break,
                        },
                        _ = stopped.changed() => break,
                    }
                    if arrivals.len() == 3 {
                        started.send(()).await.unwrap();
                    }
                }
                arrivals
            })
        })
        .collect();
    for _ in 0..BUSY_STREAMS {
        running.recv().await.unwrap();
    }
    let sent = Instant::now();
    let answered = first_event_at(client, image_request).await;
    stop.send(true).unwrap();
    let mut longest_pause = Duration::ZERO;
    let mut tokens = 0;
    for s in streams {
        let arrivals = s.await.unwrap();
        tokens += arrivals
            .iter()
            .filter(|&&t| t > sent && t <= answered)
            .count();
        for w in arrivals.windows(2) {
            if w[1] > sent && w[0] < answered {
                longest_pause = longest_pause.max(w[1] - w[0]);
            }
        }
    }
    let window = (answered - sent).as_secs_f64();
    UnderLoad {
        image_ttft_ms: window * 1e3,
        longest_pause_ms: longest_pause.as_secs_f64() * 1e3,
        tok_s: tokens as f64 / window,
        shared_image_ttft_ms: f64::NAN,
    }
}

/// Starts `running` and, once it streams, sends `second` (the same image, a
/// different question); returns the second's TTFT.
async fn shared_image_ttft(
    client: &InternVlClient<tonic::transport::Channel>,
    running: proto::GenerateRequest,
    second: proto::GenerateRequest,
) -> f64 {
    let mut stream = client.clone().generate(running).await.unwrap().into_inner();
    stream.message().await.unwrap();
    let sent = Instant::now();
    let answered = first_event_at(client, second).await;
    // Hanging up ends the running stream.
    drop(stream);
    (answered - sent).as_secs_f64() * 1e3
}

fn main() {
    let s = setup();
    println!(
        "model {} | mmproj {} | threads {} | {} tokens | {} repeats",
        s.model.display(),
        s.mmproj.display(),
        s.threads,
        s.tokens,
        s.repeats
    );
    llama::init_backend(false, &[]).unwrap();
    println!(
        "llama.cpp: {} | CPU backend file: {}",
        llama::system_info(),
        llama::cpu_backend_file().as_deref().unwrap_or("built in")
    );
    let png = std::fs::read(fixtures().join("images/square_448.png")).unwrap();
    let tile = image::load_from_memory(&png).unwrap().to_rgb8();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (svc, repeated_ms, prompts, under_load) = runtime.block_on(service(&s, png));
    drop(runtime);
    // Measured before the bare run loads its own copy of the model.
    let service_peak_rss = peak_rss_mib();
    let bare = bare(&s, &prompts, tile.as_raw());

    println!("| measure | service | bare llama.cpp | service/bare |");
    println!("|---|---|---|---|");
    let row = |name: &str, a: f64, b: f64, unit: &str| {
        println!("| {name} ({unit}) | {a:.2} | {b:.2} | {:.3} |", a / b)
    };
    row("text TTFT", svc.text_ttft_ms, bare.text_ttft_ms, "ms");
    row(
        "single-stream decode",
        svc.decode_tok_s,
        bare.decode_tok_s,
        "tok/s",
    );
    row(
        "1-tile image TTFT",
        svc.image_ttft_ms,
        bare.image_ttft_ms,
        "ms",
    );
    row(
        "13-tile image TTFT, one run",
        svc.image13_ttft_ms,
        bare.image13_ttft_ms,
        "ms",
    );
    println!(
        "| same 1-tile image request repeated, TTFT (ms) | {repeated_ms:.2} | | {:.4} × the first |",
        repeated_ms / svc.image_ttft_ms
    );
    // Per-token time the client sees beyond what bare decoding takes.
    let overhead_ms = 1e3 / svc.decode_tok_s - 1e3 / bare.decode_tok_s;
    println!("| service + gRPC overhead per streamed token (ms) | {overhead_ms:.4} | | |");
    for (i, n) in STREAMS.iter().enumerate() {
        row(
            &format!("aggregate decode, {n} streams"),
            svc.aggregate_tok_s[i],
            bare.aggregate_tok_s[i],
            "tok/s",
        );
    }
    println!(
        "| 1-tile image TTFT with {BUSY_STREAMS} streams decoding (ms) | {:.2} | | {:.3} × alone |",
        under_load.image_ttft_ms,
        under_load.image_ttft_ms / svc.image_ttft_ms
    );
    println!(
        "| meanwhile: longest pause of those streams (ms) | {:.2} | | |",
        under_load.longest_pause_ms
    );
    println!(
        "| meanwhile: their summed decode (tok/s) | {:.2} | | {:.3} × without the image |",
        under_load.tok_s,
        under_load.tok_s
            / svc.aggregate_tok_s[STREAMS
                .iter()
                .position(|&n| n as usize == BUSY_STREAMS)
                .unwrap()]
    );
    println!(
        "| another question on a 1-tile image a running stream is about, TTFT (ms) | {:.2} | | {:.4} × a fresh image |",
        under_load.shared_image_ttft_ms,
        under_load.shared_image_ttft_ms / svc.image_ttft_ms
    );
    println!("| peak RSS of the service run (MiB) | {service_peak_rss:.0} | | |");
}
