//! The model catalog: one TOML file per model in `models/`, compiled into the
//! binary (see `models/README.md` for the keys). `--model NAME[:QUANT]`,
//! `internvl-grpc models` and `internvl-grpc pull` read it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

/// The catalog files, as `(file name, content)`, gathered by `build.rs`.
const FILES: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/catalog_files.rs"));

/// One model of the catalog.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// What `--model`, `pull` and `models` call it.
    pub name: String,
    /// `InternVL3` or `InternVL3.5`.
    pub family: String,
    /// Size as the model card gives it.
    pub parameters: String,
    /// Hugging Face repository holding the files.
    #[serde(default)]
    pub repo: Option<String>,
    /// A folder of this repository holding the files instead (test models).
    #[serde(default)]
    pub bundled: Option<String>,
    /// The weights' licence.
    pub license: String,
    /// The language model's trained context, in tokens.
    pub context_length: u32,
    /// Quantization served when none is named.
    pub default_quant: String,
    /// Whether the repository's file listing was read: then every file here
    /// is in it and has its size (a unit test holds the catalog to that).
    #[serde(default)]
    pub checked: bool,
    /// What a user should know.
    #[serde(default)]
    pub note: String,
    /// Language-model files by quantization (lower case, e.g. `q4_k_m`).
    pub quants: BTreeMap<String, Quant>,
    /// The vision encoder file.
    pub mmproj: File,
}

/// A file of a catalog entry and what it must be.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// File name in the repository or bundled folder.
    pub file: String,
    /// Size in bytes, when known.
    #[serde(default)]
    pub size: Option<u64>,
    /// SHA-256 (hex), when known.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// How far `pull` can check a catalog file, from what the catalog knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    /// Its SHA-256 is known: pull checks the bytes (and the size, if known).
    Hash,
    /// Its size is known: pull checks that.
    Size,
    /// Only its name, which follows the publisher's naming but was not seen
    /// in a listing: pull fails naming the file if the hub has none, and
    /// checks the bytes against the hash the hub announces.
    NameOnly,
}

impl Verification {
    /// The word `internvl-grpc models` shows.
    pub fn label(self) -> &'static str {
        match self {
            Verification::Hash => "sha256",
            Verification::Size => "size",
            Verification::NameOnly => "unverified",
        }
    }
}

impl File {
    /// How far `pull` can check this file.
    pub fn verification(&self) -> Verification {
        match (&self.sha256, self.size) {
            (Some(_), _) => Verification::Hash,
            (None, Some(_)) => Verification::Size,
            (None, None) => Verification::NameOnly,
        }
    }
}

/// A language-model file of one quantization.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Quant {
    /// The file.
    #[serde(flatten)]
    pub file: File,
    /// Approximate resident memory with the default configuration, in GB.
    pub ram_gb: f64,
}

/// A model and quantization picked from the catalog.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice<'a> {
    /// The model.
    pub entry: &'a Entry,
    /// The quantization's name.
    pub quant: &'a str,
    /// Its language-model file.
    pub model: &'a Quant,
}

/// Why a catalog file cannot be used; only a broken build has one.
fn check(entry: &Entry) -> Result<(), String> {
    if entry.repo.is_some() == entry.bundled.is_some() {
        return Err("needs exactly one of repo and bundled".into());
    }
    if !entry.quants.contains_key(&entry.default_quant) {
        return Err(format!(
            "default_quant {} is not in quants",
            entry.default_quant
        ));
    }
    if entry.name.contains(':') || entry.quants.keys().any(|q| q.contains(':')) {
        return Err("names cannot contain ':'".into());
    }
    let files = entry
        .quants
        .values()
        .map(|q| &q.file)
        .chain(std::iter::once(&entry.mmproj));
    for file in files {
        if entry.checked && file.size.is_none() {
            return Err(format!(
                "{}: the listing was checked (checked = true), so its size is known: add size",
                file.file
            ));
        }
        if let Some(sha) = &file.sha256 {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{}: sha256 is not 64 hex digits", file.file));
            }
        }
    }
    Ok(())
}

/// One catalog file's text as an entry, checked; why not, if it is not one.
pub fn parse_entry(text: &str) -> Result<Entry, String> {
    let entry: Entry = toml::from_str(text).map_err(|e| e.to_string())?;
    check(&entry)?;
    Ok(entry)
}

