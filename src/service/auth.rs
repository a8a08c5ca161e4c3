//! API keys on gRPC metadata: the interceptor that checks them (the keys
//! and the [`Caller`] they identify are the front's, `front/auth.rs`) and
//! puts the caller in the request's extensions.

use tonic::service::Interceptor;
use tonic::{Request, Status};

pub use crate::front::auth::{ApiKeys, Caller};

/// The caller a gRPC call was authenticated as (the interceptor puts it in
/// the request's extensions).
pub fn caller_of<T>(request: &Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .copied()
        // Only calls past the interceptor reach a handler; an open service
        // has the one anonymous caller.
        .unwrap_or_else(Caller::anonymous)
}

impl Interceptor for ApiKeys {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get("authorization");
        let caller = self
            .caller(header.and_then(|v| v.to_str().ok()))
            .map_err(Status::unauthenticated)?;
        request.extensions_mut().insert(caller);
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
