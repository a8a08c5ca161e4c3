//! Where model files come from: catalog names (`internvl3.5-2b:q4_k_m`, see
//! [`internvl_api::catalog`]), `hf://owner/repo/file.gguf` references, or local
//! paths. Hub files are resolved through the Hugging Face cache, downloaded
//! with a progress bar (resuming an interrupted download), and checked
//! against their size and SHA-256 before use.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo};

use crate::engine::{EngineError, ModelPaths};
use internvl_api::catalog::{self, Entry};
use internvl_core::digest::sha256_file;

/// How hub files are fetched.
#[derive(Clone, Debug, Default)]
pub struct HubOptions {
    /// Cache directory; `None` = `HF_HOME/hub` or `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Only use cached files (also when `HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Hub address; `None` = `HF_ENDPOINT`, else huggingface.co.
    pub endpoint: Option<String>,
}

impl HubOptions {
    fn cache(&self) -> Cache {
        self.cache_dir
            .clone()
            .map_or_else(Cache::from_env, Cache::new)
    }

    fn is_offline(&self) -> bool {
        self.offline
            || std::env::var("HF_HUB_OFFLINE")
                .is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
    }
}

fn file_error(path: impl Into<PathBuf>, message: impl Into<String>) -> EngineError {
    EngineError::ModelFile {
        path: path.into(),
        message: message.into(),
    }
}

/// Resolves `--model` and `--mmproj` to files on disk. `mmproj` may be empty
/// when `model` names a catalog entry.
pub fn resolve(model: &str, mmproj: &str, hub: &HubOptions) -> Result<ModelPaths, EngineError> {
    let choice = catalog::find(model)
        .transpose()
        .map_err(|message| file_error(model, message))?;
    let model_path = match &choice {
        Some(c) => entry_file(c.entry, &c.model.file, hub, true)?,
        None => resolve_spec(model, hub)?,
    };
    let mmproj_path = match (mmproj.is_empty(), &choice) {
        (false, _) => resolve_spec(mmproj, hub)?,
        (true, Some(c)) => entry_file(c.entry, &c.entry.mmproj, hub, true)?,
        (true, None) => {
            return Err(file_error(
                model,
                "no --mmproj given, and the model is not a catalog name that names one (see `internvl-grpc models`)",
            ))
        }
    };
    Ok(ModelPaths {
        model: model_path,
        mmproj: mmproj_path,
    })
}

/// Downloads both files of a catalog model (`NAME[:QUANT]`) into the cache,
/// or finds them there; never offline.
pub fn pull(spec: &str, hub: &HubOptions) -> Result<ModelPaths, EngineError> {
    let choice = catalog::find(spec)
        .ok_or_else(|| file_error(spec, "not a catalog name (see `internvl-grpc models`)"))?
        .map_err(|message| file_error(spec, message))?;
    let hub = HubOptions {
        offline: false,
        ..hub.clone()
    };
    Ok(ModelPaths {
        model: entry_file(choice.entry, &choice.model.file, &hub, false)?,
        mmproj: entry_file(choice.entry, &choice.entry.mmproj, &hub, false)?,
    })
}

/// A catalog file on disk, if it is there already (bundled, or in the cache).
pub fn cached(entry: &Entry, file: &catalog::File, hub: &HubOptions) -> Option<PathBuf> {
    match (&entry.bundled, &entry.repo) {
        (Some(folder), _) => Some(bundled(folder, &file.file)).filter(|p| p.exists()),
        (None, Some(repo)) => hub.cache().repo(Repo::model(repo.clone())).get(&file.file),
        (None, None) => None,
    }
}

fn bundled(folder: &str, file: &str) -> PathBuf {
    let relative = Path::new(folder).join(file);
    let in_checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join(&relative);
    if in_checkout.exists() {
        in_checkout
    } else {
        relative
    }
}

