//! Who may call what on the public port: bearer tokens with roles.
//!
//! With a tokens file (`tokens_file`), every call but health checking
//! carries `authorization: Bearer TOKEN`, and the token's role must include
//! the method's ([`needed_role`]): `read` for `Get` and `GetBatch` (and
//! reflection), `write` for `Increment` and `IncrementBatch`, `admin` for
//! everything else (`Delete`, the `Admin` service, unknown methods). A call
//! without a known token is answered `UNAUTHENTICATED`, one whose token
//! lacks the role `PERMISSION_DENIED`, both before the request is decoded:
//! nothing changes. Without a tokens file, anyone may call anything (the
//! development setup).
//!
//! The check runs first on the public server, before the dispatch to the
//! services (`crate::dispatch`), on the request's path: one place for
//! every service, and no decoding work for a caller who may not call.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures::future::{ready, Either, Ready};
use tally_runtime::tokens::{Role, Tokens};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Service;

/// The role a call of `path` (`/package.Service/Method`) needs; `None`: it
/// is open to anyone.
pub(crate) fn needed_role(path: &str) -> Option<Role> {
    const COUNTER: &str = "/tally.v1.Counter/";
    if path.starts_with("/grpc.health.v1.Health/") {
        return None;
    }
    if path.starts_with("/grpc.reflection.") {
        // The API's shape is no secret, but its callers are known.
        return Some(Role::Read);
    }
    match path.strip_prefix(COUNTER) {
        Some("Get" | "GetBatch") => Some(Role::Read),
        Some("Increment" | "IncrementBatch") => Some(Role::Write),
        _ => Some(Role::Admin),
    }
}

/// The tokens a coordinator checks calls against, reloadable.
pub(crate) type SharedTokens = Arc<ArcSwap<Tokens>>;

/// A service behind the token check (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Authorize<S> {
    inner: S,
    /// None: no tokens file, every call passes.
    tokens: Option<SharedTokens>,
}

impl<S> Authorize<S> {
    pub(crate) fn new(inner: S, tokens: Option<SharedTokens>) -> Self {
        Authorize { inner, tokens }
    }
}

/// Whether `request` may go on: `Err` is the answer to give instead.
fn check<B>(tokens: &Tokens, request: &http::Request<B>) -> Result<(), tonic::Status> {
    let path = request.uri().path();
    let Some(needed) = needed_role(path) else {
        return Ok(());
    };
    let header = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| {
            tonic::Status::unauthenticated(
                "no credentials: this server needs an `authorization: Bearer TOKEN` header",
            )
        })?;
    let token = tally_runtime::tokens::bearer(header.as_bytes()).ok_or_else(|| {
        tonic::Status::unauthenticated("the authorization header is not `Bearer TOKEN`")
    })?;
    let holder = tokens
        .holder(token)
        .ok_or_else(|| tonic::Status::unauthenticated("unknown token"))?;
    if holder.role.allows(needed) {
        Ok(())
    } else {
        let method = path
            .rsplit('/')
            .find(|part| !part.is_empty())
            .unwrap_or(path);
        Err(tonic::Status::permission_denied(format!(
            "token {:?} has role {}; {method} needs {needed}",
            holder.name, holder.role
        )))
    }
}

impl<S> Service<http::Request<Body>> for Authorize<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, Ready<Result<http::Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let refused = self
            .tokens
            .as_ref()
            .and_then(|tokens| check(&tokens.load(), &request).err());
        match refused {
            None => Either::Left(self.inner.call(request)),
            Some(status) => {
                tracing::debug!(path = request.uri().path(), code = ?status.code(), "call refused");
                Either::Right(ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_runtime::tokens::{file_entry, generate};

    #[test]
    fn every_public_method_needs_its_role() {
        for (path, role) in [
            ("/tally.v1.Counter/Get", Some(Role::Read)),
            ("/tally.v1.Counter/GetBatch", Some(Role::Read)),
            ("/tally.v1.Counter/Increment", Some(Role::Write)),
            ("/tally.v1.Counter/IncrementBatch", Some(Role::Write)),
            ("/tally.v1.Counter/Delete", Some(Role::Admin)),
            ("/tally.v1.Counter/NoSuchMethod", Some(Role::Admin)),
            ("/tally.v1.Admin/Drain", Some(Role::Admin)),
            ("/tally.v1.Admin/Ring", Some(Role::Admin)),
            ("/tally.v1.Shard/Apply", Some(Role::Admin)),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Some(Role::Read),
            ),
            ("/grpc.health.v1.Health/Check", None),
            ("/grpc.health.v1.Health/Watch", None),
        ] {
            assert_eq!(needed_role(path), role, "{path}");
        }
    }

    #[test]
    fn tokens_are_checked_against_the_role() {
        let (reader, reader_hash) = generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, file_entry("dash", Role::Read, &reader_hash)).unwrap();
        let tokens = Tokens::load(&path).unwrap();
        let call = |path: &str, authorization: Option<&str>| {
            let mut request = http::Request::builder().uri(path);
            if let Some(value) = authorization {
                request = request.header("authorization", value);
            }
            check(&tokens, &request.body(()).unwrap()).map_err(|status| status.code())
        };
        let bearer = format!("Bearer {reader}");
        assert_eq!(call("/tally.v1.Counter/Get", Some(&bearer)), Ok(()));
        assert_eq!(
            call("/tally.v1.Counter/Increment", Some(&bearer)),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            call("/tally.v1.Counter/Get", None),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call("/tally.v1.Counter/Get", Some("Bearer tally_0")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call("/tally.v1.Counter/Get", Some(&reader)),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(call("/grpc.health.v1.Health/Check", None), Ok(()));
    }
}
