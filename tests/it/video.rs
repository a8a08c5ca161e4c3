//! Video files, decoded by the service's sandboxed FFmpeg as transformers'
//! `read_video_pyav` decodes them. The fixtures (tests/fixtures/video/, made
//! by its `make_videos.py`) hold an MP4 (H.264) and a WebM (VP9) of the
//! reference's 16 video frames at 4 fps, and every frame PyAV decodes from
//! each. The service's frames equal PyAV's bit for bit; a file sent as bytes
//! or by URL gets the tokens PyAV's frames get sent as images; what the
//! reference refuses, and files that are not a video, are refused naming
//! the field.

use std::sync::Arc;
use std::time::Instant;

use tonic::Code;

use crate::common;
use common::*;
use internvl_core::{Sampling, VideoSandbox};
use internvl_grpc::config::Config;
use internvl_grpc::service::proto;
use internvl_grpc::video::VideoDecoder;

const CLIPS: [&str; 2] = ["clip.mp4", "clip.webm"];

fn video_fixture(relative: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/video")
        .join(relative)
}

fn clip(name: &str) -> Vec<u8> {
    std::fs::read(video_fixture(name)).expect("video fixture")
}

/// PyAV's frame `i` of `clip`, as the fixture script stored it (PNG).
fn pyav_frame(clip: &str, i: usize) -> Vec<u8> {
    let dir = clip.replace('.', "_");
    std::fs::read(video_fixture(&format!("pyav/{dir}/frame_{i:02}.png"))).unwrap()
}

fn video(v: proto::Video) -> proto::Content {
    proto::Content {
        part: Some(proto::content::Part::Video(v)),
    }
}

fn ask(part: proto::Content) -> proto::GenerateRequest {
    greedy(
        vec![user(vec![part, text("What happens in the video?")])],
        8,
    )
}

