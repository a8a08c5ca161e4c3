//! The service's own tiles, encoded by the real vision encoder, against the
//! reference projector outputs (`images[].features`), tile by tile.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use internvl_core::position_rows;
use internvl_core::vision::{decode_rgb, tile_image, DecodeLimits, TileSpec};
use internvl_llama::{self as llama, Model, Vision};
use sha2::{Digest, Sha256};

const SPEC: TileSpec = TileSpec {
    tile_size: 448,
    min_tiles: 1,
    max_tiles: 12,
    tokens_per_tile: 256,
};

/// SHA-256 of Pillow's `convert_to_rgb(image).resize((w, h), BICUBIC).tobytes()`,
/// computed with Pillow 13.
const PILLOW: &[(&str, u32, u32, &str)] = &[
    (
        "landscape_800x600.jpg",
        1792,
        1344,
        "53de1ef1ba33e5a84ec84e11bc88356e9ac6c922cdb0f3eb7d2e852edd5bd200",
    ),
    (
        "landscape_800x600.jpg",
        448,
        448,
        "78e1aa38a7b513c487bbafc1a35675553f50e81ee03e9aabd3bbfd34a6443ad9",
    ),
    (
        "tall_300x900.jpg",
        448,
        1344,
        "7847eeb410c2c4ccacf397ce1d7ed62ecdfcf6f448ee366834113e72f4e7a97f",
    ),
    (
        "tall_300x900.jpg",
        448,
        448,
        "fe3a2d659804690d78e7c8b8c883a9a561ee4d64d1f4eec1f9636eb45e92882c",
    ),
    (
        "small_64x48.png",
        1792,
        1344,
        "0cd64c49b0dba051d92c636677568abfad822b76c7456e43b349ce0849a88c4e",
    ),
    (
        "small_64x48.png",
        448,
        448,
        "01394695f4776a5697969905991a66ea49392cbd80c98e5db749ba019f148c37",
    ),
    (
        "wide_1000x250.png",
        1792,
        448,
        "807fb8235c06728525a99e237d1b69b336f22728461ce2e8c4894bc8eada471d",
    ),
    (
        "rgba_400x300.png",
        1792,
        1344,
        "f7dbe10551b02902e8b86908ad9d02ac5068b68d1df67df8ca9478e08f2c3a7a",
    ),
    (
        "gray_500x380.png",
        448,
        448,
        "b96eef0c06242c16e4fac67ec332d8c9c568e98ba74c6fe828e975debd4746dd",
    ),
    (
        "vid_frame_03.png",
        448,
        448,
        "de4f3311546e66883d3a21f4c9c3f3e2ea3a3429d83f600c0a9abe277652c2a5",
    ),
];

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// SHA-256 of Pillow's decoded RGB pixels of the JPEG fixtures.
const PILLOW_JPEG: &[(&str, &str)] = &[
    (
        "landscape_800x600.jpg",
        "f6991e1779080fd2607e50479bee56b6dda02318da8b2f47f01f7daa09152e06",
    ),
    (
        "tall_300x900.jpg",
        "1cf4e7670a958f1a4642bf91cc9018e9843040416bf0eab6b03feed17fa90fd9",
    ),
];

