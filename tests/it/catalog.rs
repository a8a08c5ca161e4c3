//! The model catalog as a user meets it: `internvl-grpc models` and
//! `internvl-grpc pull` of the real binary against a fake Hugging Face hub on
//! loopback (hf-hub's real client, HTTP ranges and all), then serving the
//! pulled model by its catalog name, offline.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::hub::*;
use common::*;
use internvl_grpc::catalog;
use internvl_grpc::config::Config;

fn binary(args: &[&str], hub_url: &str) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_internvl-grpc"))
        .args(args)
        .env("HF_ENDPOINT", hub_url)
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .expect("binary runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A catalog entry's repository and its two file names (language, mmproj).
fn files_of(spec: &str) -> (String, String, String) {
    let choice = catalog::find(spec).unwrap().unwrap();
    (
        choice.entry.repo.clone().unwrap(),
        choice.model.file.file.clone(),
        choice.entry.mmproj.file.clone(),
    )
}

fn models_line(stdout: &str, name: &str) -> String {
    stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no line for {name} in:\n{stdout}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_downloads_resumes_and_refuses_then_serve_uses_the_catalog_name() {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let cache_arg = cache.display().to_string();

    // The tiny InternVL3.5 files stand in for the published ones.
    let model = std::fs::read(INTERNVL35.model_path()).unwrap();
    let mmproj = std::fs::read(INTERNVL35.mmproj_path()).unwrap();
    let (repo_1b, model_1b, mmproj_1b) = files_of("internvl3.5-1b");
    let (repo_8b, model_8b, mmproj_8b) = files_of("internvl3.5-8b");
    let (repo_3, model_3, mmproj_3) = files_of("internvl3-1b");
    // A file whose size and hash the catalog knows: the hub's word is not enough.
    let (repo_2b8, model_2b8, _) = files_of("internvl3.5-2b:q8_0");
    let mut corrupt = model.clone();
    corrupt[model.len() / 2] ^= 0xff;
    let files = HashMap::from([
        (url_path(&repo_1b, &model_1b), honest(&model)),
        (url_path(&repo_1b, &mmproj_1b), honest(&mmproj)),
        (url_path(&repo_8b, &model_8b), honest(&model)),
        (url_path(&repo_8b, &mmproj_8b), honest(&mmproj)),
        // Bytes that are not what the hub says they are.
        (
            url_path(&repo_3, &model_3),
            Served {
                bytes: corrupt,
                sha256: hex(&model),
            },
        ),
        (url_path(&repo_3, &mmproj_3), honest(&mmproj)),
        (url_path(&repo_2b8, &model_2b8), honest(&model)),
    ]);
    let hub = fake_hub(files).await;

    // Nothing downloaded yet: no quantization is marked.
    let (ok, before, err) = binary(&["models", "--hf-cache", &cache_arg], &hub.url);
    assert!(ok, "{err}");
    assert!(
        !models_line(&before, "internvl3.5-1b").contains('*'),
        "{before}"
    );
    assert!(
        models_line(&before, "tiny").contains("f32*"),
        "bundled: {before}"
    );
    for entry in catalog::entries() {
        models_line(&before, &entry.name);
    }

    // pull: both files, byte for byte.
    let (ok, out, err) = binary(
        &["pull", "internvl3.5-1b", "--hf-cache", &cache_arg],
        &hub.url,
    );
    assert!(ok, "pull failed: {err}");
    let paths: Vec<PathBuf> = out.lines().map(PathBuf::from).collect();
    assert_eq!(paths.len(), 2, "{out}");
    assert_eq!(std::fs::read(&paths[0]).unwrap(), model);
    assert_eq!(std::fs::read(&paths[1]).unwrap(), mmproj);
    let (_, after, _) = binary(&["models", "--hf-cache", &cache_arg], &hub.url);
    let line = models_line(&after, "internvl3.5-1b");
    assert!(line.contains("q4_k_m*"), "{line}");
    assert!(!line.contains("bf16*"), "{line}");
    // Each file says what pull can check of it.
    let line = models_line(&after, "internvl3.5-2b");
    assert!(
        line.contains("q8_0 (3.7, sha256)")
            && line.contains("bf16 (5.4, unverified)")
            && line.contains("mmproj sha256"),
        "{line}"
    );
    assert!(!after.contains("unchecked"), "{after}");

    // An interrupted download resumes where it stopped.
    let blobs = cache.join(format!("models--{}/blobs", repo_8b.replace('/', "--")));
    std::fs::create_dir_all(&blobs).unwrap();
    let half = model.len() / 2;
    std::fs::write(blobs.join(format!("{}.part", hex(&model))), &model[..half]).unwrap();
    let (ok, out, err) = binary(
        &["pull", "internvl3.5-8b", "--hf-cache", &cache_arg],
        &hub.url,
    );
    assert!(ok, "resumed pull failed: {err}");
    assert_eq!(std::fs::read(out.lines().next().unwrap()).unwrap(), model);
    let ranges = hub.ranges.lock().unwrap().clone();
    let resumed = format!("{} bytes={half}-", url_path(&repo_8b, &model_8b));
    assert!(ranges.contains(&resumed), "no resumed range in {ranges:?}");

    // Bytes whose hash is not the hub's are refused and removed.
    let (ok, _, err) = binary(
        &["pull", "internvl3-1b", "--hf-cache", &cache_arg],
        &hub.url,
    );
    assert!(!ok, "a corrupt download was accepted");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains(&model_3) && last.contains("SHA-256"),
        "last line {last:?} must name the file and the hash"
    );
    let (_, listing, _) = binary(&["models", "--hf-cache", &cache_arg], &hub.url);
    assert!(
        !models_line(&listing, "internvl3-1b").contains('*'),
        "{listing}"
    );

    // Bytes the hub vouches for, but not the size the catalog records.
    let (ok, _, err) = binary(
        &["pull", "internvl3.5-2b:q8_0", "--hf-cache", &cache_arg],
        &hub.url,
    );
    assert!(!ok, "a file of the wrong size was accepted");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains(&model_2b8) && last.contains("2165036128"),
        "last line {last:?} must name the file and the catalog's size"
    );

    // An unknown quantization names the known ones.
    let (ok, _, err) = binary(
        &["pull", "internvl3.5-1b:q1", "--hf-cache", &cache_arg],
        &hub.url,
    );
    assert!(!ok);
    assert!(err.contains("q4_k_m"), "{err}");

    // The pulled model serves by its catalog name, offline.
    let server = start(Config {
        model: "internvl3.5-1b".into(),
        hf_cache: Some(cache.clone()),
        offline: true,
        ..INTERNVL35.config()
    })
    .await;
    let mut client = server.client().await;
    let got = generate_ok(&mut client, greedy(vec![user(vec![text("hello")])], 3)).await;
    assert_eq!(got.ids.len(), 3);
    server.stop().await;
    std::fs::remove_dir_all(&cache).unwrap();
}
