//! Image and video preprocessing, exactly as the reference processor does it.
//!
//! Untrusted bytes are decoded here, in Rust, with decoder limits; llama.cpp only
//! ever sees 448×448 RGB tiles that this module produced.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage, RgbaImage};

use super::error::EngineError;
use super::resize::resize_bicubic;

/// Tiling parameters of the vision encoder, read from the mmproj file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TileSpec {
    /// Side of one square tile in pixels (448 for InternVL3).
    pub tile_size: u32,
    /// Fewest tiles an image may be cut into, the thumbnail not counted.
    pub min_tiles: u32,
    /// Most tiles an image may be cut into, the thumbnail not counted.
    pub max_tiles: u32,
    /// Embedding positions the projector produces per tile (256 for InternVL3).
    pub tokens_per_tile: u32,
}

/// Limits applied while decoding untrusted image bytes.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    /// Largest accepted width or height in pixels.
    pub max_side: u32,
    /// Largest accepted width × height.
    pub max_pixels: u64,
    /// Largest allocation the decoder may make, in bytes.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_side: 16_384,
            max_pixels: 64 * 1024 * 1024,
            max_alloc: 512 * 1024 * 1024,
        }
    }
}

/// An image cut into the tiles the vision encoder will see, in prompt order.
#[derive(Clone, Debug)]
pub struct TiledImage {
    /// Grid columns of the dynamic-resolution canvas.
    pub cols: u32,
    /// Grid rows of the dynamic-resolution canvas.
    pub rows: u32,
    /// Tiles row by row, then the thumbnail when there is more than one tile.
    pub tiles: Vec<RgbImage>,
    /// SHA-256 of each tile's pixels: the identity under which its encoding
    /// and its place in the KV cache are reused.
    pub hashes: Vec<TileHash>,
}

/// Content hash of one tile's RGB pixels.
pub type TileHash = [u8; 32];

impl TiledImage {
    /// Tiles with their content hashes.
    pub fn new(cols: u32, rows: u32, tiles: Vec<RgbImage>) -> Self {
        use sha2::{Digest, Sha256};
        let hashes = tiles
            .iter()
            .map(|t| Sha256::digest(t.as_raw()).into())
            .collect();
        Self {
            cols,
            rows,
            tiles,
            hashes,
        }
    }

    /// Tiles the encoder runs on, the thumbnail included.
    pub fn tile_count(&self) -> u32 {
        self.tiles.len() as u32
    }
}

/// Decodes untrusted bytes into RGB the way the reference does: EXIF orientation
/// applied, then every mode converted through RGBA composited on white.
pub fn decode_rgb(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, EngineError> {
    decode_rgb_with(bytes, limits, |_| Ok(()))
}

/// [`decode_rgb`], calling `before` with the bytes the decoded image and its
/// RGB copy will take, once the header is read and checked and before any
/// pixel is decoded: a refusal there decodes nothing.
pub fn decode_rgb_with(
    bytes: &[u8],
    limits: &DecodeLimits,
    before: impl FnOnce(u64) -> Result<(), EngineError>,
) -> Result<RgbImage, EngineError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| EngineError::InvalidImage(format!("cannot read image bytes: {e}")))?;
    let Some(format) = reader.format() else {
        return Err(EngineError::InvalidImage(
            "unrecognised image format (expected PNG, JPEG, WebP, GIF, BMP or TIFF)".into(),
        ));
    };
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_side);
    image_limits.max_image_height = Some(limits.max_side);
    image_limits.max_alloc = Some(limits.max_alloc);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| EngineError::InvalidImage(format!("cannot decode image: {e}")))?;
    decoder
        .set_limits(image_limits)
        .map_err(|e| EngineError::InvalidImage(format!("image exceeds limits: {e}")))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(EngineError::InvalidImage(format!(
            "image has no pixels ({width}x{height})"
        )));
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(EngineError::InvalidImage(format!(
            "image is {width}x{height}, more than the {} pixels allowed",
            limits.max_pixels
        )));
    }
    // `set_limits` bounds the decoder's own buffers, not the image it returns
    // (only `ImageReader::decode` reserves that), so the output is checked here.
    let needed = decoder.total_bytes();
    if needed > limits.max_alloc {
        return Err(EngineError::InvalidImage(format!(
            "decoding this {width}x{height} image needs {needed} bytes, more than the {} allowed",
            limits.max_alloc
        )));
    }
    if format == ImageFormat::Jpeg {
        jpeg_complete(bytes).map_err(EngineError::InvalidImage)?;
    }
    before(needed.saturating_add(u64::from(width) * u64::from(height) * 3))?;
    let orientation = decoder.orientation().ok();
    let mut image = DynamicImage::from_decoder(decoder)
        .map_err(|e| EngineError::InvalidImage(format!("cannot decode image: {e}")))?;
    if format == ImageFormat::Jpeg {
        if let Some(exact) = libjpeg_pixels(bytes, width, height) {
            image = DynamicImage::ImageRgb8(exact);
        }
    }
    if let Some(orientation) = orientation {
        image.apply_orientation(orientation);
    }
    Ok(to_rgb_like_reference(image))
}

