//! The edge of every Tally gRPC server (a coordinator's public port and a
//! shard node's): what a connection and a call meet before any service
//! sees them, so that each server's resources are bounded and every bad
//! input gets the right gRPC code, the same way on both.
//!
//! # Bounds
//!
//! [`server_builder`] sets the HTTP/2 limits of every server, and
//! `crate::tls::incoming` caps the connections a server holds (a TLS
//! handshake in progress included) and closes one whose peer sends nothing;
//! the constants below are the defaults, each with why it is what it is.
//!
//! What a peer can make a server hold: each stream (call) holds at most
//! one request message while it is read and one answer while it is
//! written, whether or not the peer reads it. So one connection holds at
//! most about [`MAX_CONCURRENT_STREAMS_PER_CONNECTION`] x the largest
//! message, a server [`MAX_CONNECTIONS_PER_SERVER`] times that, each for at
//! most [`MAX_CONNECTION_AGE`] + [`MAX_CONNECTION_AGE_GRACE`]. For a
//! coordinator the largest answer is a full `GetBatch` (10,000 names of
//! 256 bytes: 2.6 MB encoded), so a connection whose peer opens every
//! stream it may and never reads holds about 100 x 2.6 MB = 260 MB
//! (measured in tests/edge.rs). A request is bounded by the message limit
//! instead, so a peer that sends 100 requests of nearly 16 MiB and stalls
//! each before its end makes one connection hold up to 1.6 GiB. Before
//! these limits one connection could hold any amount (no stream limit): a
//! few connections that never read took a coordinator to 1.13 GiB. The
//! product over every connection is large: the connection cap bounds a
//! server's file descriptors and what a runaway client can take, but a
//! coordinator open to untrusted clients still wants a proxy that limits
//! each client in front of it.
//!
//! # Calls
//!
//! [`Edge`] wraps a server's service. Before the service sees a call it:
//!
//! - answers a malformed `grpc-timeout` `INVALID_ARGUMENT`, and a zero one
//!   `DEADLINE_EXCEEDED`, at once (tonic ignores a malformed one, and
//!   answers a zero one `CANCELLED`, possibly after the handler started);
//! - answers `DEADLINE_EXCEEDED` when the call's timeout passes. tonic's
//!   own timeout layer answers `CANCELLED` then, but it sits outside this
//!   one and polls it first, and this one's timer is set first, so this
//!   answer wins (see [`EdgeFuture`]);
//! - reads the 5-byte gRPC length prefix of every request message as it
//!   arrives, and answers a message over the server's limit
//!   `RESOURCE_EXHAUSTED` without reading the rest. tonic's own limit,
//!   which answers `OUT_OF_RANGE` (a code the public contract keeps for
//!   counter overflow), stays on every service at the same value, as a
//!   backstop that never fires while this check runs;
//! - gives an `UNIMPLEMENTED` answer the server's message.
//!
//! A request that does not decode is `INVALID_ARGUMENT` by the generated
//! servers' codec (`tally_proto::codec`).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Bytes;
use tonic::Status;

/// Largest request or answer message on a coordinator's public port, in
/// bytes (the public contract's limit, docs/API.md). The largest valid
/// request, a full `IncrementBatch` (10,000 items with 256-byte names and
/// 128-byte keys), is 4.03 MB, and the largest answer, a full `GetBatch`,
/// 2.6 MB: the limit leaves room for fields added later without letting
/// one call buffer much more than a valid one could need.
pub const MAX_PUBLIC_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Largest request or answer message on a shard node's port, in bytes.
/// The largest are full copies of a node (Changes, Replicate, CopyOf,
/// Restore): one message with every entry and idempotency record, about
/// 40 bytes per entry and 50 per record with short names, so a node at the
/// default 1,000,000 keys needs about 100 MiB. Only coordinators call a
/// shard node. Paging the copies is the lasting fix.
pub const MAX_INTERNAL_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Streams (calls in flight) one HTTP/2 connection may have open at once,
/// advertised as `SETTINGS_MAX_CONCURRENT_STREAMS`: a client's further
/// calls wait for a free stream (HTTP/2 clients queue them), and a stream
/// opened beyond it is refused (`REFUSED_STREAM`, safe to retry: nothing
/// of it was processed). 100 is the least RFC 9113 recommends, so that a
/// client does not need more connections for parallelism, and what many
/// gRPC servers and proxies use. A coordinator's calls to one shard node
/// use a few streams each: `max_in_flight_batches_per_shard` (4 by
/// default) for Apply and as many for Read, plus probes, copies and
/// deletes. This limit is what bounds the memory of one connection (see
/// the module docs); without it tonic sets none.
pub const MAX_CONCURRENT_STREAMS_PER_CONNECTION: u32 = 100;

