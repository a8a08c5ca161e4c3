//! Where a `dynamic-backends` build finds ggml's shared libraries. (The proto
//! and the catalog are compiled in `crates/api`.)

fn main() -> Result<(), Box<dyn std::error::Error>> {
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
