//! Generates the gRPC server and client code from `proto/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Undecodable requests are the caller's fault: INVALID_ARGUMENT.
        .codec_path("crate::service::codec::WireCodec")
        .file_descriptor_set_path(out_dir.join("internvl_descriptor.bin"))
        .compile_protos(&["proto/internvl/v1/internvl.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
