//! The servers' edge (`tally_runtime::edge`), tested from the wire.
//!
//! Bad input a generated client cannot send (bytes that are not UTF-8 in a
//! string field, a message over the size limit, a zero, passed or malformed
//! `grpc-timeout`) goes over a raw HTTP/2 connection to a coordinator and
//! to a shard node: each gets its code, changes nothing, and both servers
//! go on serving. Then the bounds: streams beyond a connection's limit are
//! refused, a header list over the limit is refused, connections beyond a
//! server's cap wait, and a real coordinator process whose peers open every
//! stream they may and never read stays within the memory those limits
//! allow, while a normal client is served.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::cluster::{increment, start, value};
use tally::cli::local_cluster::LocalCluster;
use tally::proto::pb;
use tally::runtime::edge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codegen::{http, Bytes};
use tonic::{Code, Status};

/// Longest wait for one answer the test expects.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

// --- Hand-made gRPC messages ---------------------------------------------

/// `value` as a protobuf varint.
fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A protobuf length-delimited field `number` holding `bytes`, whatever
/// they are (a string field that is not UTF-8 too).
fn bytes_field(number: u64, bytes: &[u8]) -> Vec<u8> {
    let mut field = Vec::new();
    varint(number << 3 | 2, &mut field);
    varint(bytes.len() as u64, &mut field);
    field.extend_from_slice(bytes);
    field
}

/// An `IncrementRequest` with `counter` and `key` as raw bytes.
fn increment_request(counter: &[u8], delta: i64, key: &[u8]) -> Vec<u8> {
    let mut message = bytes_field(1, counter);
    // Field 2, `sint64 delta`: a zig-zag varint.
    varint(2 << 3, &mut message);
    varint(((delta << 1) ^ (delta >> 63)) as u64, &mut message);
    message.extend(bytes_field(3, key));
    message
}

/// A shard `ReadRequest` for node `node_id` of `counter` as raw bytes.
fn read_request(node_id: &str, counter: &[u8]) -> Vec<u8> {
    [bytes_field(1, node_id.as_bytes()), bytes_field(2, counter)].concat()
}

/// `message` as gRPC frames it: uncompressed, its 4-byte length, itself.
fn framed(message: &[u8]) -> Bytes {
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    Bytes::from(frame)
}

/// The start of a message of `length` bytes: its prefix and `sent` bytes of
/// it, the rest never sent.
fn message_start(length: usize, sent: usize) -> Bytes {
    let mut frame = vec![0];
    frame.extend_from_slice(&u32::try_from(length).unwrap().to_be_bytes());
    frame.resize(5 + sent, 0);
    Bytes::from(frame)
}

// --- One call over a raw HTTP/2 connection --------------------------------

/// The address in an `http://` endpoint.
fn address_of(endpoint: &str) -> SocketAddr {
    endpoint.trim_start_matches("http://").parse().unwrap()
}

/// A request to `path` at `address` with gRPC's headers and `headers`.
fn grpc_request(address: SocketAddr, path: &str, headers: &[(&str, &[u8])]) -> http::Request<()> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{address}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, http::HeaderValue::from_bytes(value).unwrap());
    }
    request.body(()).unwrap()
}

