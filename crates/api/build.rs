//! Generates the gRPC server and client code from the repository's `proto/`,
//! and compiles the model catalog (`models/`) in.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let root = Path::new(&std::env::var("CARGO_MANIFEST_DIR")?).join("../..");
    let proto = root.join("proto");
    tonic_prost_build::configure()
        // Undecodable requests are the caller's fault: INVALID_ARGUMENT.
        .codec_path("crate::codec::WireCodec")
        .file_descriptor_set_path(out_dir.join("internvl_descriptor.bin"))
        .compile_protos(
            &[proto.join("internvl/v1/internvl.proto")],
            std::slice::from_ref(&proto),
        )?;
    println!("cargo:rerun-if-changed={}", proto.display());
    catalog(&root.join("models"), &out_dir)
}

/// Compiles every `models/*.toml` into the binary: adding a model to the
/// catalog is adding a file, with no code change.
fn catalog(dir: &Path, out_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut code = String::from("&[\n");
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
        code.push_str(&format!(
            "    ({:?}, include_str!({:?})),\n",
            file.file_name().unwrap_or_default().to_string_lossy(),
            file.display().to_string()
        ));
    }
    code.push_str("]\n");
    std::fs::write(out_dir.join("catalog_files.rs"), code)?;
    Ok(())
}