/// One file of a catalog entry; `use_offline` lets the configuration's
/// offline setting forbid a download.
fn entry_file(
    entry: &Entry,
    file: &catalog::File,
    hub: &HubOptions,
    use_offline: bool,
) -> Result<PathBuf, EngineError> {
    match (&entry.bundled, &entry.repo) {
        (Some(folder), _) => Ok(bundled(folder, &file.file)),
        (None, Some(repo)) => {
            let hub = HubOptions {
                offline: use_offline && hub.offline,
                ..hub.clone()
            };
            fetch(repo, &file.file, &hub, Some(file))
        }
        (None, None) => Err(file_error(&entry.name, "catalog entry has no source")),
    }
}

/// `hf://owner/repo/path/in/repo.gguf` or a local path.
fn resolve_spec(spec: &str, hub: &HubOptions) -> Result<PathBuf, EngineError> {
    let Some(rest) = spec.strip_prefix("hf://") else {
        return Ok(PathBuf::from(spec));
    };
    let mut parts = rest.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(owner), Some(name), Some(file))
            if !owner.is_empty() && !name.is_empty() && !file.is_empty() =>
        {
            fetch(&format!("{owner}/{name}"), file, hub, None)
        }
        _ => Err(file_error(spec, "expected hf://owner/repo/file.gguf")),
    }
}

/// A hub file from the cache, else downloaded into it (with a progress bar,
/// resuming a partial download) and checked.
fn fetch(
    repo: &str,
    file: &str,
    hub: &HubOptions,
    expect: Option<&catalog::File>,
) -> Result<PathBuf, EngineError> {
    let cache = hub.cache();
    let display = PathBuf::from(format!("hf://{repo}/{file}"));
    if let Some(path) = cache.repo(Repo::model(repo.to_string())).get(file) {
        // Sizes are cheap to check at every start; hashes only after a download.
        if let Some(size) = expect.and_then(|e| e.size) {
            check_size(&path, size).map_err(|m| file_error(&display, m))?;
        }
        return Ok(path);
    }
    if hub.is_offline() {
        return Err(file_error(
            display,
            format!(
                "not in the Hugging Face cache at {} and offline mode is on",
                cache.path().display()
            ),
        ));
    }
    tracing::info!(repo, file, "downloading from the Hugging Face hub");
    let mut builder = ApiBuilder::from_cache(cache).with_progress(true);
    if let Some(endpoint) = hub
        .endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok())
    {
        builder = builder.with_endpoint(endpoint);
    }
    let api = builder
        .build()
        .map_err(|e| file_error(&display, format!("cannot set up the hub client: {e}")))?;
    let path = api.model(repo.to_string()).download(file).map_err(|e| {
        file_error(
            &display,
            format!("download failed (offline, or the file does not exist?): {e}"),
        )
    })?;
    if let Err(message) = verify(&path, expect) {
        discard(&path);
        return Err(file_error(
            display,
            format!("{message}; the download was removed"),
        ));
    }
    Ok(path)
}

fn check_size(path: &Path, want: u64) -> Result<(), String> {
    let got = std::fs::metadata(path)
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?
        .len();
    if got != want {
        return Err(format!("is {got} bytes, expected {want}"));
    }
    Ok(())
}

/// Checks a download against the catalog's size and SHA-256, else against
/// the hub's own content hash: the cache names a blob by its ETag, which
/// for files in LFS (every GGUF) is the SHA-256 of the content.
fn verify(path: &Path, expect: Option<&catalog::File>) -> Result<(), String> {
    if let Some(size) = expect.and_then(|e| e.size) {
        check_size(path, size)?;
    }
    let blob = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let from_hub = blob
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()));
    let Some(want) = expect
        .and_then(|e| e.sha256.clone())
        .map(|s| s.to_ascii_lowercase())
        .or(from_hub)
    else {
        tracing::warn!(path = %path.display(), "no hash to check this download against");
        return Ok(());
    };
    let got = sha256_file(path).map_err(|e| format!("cannot read the download: {e}"))?;
    if got != want {
        return Err(format!("SHA-256 is {got}, expected {want}"));
    }
    Ok(())
}