#[test]
fn decoding_and_resizing_match_pillow_bit_for_bit() {
    let mut failures = Vec::new();
    for (name, want) in PILLOW_JPEG {
        let rgb = decode_rgb(&image_bytes(name), &DecodeLimits::default()).unwrap();
        if sha(rgb.as_raw()) != *want {
            failures.push(format!("{name}: decoded pixels differ from Pillow's"));
        }
    }
    for (name, w, h, want) in PILLOW {
        let rgb = decode_rgb(&image_bytes(name), &DecodeLimits::default()).unwrap();
        let out = internvl_core::resize::resize_bicubic(&rgb, *w, *h);
        if sha(out.as_raw()) != *want {
            failures.push(format!(
                "{name} -> {w}x{h}: resized pixels differ from Pillow's"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Encodes every reference image's tiles with the vision encoder loaded from
/// `mmproj`; the largest |Δ| per tile against the reference features, per image.
fn encode_against_reference(family: &Family, mmproj: &Path) -> Vec<(String, Vec<f32>)> {
    // The devices the service would use: in a GPU build the encoder runs on
    // the GPU (`mmproj_offload`) and meets the same bound there (lavapipe,
    // with ggml's f16 math, does not: 0.051; docs/OFFLOAD.md).
    let settings = family.config().engine_settings().unwrap();
    llama::init_backend(false, &settings.model.vulkan_devices).unwrap();
    let model = Arc::new(Model::load(&family.model_path(), &settings.model).unwrap());
    let mut vision = Vision::load(mmproj, model, &settings.vision).unwrap();
    let mut images = Vec::new();
    for img in family.reference()["images"].as_array().unwrap() {
        let name = img["image"].as_str().unwrap();
        let want = family.npy(img["features"].as_str().unwrap());
        let rgb = decode_rgb(&image_bytes(name), &DecodeLimits::default()).unwrap();
        let tiled = tile_image(&rgb, &SPEC, 1, 12);
        assert_eq!(
            want.len(),
            tiled.tiles.len() * 256 * 64,
            "{name}: tile count"
        );
        let per_tile = tiled
            .tiles
            .iter()
            .enumerate()
            .map(|(t, tile)| {
                let got = vision.encode_tile(tile.as_raw(), 448).unwrap();
                let reference = &want[t * 256 * 64..(t + 1) * 256 * 64];
                got.iter()
                    .zip(reference)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max)
            })
            .collect();
        images.push((name.to_string(), per_tile));
    }
    images
}

/// The mmproj as the service hands it to llama.cpp.
fn served_mmproj(family: &Family) -> PathBuf {
    let cache = test_cache_dir();
    position_rows::prepare(&family.mmproj_path(), Some(&cache))
        .unwrap()
        .path()
        .to_path_buf()
}

fn tiles_match(family: &Family) {
    let mmproj = served_mmproj(family);
    assert_ne!(
        mmproj,
        family.mmproj_path(),
        "{}: not corrected",
        family.name
    );
    // Tiles are pixel-identical to the reference's, so only float noise remains.
    let tolerance = 0.01;
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for (name, per_tile) in encode_against_reference(family, &mmproj) {
        for (t, max) in per_tile.iter().enumerate() {
            if *max > tolerance {
                failures.push(format!("{name} tile {t}: max |Δ| {max} > {tolerance}"));
            }
        }
        let shown: Vec<String> = per_tile.iter().map(|m| format!("{m:.4}")).collect();
        report.push(format!(
            "{} {name}: max |Δ| per tile {}",
            family.name,
            shown.join(" ")
        ));
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        report.join("\n")
    );
}

#[test]
fn internvl3_tiles_match_the_reference_features() {
    tiles_match(&INTERNVL3);
}

#[test]
fn internvl35_tiles_match_the_reference_features() {
    tiles_match(&INTERNVL35);
}

/// The defect the correction exists for, in the pinned llama.cpp: the
/// converter-made file as it is gives every patch its neighbour's position.
/// If a llama.cpp update fixes its graph, this test fails, and so do the
/// ones above (the rows would be rotated twice): drop the correction then.
#[test]
fn the_uncorrected_converter_file_does_not_match() {
    let images = encode_against_reference(&INTERNVL3, &INTERNVL3.mmproj_path());
    let worst = images
        .iter()
        .flat_map(|(_, per_tile)| per_tile.iter().copied())
        .fold(0.0f32, f32::max);
    eprintln!("uncorrected: worst max |Δ| {worst}");
    assert!(
        worst > 0.1,
        "llama.cpp now matches the reference on the converter layout (worst |Δ| {worst}): \
         its graph changed, so position_rows must stop rotating"
    );
}
