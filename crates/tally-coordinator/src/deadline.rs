//! The client's deadline, read from the `grpc-timeout` header.
//!
//! The server's edge (`tally_runtime::edge`) refuses a malformed or zero
//! timeout, and answers `DEADLINE_EXCEEDED` when the timeout passes (tonic
//! would answer `CANCELLED`). Each handler also runs under its own
//! deadline, set a little earlier than the edge's, so that it reports what
//! it did by then (a read's complete parts, a status's unreachable nodes)
//! and gives its internal calls only what is left. The deadline counts from
//! the request's arrival, stamped by [`stamp_arrival`] before the body is
//! decoded (decoding a 10,000-item batch takes time), not from when the
//! handler starts.

use std::time::Duration;

use tokio::time::Instant;

/// How much earlier than the client's deadline a handler gives up, so that
/// its answer is sent before tonic's own timeout fires: a tenth of the
/// timeout, at most 50 ms.
fn margin(timeout: Duration) -> Duration {
    (timeout / 10).min(Duration::from_millis(50))
}

/// When a request reached the server, before its body was decoded.
#[derive(Debug, Clone, Copy)]
struct Arrival(Instant);

/// A tonic interceptor that records the request's arrival time; install it
/// on every public service. Only a request with a deadline needs it: the
/// others skip the clock read and the allocation of the stamp.
pub fn stamp_arrival(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    if request.metadata().contains_key(GRPC_TIMEOUT) {
        request.extensions_mut().insert(Arrival(Instant::now()));
    }
    Ok(request)
}

/// What [`stamp_arrival`] does, on a request before tonic has made it a
/// [`tonic::Request`] (the server's own dispatch, `crate::dispatch`).
pub(crate) fn stamp_http_arrival<B>(request: &mut tonic::codegen::http::Request<B>) {
    if request.headers().contains_key(GRPC_TIMEOUT) {
        request.extensions_mut().insert(Arrival(Instant::now()));
    }
}

/// The header that carries the client's timeout.
const GRPC_TIMEOUT: &str = tally_runtime::edge::GRPC_TIMEOUT;

/// When this request's handler must answer, if the client set a deadline.
pub fn request_deadline<T>(request: &tonic::Request<T>) -> Option<Instant> {
    let timeout = request
        .metadata()
        .get(GRPC_TIMEOUT)
        .and_then(|value| value.to_str().ok())
        .and_then(tally_runtime::edge::parse_grpc_timeout)?;
    let arrival = request
        .extensions()
        .get::<Arrival>()
        .map_or_else(Instant::now, |arrival| arrival.0);
    Some(arrival + timeout.saturating_sub(margin(timeout)))
}

/// The time an internal call may take: the shard timeout, cut short by the
/// client's deadline.
pub fn call_budget(shard_timeout: Duration, deadline: Option<Instant>) -> Duration {
    match deadline {
        Some(deadline) => shard_timeout.min(deadline.saturating_duration_since(Instant::now())),
        None => shard_timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_deadline_counts_from_the_arrival_stamp() {
        use tonic::codegen::http;
        let mut request = http::Request::builder()
            .header(GRPC_TIMEOUT, "1S")
            .body(())
            .unwrap();
        let arrived = Instant::now();
        stamp_http_arrival(&mut request);
        // Decoding a large body takes time; the handler starts later.
        tokio::time::advance(Duration::from_millis(300)).await;
        let deadline = request_deadline(&tonic::Request::from_http(request)).unwrap();
        assert_eq!(deadline, arrived + Duration::from_millis(950));
        // Internal calls get what is left, at most the shard timeout.
        assert_eq!(
            call_budget(Duration::from_secs(5), Some(deadline)),
            Duration::from_millis(650)
        );
        assert_eq!(
            call_budget(Duration::from_millis(100), Some(deadline)),
            Duration::from_millis(100)
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            call_budget(Duration::from_secs(5), Some(deadline)),
            Duration::ZERO
        );
        // Without a timeout there is nothing to stamp.
        let mut request = http::Request::new(());
        stamp_http_arrival(&mut request);
        assert!(request.extensions().get::<Arrival>().is_none());
    }

    #[test]
    fn the_handler_answers_before_tonic_times_out() {
        assert_eq!(margin(Duration::from_secs(10)), Duration::from_millis(50));
        assert_eq!(margin(Duration::from_millis(20)), Duration::from_millis(2));
    }
}