/// Removes a refused download: the blob and the snapshot link to it.
fn discard(path: &Path) {
    let blob = std::fs::canonicalize(path).ok();
    for p in blob.iter().map(PathBuf::as_path).chain([path]) {
        if let Err(e) = std::fs::remove_file(p) {
            tracing::warn!(path = %p.display(), "could not remove a refused download: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hub cache holding `file` of `repo` with `bytes`, as hf-hub lays it
    /// out (blob named by hash, snapshot link, ref).
    fn fake_cache(root: &Path, repo: &str, file: &str, bytes: &[u8]) -> PathBuf {
        let folder = root.join(format!("models--{}", repo.replace('/', "--")));
        std::fs::create_dir_all(folder.join("refs")).unwrap();
        std::fs::write(folder.join("refs/main"), "0123abcd").unwrap();
        let snapshot = folder.join("snapshots/0123abcd");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(snapshot.join(file), bytes).unwrap();
        snapshot.join(file)
    }

    fn scratch(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("internvl-hub-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        root
    }

    #[test]
    fn catalog_names_resolve_from_a_local_cache_without_network() {
        let root = scratch("resolve");
        let choice = catalog::find("internvl3.5-8b:q4_k_m").unwrap().unwrap();
        let repo = choice.entry.repo.as_deref().unwrap();
        let model = fake_cache(&root, repo, &choice.model.file.file, b"GGUF");
        let mmproj = fake_cache(&root, repo, &choice.entry.mmproj.file, b"GGUF");
        let options = HubOptions {
            cache_dir: Some(root.clone()),
            offline: true,
            endpoint: None,
        };
        let paths = resolve("internvl3.5-8b:q4_k_m", "", &options).unwrap();
        assert_eq!((paths.model, paths.mmproj), (model.clone(), mmproj));
        assert_eq!(
            cached(choice.entry, &choice.model.file, &options),
            Some(model.clone())
        );
        let spec = format!("hf://{repo}/{}", choice.model.file.file);
        assert_eq!(resolve(&spec, &spec, &options).unwrap().model, model);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn offline_and_uncached_names_the_file() {
        let options = HubOptions {
            cache_dir: Some(scratch("empty")),
            offline: true,
            endpoint: None,
        };
        let err = resolve("internvl3-8b", "", &options)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "hf://ggml-org/InternVL3-8B-Instruct-GGUF/InternVL3-8B-Instruct-Q4_K_M.gguf"
            ),
            "{err}"
        );
        assert!(err.contains("offline"), "{err}");
    }

    #[test]
    fn an_unknown_quantization_lists_the_known_ones() {
        let err = resolve("internvl3.5-2b:q3_k_s", "", &HubOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("q8_0") && err.contains("bf16"), "{err}");
    }

    #[test]
    fn a_non_catalog_model_needs_an_mmproj() {
        let err = resolve("/models/x.gguf", "", &HubOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--mmproj"), "{err}");
    }

    #[test]
    fn bundled_models_resolve_to_the_checkout() {
        let paths = resolve("tiny-internvl3.5", "", &HubOptions::default()).unwrap();
        assert!(paths.model.ends_with("tiny-internvl35-f32.gguf"));
        assert!(paths.mmproj.exists());
    }

    #[test]
    fn downloads_are_checked_against_size_and_hash() {
        let root = scratch("verify");
        std::fs::create_dir_all(&root).unwrap();
        let file = root.join("f.gguf");
        std::fs::write(&file, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let expect = |size, sha: &str| catalog::File {
            file: "f.gguf".into(),
            size,
            sha256: Some(sha.into()),
        };
        assert!(verify(&file, Some(&expect(Some(3), abc))).is_ok());
        assert!(verify(&file, Some(&expect(Some(4), abc)))
            .unwrap_err()
            .contains("expected 4"));
        assert!(verify(&file, Some(&expect(None, &"0".repeat(64))))
            .unwrap_err()
            .contains("SHA-256"));
        // Without a catalog hash, the blob's name (the hub's hash) is the reference.
        let blob = root.join("0".repeat(64));
        std::fs::write(&blob, b"abc").unwrap();
        assert!(verify(&blob, None).unwrap_err().contains("SHA-256"));
        let blob = root.join(abc);
        std::fs::write(&blob, b"abc").unwrap();
        assert!(verify(&blob, None).is_ok());
        std::fs::remove_dir_all(root).unwrap();
    }
}
