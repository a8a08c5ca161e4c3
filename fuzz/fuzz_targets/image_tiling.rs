//! Any bytes as an image: decoding within limits, then InternVL tiling, must
//! refuse or produce whole 448×448 tiles, never panic.
#![no_main]

use internvl_core::vision::{decode_rgb, tile_image, DecodeLimits, TileSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small limits keep each execution fast; the checks are the same.
    let limits = DecodeLimits {
        max_side: 2048,
        max_pixels: 1 << 20,
        max_alloc: 64 << 20,
    };
    let Ok(image) = decode_rgb(data, &limits) else {
        return;
    };
    let spec = TileSpec {
        tile_size: 448,
        min_tiles: 1,
        max_tiles: 4,
        tokens_per_tile: 256,
    };
    let tiled = tile_image(&image, &spec, 1, 4);
    assert!(!tiled.tiles.is_empty() && tiled.tiles.len() <= 5);
    for tile in &tiled.tiles {
        assert_eq!(tile.dimensions(), (448, 448));
    }
});
