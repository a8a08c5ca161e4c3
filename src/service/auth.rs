//! API keys: `authorization: Bearer <key>` metadata, compared in constant time.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

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
    /// why it is refused, if it is.
    pub fn check(&self, authorization: Option<&str>) -> Result<(), &'static str> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let presented = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or("authorization: expected \"Bearer <api key>\"")?;
        if self.accepts(presented.as_bytes()) {
            Ok(())
        } else {
            Err("authorization: unknown API key")
        }
    }
}

impl Interceptor for ApiKeys {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get("authorization");
        self.check(header.and_then(|v| v.to_str().ok()))
            .map_err(Status::unauthenticated)?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(keys: &ApiKeys, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        keys.clone().call(request).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn bearer_keys_are_checked() {
        let keys = ApiKeys::new(&["alpha".into(), "beta-key".into()]);
        assert_eq!(call(&keys, Some("Bearer beta-key")), Ok(()));
        assert_eq!(call(&keys, Some("Bearer alpha")), Ok(()));
        assert_eq!(
            call(&keys, Some("Bearer alph")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call(&keys, Some("alpha")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(call(&keys, None), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&ApiKeys::open(), None), Ok(()));
    }
}
