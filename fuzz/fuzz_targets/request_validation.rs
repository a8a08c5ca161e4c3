//! Any bytes as a Generate or Embed request on the wire: decoding then
//! validation must accept or name a field, never panic; and what validation
//! accepts goes on as the engine takes it: each image decoded within limits
//! (or refused naming its field) and the `response_format` compiled (or
//! refused naming it). Structured seeds (fuzz/seeds/request_validation,
//! written by fuzz/make_seeds.py) start it inside nested messages with
//! images, videos and every format kind.
#![no_main]

#[path = "shared/formats.rs"]
mod formats;

use internvl_api::proto;
use internvl_api::validation::{embed, generate, Limits};
use internvl_core::vision::decode_rgb;
use internvl_core::{DecodeLimits, Part, VideoSource};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const LIMITS: DecodeLimits = DecodeLimits {
    max_side: 2048,
    max_pixels: 1 << 20,
    max_alloc: 64 << 20,
};

fn decode_images<'a>(parts: impl Iterator<Item = &'a Part>) {
    for part in parts {
        let frames: Vec<&[u8]> = match part {
            Part::Text(_) => continue,
            Part::Image(image) => vec![&image.data],
            Part::Video(video) => match &video.source {
                VideoSource::Frames(frames) => {
                    // Sampling takes any accepted count without panicking,
                    // and every index it gives is a frame.
                    if let Ok(indices) =
                        video
                            .sampling
                            .indices(frames.len(), None, frames.len(), "v")
                    {
                        assert!(indices.iter().all(|&i| i < frames.len()));
                    }
                    frames.iter().map(|f| f.as_slice()).collect()
                }
                // Files are the service's sandboxed FFmpeg's, not decoded here.
                VideoSource::File(_) | VideoSource::Sampled(_) => continue,
            },
        };
        for frame in frames {
            if let Ok(image) = decode_rgb(frame, &LIMITS) {
                assert!(image.width() > 0 && image.height() > 0);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(request) = proto::GenerateRequest::decode(data) {
        match generate(request, &limits) {
            Ok(request) => {
                decode_images(request.messages.iter().flat_map(|m| m.parts.iter()));
                if let Some(format) = &request.response_format {
                    if let Err(e) = formats::compiler().compile(format) {
                        assert!(e.to_string().starts_with("response_format"), "{e}");
                    }
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    if let Ok(request) = proto::EmbedRequest::decode(data) {
        match embed(request, &limits) {
            Ok(request) => decode_images(request.inputs.iter().flat_map(|i| i.iter())),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
});