/// An HTTP/2 connection to `address`, driven on a task of its own (aborted
/// with the returned guard).
async fn connect_h2(
    address: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tally::runtime::process::AbortOnDrop<()>,
) {
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let (send_request, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (send_request, tally::runtime::process::AbortOnDrop(driver))
}

/// The status of a call to `path` at `address` with `headers` and `body`
/// (sent whole when `end_of_stream`; otherwise the request stays open, as
/// from a client that stopped sending): from the answer's headers when it
/// is trailers-only, else from its trailers.
async fn call(
    address: SocketAddr,
    path: &str,
    headers: &[(&str, &[u8])],
    body: Bytes,
    end_of_stream: bool,
) -> Status {
    let (send_request, _driver) = connect_h2(address).await;
    let mut send_request = send_request.ready().await.unwrap();
    let (response, mut request_body) = send_request
        .send_request(grpc_request(address, path, headers), false)
        .unwrap();
    request_body.send_data(body, end_of_stream).unwrap();
    let response = tokio::time::timeout(ANSWER_TIMEOUT, response)
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::OK, "{response:?}");
    if let Some(status) = Status::from_header_map(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        body.flow_control().release_capacity(data.len()).unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    Status::from_header_map(&trailers).expect("a grpc-status")
}

// --- The servers under test ------------------------------------------------

/// Where a test sends its calls: the in-process cluster's coordinator, and
/// its first shard node with that node's id.
struct Servers {
    coordinator: SocketAddr,
    shard: SocketAddr,
    shard_id: String,
}

fn servers(cluster: &LocalCluster) -> Servers {
    let shard = cluster.shard_configs().next().unwrap();
    Servers {
        coordinator: address_of(&cluster.endpoint()),
        shard: shard.listen,
        shard_id: shard.node_id.clone(),
    }
}

const INCREMENT: &str = "/tally.v1.Counter/Increment";
const SHARD_READ: &str = "/tally.v1.Shard/Read";

/// Checks that `counter` is still `expected` through the coordinator, and
/// that both servers serve normal calls: an increment applied and read
/// back, and a shard's Read.
async fn still_serving(cluster: &LocalCluster, counter: &str, expected: i64) {
    let mut client = cluster.counter_client().await.unwrap();
    assert_eq!(
        value(&mut client, counter).await,
        expected,
        "{counter} changed"
    );
    client.increment(increment(counter, 1, "")).await.unwrap();
    assert_eq!(value(&mut client, counter).await, expected + 1);
    let node_id = cluster.shard_configs().next().unwrap().node_id.clone();
    let mut shard = support::cluster::shard_client(cluster, 0).await;
    let read = shard
        .read(pb::ReadRequest {
            node_id,
            counters: vec![counter.to_string()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.counters.len(), 1);
}

fn expect(status: &Status, code: Code, needle: &str, what: &str) {
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert!(
        status.message().contains(needle),
        "{what}: {:?} does not say {needle:?}",
        status.message()
    );
}

// --- Bad input -------------------------------------------------------------

#[tokio::test]
async fn a_request_that_does_not_decode_is_invalid_argument_and_changes_nothing() {
    let test = start().await;
    let servers = servers(&test.cluster);
    let mut client = test.cluster.counter_client().await.unwrap();
    client.increment(increment("edge", 5, "")).await.unwrap();

    for (what, message, field) in [
        (
            "a counter name that is not UTF-8",
            increment_request(b"edge\xff", 1, b""),
            "IncrementRequest.counter",
        ),
        (
            "a key that is not UTF-8",
            increment_request(b"edge", 1, b"key-\xc3\x28"),
            "IncrementRequest.idempotency_key",
        ),
    ] {
        let status = call(servers.coordinator, INCREMENT, &[], framed(&message), true).await;
        expect(&status, Code::InvalidArgument, field, what);
        expect(&status, Code::InvalidArgument, "not UTF-8", what);
    }
    let status = call(
        servers.shard,
        SHARD_READ,
        &[],
        framed(&read_request(&servers.shard_id, b"edge\xfe")),
        true,
    )
    .await;
    expect(
        &status,
        Code::InvalidArgument,
        "ReadRequest.counters",
        "a shard's Read of a name that is not UTF-8",
    );

    still_serving(&test.cluster, "edge", 5).await;
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_message_over_the_limit_is_resource_exhausted_without_reading_the_rest() {
    let test = start().await;
    let servers = servers(&test.cluster);
    let mut client = test.cluster.counter_client().await.unwrap();
    client.increment(increment("edge", 5, "")).await.unwrap();

    // One byte over each server's limit; only its prefix and 64 KiB are
    // sent, and the request stays open: the answer cannot wait for the rest.
    for (server, path, limit) in [
        (
            servers.coordinator,
            INCREMENT,
            edge::MAX_PUBLIC_MESSAGE_BYTES,
        ),
        (servers.shard, SHARD_READ, edge::MAX_INTERNAL_MESSAGE_BYTES),
    ] {
        let status = call(
            server,
            path,
            &[],
            message_start(limit + 1, 64 * 1024),
            false,
        )
        .await;
        expect(
            &status,
            Code::ResourceExhausted,
            &format!("{} bytes", limit + 1),
            path,
        );
        expect(
            &status,
            Code::ResourceExhausted,
            &format!("limit of {limit} bytes"),
            path,
        );
    }

    still_serving(&test.cluster, "edge", 5).await;
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_zero_timeout_is_deadline_exceeded_and_nothing_is_done() {
    let test = start().await;
    let servers = servers(&test.cluster);
    let mut client = test.cluster.counter_client().await.unwrap();
    client.increment(increment("edge", 5, "")).await.unwrap();

    // A valid increment, whose deadline had passed when it arrived.
    let status = call(
        servers.coordinator,
        INCREMENT,
        &[("grpc-timeout", b"0m")],
        framed(&increment_request(b"edge", 1, b"")),
        true,
    )
    .await;
    expect(
        &status,
        Code::DeadlineExceeded,
        "zero",
        "an Increment with grpc-timeout 0m",
    );
    let status = call(
        servers.shard,
        SHARD_READ,
        &[("grpc-timeout", b"0n")],
        framed(&read_request(&servers.shard_id, b"edge")),
        true,
    )
    .await;
    expect(
        &status,
        Code::DeadlineExceeded,
        "zero",
        "a shard's Read with grpc-timeout 0n",
    );

    // The increment was not applied.
    still_serving(&test.cluster, "edge", 5).await;
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_malformed_timeout_is_invalid_argument_and_nothing_is_done() {
    let test = start().await;
    let servers = servers(&test.cluster);
    let mut client = test.cluster.counter_client().await.unwrap();
    client.increment(increment("edge", 5, "")).await.unwrap();

    for timeout in [&b"abc"[..], b"10", b"123456789S", b"1.5S"] {
        let status = call(
            servers.coordinator,
            INCREMENT,
            &[("grpc-timeout", timeout)],
            framed(&increment_request(b"edge", 1, b"")),
            true,
        )
        .await;
        expect(
            &status,
            Code::InvalidArgument,
            "grpc-timeout",
            &format!("{timeout:?}"),
        );
    }
    let status = call(
        servers.shard,
        SHARD_READ,
        &[("grpc-timeout", b"abc")],
        framed(&read_request(&servers.shard_id, b"edge")),
        true,
    )
    .await;
    expect(
        &status,
        Code::InvalidArgument,
        "grpc-timeout",
        "a shard's Read",
    );

    // None of the increments was applied.
    still_serving(&test.cluster, "edge", 5).await;
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_timeout_that_passes_is_deadline_exceeded_not_cancelled() {
    let test = start().await;
    let servers = servers(&test.cluster);
    let mut client = test.cluster.counter_client().await.unwrap();
    client.increment(increment("edge", 5, "")).await.unwrap();

    // The headers of a call with a 200 ms timeout, and no body ever: the
    // call waits for its message until its deadline. tonic's own timeout
    // would answer CANCELLED.
    for (server, path) in [
        (servers.coordinator, INCREMENT),
        (servers.shard, SHARD_READ),
    ] {
        let began = Instant::now();
        let status = call(
            server,
            path,
            &[("grpc-timeout", b"200m")],
            Bytes::new(),
            false,
        )
        .await;
        expect(&status, Code::DeadlineExceeded, "deadline", path);
        assert!(
            began.elapsed() >= Duration::from_millis(200),
            "{path}: answered early"
        );
    }

    still_serving(&test.cluster, "edge", 5).await;
    test.cluster.shutdown().await.unwrap();
}

// --- Raw frames: streams and headers beyond the limits ----------------------

/// An HTTP/2 connection of hand-written frames, to break the rules a client
/// library keeps (opening streams beyond the peer's limit).
struct RawConnection {
    tcp: tokio::net::TcpStream,
    authority: String,
}

const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const REFUSED_STREAM: u32 = 0x7;

impl RawConnection {
    async fn open(address: SocketAddr) -> RawConnection {
        let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut connection = RawConnection {
            tcp,
            authority: address.to_string(),
        };
        connection.write_frame(FRAME_SETTINGS, 0, 0, &[]).await;
        connection
    }

    async fn write_frame(&mut self, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream_id.to_be_bytes());
        frame.extend_from_slice(payload);
        self.tcp.write_all(&frame).await.unwrap();
    }

    /// The next frame: its type, flags, stream and payload. Acknowledges
    /// the server's settings on the way.
    async fn read_frame(&mut self) -> (u8, u8, u32, Vec<u8>) {
        loop {
            let mut header = [0; 9];
            self.tcp.read_exact(&mut header).await.unwrap();
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let (kind, flags) = (header[3], header[4]);
            let stream_id = u32::from_be_bytes(header[5..9].try_into().unwrap()) & 0x7fff_ffff;
            let mut payload = vec![0; length];
            self.tcp.read_exact(&mut payload).await.unwrap();
            if kind == FRAME_SETTINGS && flags & FLAG_ACK == 0 {
                self.write_frame(FRAME_SETTINGS, FLAG_ACK, 0, &[]).await;
                continue;
            }
            return (kind, flags, stream_id, payload);
        }
    }

    /// Opens stream `stream_id` with the headers of a gRPC call to `path`,
    /// and leaves it open (no body): its handler waits for the message.
    async fn open_stream(&mut self, stream_id: u32, path: &str) {
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", &self.authority.clone()),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            hpack_literal(name, value, &mut block);
        }
        self.write_frame(FRAME_HEADERS, FLAG_END_HEADERS, stream_id, &block)
            .await;
    }
}

/// An HPACK integer with an `prefix_bits`-bit prefix, first byte's other
/// bits `flags`.
fn hpack_integer(value: usize, prefix_bits: u32, flags: u8, out: &mut Vec<u8>) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max_prefix as u8);
    let mut rest = value - max_prefix;
    while rest >= 0x80 {
        out.push((rest as u8 & 0x7f) | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// An HPACK literal header field without indexing, new name, no Huffman.
fn hpack_literal(name: &str, value: &str, out: &mut Vec<u8>) {
    out.push(0x00);
    hpack_integer(name.len(), 7, 0, out);
    out.extend_from_slice(name.as_bytes());
    hpack_integer(value.len(), 7, 0, out);
    out.extend_from_slice(value.as_bytes());
}

#[tokio::test]
async fn a_stream_beyond_the_connections_limit_is_refused() {
    let test = start().await;
    let servers = servers(&test.cluster);
    let limit = edge::MAX_CONCURRENT_STREAMS_PER_CONNECTION;
    for (server, path) in [
        (servers.coordinator, INCREMENT),
        (servers.shard, SHARD_READ),
    ] {
        // As many streams as the server allows, each left open, and one
        // more: that one is refused, the others are not.
        let mut connection = RawConnection::open(server).await;
        let beyond = 2 * limit + 1;
        for stream_id in (1..=beyond).step_by(2) {
            connection.open_stream(stream_id, path).await;
        }
        let refused = tokio::time::timeout(ANSWER_TIMEOUT, async {
            loop {
                let (kind, _, stream_id, payload) = connection.read_frame().await;
                assert_ne!(kind, FRAME_GOAWAY, "{path}: the connection was closed");
                if kind == FRAME_RST_STREAM {
                    return (
                        stream_id,
                        u32::from_be_bytes(payload[..4].try_into().unwrap()),
                    );
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{path}: stream {beyond}, beyond the limit, was not refused"));
        assert_eq!(refused, (beyond, REFUSED_STREAM), "{path}");
    }
    still_serving(&test.cluster, "edge", 0).await;
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_header_list_over_the_limit_is_refused() {
    let test = start().await;
    let servers = servers(&test.cluster);
    let limit = edge::MAX_HEADER_LIST_BYTES as usize;
    // A header that fits with the rest of the call's headers, and one that
    // takes the list over the limit (but under hyper's own default of
    // 16 KiB).
    let fits = "x".repeat(limit - 512);
    let too_large = "x".repeat(limit + 1024);
    for (server, path, message) in [
        (
            servers.coordinator,
            INCREMENT,
            increment_request(b"edge", 0, b""),
        ),
        (
            servers.shard,
            SHARD_READ,
            read_request(&servers.shard_id, b"edge"),
        ),
    ] {
        let status = call(
            server,
            path,
            &[("x-padding", fits.as_bytes())],
            framed(&message),
            true,
        )
        .await;
        assert_eq!(status.code(), Code::Ok, "{path}: {status:?}");

        let (send_request, _driver) = connect_h2(server).await;
        let mut send_request = send_request.ready().await.unwrap();
        let (response, _body) = send_request
            .send_request(
                grpc_request(server, path, &[("x-padding", too_large.as_bytes())]),
                true,
            )
            .unwrap();
        let response = tokio::time::timeout(ANSWER_TIMEOUT, response)
            .await
            .expect("an answer")
            .unwrap();
        assert_eq!(
            response.status(),
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "{path}: {response:?}"
        );
    }
    still_serving(&test.cluster, "edge", 0).await;
    test.cluster.shutdown().await.unwrap();
}

// --- Real processes: connections and memory ----------------------------------

/// A process's resident memory now and at its peak (`VmRSS`, `VmHWM`), in
/// bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
        kib * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

const MIB: u64 = 1024 * 1024;

/// A coordinator config under `dir` whose membership is `shard` alone.
fn one_shard_coordinator_config(dir: &std::path::Path, shard: SocketAddr) -> std::path::PathBuf {
    let path = dir.join("coordinator.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\nreplication_factor = 1\n\n\
             [[nodes]]\nid = \"shard-1\"\naddress = \"{shard}\"\n"
        ),
    )
    .unwrap();
    path
}

/// A raw connection to `address` whose HTTP/2 handshake the server
/// answered (its SETTINGS frame arrived): a connection the server holds.
async fn held_connection(address: SocketAddr) -> tokio::net::TcpStream {
    let mut connection = RawConnection::open(address).await;
    let (kind, ..) = tokio::time::timeout(ANSWER_TIMEOUT, connection.read_frame_raw())
        .await
        .expect("the server's settings");
    assert_eq!(kind, FRAME_SETTINGS);
    connection.tcp
}

impl RawConnection {
    /// The next frame, whatever it is.
    async fn read_frame_raw(&mut self) -> (u8, u8, u32, Vec<u8>) {
        let mut header = [0; 9];
        self.tcp.read_exact(&mut header).await.unwrap();
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0; length];
        self.tcp.read_exact(&mut payload).await.unwrap();
        let stream_id = u32::from_be_bytes(header[5..9].try_into().unwrap()) & 0x7fff_ffff;
        (header[3], header[4], stream_id, payload)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_a_servers_cap_wait_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let shard = support::start_shard(
        "shard-1",
        &support::write_shard_config(dir.path(), 1, "sync"),
        &[],
    );
    // The coordinator's node is elsewhere (a port nobody listens on any
    // more), so that the shard holds no coordinator connection.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let coordinator_dir = dir.path().join("coordinator");
    std::fs::create_dir(&coordinator_dir).unwrap();
    let coordinator = support::Daemon::start(
        "tally-coordinator",
        "coordinator",
        &[
            "--config",
            one_shard_coordinator_config(&coordinator_dir, nowhere)
                .to_str()
                .unwrap(),
        ],
        &coordinator_dir,
    );
    for (server, address) in [
        ("coordinator", coordinator.address),
        ("shard", shard.address),
    ] {
        let mut held = Vec::new();
        for _ in 0..edge::MAX_CONNECTIONS_PER_SERVER {
            held.push(held_connection(address).await);
        }
        // One more: the kernel completes its TCP handshake (the listen
        // queue), but the server does not take it, so its HTTP/2 preface
        // gets no answer while the others stay open...
        let mut waiting = RawConnection::open(address).await;
        let unanswered =
            tokio::time::timeout(Duration::from_millis(500), waiting.read_frame_raw()).await;
        assert!(unanswered.is_err(), "{server}: served beyond its cap");
        // ... until one of them closes.
        drop(held.pop());
        let (kind, ..) = tokio::time::timeout(ANSWER_TIMEOUT, waiting.read_frame_raw())
            .await
            .unwrap_or_else(|_| panic!("{server}: the waiting connection was never served"));
        assert_eq!(kind, FRAME_SETTINGS, "{server}");
    }
    coordinator.terminate();
    shard.terminate();
}

/// The memory test's bound on its own time: the peers' traffic is about
/// 520 MB of requests to a debug build, on a busy 2-core machine.
const MEMORY_TEST_TIME_LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_whose_peers_never_read_stays_within_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let shard = support::start_shard(
        "shard-1",
        &support::write_shard_config(dir.path(), 1, "sync"),
        &[],
    );
    let coordinator_dir = dir.path().join("coordinator");
    std::fs::create_dir(&coordinator_dir).unwrap();
    let coordinator = support::Daemon::start(
        "tally-coordinator",
        "coordinator",
        &[
            "--config",
            one_shard_coordinator_config(&coordinator_dir, shard.address)
                .to_str()
                .unwrap(),
        ],
        &coordinator_dir,
    );
    tokio::time::timeout(MEMORY_TEST_TIME_LIMIT, never_read(&coordinator))
        .await
        .unwrap_or_else(|_| panic!("the memory test took over {MEMORY_TEST_TIME_LIMIT:?}"));
    coordinator.terminate();
    shard.terminate();
}

/// Peers that open every stream they may on `coordinator` and never read,
/// and what the coordinator holds meanwhile and after.
async fn never_read(coordinator: &support::Daemon) {
    const PEERS: usize = 2;
    const GET_BATCH: &str = "/tally.v1.Counter/GetBatch";
    let began = Instant::now();
    let address = coordinator.address;
    let mut client = pb::counter_client::CounterClient::connect(coordinator.endpoint())
        .await
        .unwrap();
    client.increment(increment("memory", 1, "")).await.unwrap();
    assert_eq!(value(&mut client, "memory").await, 1);
    let (base, _) = memory_of(coordinator.pid());

    // The largest GetBatch: 10,000 names of 256 bytes (one name, whose
    // read costs the shard little), and the size of its answer.
    let names = vec!["n".repeat(256); 10_000];
    let request = framed(&prost::Message::encode_to_vec(&pb::GetBatchRequest {
        counters: names.clone(),
        allow_partial: false,
        ..Default::default()
    }));
    let answer_bytes = prost::Message::encoded_len(&pb::GetBatchResponse {
        counters: names
            .iter()
            .map(|name| pb::GetResponse {
                counter: name.clone(),
                value: 0,
                complete: true,
                ..Default::default()
            })
            .collect(),
    }) as u64;
    let limit = edge::MAX_CONCURRENT_STREAMS_PER_CONNECTION as usize;

    // Each peer opens as many GetBatch streams as the server allows and
    // sends each request whole; it never reads an answer, so the server
    // can send it no more than its 64 KiB windows. The answers' heads
    // arrive (their handlers are done): the server holds the rest.
    let mut peers = Vec::new();
    for _ in 0..PEERS {
        let (mut send_request, driver) = connect_h2(address).await;
        let mut held = Vec::new();
        for stream in 0..limit {
            send_request = send_request.ready().await.unwrap();
            let (response, mut body) = send_request
                .send_request(grpc_request(address, GET_BATCH, &[]), false)
                .unwrap();
            body.send_data(request.clone(), true).unwrap();
            let response = tokio::time::timeout(ANSWER_TIMEOUT, response)
                .await
                .expect("an answer")
                .unwrap();
            assert_eq!(response.status(), http::StatusCode::OK);
            // Not trailers-only: an answer with a body, which stays unread.
            assert!(
                Status::from_header_map(response.headers()).is_none(),
                "{response:?}"
            );
            if stream == 0 {
                // The server's settings came before its first answer.
                assert_eq!(
                    send_request.current_max_send_streams(),
                    limit,
                    "the server's SETTINGS_MAX_CONCURRENT_STREAMS"
                );
            }
            held.push((response, body));
        }
        // A stream beyond the limit waits in the client, as HTTP/2 says
        // (a client that sends it anyway has it refused:
        // `a_stream_beyond_the_connections_limit_is_refused`).
        send_request = send_request.ready().await.unwrap();
        let (beyond, beyond_body) = send_request
            .send_request(grpc_request(address, GET_BATCH, &[]), true)
            .unwrap();
        peers.push((driver, held, beyond, beyond_body));
    }
    for (_, _, beyond, _) in &mut peers {
        let answer = tokio::time::timeout(Duration::from_millis(500), beyond).await;
        assert!(answer.is_err(), "a stream beyond the limit was answered");
    }

    // A normal client is served meanwhile, on a connection of its own.
    let mut normal = pb::counter_client::CounterClient::connect(coordinator.endpoint())
        .await
        .unwrap();
    normal.increment(increment("memory", 1, "")).await.unwrap();
    assert_eq!(value(&mut normal, "memory").await, 2);

    // The bound, from the limits: each peer has at most the server's
    // stream limit of streams, each holding its answer (encoded whole
    // before it is sent: measured at 1.04 answers per stream) and, on the
    // way, its request (in flight, then decoded) and its answer before it
    // is encoded. Half an answer more per stream covers those and the
    // allocator's rounding. The peak is checked: the transients count.
    let (rss, peak) = memory_of(coordinator.pid());
    let streams = (PEERS * limit) as u64;
    let bound = base + streams * answer_bytes * 3 / 2;
    support::report(&format!(
        "edge memory: {PEERS} peers x {limit} streams x {:.2} MiB answers unread: coordinator \
         RSS {:.0} MiB before, {:.0} MiB holding them (peak {:.0} MiB), bound {:.0} MiB",
        answer_bytes as f64 / MIB as f64,
        base as f64 / MIB as f64,
        rss as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        bound as f64 / MIB as f64,
    ));
    assert!(peak <= bound, "peak RSS {peak} over the bound {bound}");

    drop(peers);
    // Once the peers are gone, what they held goes back to the system
    // (the coordinator's allocator returns large blocks when they are
    // freed: `tally_runtime::process::tune_allocator`).
    let released = base + streams * answer_bytes / 8;
    let after = support::wait_until(
        "the coordinator to give back what the peers held",
        Duration::from_secs(10),
        || async {
            let (rss, _) = memory_of(coordinator.pid());
            if rss <= released {
                Ok(rss)
            } else {
                Err(format!(
                    "RSS {} MiB, waiting for {} MiB",
                    rss / MIB,
                    released / MIB
                ))
            }
        },
    )
    .await;
    support::report(&format!(
        "edge memory: {:.0} MiB once the peers closed; {:.1} s",
        after as f64 / MIB as f64,
        began.elapsed().as_secs_f64()
    ));
}
