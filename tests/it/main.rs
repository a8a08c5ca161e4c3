//! The integration tests: one binary (it links llama.cpp once), one module
//! per area. Each starts the real server on 127.0.0.1:0, or the real binary,
//! and talks to it over real clients. Run one area with
//! `cargo test --test it parity::`. `tests/rpc.rs` and
//! `tests/vision_overlap.rs` are binaries apart (each says why).

mod common;

mod bad_input;
mod batching;
mod cancel;
mod catalog;
mod confine;
mod drain;
mod health_probe;
mod hostile;
mod kubelet;
mod load;
mod malformed;
mod media;
mod mesh_nginx;
mod metrics;
mod node_client;
mod non_root;
mod offload;
mod openai;
mod parity;
mod python_client;
mod real_files;
mod reuse;
mod security;
mod serving;
mod startup;
mod structured_output;
mod video;
mod vision_features;