/// Connections a server holds at once. Beyond it the server stops
/// accepting: a new connection waits in the listen queue until one
/// closes (as Go's `netutil.LimitListener`), so a flood of connections
/// costs the server nothing more and the ones it serves keep being served.
/// A shard node has one connection per coordinator; a coordinator one or a
/// few per client process. 512 keeps a server under the common default of
/// 1,024 open files (a process that hits it fails every accept and every
/// file it opens), with room for its log, its own client connections and
/// metrics scrapes.
pub const MAX_CONNECTIONS_PER_SERVER: usize = 512;

/// How long a connection may go without a frame from its peer before the
/// server pings it, so that a peer that vanished (a crashed host, a cut
/// network: no FIN, no RST) is found and its connection, with what its
/// calls hold, dropped. Pings are 17 bytes each way; every 30 s they cost
/// nothing and find a dead peer well within a minute.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// How long the server waits for a ping's answer before it closes the
/// connection. A live peer answers within a round trip, even one that
/// never reads its calls' answers (HTTP/2 stacks answer pings on their
/// own): 10 s is generous for any network a cluster runs on.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may live: after it, the server asks the client
/// to move to a new connection (GOAWAY, which the calls in flight finish
/// under, and clients reconnect for the next call without failing it;
/// tested at a connection every 20 ms with tonic's client). It bounds how
/// long a peer can hold what its calls hold (a peer that never reads
/// answers answers its pings), and lets clients spread over coordinators
/// added behind a load balancer. A reconnect every 15 minutes costs
/// nothing measurable.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(15 * 60);

/// How long a connection past [`MAX_CONNECTION_AGE`] has for its calls in
/// flight to finish before it is closed with whatever it still holds. The
/// longest calls are a shard's full copies and a drain, whose callers give
/// it tens of seconds; a health `Watch` stream is cut at this point, and
/// its client watches again.
pub const MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(60);

/// Largest header list of a call the server takes, in bytes (RFC 9113
/// counting: each header's name and value and 32), advertised as
/// `SETTINGS_MAX_HEADER_LIST_SIZE`; a call over it is refused (HTTP 431
/// and `REFUSED_STREAM`). 8 KiB is gRPC's default limit on metadata
/// (grpc-core, grpc-java), so a client that any gRPC server accepts works
/// here; Tally's calls send a few hundred bytes (the gRPC headers, a
/// `traceparent`). hyper's default would be 16 KiB per stream, held for
/// every stream of every connection.
pub const MAX_HEADER_LIST_BYTES: u32 = 8 * 1024;

/// Streams a peer may make the server reset for protocol errors before the
/// server closes its connection: hyper's default, which tonic turns off
/// unless set (RUSTSEC-2024-0003: without it a peer can keep a server busy
/// resetting streams).
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// The server builder of every Tally server, with the limits above (see
/// the module docs). The message size limit is per server, in [`Edge`].
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .max_connection_age(MAX_CONNECTION_AGE)
        .max_connection_age_grace(MAX_CONNECTION_AGE_GRACE)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
}

