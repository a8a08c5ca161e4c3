//! What media by URL and video files cost before the model sees them, as the
//! service runs them (`internvl_grpc::media::Fetcher`,
//! `internvl_grpc::video::VideoDecoder`), median of the repeats:
//!
//! - one FFmpeg call: `ffmpeg -version` under each `media_video_sandbox`
//!   (`off`: resource limits; `landlock`: Landlock and seccomp; `auto`:
//!   those inside bubblewrap): what the subprocess and its confinement cost
//!   per call, before any decoding;
//! - decoding: the fixture clips (320x240, 16 frames) and a generated
//!   1280x720 H.264 clip (`INTERNVL_BENCH_VIDEO_SECS`, 10 s at 30 fps),
//!   8 frames sampled, under each; per MB of file and per sampled
//!   frame;
//! - fetching: `INTERNVL_BENCH_FETCH_MB` (32) MiB from a loopback HTTP
//!   server, per MB.
//!
//! `cargo bench --bench media` (needs `ffmpeg`, `ffprobe` and `bwrap`; the
//! test profile's `cargo test --bench media` serves too). Knobs: INTERNVL_BENCH_REPEATS (7).

// The model-pair helpers are for the benches that load one.
#[allow(dead_code)]
mod common;

use std::sync::Arc;
use std::time::Instant;

use internvl_core::{Sampling, VideoSandbox};
use internvl_grpc::config::Config;
use internvl_grpc::media::Fetcher;
use internvl_grpc::video::VideoDecoder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use common::{env_or, median};

fn ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1e3
}

fn decoder(sandbox: VideoSandbox) -> VideoDecoder {
    VideoDecoder::new(&Config {
        media_video_sandbox: sandbox,
        media_confine_program: Some(env!("CARGO_BIN_EXE_internvl-grpc").into()),
        ..Config::default()
    })
}

/// A 1280x720 H.264 clip of `secs` seconds at 30 fps, made by `ffmpeg`.
fn hd_clip(secs: u32) -> Vec<u8> {
    let path = std::env::temp_dir().join(format!("internvl-bench-{secs}s-720p.mp4"));
    let status = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!("testsrc2=size=1280x720:rate=30:duration={secs}"))
        .args([
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast",
        ])
        .arg(&path)
        .status()
        .expect("ffmpeg");
    assert!(status.success());
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    bytes
}

async fn serve(body: Arc<Vec<u8>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let ok = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(ok.as_bytes()).await;
                let _ = socket.write_all(&body).await;
            });
        }
    });
    port
}

#[tokio::main]
async fn main() {
    let repeats: usize = env_or("INTERNVL_BENCH_REPEATS", 7);
    let secs: u32 = env_or("INTERNVL_BENCH_VIDEO_SECS", 10);
    let fetch_mb: usize = env_or("INTERNVL_BENCH_FETCH_MB", 32);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("media bench: {cores} cores, {repeats} repeats, medians");

    for sandbox in [
        VideoSandbox::Off,
        VideoSandbox::Landlock,
        VideoSandbox::Auto,
    ] {
        let mut decoder = decoder(sandbox);
        let version = decoder.check().await.expect("ffmpeg runs");
        let mut times = Vec::new();
        for _ in 0..repeats {
            let started = Instant::now();
            decoder.check().await.expect("ffmpeg runs");
            times.push(ms(started));
        }
        println!(
            "ffmpeg -version, sandbox {:8}: {:6.1} ms per call ({version})",
            sandbox.to_string(),
            median(times)
        );
    }

    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/video");
    let mut clips: Vec<(String, Vec<u8>)> = ["clip.mp4", "clip.webm"]
        .iter()
        .map(|name| {
            (
                name.to_string(),
                std::fs::read(fixtures.join(name)).unwrap(),
            )
        })
        .collect();
    clips.push((format!("720p {secs} s H.264"), hd_clip(secs)));
    let eight = Sampling {
        num_frames: 8,
        fps: 0.0,
    };
    for (name, data) in &clips {
        for sandbox in [
            VideoSandbox::Off,
            VideoSandbox::Landlock,
            VideoSandbox::Auto,
        ] {
            let mut decoder = decoder(sandbox);
            decoder.check().await.expect("ffmpeg runs");
            let mut times = Vec::new();
            for _ in 0..repeats {
                let started = Instant::now();
                let mut media = internvl_core::media_budget::MediaHold::unbounded();
                let frames = decoder
                    .decode(data, eight, "video", &mut media)
                    .await
                    .expect("decodes");
                times.push(ms(started));
                assert_eq!(frames.len(), 8);
            }
            let t = median(times);
            let mb = data.len() as f64 / (1024.0 * 1024.0);
            println!(
                "decode {name:18} ({:7.2} MiB), 8 frames, sandbox {:8}: {t:7.1} ms \
                 = {:7.1} ms/MiB, {:5.1} ms/frame",
                mb,
                sandbox.to_string(),
                t / mb,
                t / 8.0
            );
        }
    }

    let body = Arc::new(vec![7u8; fetch_mb * 1024 * 1024]);
    let port = serve(body).await;
    let fetcher = Fetcher::new(&Config {
        media_allow: vec![format!("http://127.0.0.1:{port}/")],
        media_max_mb: fetch_mb as u64 + 1,
        ..Config::default()
    })
    .unwrap();
    let url = format!("http://127.0.0.1:{port}/body");
    let mut times = Vec::new();
    for _ in 0..repeats {
        let started = Instant::now();
        let bytes = fetcher.fetch(&url, "image.url").await.expect("fetched");
        times.push(ms(started));
        assert_eq!(bytes.len(), fetch_mb * 1024 * 1024);
    }
    let t = median(times);
    println!(
        "fetch {fetch_mb} MiB over loopback HTTP: {t:.1} ms = {:.2} ms/MiB",
        t / fetch_mb as f64
    );
}
