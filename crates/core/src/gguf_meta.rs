//! Checks of the model files made in Rust before llama.cpp opens them, and the
//! vision encoder's tiling read from the mmproj metadata.

use std::path::Path;

use super::error::EngineError;
use super::gguf::{self, Gguf};
use super::vision::TileSpec;

fn file_error(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::ModelFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Refuses a file that is missing, unreadable or not a well-formed GGUF
/// (header, metadata and tensor table read in Rust), so llama.cpp never
/// parses garbage.
pub fn check_file(path: &Path) -> Result<Gguf, EngineError> {
    gguf::read(path).map_err(|message| file_error(path, message))
}

/// [`check_file`], then what a language model needs: architecture sizes,
/// a vocabulary, tensors, and not being an mmproj.
pub fn check_language_model(path: &Path) -> Result<(), EngineError> {
    let file = check_file(path)?;
    gguf::check_language_model(&file).map_err(|message| file_error(path, message))
}

/// Typed access to the metadata of a checked GGUF.
struct Meta<'a> {
    file: &'a Gguf,
    path: &'a Path,
}

impl Meta<'_> {
    fn uint(&self, key: &str) -> Result<Option<u64>, EngineError> {
        match self.file.meta.get(key) {
            None => Ok(None),
            Some(gguf::Value::Int(i)) => u64::try_from(*i)
                .map(Some)
                .map_err(|_| file_error(self.path, format!("{key} is negative or too large"))),
            Some(_) => Err(file_error(self.path, format!("{key} is not an integer"))),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>, EngineError> {
        match self.file.meta.get(key) {
            None => Ok(None),
            Some(gguf::Value::Str(s)) => Ok(Some(s.clone())),
            Some(_) => Err(file_error(self.path, format!("{key} is not a string"))),
        }
    }
}

/// Most tiles an mmproj may ask for; beyond this a file is taken as corrupt.
const MAX_TILES_LIMIT: u64 = 64;

/// Reads and checks the mmproj's tiling: an InternVL projector, a tile size the
/// patch size and pixel shuffle divide, and sane tile limits.
pub fn read_tile_spec(path: &Path) -> Result<(TileSpec, String), EngineError> {
    let file = check_file(path)?;
    let meta = Meta { file: &file, path };
    let projector = meta
        .string("clip.projector_type")?
        .ok_or_else(|| file_error(path, "missing clip.projector_type: is this an mmproj file?"))?;
    if projector != "internvl" {
        return Err(file_error(
            path,
            format!("projector type is {projector:?}, expected \"internvl\""),
        ));
    }
    let required = |key: &str| -> Result<u64, EngineError> {
        meta.uint(key)?
            .ok_or_else(|| file_error(path, format!("missing {key}")))
    };
    let image_size = required("clip.vision.image_size")?;
    let patch_size = required("clip.vision.patch_size")?;
    let scale = meta
        .uint("clip.vision.projector.scale_factor")?
        .unwrap_or(2);
    let min_tiles = meta.uint("clip.vision.preproc_min_tiles")?.unwrap_or(1);
    let max_tiles = meta.uint("clip.vision.preproc_max_tiles")?.unwrap_or(12);
    if image_size == 0 || image_size > 4096 || patch_size == 0 || scale == 0 {
        return Err(file_error(path, format!("implausible image_size {image_size}, patch_size {patch_size}, scale_factor {scale}")));
    }
    let patches = image_size / patch_size;
    if image_size % patch_size != 0 || patches % scale != 0 {
        return Err(file_error(path, format!("image_size {image_size} is not a multiple of patch_size {patch_size} × scale_factor {scale}")));
    }
    if min_tiles == 0 || min_tiles > max_tiles || max_tiles > MAX_TILES_LIMIT {
        return Err(file_error(
            path,
            format!("tile limits {min_tiles}..={max_tiles} are not within 1..={MAX_TILES_LIMIT}"),
        ));
    }
    let per_side = patches / scale;
    Ok((
        TileSpec {
            tile_size: image_size as u32,
            min_tiles: min_tiles as u32,
            max_tiles: max_tiles as u32,
            tokens_per_tile: (per_side * per_side) as u32,
        },
        projector,
    ))
}
