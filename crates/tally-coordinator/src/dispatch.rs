//! The public server's first stop: `tally.v1.Counter` calls go straight to
//! their service; everything else (Admin, health checking, reflection) to
//! tonic's router.
//!
//! tonic's router is an axum router: per call it matches the path against
//! every service's route, records the matched path parameters (a few
//! allocations), and wraps the service in two more layers of futures, which
//! the coordinator polls twice per call (before and after the shard's
//! answer). A profile of unary Increment load put ~1 µs of CPU per call
//! there, and 10 of the 43 allocations per call. The Counter service is matched here by its path prefix instead,
//! and stamped with its arrival time directly (what the interceptor does on
//! the router's path, see [`crate::deadline`]).

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::future::Either;
use tally_proto::pb::counter_server::CounterServer;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::service::Routes;

use crate::service::CounterService;

/// Dispatches a public call (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Dispatch {
    counter: CounterServer<CounterService>,
    routes: Routes,
}

impl Dispatch {
    /// `counter` for `tally.v1.Counter` calls, `routes` for every other.
    pub(crate) fn new(counter: CounterServer<CounterService>, routes: Routes) -> Self {
        Dispatch { counter, routes }
    }
}

/// Whether `path` names a method of `tally.v1.Counter`.
fn is_counter_call(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|path| path.strip_prefix(CounterServer::<CounterService>::NAME))
        .is_some_and(|method| method.starts_with('/'))
}

type CounterFuture = <CounterServer<CounterService> as Service<http::Request<Body>>>::Future;
type RoutesFuture = <Routes as Service<http::Request<Body>>>::Future;

impl Service<http::Request<Body>> for Dispatch {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<CounterFuture, RoutesFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The Counter service is always ready; the router says for itself.
        Service::<http::Request<Body>>::poll_ready(&mut self.routes, cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if is_counter_call(request.uri().path()) {
            crate::deadline::stamp_http_arrival(&mut request);
            Either::Left(self.counter.call(request))
        } else {
            Either::Right(self.routes.call(request))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_counter_methods_take_the_short_way() {
        assert!(is_counter_call("/tally.v1.Counter/Increment"));
        assert!(is_counter_call("/tally.v1.Counter/GetBatch"));
        assert!(is_counter_call("/tally.v1.Counter/NoSuchMethod"));
        assert!(!is_counter_call("/tally.v1.Admin/Ring"));
        assert!(!is_counter_call("/tally.v1.CounterX/Increment"));
        assert!(!is_counter_call("/grpc.health.v1.Health/Check"));
        assert!(!is_counter_call("tally.v1.Counter/Increment"));
    }
}
