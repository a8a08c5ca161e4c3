//! The correction that makes llama.cpp's InternVL vision tower match the
//! reference on the mmproj files people download.
//!
//! llama.cpp's graph (`tools/mtmd/models/internvl.cpp`) appends the class
//! token *after* the patches, then adds `v.position_embd.weight` row by row:
//! patch i gets row i and the class token the last row. InternViT, and every
//! mmproj that llama.cpp's own converter writes, keep the class token's row
//! first: patch i belongs to row i + 1. Left alone, every patch gets its
//! neighbour's position (tile features off by cosine ≈ 0.994, greedy text
//! diverging at the first tokens).
//!
//! The fix hands llama.cpp a derived mmproj whose position rows are rotated
//! (row 0 moved last), made once per source file and kept in the cache
//! directory under the source's SHA-256 (remembered per file identity, so
//! only the first start reads the whole file). Only those rows change; every other
//! byte of the tensor data is copied as it is (by the kernel, without passing
//! through this process), and the header gains [`MARKER_KEY`] so a derived
//! file is never rotated twice. Writes go to a temporary name and are renamed
//! into place, so replicas starting together on one volume do not see half a
//! file.
//!
//! If a later llama.cpp fixes its graph, the parity tests on converter-made
//! files fail (the rows would then be rotated once too often): the pinned
//! llama.cpp version and those tests guard this module.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::digest::sha256_file;
use super::error::EngineError;
use super::gguf::{self, Gguf};

/// Metadata key that marks an mmproj whose position rows are already in
/// llama.cpp's order.
pub const MARKER_KEY: &str = "internvl_grpc.position_rows";
/// Its value: patches' rows first, the class token's last.
pub const MARKER_VALUE: &str = "patches_then_class";
/// Bumped whenever the derived file's content would change, so files made by
/// an older version are not reused.
const FORMAT: u32 = 1;

const POSITION_TENSOR: &str = "v.position_embd.weight";
const CLASS_TENSOR: &str = "v.class_embd";

/// What the engine hands to llama.cpp as the vision encoder file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VisionFile {
    /// The file as given: its rows are already in llama.cpp's order.
    AsIs(PathBuf),
    /// A derived copy with the rows rotated.
    Corrected {
        /// The file that was asked for.
        source: PathBuf,
        /// The derived file llama.cpp loads.
        derived: PathBuf,
        /// Whether this start wrote it (false: an earlier start did).
        created: bool,
    },
}

impl VisionFile {
    /// The file llama.cpp should load.
    pub fn path(&self) -> &Path {
        match self {
            VisionFile::AsIs(path) => path,
            VisionFile::Corrected { derived, .. } => derived,
        }
    }
}

/// The default directory for derived files: `$XDG_CACHE_HOME/internvl-grpc`,
/// else `$HOME/.cache/internvl-grpc`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let nonempty = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty());
    nonempty("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| nonempty("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .map(|base| base.join("internvl-grpc"))
}