/// The header that carries a call's timeout.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Parses a `grpc-timeout` value as gRPC defines it: 1 to 8 ASCII digits
/// and a unit, `H` (hours), `M` (minutes), `S`, `m`, `u` or `n` (seconds,
/// milli-, micro-, nanoseconds). `None` if it is not one.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// What the edge makes of a call's `grpc-timeout` header.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CallTimeout {
    /// No header: the call waits as long as it takes.
    None,
    /// The call must be answered within this (not zero).
    Within(Duration),
    /// A zero timeout: the deadline had passed when the call arrived.
    Expired,
    /// Not a timeout; the value, for the answer.
    Malformed(String),
}

fn call_timeout(headers: &http::HeaderMap) -> CallTimeout {
    let Some(value) = headers.get(GRPC_TIMEOUT) else {
        return CallTimeout::None;
    };
    match value.to_str().ok().and_then(parse_grpc_timeout) {
        Some(Duration::ZERO) => CallTimeout::Expired,
        Some(timeout) => CallTimeout::Within(timeout),
        None => CallTimeout::Malformed(format!("{value:?}")),
    }
}

/// A server's service behind the edge (see the module docs): its calls'
/// timeouts checked and enforced with the right codes, their request
/// messages held to `max_message_bytes`, and its `UNIMPLEMENTED` answers
/// explained by `unimplemented`.
#[derive(Debug, Clone)]
pub struct Edge<S> {
    inner: S,
    unimplemented: &'static str,
    max_message_bytes: usize,
}

impl<S> Edge<S> {
    /// `inner` behind the edge: `unimplemented` is the message of its
    /// `UNIMPLEMENTED` answers that have none (printable ASCII without
    /// `%`), `max_message_bytes` the largest request message it takes.
    pub fn new(inner: S, unimplemented: &'static str, max_message_bytes: usize) -> Self {
        Edge {
            inner,
            unimplemented,
            max_message_bytes,
        }
    }
}

impl<S> tonic::codegen::Service<http::Request<Body>> for Edge<S>
where
    S: tonic::codegen::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let timeout = match call_timeout(request.headers()) {
            CallTimeout::Malformed(value) => {
                return EdgeFuture::answered(Status::invalid_argument(format!(
                    "grpc-timeout {value} is not a timeout: 1 to 8 digits and a unit (H, M, S, \
                     m, u or n); nothing was done"
                )));
            }
            CallTimeout::Expired => {
                return EdgeFuture::answered(Status::deadline_exceeded(
                    "the call's timeout was zero: its deadline had passed when it arrived; \
                     nothing was done",
                ));
            }
            CallTimeout::Within(timeout) => Some(timeout),
            CallTimeout::None => None,
        };
        let max_message_bytes = self.max_message_bytes;
        let request = request.map(|body| Body::new(MessageSizeCheck::new(body, max_message_bytes)));
        // Set before tonic's timeout layer sets its own, which it does
        // after this returns: this deadline is never the later one.
        EdgeFuture {
            state: Answer::Service {
                inner: self.inner.call(request),
                deadline: timeout.map(tokio::time::sleep),
                unimplemented: self.unimplemented,
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer of an [`Edge`]: the edge's own, or the service's.
    ///
    /// The service's is polled first, so an answer that is ready wins; then
    /// the call's deadline. tonic's timeout layer polls this future before
    /// its own timer, and this timer was set first: when both have fired,
    /// this answers `DEADLINE_EXCEEDED` before tonic could answer
    /// `CANCELLED`.
    #[derive(Debug)]
    pub struct EdgeFuture<F> {
        #[pin]
        state: Answer<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = AnswerProjection]
    #[derive(Debug)]
    enum Answer<F> {
        // The edge answered the call itself (until the answer is given).
        Edge {
            status: Option<Status>,
        },
        // The service is answering, under the call's deadline, if any.
        Service {
            #[pin]
            inner: F,
            #[pin]
            deadline: Option<tokio::time::Sleep>,
            unimplemented: &'static str,
        },
    }
}

impl<F> EdgeFuture<F> {
    fn answered(status: Status) -> Self {
        EdgeFuture {
            state: Answer::Edge {
                status: Some(status),
            },
        }
    }
}

impl<F, E> Future for EdgeFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            AnswerProjection::Edge { status } => Poll::Ready(Ok(status
                .take()
                .expect("an edge answer is polled once it is ready")
                .into_http())),
            AnswerProjection::Service {
                inner,
                deadline,
                unimplemented,
            } => {
                if let Poll::Ready(answer) = inner.poll(cx) {
                    return Poll::Ready(answer.map(|response| explain(response, unimplemented)));
                }
                match deadline.as_pin_mut() {
                    Some(deadline) => {
                        ready!(deadline.poll(cx));
                        // Dropping the service's future ends the handler,
                        // as tonic's timeout would.
                        Poll::Ready(Ok(Status::deadline_exceeded(
                            "the call's deadline (grpc-timeout) passed before it was answered",
                        )
                        .into_http()))
                    }
                    None => Poll::Pending,
                }
            }
        }
    }
}

