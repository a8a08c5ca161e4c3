//! Any text as a media URL under a fixed policy, and as a `media_allow`
//! entry: never a panic; a URL judged remote is under an allowed prefix; a
//! private address is allowed only as the entry names it.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;

use internvl_api::media::{MediaPolicy, Target};
use libfuzzer_sys::fuzz_target;

fn policy() -> &'static MediaPolicy {
    static POLICY: OnceLock<MediaPolicy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("internvl-fuzz-media-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let allow = ["https://images.example.com/cats/".to_string(), "http://127.0.0.1:8080/m/".to_string()];
        MediaPolicy::new(&allow, Some(&root)).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Target::Remote { url, host, port }) = policy().check_url(text) {
        let under = (url.scheme() == "https" && host == "images.example.com" && port == 443 && url.path().starts_with("/cats/"))
            || (url.scheme() == "http" && host == "127.0.0.1" && port == 8080 && url.path().starts_with("/m/"));
        assert!(under, "{text:?} passed as {url}");
        let loopback: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        assert!(policy().check_address(&host, loopback).is_err());
    }
    let _ = MediaPolicy::new(&[text.to_string()], None);
});