/// The field a refusal names: its message is `field: why`.
fn field_of(status: &tonic::Status) -> Option<String> {
    status
        .message()
        .split_once(": ")
        .map(|(field, _)| field.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoded_frames_are_pyavs_bit_for_bit() {
    for sandbox in [VideoSandbox::Landlock, VideoSandbox::Auto] {
        let config = Config {
            media_video_sandbox: sandbox,
            ..tiny_config()
        };
        let mut decoder = VideoDecoder::new(&config);
        let version = decoder.check().await.expect("FFmpeg runs in its sandbox");
        let (how, _) = decoder.confinement().unwrap();
        eprintln!("media_video_sandbox = {sandbox}: {how} ({version})");
        frames_match_pyav(&decoder).await;
    }
}

async fn frames_match_pyav(decoder: &VideoDecoder) {
    for name in CLIPS {
        let data = clip(name);
        let every = Sampling {
            num_frames: 16,
            fps: 0.0,
        };
        let started = Instant::now();
        let mut media = internvl_core::media_budget::MediaHold::unbounded();
        let frames = decoder
            .decode(&data, every, "video", &mut media)
            .await
            .expect(name);
        let took = started.elapsed();
        assert_eq!(frames.len(), 16, "{name}");
        let mut max_diff = 0u8;
        for (i, frame) in frames.iter().enumerate() {
            let want = image::load_from_memory(&pyav_frame(name, i))
                .unwrap()
                .to_rgb8();
            assert_eq!(frame.dimensions(), want.dimensions(), "{name} frame {i}");
            for (a, b) in frame.as_raw().iter().zip(want.as_raw()) {
                max_diff = max_diff.max(a.abs_diff(*b));
            }
        }
        eprintln!(
            "{name}: {} bytes, 16 frames of 320x240 decoded in {:.1} ms; \
             largest difference from PyAV {max_diff}",
            data.len(),
            took.as_secs_f64() * 1e3
        );
        assert_eq!(
            max_diff, 0,
            "{name}: the service's frames differ from PyAV's"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_file_gets_the_tokens_of_its_frames_sent_as_images() {
    let mut config = tiny_config();
    for name in CLIPS {
        let port = serve_bytes(Arc::new(clip(name))).await;
        config.media_allow.push(format!("http://127.0.0.1:{port}/"));
        let server = start(config.clone()).await;
        let mut client = server.client().await;

        // PyAV's 16 frames, sampled by the service as the reference samples.
        let frames: Vec<Vec<u8>> = (0..16).map(|i| pyav_frame(name, i)).collect();
        let want = generate_ok(
            &mut client,
            ask(video(proto::Video {
                frames,
                num_frames: 8,
                ..Default::default()
            })),
        )
        .await;
        let want_prompt = want.done.as_ref().unwrap().usage.unwrap().prompt_tokens;
        // 8 frames of one tile (256 tokens) each.
        assert!(want_prompt > 8 * 256, "{want_prompt}");

        let as_file = |v: proto::Video| ask(video(v));
        let cases = [
            (
                "data, num_frames 8",
                as_file(proto::Video {
                    data: clip(name),
                    num_frames: 8,
                    ..Default::default()
                }),
            ),
            (
                "data, the default",
                as_file(proto::Video {
                    data: clip(name),
                    ..Default::default()
                }),
            ),
            // 2 per second of a 4 s video: the same 8.
            (
                "data, fps 2",
                as_file(proto::Video {
                    data: clip(name),
                    fps: 2.0,
                    ..Default::default()
                }),
            ),
            (
                "url, num_frames 8",
                as_file(proto::Video {
                    url: format!("http://127.0.0.1:{port}/{name}"),
                    num_frames: 8,
                    ..Default::default()
                }),
            ),
        ];
        for (case, request) in cases {
            let got = generate_ok(&mut client, request).await;
            assert_eq!(got.ids, want.ids, "{name}, {case}");
            let prompt = got.done.unwrap().usage.unwrap().prompt_tokens;
            assert_eq!(prompt, want_prompt, "{name}, {case}");
        }

        // CountTokens decodes the file the same way.
        let counted = client
            .count_tokens(proto::CountTokensRequest {
                messages: vec![user(vec![
                    video(proto::Video {
                        data: clip(name),
                        num_frames: 8,
                        ..Default::default()
                    }),
                    text("What happens in the video?"),
                ])],
            })
            .await
            .expect("count")
            .into_inner();
        assert_eq!(counted.prompt_tokens, want_prompt, "{name}");
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_a_sampleable_video_is_refused_naming_the_field() {
    let mut config = tiny_config();
    // Room for every frame, so that the video's own count decides.
    config.max_images_per_request = 64;
    let server = start(config).await;
    let mut client = server.client().await;
    let mp4 = clip("clip.mp4");
    let field = "messages[0].content[0].video";
    let cases: Vec<(&str, proto::Video, Code, String, &str)> = vec![
        (
            "a truncated MP4",
            proto::Video {
                data: mp4[..mp4.len() / 2].to_vec(),
                ..Default::default()
            },
            Code::InvalidArgument,
            format!("{field}.data"),
            "not a decodable video",
        ),
        (
            "bytes that are no video",
            proto::Video {
                data: b"these bytes are not a video file at all".repeat(20),
                ..Default::default()
            },
            Code::InvalidArgument,
            format!("{field}.data"),
            "not a decodable video",
        ),
        (
            "a PNG",
            proto::Video {
                data: image_bytes("small_64x48.png"),
                ..Default::default()
            },
            Code::InvalidArgument,
            format!("{field}.data"),
            "not a decodable video",
        ),
        (
            "audio only",
            proto::Video {
                data: clip("audio_only.m4a"),
                ..Default::default()
            },
            Code::InvalidArgument,
            format!("{field}.data"),
            "no video stream",
        ),
        (
            "more frames than the video has",
            proto::Video {
                data: mp4.clone(),
                num_frames: 17,
                ..Default::default()
            },
            Code::InvalidArgument,
            format!("{field}.num_frames"),
            "the video has 16",
        ),
        (
            "more frames per second than the video has",
            proto::Video {
                data: mp4.clone(),
                fps: 8.0,
                ..Default::default()
            },
            Code::InvalidArgument,
            format!("{field}.fps"),
            "the video has 16",
        ),
        (
            "num_frames and fps",
            proto::Video {
                data: mp4.clone(),
                num_frames: 4,
                fps: 1.0,
                ..Default::default()
            },
            Code::InvalidArgument,
            format!("{field}.fps"),
            "mutually exclusive",
        ),
        (
            "fps for frames, which carry no rate",
            proto::Video {
                frames: vec![image_bytes("vid_frame_00.png")],
                fps: 1.0,
                ..Default::default()
            },
            Code::InvalidArgument,
            format!("{field}.fps"),
            "frame rate",
        ),
        (
            "frames and data",
            proto::Video {
                frames: vec![image_bytes("vid_frame_00.png")],
                data: mp4.clone(),
                ..Default::default()
            },
            Code::InvalidArgument,
            field.to_string(),
            "send one",
        ),
        (
            "no source",
            proto::Video::default(),
            Code::InvalidArgument,
            field.to_string(),
            "no frames, data or url",
        ),
        (
            "a URL this deployment does not allow",
            proto::Video {
                url: "http://127.0.0.1:9/clip.mp4".into(),
                ..Default::default()
            },
            Code::PermissionDenied,
            format!("{field}.url"),
            "media_allow",
        ),
    ];
    for (case, v, code, want_field, says) in cases {
        let status = client.generate(ask(video(v))).await.expect_err(case);
        assert_eq!(status.code(), code, "{case}: {status:?}");
        let field = field_of(&status);
        assert_eq!(
            field.as_deref(),
            Some(want_field.as_str()),
            "{case}: {status:?}"
        );
        assert!(
            status.message().contains(says),
            "{case}: {}",
            status.message()
        );
    }
    // The server is whole after all of that.
    let ok = generate_ok(
        &mut client,
        ask(video(proto::Video {
            data: mp4.clone(),
            num_frames: 2,
            ..Default::default()
        })),
    )
    .await;
    assert_eq!(ok.ids.len(), 8);
    server.stop().await;

    // A rate that samples more frames than a request may carry images is
    // refused once the file's length is known.
    let mut config = tiny_config();
    config.max_images_per_request = 8;
    config.media_video_max_decoded_mb = 1;
    let server = start(config).await;
    let mut client = server.client().await;
    let status = client
        .generate(ask(video(proto::Video {
            data: mp4.clone(),
            fps: 2.5,
            ..Default::default()
        })))
        .await
        .expect_err("10 frames, 8 allowed");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(field_of(&status), Some(format!("{field}.fps")));
    assert!(
        status.message().contains("max_images_per_request"),
        "{}",
        status.message()
    );
    // 8 frames of 320x240 are 1.8 MiB as RGB: past the 1 MiB set here.
    let status = client
        .generate(ask(video(proto::Video {
            data: mp4.clone(),
            num_frames: 8,
            ..Default::default()
        })))
        .await
        .expect_err("1.8 MiB decoded, 1 allowed");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(field_of(&status), Some(format!("{field}.data")));
    assert!(
        status.message().contains("media_video_max_decoded_mb"),
        "{}",
        status.message()
    );
    server.stop().await;

    // A frame size past max_image_pixels is refused from the probe, before
    // any frame is decoded (a decompression bomb costs a demux, not a decode).
    let mut config = tiny_config();
    config.max_image_pixels = 100 * 100;
    let server = start(config).await;
    let mut client = server.client().await;
    let status = client
        .generate(ask(video(proto::Video {
            data: mp4,
            ..Default::default()
        })))
        .await
        .expect_err("320x240 frames, 10000 pixels allowed");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(field_of(&status), Some(format!("{field}.data")));
    assert!(status.message().contains("320x240"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_without_ffmpeg_says_so_and_serves_the_rest() {
    let mut config = tiny_config();
    config.media_ffmpeg = "/nonexistent/ffmpeg".into();
    let server = start(config).await;
    let mut client = server.client().await;
    let status = client
        .generate(ask(video(proto::Video {
            data: clip("clip.mp4"),
            ..Default::default()
        })))
        .await
        .expect_err("no FFmpeg");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("media_ffmpeg"),
        "{}",
        status.message()
    );
    assert_eq!(
        field_of(&status).as_deref(),
        Some("messages[0].content[0].video.data")
    );
    // Frames the client decoded need no FFmpeg.
    let frames = (0..16).map(|i| pyav_frame("clip.mp4", i)).collect();
    let ok = generate_ok(
        &mut client,
        ask(video(proto::Video {
            frames,
            ..Default::default()
        })),
    )
    .await;
    assert_eq!(ok.ids.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ffmpeg_that_cannot_run_is_the_deployments_fault_decided_at_start() {
    // FFmpeg and ffprobe that fail as a sandbox that cannot start does: the
    // start-up check finds it, and every video file is FAILED_PRECONDITION
    // with that reason, not INVALID_ARGUMENT ("not a decodable video").
    let dir = tempfile::tempdir().unwrap();
    for name in ["ffmpeg", "ffprobe"] {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            "#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut config = tiny_config();
    config.media_ffmpeg = dir.path().join("ffmpeg").display().to_string();
    let server = start(config).await;
    let mut client = server.client().await;
    let status = client
        .generate(ask(video(proto::Video {
            data: clip("clip.mp4"),
            ..Default::default()
        })))
        .await
        .expect_err("FFmpeg cannot run");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains("No permissions to create new namespace"),
        "{}",
        status.message()
    );
    assert_eq!(
        field_of(&status).as_deref(),
        Some("messages[0].content[0].video.data")
    );
}
