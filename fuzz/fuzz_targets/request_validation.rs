//! Any bytes as a Generate or Embed request on the wire: decoding then
//! validation must accept or name a field, never panic.
#![no_main]

use internvl_grpc::service::proto;
use internvl_grpc::service::validation::{embed, generate, Limits};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(request) = proto::GenerateRequest::decode(data) {
        if let Err(e) = generate(request, &limits) {
            assert!(!e.to_string().is_empty());
        }
    }
    if let Ok(request) = proto::EmbedRequest::decode(data) {
        if let Err(e) = embed(request, &limits) {
            assert!(!e.to_string().is_empty());
        }
    }
});