/// Gives an `UNIMPLEMENTED` answer without a message `message`. tonic
/// answers a method no service has, or an unknown method of a known
/// service, with an empty message, which tells a client nothing. It
/// answers with its status in the headers (a trailers-only response), so
/// only the headers need a look; every other answer is left alone.
fn explain(mut response: http::Response<Body>, message: &'static str) -> http::Response<Body> {
    let headers = response.headers_mut();
    let unimplemented = headers
        .get(Status::GRPC_STATUS)
        .is_some_and(|code| code.as_bytes() == b"12");
    if unimplemented
        && headers
            .get(Status::GRPC_MESSAGE)
            .is_none_or(|text| text.is_empty())
    {
        headers.insert(
            Status::GRPC_MESSAGE,
            http::HeaderValue::from_static(message),
        );
    }
    response
}

pin_project_lite::pin_project! {
    /// A request body, passed through unchanged, whose gRPC messages are
    /// checked against a size limit as their length prefixes arrive: a
    /// message over it ends the body with `RESOURCE_EXHAUSTED`, which
    /// tonic answers the call with, and nothing after its prefix is read.
    #[derive(Debug)]
    pub struct MessageSizeCheck<B> {
        #[pin]
        inner: B,
        limit: usize,
        framing: Framing,
    }
}

impl<B> MessageSizeCheck<B> {
    /// `inner`, whose messages may be at most `limit` bytes.
    pub fn new(inner: B, limit: usize) -> Self {
        MessageSizeCheck {
            inner,
            limit,
            framing: Framing::default(),
        }
    }
}

impl<B> tonic::codegen::Body for MessageSizeCheck<B>
where
    B: tonic::codegen::Body<Data = Bytes, Error = Status>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.project();
        if this.framing.refused {
            return Poll::Ready(None);
        }
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(data) = frame
            .as_ref()
            .and_then(|frame| frame.as_ref().ok())
            .and_then(http_body::Frame::data_ref)
        {
            if let Err(length) = this.framing.advance(data, *this.limit) {
                this.framing.refused = true;
                return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                    "a request message of {length} bytes is over this server's limit of {} \
                     bytes; nothing was done",
                    this.limit
                )))));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.framing.refused || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Where a request body is in its gRPC framing: each message is a
/// compression flag, a 4-byte big-endian length, and that many bytes.
#[derive(Debug, Default)]
struct Framing {
    /// The prefix of the next message, as far as it has arrived.
    prefix: [u8; 5],
    prefix_bytes: usize,
    /// Bytes of the current message still to pass.
    message_bytes_left: u64,
    /// A message was over the limit: the body has ended.
    refused: bool,
}

