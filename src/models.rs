//! Where model files come from: presets naming real InternVL3 GGUF repositories,
//! `hf://owner/repo/file.gguf` references, or local paths. Hub files are
//! resolved through the Hugging Face cache and downloaded with a progress bar.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo};

use crate::engine::{EngineError, ModelPaths};

/// Where one file of a preset lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresetFile {
    /// A file of a Hugging Face model repository.
    Hub {
        /// `owner/name`.
        repo: &'static str,
        /// File inside the repository.
        file: &'static str,
    },
    /// A file shipped in this repository, relative to its root.
    Bundled(&'static str),
}

/// A named model: its language GGUF and its mmproj.
#[derive(Clone, Copy, Debug)]
pub struct Preset {
    /// Name given to `--model`.
    pub name: &'static str,
    /// Language model.
    pub model: PresetFile,
    /// Vision encoder.
    pub mmproj: PresetFile,
}

const fn hub(repo: &'static str, file: &'static str) -> PresetFile {
    PresetFile::Hub { repo, file }
}

/// The models this service knows by name.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "tiny",
        model: PresetFile::Bundled("tests/fixtures/tiny-internvl/tiny-internvl-f32.gguf"),
        mmproj: PresetFile::Bundled("tests/fixtures/tiny-internvl/mmproj-tiny-internvl-f32.gguf"),
    },
    Preset {
        name: "internvl3-1b",
        model: hub(
            "ggml-org/InternVL3-1B-Instruct-GGUF",
            "InternVL3-1B-Instruct-Q8_0.gguf",
        ),
        mmproj: hub(
            "ggml-org/InternVL3-1B-Instruct-GGUF",
            "mmproj-InternVL3-1B-Instruct-Q8_0.gguf",
        ),
    },
    Preset {
        name: "internvl3-2b",
        model: hub(
            "ggml-org/InternVL3-2B-Instruct-GGUF",
            "InternVL3-2B-Instruct-Q8_0.gguf",
        ),
        mmproj: hub(
            "ggml-org/InternVL3-2B-Instruct-GGUF",
            "mmproj-InternVL3-2B-Instruct-Q8_0.gguf",
        ),
    },
    Preset {
        name: "internvl3-8b",
        model: hub(
            "ggml-org/InternVL3-8B-Instruct-GGUF",
            "InternVL3-8B-Instruct-Q4_K_M.gguf",
        ),
        mmproj: hub(
            "ggml-org/InternVL3-8B-Instruct-GGUF",
            "mmproj-InternVL3-8B-Instruct-Q8_0.gguf",
        ),
    },
];

/// How hub files are fetched.
#[derive(Clone, Debug, Default)]
pub struct HubOptions {
    /// Cache directory; `None` = `HF_HOME/hub` or `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Only use cached files (also when `HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

/// Resolves `--model` and `--mmproj` to files on disk. `mmproj` may be empty
/// when `model` names a preset.
pub fn resolve(model: &str, mmproj: &str, hub: &HubOptions) -> Result<ModelPaths, EngineError> {
    let preset = PRESETS.iter().find(|p| p.name == model);
    let model_path = match preset {
        Some(p) => resolve_preset_file(p.model, hub)?,
        None => resolve_spec(model, hub)?,
    };
    let mmproj_path = match (mmproj.is_empty(), preset) {
        (false, _) => resolve_spec(mmproj, hub)?,
        (true, Some(p)) => resolve_preset_file(p.mmproj, hub)?,
        (true, None) => {
            return Err(EngineError::ModelFile {
                path: PathBuf::from(model),
                message: "no --mmproj given, and the model is not a preset that names one".into(),
            })
        }
    };
    Ok(ModelPaths {
        model: model_path,
        mmproj: mmproj_path,
    })
}

fn resolve_preset_file(file: PresetFile, hub: &HubOptions) -> Result<PathBuf, EngineError> {
    match file {
        PresetFile::Hub { repo, file } => fetch(repo, file, hub),
        PresetFile::Bundled(relative) => {
            let in_checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
            if in_checkout.exists() {
                Ok(in_checkout)
            } else {
                Ok(PathBuf::from(relative))
            }
        }
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
            fetch(&format!("{owner}/{name}"), file, hub)
        }
        _ => Err(EngineError::ModelFile {
            path: PathBuf::from(spec),
            message: "expected hf://owner/repo/file.gguf".into(),
        }),
    }
}

fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// A hub file from the cache, else downloaded into it (with a progress bar).
fn fetch(repo: &str, file: &str, hub: &HubOptions) -> Result<PathBuf, EngineError> {
    let cache = hub
        .cache_dir
        .clone()
        .map_or_else(Cache::from_env, Cache::new);
    let display = PathBuf::from(format!("hf://{repo}/{file}"));
    if let Some(path) = cache.repo(Repo::model(repo.to_string())).get(file) {
        return Ok(path);
    }
    if hub.offline || offline_from_env() {
        return Err(EngineError::ModelFile {
            path: display,
            message: format!(
                "not in the Hugging Face cache at {} and offline mode is on",
                cache.path().display()
            ),
        });
    }
    tracing::info!(repo, file, "downloading from the Hugging Face hub");
    let api = ApiBuilder::from_cache(cache)
        .with_progress(true)
        .build()
        .map_err(|e| EngineError::ModelFile {
            path: display.clone(),
            message: format!("cannot set up the hub client: {e}"),
        })?;
    api.model(repo.to_string())
        .get(file)
        .map_err(|e| EngineError::ModelFile {
            path: display,
            message: format!("download failed (offline, or the file does not exist?): {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_cache(root: &Path, repo: &str, file: &str) -> PathBuf {
        let folder = root.join(format!("models--{}", repo.replace('/', "--")));
        std::fs::create_dir_all(folder.join("refs")).unwrap();
        std::fs::write(folder.join("refs/main"), "0123abcd").unwrap();
        let snapshot = folder.join("snapshots/0123abcd");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(snapshot.join(file), b"GGUF").unwrap();
        snapshot.join(file)
    }

    #[test]
    fn presets_resolve_from_a_local_cache_without_network() {
        let root = std::env::temp_dir().join(format!("internvl-hub-{}", std::process::id()));
        let preset = PRESETS.iter().find(|p| p.name == "internvl3-1b").unwrap();
        let (PresetFile::Hub { repo, file: model }, PresetFile::Hub { file: mmproj, .. }) =
            (preset.model, preset.mmproj)
        else {
            panic!("internvl3-1b is a hub preset");
        };
        let expected_model = fake_cache(&root, repo, model);
        let expected_mmproj = fake_cache(&root, repo, mmproj);
        let options = HubOptions {
            cache_dir: Some(root.clone()),
            offline: true,
        };
        let paths = resolve("internvl3-1b", "", &options).unwrap();
        assert_eq!(paths.model, expected_model);
        assert_eq!(paths.mmproj, expected_mmproj);
        let spec = format!("hf://{repo}/{model}");
        assert_eq!(
            resolve(&spec, &spec, &options).unwrap().model,
            expected_model
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn offline_and_uncached_names_the_file() {
        let options = HubOptions {
            cache_dir: Some(std::env::temp_dir().join("internvl-empty-hub-cache")),
            offline: true,
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
    fn a_non_preset_model_needs_an_mmproj() {
        let err = resolve("/models/x.gguf", "", &HubOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--mmproj"), "{err}");
    }
}