fn file_error(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::ModelFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn cache_error(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::CacheDir {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Where the rows of the position tensor lie, once checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rows {
    /// Offset of the tensor's data from the start of the file.
    start: u64,
    /// Rows: one per patch plus the class token's.
    count: u64,
    /// Bytes of one row.
    row_bytes: u64,
}

/// Checks that an InternVL mmproj has the tensors llama.cpp's graph asserts
/// on (an abort, not an error, if missing) and finds the position rows.
/// `None` when the rows are already in llama.cpp's order.
fn position_rows(path: &Path, file: &Gguf) -> Result<Option<Rows>, EngineError> {
    if file.string(MARKER_KEY).is_some() {
        return Ok(None);
    }
    if file.tensor(CLASS_TENSOR).is_none() {
        return Err(file_error(
            path,
            format!("has no {CLASS_TENSOR}: not an InternVL vision encoder"),
        ));
    }
    let pos = file.tensor(POSITION_TENSOR).ok_or_else(|| {
        file_error(
            path,
            format!("has no {POSITION_TENSOR}: not an InternVL vision encoder"),
        )
    })?;
    let int = |key: &str| file.int(key).filter(|v| *v > 0).map(|v| v as u64);
    let (Some(image), Some(patch), Some(width)) = (
        int("clip.vision.image_size"),
        int("clip.vision.patch_size"),
        int("clip.vision.embedding_length"),
    ) else {
        return Err(file_error(
            path,
            "missing clip.vision.image_size, patch_size or embedding_length",
        ));
    };
    let side = image / patch;
    let count = side * side + 1;
    let shape_ok = pos.dims.len() >= 2
        && pos.dims[0] == width
        && pos.dims[1] == count
        && pos.dims[2..].iter().all(|&d| d == 1);
    if !shape_ok {
        return Err(file_error(
            path,
            format!(
                "{POSITION_TENSOR} has shape {:?}; expected [{width}, {count}] (one row per {side}×{side} patch plus the class token)",
                pos.dims
            ),
        ));
    }
    Ok(Some(Rows {
        start: file.layout.data_start + pos.offset,
        count,
        row_bytes: pos.bytes / count,
    }))
}

/// Decides which file llama.cpp loads for the vision encoder at `mmproj`,
/// making the corrected copy in `cache_dir` when it does not exist yet.
pub fn prepare(mmproj: &Path, cache_dir: Option<&Path>) -> Result<VisionFile, EngineError> {
    let file = gguf::read(mmproj).map_err(|m| file_error(mmproj, m))?;
    let Some(rows) = position_rows(mmproj, &file)? else {
        return Ok(VisionFile::AsIs(mmproj.to_path_buf()));
    };
    let cache_dir = cache_dir.ok_or_else(|| {
        cache_error(
            Path::new("(none)"),
            "no cache directory: set cache_dir (INTERNVL_CACHE_DIR), XDG_CACHE_HOME or HOME",
        )
    })?;
    let folder = cache_dir.join("mmproj");
    std::fs::create_dir_all(&folder)
        .map_err(|e| cache_error(&folder, format!("cannot create it: {e}")))?;
    let digest = content_key(mmproj, &folder)?;
    let derived = folder.join(format!("{digest}-rows{FORMAT}.gguf"));
    if usable(&derived, &file) {
        return Ok(VisionFile::Corrected {
            source: mmproj.to_path_buf(),
            derived,
            created: false,
        });
    }
    write_corrected(mmproj, &file, rows, &derived)?;
    Ok(VisionFile::Corrected {
        source: mmproj.to_path_buf(),
        derived,
        created: true,
    })
}

/// The SHA-256 of `path`, remembered per file identity (device, inode, size,
/// modification time) in `folder`, so a start after the first does not read
/// the whole file again (its cost: benches/README.md, "Start-up").
/// A file rewritten in place with the same size and modification time would
/// keep its old key; nothing that downloads or copies models does that.
fn content_key(path: &Path, folder: &Path) -> Result<String, EngineError> {
    let meta =
        std::fs::metadata(path).map_err(|e| file_error(path, format!("cannot stat: {e}")))?;
    let memo = identity(&meta).map(|id| folder.join(format!("{id}.sha256")));
    if let Some(known) = memo.as_ref().and_then(|m| std::fs::read_to_string(m).ok()) {
        if known.len() == 64 && known.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(known);
        }
    }
    let digest = sha256_file(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    if let Some(memo) = memo {
        let temp = memo.with_extension(format!("{}.partial", std::process::id()));
        let saved = std::fs::write(&temp, &digest).and_then(|()| std::fs::rename(&temp, &memo));
        if let Err(e) = saved {
            // Only costs the next start a hash.
            tracing::debug!(path = %memo.display(), "could not remember a file's hash: {e}");
        }
    }
    Ok(digest)
}

#[cfg(unix)]
fn identity(meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    Some(format!(
        "{}-{}-{}-{}.{}",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

#[cfg(not(unix))]
fn identity(_meta: &std::fs::Metadata) -> Option<String> {
    None
}

/// Whether a derived file from an earlier start is complete: it parses, is
/// marked, and has the source's tensor table at the length expected.
fn usable(derived: &Path, source: &Gguf) -> bool {
    let Ok(file) = gguf::read(derived) else {
        return false;
    };
    file.string(MARKER_KEY) == Some(MARKER_VALUE) && file.tensors == source.tensors
}

/// One metadata entry: a string key with a string value.
fn string_entry(key: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::new();
    gguf::push_string(&mut out, key);
    out.extend(8u32.to_le_bytes());
    gguf::push_string(&mut out, value);
    out
}

/// Writes the corrected copy to a temporary file beside `derived`, then
/// renames it into place.
fn write_corrected(
    source: &Path,
    file: &Gguf,
    rows: Rows,
    derived: &Path,
) -> Result<(), EngineError> {
    let folder = derived.parent().unwrap_or(Path::new("."));
    // Unique per process and per call: starts racing on one volume each
    // write their own file, and the last rename wins with identical bytes.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let temp = folder.join(format!(
        ".{}.{}-{}.partial",
        derived.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_to(source, file, rows, &temp).and_then(|()| {
        std::fs::rename(&temp, derived)
            .map_err(|e| cache_error(folder, format!("cannot rename into place: {e}")))
    });
    if result.is_err() {
        if let Err(e) = std::fs::remove_file(&temp) {
            // A leftover only costs disk.
            tracing::debug!(path = %temp.display(), "could not remove a partial file: {e}");
        }
    }
    result
}

fn write_to(source: &Path, file: &Gguf, rows: Rows, temp: &Path) -> Result<(), EngineError> {
    let read_err = |e: std::io::Error| file_error(source, format!("cannot read: {e}"));
    let write_err = |e: std::io::Error| cache_error(temp, format!("cannot write: {e}"));
    let layout = file.layout;
    let mut src = File::open(source).map_err(read_err)?;
    let len = src.metadata().map_err(read_err)?.len();
    let mut header = vec![0u8; layout.header_end as usize];
    src.read_exact(&mut header).map_err(read_err)?;
    let mut out = File::create(temp).map_err(write_err)?;

    // Header: one more metadata entry, inserted after the last one; the
    // tensor table (offsets relative to the data) is kept as it is.
    let n_kv = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes")) + 1;
    let mut head = Vec::with_capacity(header.len() + 128);
    head.extend(&header[..16]);
    head.extend(n_kv.to_le_bytes());
    head.extend(&header[24..layout.kv_end as usize]);
    head.extend(string_entry(MARKER_KEY, MARKER_VALUE));
    head.extend(&header[layout.kv_end as usize..]);
    head.resize(
        (head.len() as u64).div_ceil(layout.alignment) as usize * layout.alignment as usize,
        0,
    );
    out.write_all(&head).map_err(write_err)?;

    // Data: as it is, but for the position rows, rotated by one.
    let copy = |src: &mut File, out: &mut File, from: u64, to: u64| -> Result<(), EngineError> {
        src.seek(SeekFrom::Start(from)).map_err(read_err)?;
        // File to file: std copies with copy_file_range, in the kernel.
        let copied =
            std::io::copy(&mut Read::take(&mut *src, to - from), out).map_err(write_err)?;
        if copied != to - from {
            return Err(file_error(source, "the file changed while it was copied"));
        }
        Ok(())
    };
    let rows_end = rows.start + rows.count * rows.row_bytes;
    copy(&mut src, &mut out, layout.data_start, rows.start)?;
    let mut table = vec![0u8; (rows.count * rows.row_bytes) as usize];
    src.seek(SeekFrom::Start(rows.start)).map_err(read_err)?;
    src.read_exact(&mut table).map_err(read_err)?;
    table.rotate_left(rows.row_bytes as usize);
    out.write_all(&table).map_err(write_err)?;
    copy(&mut src, &mut out, rows_end, len)?;
    out.sync_all().map_err(write_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::gguf::push_string as string;

    /// A minimal InternVL-shaped mmproj: 28 px tiles of 14 px patches (4
    /// patches, so 5 position rows of width 2), F32 rows holding their own
    /// index, and a class embedding; data after the rows to check it is kept.
    fn mmproj(position_dims: &[u64]) -> Vec<u8> {
        let mut f = b"GGUF".to_vec();
        f.extend(3u32.to_le_bytes());
        f.extend(3u64.to_le_bytes());
        f.extend(3u64.to_le_bytes());
        for (key, value) in [
            ("clip.vision.image_size", 28u32),
            ("clip.vision.patch_size", 14),
            ("clip.vision.embedding_length", 2),
        ] {
            string(&mut f, key);
            f.extend(4u32.to_le_bytes());
            f.extend(value.to_le_bytes());
        }
        let tensors: [(&str, &[u64], u64); 3] = [
            ("v.class_embd", &[2, 1, 1], 0),
            ("v.position_embd.weight", position_dims, 32),
            ("v.after", &[8], 96),
        ];
        for (name, dims, offset) in tensors {
            string(&mut f, name);
            f.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                f.extend(d.to_le_bytes());
            }
            f.extend(0u32.to_le_bytes());
            f.extend(offset.to_le_bytes());
        }
        while !f.len().is_multiple_of(32) {
            f.push(0);
        }
        let data_start = f.len();
        f.extend([7.0f32, 7.0].iter().flat_map(|v| v.to_le_bytes()));
        f.resize(data_start + 32, 0);
        for row in 0..5 {
            f.extend(
                [row as f32, row as f32]
                    .iter()
                    .flat_map(|v| v.to_le_bytes()),
            );
        }
        f.resize(data_start + 96, 0);
        f.extend((0..8).flat_map(|i| (100.0 + i as f32).to_le_bytes()));
        f
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("internvl-rows-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn floats(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn tensor_data(path: &Path, name: &str) -> Vec<f32> {
        let file = gguf::read(path).unwrap();
        let t = file.tensor(name).unwrap();
        let bytes = std::fs::read(path).unwrap();
        let start = (file.layout.data_start + t.offset) as usize;
        floats(&bytes[start..start + t.bytes as usize])
    }

    #[test]
    fn converter_rows_are_rotated_once_and_everything_else_is_kept() {
        let dir = scratch("rotate");
        let source = dir.join("mmproj.gguf");
        std::fs::write(&source, mmproj(&[2, 5, 1])).unwrap();
        let cache = dir.join("cache");
        let first = prepare(&source, Some(&cache)).unwrap();
        let VisionFile::Corrected {
            derived, created, ..
        } = &first
        else {
            panic!("not corrected: {first:?}");
        };
        assert!(created);
        assert_eq!(
            tensor_data(derived, POSITION_TENSOR),
            [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 0.0, 0.0]
        );
        assert_eq!(tensor_data(derived, CLASS_TENSOR), [7.0, 7.0]);
        assert_eq!(
            tensor_data(derived, "v.after"),
            (0..8).map(|i| 100.0 + i as f32).collect::<Vec<_>>()
        );
        let header = gguf::read(derived).unwrap();
        assert_eq!(header.string(MARKER_KEY), Some(MARKER_VALUE));
        assert_eq!(header.tensors, gguf::read(&source).unwrap().tensors);

        // A second start reuses it; the derived file itself is not rotated again.
        let second = prepare(&source, Some(&cache)).unwrap();
        assert!(matches!(
            second,
            VisionFile::Corrected { created: false, .. }
        ));
        assert_eq!(second.path(), first.path());
        assert_eq!(
            prepare(derived, Some(&cache)).unwrap(),
            VisionFile::AsIs(derived.clone())
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn two_dimensional_rows_are_corrected_too() {
        let dir = scratch("2d");
        let source = dir.join("mmproj.gguf");
        std::fs::write(&source, mmproj(&[2, 5])).unwrap();
        let fixed = prepare(&source, Some(&dir.join("cache"))).unwrap();
        assert_eq!(tensor_data(fixed.path(), POSITION_TENSOR)[8..], [0.0, 0.0]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_content_change_makes_a_new_file() {
        let dir = scratch("content");
        let source = dir.join("mmproj.gguf");
        let cache = dir.join("cache");
        let mut bytes = mmproj(&[2, 5, 1]);
        std::fs::write(&source, &bytes).unwrap();
        let before = prepare(&source, Some(&cache)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        // One more byte too: a file system with coarse timestamps could
        // otherwise give the rewritten file the same identity.
        bytes.push(0);
        std::fs::write(&source, &bytes).unwrap();
        let after = prepare(&source, Some(&cache)).unwrap();
        assert_ne!(before.path(), after.path());
        assert!(matches!(after, VisionFile::Corrected { created: true, .. }));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_hash_is_remembered_per_file_identity() {
        let dir = scratch("memo");
        let source = dir.join("mmproj.gguf");
        let cache = dir.join("cache");
        let bytes = mmproj(&[2, 5, 1]);
        std::fs::write(&source, &bytes).unwrap();
        let first = prepare(&source, Some(&cache)).unwrap();
        let memos = std::fs::read_dir(cache.join("mmproj"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".sha256"))
            })
            .count();
        assert_eq!(memos, 1);
        // A later start finds the same file without reading it: the memo
        // answers even where the content could no longer be read.
        let memo_file = std::fs::read_dir(cache.join("mmproj"))
            .unwrap()
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().ends_with(".sha256"))
            .unwrap()
            .path();
        std::fs::write(&memo_file, "f".repeat(64)).unwrap();
        let key = content_key(&source, &cache.join("mmproj")).unwrap();
        assert_eq!(key, "f".repeat(64));
        assert!(matches!(first, VisionFile::Corrected { created: true, .. }));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_torn_derived_file_is_made_again() {
        let dir = scratch("torn");
        let source = dir.join("mmproj.gguf");
        let cache = dir.join("cache");
        std::fs::write(&source, mmproj(&[2, 5, 1])).unwrap();
        let path = prepare(&source, Some(&cache)).unwrap().path().to_path_buf();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let again = prepare(&source, Some(&cache)).unwrap();
        assert!(matches!(again, VisionFile::Corrected { created: true, .. }));
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_or_misshapen_tensors_are_refused_before_llama_cpp() {
        let dir = scratch("shape");
        let source = dir.join("mmproj.gguf");
        std::fs::write(&source, mmproj(&[2, 4, 1])).unwrap();
        let err = prepare(&source, Some(&dir)).unwrap_err().to_string();
        assert!(err.contains("v.position_embd.weight has shape"), "{err}");
        let mut bytes = mmproj(&[2, 5, 1]);
        let at = bytes
            .windows(12)
            .position(|w| w == b"v.class_embd")
            .unwrap();
        bytes[at..at + 12].copy_from_slice(b"v.other_embd");
        std::fs::write(&source, bytes).unwrap();
        let err = prepare(&source, Some(&dir)).unwrap_err().to_string();
        assert!(err.contains("has no v.class_embd"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_unwritable_cache_is_named() {
        let dir = scratch("unwritable");
        let source = dir.join("mmproj.gguf");
        std::fs::write(&source, mmproj(&[2, 5, 1])).unwrap();
        // A file where the cache directory should be: no permission bits
        // needed, so this fails for root too.
        let blocker = dir.join("cache");
        std::fs::write(&blocker, b"").unwrap();
        let err = prepare(&source, Some(&blocker)).unwrap_err();
        assert!(matches!(err, EngineError::CacheDir { .. }), "{err}");
        assert!(err.to_string().contains("cache"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn starts_racing_on_one_cache_agree() {
        let dir = scratch("race");
        let source = dir.join("mmproj.gguf");
        let cache = dir.join("cache");
        std::fs::write(&source, mmproj(&[2, 5, 1])).unwrap();
        let paths: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| prepare(&source, Some(&cache)).unwrap().path().to_path_buf()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(paths.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(
            tensor_data(&paths[0], POSITION_TENSOR),
            [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 0.0, 0.0]
        );
        // Nothing half-written is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(cache.join("mmproj"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
