//! internvl-grpc's contract with its callers and deployers, without llama.cpp
//! and without the server: the gRPC API generated from `proto/` ([`proto`])
//! with its codec ([`codec`]), what a request must satisfy before the engine
//! sees it ([`validation`]), the configuration schema ([`config`]) and the
//! model catalog ([`catalog`]). The fuzz targets build on this and
//! `internvl-core` alone.

// llama.cpp's unsafe code lives in `internvl-llama` alone.
#![forbid(unsafe_code)]

pub mod catalog;
pub mod codec;
pub mod config;
pub mod media;
pub mod validation;

/// Code generated from `proto/internvl/v1/internvl.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("internvl.v1");

    /// Encoded descriptors of the API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("internvl_descriptor");
}
