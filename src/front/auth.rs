//! API keys: `authorization: Bearer <key>` metadata, compared in constant
//! time; and the [`Caller`] a key identifies, whose requests share cached
//! prefixes and image encodings only with each other.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::engine::CachePartition;

/// Who sent a request, as far as reuse is concerned: a digest of the API
/// key it presented (no key where the service is open). Requests reuse
/// each other's KV cells and tile encodings only within one partition, so
/// one caller's `cached_tokens` says nothing of another's prompts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    key: [u8; 32],
}

impl Caller {
    /// The one caller of a service that checks no keys.
    pub fn anonymous() -> Self {
        Self::of_key(b"")
    }

    fn of_key(key: &[u8]) -> Self {
        Self {
            key: Sha256::new()
                .chain_update(b"internvl-grpc api key\0")
                .chain_update(key)
                .finalize()
                .into(),
        }
    }

    /// The partition of this caller's requests with `cache_salt` (empty =
    /// none): tenants sharing one key keep apart by sending different salts.
    pub fn partition(&self, cache_salt: &str) -> CachePartition {
        if cache_salt.is_empty() {
            return CachePartition(self.key);
        }
        CachePartition(
            Sha256::new()
                .chain_update(self.key)
                .chain_update(b"\0cache_salt\0")
                .chain_update(cache_salt.as_bytes())
                .finalize()
                .into(),
        )
    }
}

/// The keys a caller may present; empty means the service is open.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Arc<Vec<Vec<u8>>>,
}

impl ApiKeys {
    /// Accepts any of `keys` (none = no authentication).
    pub fn new(keys: &[String]) -> Self {
        Self {
            keys: Arc::new(keys.iter().map(|k| k.as_bytes().to_vec()).collect()),
        }
    }

    /// Lets every call through (health and reflection when they stay open).
    pub fn open() -> Self {
        Self::default()
    }

    fn accepts(&self, presented: &[u8]) -> bool {
        // Every key is compared, so timing tells nothing about which matched.
        self.keys
            .iter()
            .fold(subtle::Choice::from(0), |found, key| {
                found | key.as_slice().ct_eq(presented)
            })
            .into()
    }
}

impl ApiKeys {
    /// Checks an `authorization` value (gRPC metadata or an HTTP header):
    /// the caller it identifies, or why it is refused.
    pub fn caller(&self, authorization: Option<&str>) -> Result<Caller, &'static str> {
        if self.keys.is_empty() {
            return Ok(Caller::anonymous());
        }
        let presented = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or("authorization: expected \"Bearer <api key>\"")?;
        if self.accepts(presented.as_bytes()) {
            Ok(Caller::of_key(presented.as_bytes()))
        } else {
            Err("authorization: unknown API key")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_and_salt_is_a_partition_of_its_own() {
        let keys = ApiKeys::new(&["alpha".into(), "beta-key".into()]);
        let a = keys.caller(Some("Bearer alpha")).unwrap();
        let b = keys.caller(Some("Bearer beta-key")).unwrap();
        assert_ne!(a.partition(""), b.partition(""));
        assert_eq!(
            a.partition(""),
            keys.caller(Some("Bearer alpha")).unwrap().partition("")
        );
        assert_ne!(a.partition(""), a.partition("tenant-1"));
        assert_ne!(a.partition("tenant-1"), a.partition("tenant-2"));
        assert_ne!(a.partition("tenant-1"), b.partition("tenant-1"));
    }
}