impl Framing {
    /// Takes the next `data` of the body; the length of a message over
    /// `limit` if its prefix ends in `data`.
    fn advance(&mut self, mut data: &[u8], limit: usize) -> Result<(), u64> {
        while !data.is_empty() {
            if self.message_bytes_left > 0 {
                let passing = data
                    .len()
                    .min(usize::try_from(self.message_bytes_left).unwrap_or(usize::MAX));
                self.message_bytes_left -= passing as u64;
                data = &data[passing..];
                continue;
            }
            let taken = data.len().min(self.prefix.len() - self.prefix_bytes);
            self.prefix[self.prefix_bytes..self.prefix_bytes + taken]
                .copy_from_slice(&data[..taken]);
            self.prefix_bytes += taken;
            data = &data[taken..];
            if self.prefix_bytes == self.prefix.len() {
                self.prefix_bytes = 0;
                let length = u64::from(u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]));
                if length > limit as u64 {
                    return Err(length);
                }
                self.message_bytes_left = length;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tonic::codegen::Service;
    use tonic::Code;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        assert_eq!(parse_grpc_timeout("0m"), Some(Duration::ZERO));
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "m",
            "10",
            "10x",
            "-1S",
            "123456789S",
            "1.5S",
            "abc",
            " 1S",
            "1s",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    /// A service that counts its calls and answers with `answer`, or never.
    #[derive(Clone)]
    struct Mock {
        calls: Arc<AtomicUsize>,
        answer: Option<fn() -> http::Response<Body>>,
    }

    impl Mock {
        fn answering(answer: fn() -> http::Response<Body>) -> Self {
            Mock {
                calls: Arc::default(),
                answer: Some(answer),
            }
        }

        fn never_answering() -> Self {
            Mock {
                calls: Arc::default(),
                answer: None,
            }
        }
    }

    type MockFuture =
        Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    impl Service<http::Request<Body>> for Mock {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = MockFuture;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> MockFuture {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match self.answer {
                Some(answer) => Box::pin(std::future::ready(Ok(answer()))),
                None => Box::pin(std::future::pending()),
            }
        }
    }

    fn ok_answer() -> http::Response<Body> {
        Status::ok("").into_http()
    }

    fn request(timeout: Option<&[u8]>) -> http::Request<Body> {
        let mut request = http::Request::new(Body::empty());
        if let Some(timeout) = timeout {
            request.headers_mut().insert(
                GRPC_TIMEOUT,
                http::HeaderValue::from_bytes(timeout).unwrap(),
            );
        }
        request
    }

    fn status_of(response: &http::Response<Body>) -> Status {
        Status::from_header_map(response.headers()).expect("a trailers-only answer")
    }

    const MESSAGE: &str = "this server serves nothing of the kind";

    #[tokio::test]
    async fn a_malformed_timeout_is_invalid_argument_and_reaches_no_service() {
        let service = Mock::answering(ok_answer);
        let mut edge = Edge::new(service.clone(), MESSAGE, 1024);
        for bad in [
            &b"abc"[..],
            b"1",
            b"123456789S",
            b"1.5S",
            b"-1S",
            b"5x",
            b"1\xff",
        ] {
            let response = edge.call(request(Some(bad))).await.unwrap();
            let status = status_of(&response);
            assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
            assert!(status.message().contains("grpc-timeout"), "{status:?}");
        }
        assert_eq!(service.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_zero_timeout_is_deadline_exceeded_at_once_and_reaches_no_service() {
        let service = Mock::answering(ok_answer);
        let mut edge = Edge::new(service.clone(), MESSAGE, 1024);
        for zero in [&b"0m"[..], b"0n", b"00000000S"] {
            let response = edge.call(request(Some(zero))).await.unwrap();
            assert_eq!(
                status_of(&response).code(),
                Code::DeadlineExceeded,
                "{zero:?}"
            );
        }
        assert_eq!(service.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_that_passes_is_deadline_exceeded() {
        let mut edge = Edge::new(Mock::never_answering(), MESSAGE, 1024);
        let started = tokio::time::Instant::now();
        let response = edge.call(request(Some(b"250m"))).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        assert_eq!(status_of(&response).code(), Code::DeadlineExceeded);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_time_is_the_services() {
        let service = Mock::answering(ok_answer);
        let mut edge = Edge::new(service.clone(), MESSAGE, 1024);
        for timeout in [None, Some(&b"1n"[..]), Some(b"5S")] {
            let response = edge.call(request(timeout)).await.unwrap();
            assert_eq!(status_of(&response).code(), Code::Ok, "{timeout:?}");
        }
        assert_eq!(service.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_unimplemented_answer_without_a_message_gets_the_servers() {
        let mut edge = Edge::new(
            Mock::answering(|| Status::unimplemented("").into_http()),
            MESSAGE,
            1024,
        );
        let response = edge.call(request(None)).await.unwrap();
        let status = status_of(&response);
        assert_eq!(status.code(), Code::Unimplemented);
        assert_eq!(status.message(), MESSAGE);
        // A message of the service's own stays.
        let mut edge = Edge::new(
            Mock::answering(|| Status::unimplemented("compression").into_http()),
            MESSAGE,
            1024,
        );
        let response = edge.call(request(None)).await.unwrap();
        assert_eq!(status_of(&response).message(), "compression");
    }

    /// A request body of `chunks`, as the connection delivers them.
    struct Chunks(VecDeque<Bytes>);

    impl tonic::codegen::Body for Chunks {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|chunk| Ok(http_body::Frame::data(chunk))),
            )
        }
    }

    /// A gRPC message of `length` bytes, prefix included.
    fn message(length: u32) -> Vec<u8> {
        let mut message = vec![0];
        message.extend_from_slice(&length.to_be_bytes());
        message.resize(5 + length as usize, b'x');
        message
    }

    /// Reads `chunks` through the size check with `limit`: the chunks
    /// passed, and the error that ended the body, if one did.
    async fn read_checked(chunks: Vec<Vec<u8>>, limit: usize) -> (Vec<u8>, Option<Status>) {
        use http_body::Body as _;
        let body =
            MessageSizeCheck::new(Chunks(chunks.into_iter().map(Bytes::from).collect()), limit);
        let mut body = std::pin::pin!(body);
        let mut passed = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            match frame {
                Ok(frame) => passed.extend_from_slice(frame.data_ref().unwrap()),
                Err(status) => return (passed, Some(status)),
            }
        }
        (passed, None)
    }

    #[tokio::test]
    async fn messages_up_to_the_limit_pass_unchanged_however_they_are_cut() {
        let mut stream = message(10);
        stream.extend(message(0));
        stream.extend(message(7));
        // Cut at every offset, and byte by byte: prefixes split across
        // chunks.
        for cut in 0..=stream.len() {
            let chunks = vec![stream[..cut].to_vec(), stream[cut..].to_vec()];
            let (passed, error) = read_checked(chunks, 10).await;
            assert_eq!(passed, stream, "cut at {cut}");
            assert!(error.is_none(), "cut at {cut}: {error:?}");
        }
        let bytes = stream.iter().map(|&byte| vec![byte]).collect();
        let (passed, error) = read_checked(bytes, 10).await;
        assert_eq!(passed, stream);
        assert!(error.is_none(), "{error:?}");
    }

    #[tokio::test]
    async fn a_message_over_the_limit_ends_the_body_at_its_prefix() {
        let mut stream = message(10);
        stream.extend(message(11));
        // The second message's prefix arrives split, its body never.
        let chunks = vec![
            stream[..17].to_vec(),
            stream[17..20].to_vec(),
            stream[20..].to_vec(),
        ];
        let (passed, error) = read_checked(chunks, 10).await;
        assert_eq!(passed, stream[..17]);
        let status = error.expect("refused");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("11 bytes"), "{status:?}");
        assert!(status.message().contains("limit of 10 bytes"), "{status:?}");
        // The largest length a prefix can hold.
        let (_, error) = read_checked(vec![vec![0, 0xff, 0xff, 0xff, 0xff]], 10).await;
        assert_eq!(error.unwrap().code(), Code::ResourceExhausted);
    }
}
