//! Generates the gRPC server and client code from `proto/`, and compiles the
//! model catalog in.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Undecodable requests are the caller's fault: INVALID_ARGUMENT.
        .codec_path("crate::service::codec::WireCodec")
        .file_descriptor_set_path(out_dir.join("internvl_descriptor.bin"))
        .compile_protos(&["proto/internvl/v1/internvl.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    catalog(&out_dir)?;
    // A `dynamic-backends` server links ggml's shared libraries: it looks for
    // them beside itself, where a deployment puts them with the plugins, so
    // copying the folder is enough (`$ORIGIN` is the real binary's folder,
    // through a symlink too). Then in the folder the build wrote them to, so
    // `target/release/internvl-grpc` runs where it was built, and so do the
    // processes tests start in a sandbox without cargo's library path
    // (llama-cpp-sys-2 leaves in `target/` only links to files it does not
    // copy).
    if std::env::var_os("CARGO_FEATURE_DYNAMIC_BACKENDS").is_some() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN");
        if let Some(backends) = std::env::var_os("DEP_LLAMA_BACKENDS_DIR") {
            let lib = std::path::Path::new(&backends).with_file_name("lib");
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        }
    }
    Ok(())
}

/// Compiles every `models/*.toml` into the binary: adding a model to the
/// catalog is adding a file, with no code change.
fn catalog(out_dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR")?).join("models");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
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