/// The reference decodes JPEG with libjpeg-turbo (through Pillow), whose
/// integer IDCT and fancy upsampling the `image` crate does not reproduce
/// bit for bit; on the fixtures that moved a near-tied top-5 logit. So once the
/// Rust decoder has fully decoded the stream within the limits (proving it
/// well-formed and bounded), the pixels are taken from libjpeg-turbo's decoder
/// (mozjpeg, same defaults as Pillow: ISLOW IDCT, fancy upsampling). Any
/// failure there, or a colour space it cannot turn into RGB (CMYK), keeps the
/// Rust pixels.
fn libjpeg_pixels(bytes: &[u8], width: u32, height: u32) -> Option<RgbImage> {
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<(usize, usize, Vec<u8>)> {
        let mut started = mozjpeg::Decompress::new_mem(bytes)?.rgb()?;
        let (w, h) = (started.width(), started.height());
        let pixels = started.read_scanlines::<u8>()?;
        started.finish()?;
        Ok((w, h, pixels))
    });
    match decoded {
        Ok(Ok((w, h, pixels))) if w == width as usize && h == height as usize => {
            RgbImage::from_raw(width, height, pixels)
        }
        _ => {
            tracing::debug!("libjpeg-turbo could not decode a JPEG the Rust decoder accepted; using the Rust pixels");
            None
        }
    }
}

/// Refuses a JPEG whose data ends before its end-of-image marker, as Pillow
/// does ("image file is truncated"). Both JPEG decoders here are lenient:
/// they fill what is missing with grey and report success, so the stream's
/// segments are walked instead. Bytes after the end-of-image marker are
/// ignored, as Pillow ignores them.
fn jpeg_complete(bytes: &[u8]) -> Result<(), String> {
    let truncated = |at: usize| {
        Err(format!(
            "image file is truncated: the JPEG data ends at byte {at} before its end-of-image marker"
        ))
    };
    if !bytes.starts_with(&[0xff, 0xd8]) {
        return Err("not a JPEG stream (no start-of-image marker)".into());
    }
    let mut i = 2;
    loop {
        // A marker: 0xFF, optional fill bytes 0xFF, then its code.
        if bytes.get(i) != Some(&0xff) {
            return match bytes.get(i) {
                None => truncated(bytes.len()),
                Some(b) => Err(format!(
                    "corrupt JPEG: byte {b:#04x} at {i} where a marker should start"
                )),
            };
        }
        while bytes.get(i) == Some(&0xff) {
            i += 1;
        }
        let Some(&code) = bytes.get(i) else {
            return truncated(bytes.len());
        };
        i += 1;
        match code {
            0xd9 => return Ok(()),
            // Markers without a length: restart markers and TEM.
            0xd0..=0xd7 | 0x01 => continue,
            _ => {}
        }
        let Some(len) = bytes
            .get(i..i + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        else {
            return truncated(bytes.len());
        };
        if len < 2 {
            return Err(format!("corrupt JPEG: segment length {len} at byte {i}"));
        }
        i += len;
        if i > bytes.len() {
            return truncated(bytes.len());
        }
        if code == 0xda {
            // Entropy-coded data runs to the next marker that is neither a
            // stuffed 0xFF00 nor a restart marker.
            loop {
                match bytes.get(i..i + 2) {
                    None => return truncated(bytes.len()),
                    Some([0xff, 0x00]) | Some([0xff, 0xd0..=0xd7]) => i += 2,
                    Some([0xff, _]) => break,
                    Some(_) => i += 1,
                }
            }
        }
    }
}

/// transformers' `convert_to_rgb`: RGB stays as is; anything else goes through
/// RGBA and is alpha-composited on white with Pillow's integer arithmetic.
fn to_rgb_like_reference(image: DynamicImage) -> RgbImage {
    if let DynamicImage::ImageRgb8(rgb) = image {
        return rgb;
    }
    let rgba: RgbaImage = image.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (src, dst) in rgba.pixels().zip(out.pixels_mut()) {
        let a = u32::from(src.0[3]);
        for c in 0..3 {
            dst.0[c] = composite_on_white(u32::from(src.0[c]), a);
        }
    }
    out
}

/// Pillow's `ImagingAlphaComposite` for one channel over an opaque white
/// background, where its coefficients reduce to `a << 7` and `(255 - a) << 7`.
fn composite_on_white(channel: u32, alpha: u32) -> u8 {
    const PRECISION_BITS: u32 = 7;
    let tmp = (channel * alpha + 255 * (255 - alpha)) << PRECISION_BITS;
    let tmp = tmp + (0x80 << PRECISION_BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> PRECISION_BITS).min(255) as u8
}

/// The reference's `get_optimal_tiled_canvas`: the grid (cols, rows) whose aspect
/// ratio is closest to the image's, preferring the later (larger) grid on a tie
/// while the image is large enough to fill more than half of it.
pub fn choose_grid(
    width: u32,
    height: u32,
    min_tiles: u32,
    max_tiles: u32,
    tile: u32,
) -> (u32, u32) {
    let mut grids = Vec::new();
    for cols in 1..=max_tiles {
        for rows in 1..=max_tiles {
            let n = cols * rows;
            if n >= min_tiles && n <= max_tiles {
                grids.push((cols, rows));
            }
        }
    }
    // Python's `sorted` is stable, and so is `sort_by_key`.
    grids.sort_by_key(|(c, r)| c * r);
    let aspect = f64::from(width) / f64::from(height);
    let area = f64::from(width) * f64::from(height);
    let mut best = (1, 1);
    let mut best_diff = f64::INFINITY;
    for (cols, rows) in grids {
        let diff = (aspect - f64::from(cols) / f64::from(rows)).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (cols, rows);
        } else if diff == best_diff
            && area > 0.5 * f64::from(tile) * f64::from(tile) * f64::from(cols * rows)
        {
            best = (cols, rows);
        }
    }
    best
}