/// Every entry, sorted by name. Panics on a malformed catalog file: they are
/// compiled in, and a unit test parses each one.
pub fn entries() -> &'static [Entry] {
    static ENTRIES: OnceLock<Vec<Entry>> = OnceLock::new();
    ENTRIES.get_or_init(|| {
        let mut entries: Vec<Entry> = FILES
            .iter()
            .map(|(file, text)| parse_entry(text).unwrap_or_else(|e| panic!("models/{file}: {e}")))
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries
    })
}

/// The catalog entry `spec` names (`NAME` or `NAME:QUANT`), if it names one.
/// `Some(Err)` when the name is known but the quantization is not.
pub fn find(spec: &str) -> Option<Result<Choice<'static>, String>> {
    let (name, quant) = match spec.split_once(':') {
        Some((name, quant)) => (name, Some(quant)),
        None => (spec, None),
    };
    let entry = entries().iter().find(|e| e.name == name)?;
    let quant = quant.map_or(entry.default_quant.clone(), str::to_ascii_lowercase);
    Some(match entry.quants.get_key_value(quant.as_str()) {
        Some((quant, model)) => Ok(Choice {
            entry,
            quant,
            model,
        }),
        None => Err(format!(
            "{name} has no quantization {quant:?}; it has {}",
            entry.quants.keys().cloned().collect::<Vec<_>>().join(", ")
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catalog_file_parses_and_names_are_unique() {
        let entries = entries();
        assert_eq!(entries.len(), FILES.len());
        let mut names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), entries.len(), "duplicate names");
        for family in ["InternVL3", "InternVL3.5"] {
            assert!(
                entries.iter().filter(|e| e.family == family).count() >= 4,
                "{family}"
            );
        }
        for e in entries {
            assert!(e.context_length > 0, "{}", e.name);
            assert!(e.quants.values().all(|q| q.ram_gb > 0.0), "{}", e.name);
        }
    }

    #[test]
    fn a_quantization_is_picked_by_name_or_by_default() {
        let choice = find("internvl3.5-2b:Q4_K_M").unwrap().unwrap();
        assert_eq!(choice.quant, "q4_k_m");
        assert!(choice.model.file.file.contains("Q4_K_M"));
        let default = find("internvl3-1b").unwrap().unwrap();
        assert_eq!(default.quant, default.entry.default_quant);
        let err = find("internvl3-1b:q2_k").unwrap().unwrap_err();
        assert!(err.contains("q8_0"), "{err}");
        assert!(find("/models/internvl3-1b.gguf").is_none());
        assert!(find("hf://a/b/c.gguf").is_none());
    }

    #[test]
    fn malformed_entries_are_refused() {
        let entry = find("internvl3-1b").unwrap().unwrap().entry.clone();
        let mut both = entry.clone();
        both.bundled = Some("x".into());
        assert!(check(&both).is_err());
        let mut bad_default = entry.clone();
        bad_default.default_quant = "q1".into();
        assert!(check(&bad_default).unwrap_err().contains("default_quant"));
        let mut bad_sha = entry.clone();
        bad_sha.mmproj.sha256 = Some("abc".into());
        assert!(check(&bad_sha).unwrap_err().contains("sha256"));
        let mut listed_without_size = find("internvl3-2b").unwrap().unwrap().entry.clone();
        assert!(listed_without_size.checked);
        check(&listed_without_size).unwrap();
        listed_without_size.mmproj.size = None;
        assert!(check(&listed_without_size).unwrap_err().contains("size"));
    }

    #[test]
    fn every_file_of_a_checked_listing_has_its_size() {
        let checked: Vec<&Entry> = entries().iter().filter(|e| e.checked).collect();
        assert!(
            checked.iter().any(|e| e.repo.is_some()),
            "a hub listing was checked"
        );
        for entry in checked {
            for file in entry
                .quants
                .values()
                .map(|q| &q.file)
                .chain([&entry.mmproj])
            {
                assert!(
                    file.size.is_some(),
                    "{}: {} has no size",
                    entry.name,
                    file.file
                );
            }
        }
    }

    #[test]
    fn verification_follows_what_the_catalog_knows() {
        let q8 = find("internvl3.5-2b:q8_0").unwrap().unwrap();
        assert_eq!(q8.model.file.verification(), Verification::Hash);
        let bf16 = find("internvl3.5-2b:bf16").unwrap().unwrap();
        assert_eq!(bf16.model.file.verification(), Verification::NameOnly);
        let q4 = find("internvl3-2b:q4_k_m").unwrap().unwrap();
        assert_eq!(q4.model.file.verification(), Verification::Size);
    }
}