/// How many tiles [`tile_image`] cuts `image` into, thumbnail included,
/// without cutting them.
pub fn tile_count(image: &RgbImage, spec: &TileSpec, min_tiles: u32, max_tiles: u32) -> u32 {
    let (cols, rows) = choose_grid(
        image.width(),
        image.height(),
        min_tiles,
        max_tiles,
        spec.tile_size,
    );
    match cols * rows {
        1 => 1,
        n => n + 1,
    }
}

/// Cuts an image into the reference's tiles: resize to the grid canvas, cut row
/// by row, and add a thumbnail of the original image when there are several tiles.
pub fn tile_image(image: &RgbImage, spec: &TileSpec, min_tiles: u32, max_tiles: u32) -> TiledImage {
    let t = spec.tile_size;
    let (cols, rows) = choose_grid(image.width(), image.height(), min_tiles, max_tiles, t);
    let canvas = resize_bicubic(image, cols * t, rows * t);
    let mut tiles = Vec::with_capacity((cols * rows + 1) as usize);
    for row in 0..rows {
        for col in 0..cols {
            tiles.push(image::imageops::crop_imm(&canvas, col * t, row * t, t, t).to_image());
        }
    }
    if tiles.len() != 1 {
        tiles.push(resize_bicubic(image, t, t));
    }
    TiledImage::new(cols, rows, tiles)
}

/// One video frame as the reference feeds it: a single 448×448 tile.
pub fn frame_tile(frame: &RgbImage, spec: &TileSpec) -> TiledImage {
    TiledImage::new(
        1,
        1,
        vec![resize_bicubic(frame, spec.tile_size, spec.tile_size)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_match_the_reference_rule() {
        assert_eq!(choose_grid(448, 448, 1, 12, 448), (1, 1));
        assert_eq!(choose_grid(800, 600, 1, 12, 448), (4, 3));
        assert_eq!(choose_grid(1000, 250, 1, 12, 448), (4, 1));
        assert_eq!(choose_grid(300, 900, 1, 12, 448), (1, 3));
        assert_eq!(choose_grid(64, 48, 1, 12, 448), (4, 3));
        // A tie between 1x1 and 2x2 goes to 2x2 only for a large enough image.
        assert_eq!(choose_grid(100, 100, 1, 4, 448), (1, 1));
        assert_eq!(choose_grid(1000, 1000, 1, 4, 448), (2, 2));
    }

    #[test]
    fn jpeg_streams_must_reach_their_end_marker() {
        // SOI, a comment segment, SOS with a 2-byte header and entropy data
        // holding a stuffed byte and a restart marker, then EOI.
        let whole = [
            0xff, 0xd8, 0xff, 0xfe, 0x00, 0x04, b'h', b'i', 0xff, 0xda, 0x00, 0x02, 0x12, 0xff,
            0x00, 0x34, 0xff, 0xd0, 0x56, 0xff, 0xd9,
        ];
        assert_eq!(jpeg_complete(&whole), Ok(()));
        let mut trailing = whole.to_vec();
        trailing.extend_from_slice(b"trailing bytes");
        assert_eq!(jpeg_complete(&trailing), Ok(()));
        for cut in 0..whole.len() - 1 {
            assert!(
                jpeg_complete(&whole[..cut]).is_err(),
                "accepted a cut at {cut}"
            );
        }
        assert!(jpeg_complete(&whole[..whole.len() - 2])
            .unwrap_err()
            .contains("truncated"));
    }

    #[test]
    fn compositing_matches_pillow_at_the_edges() {
        assert_eq!(composite_on_white(0, 255), 0);
        assert_eq!(composite_on_white(200, 255), 200);
        assert_eq!(composite_on_white(0, 0), 255);
        assert_eq!(composite_on_white(0, 128), 127);
    }
}
