//! `ceiling`: a trivial in-memory `tally.v1.Counter` server, the upper bound
//! for Tally's unary figures in `benches/compare.sh`.
//!
//! It serves the public Counter API on the coordinator's own stack, so that
//! a comparison isolates what Tally adds to it: the same tonic server from
//! [`tally_runtime::process::grpc_server`] (health checking and reflection
//! included), connections accepted by [`tally_runtime::tls::incoming`]
//! (Nagle off), the coordinator's message size limits and its arrival-stamp
//! interceptor, the same request validation ([`tally_proto::domain`]) and
//! one multi-threaded tokio runtime. What it leaves out is everything else:
//! there is no second hop to shard nodes, no stripes, no disk, no
//! replication and no idempotency keys (accepted and ignored). Counters live
//! in a map split into [`SHARDS`] mutex-guarded parts by the name's hash;
//! an increment takes one lock and does one `checked_add`.
//!
//! Not a product: it forgets everything when it stops. Run it like a daemon:
//!
//! ```sh
//! cargo build --release --example ceiling
//! target/release/examples/ceiling --listen 127.0.0.1:0   # prints `listening on ADDRESS`
//! tallyctl --endpoint ADDRESS bench -c 64 -d 10s
//! ```
//!
//! It prints `listening on ADDRESS` on stdout once it serves, logs to stderr
//! (`RUST_LOG`), and stops on SIGTERM or SIGINT, finishing in-flight calls.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tally_proto::domain::{validate_batch, CounterName, Increment};
use tally_proto::pb;
use tally_proto::pb::counter_server::{Counter, CounterServer};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

/// Independent parts of the map: enough that clients on different counters
/// rarely share a lock.
const SHARDS: usize = 64;

const USAGE: &str = "usage: ceiling [--listen IP:PORT]   (default 127.0.0.1:0, a free port)";

/// Counters in memory, each in the part its name hashes to.
struct Ceiling {
    parts: Vec<Mutex<HashMap<String, i64>>>,
    hasher: RandomState,
}

impl Ceiling {
    fn new() -> Self {
        Ceiling {
            parts: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn part(&self, counter: &str) -> MutexGuard<'_, HashMap<String, i64>> {
        let index = (self.hasher.hash_one(counter) % SHARDS as u64) as usize;
        self.parts[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `delta`, or changes nothing and fails with `OUT_OF_RANGE` if the
    /// value would leave the i64 range (Tally's contract).
    fn add(&self, counter: CounterName, delta: i64) -> Result<(), Status> {
        let mut part = self.part(counter.as_str());
        match part.get_mut(counter.as_str()) {
            Some(value) => {
                *value = value.checked_add(delta).ok_or_else(|| {
                    Status::out_of_range(format!("counter {counter} would overflow i64"))
                })?;
            }
            None => {
                part.insert(counter.into_string(), delta);
            }
        }
        Ok(())
    }

    fn get(&self, counter: CounterName) -> pb::GetResponse {
        let value = self
            .part(counter.as_str())
            .get(counter.as_str())
            .copied()
            .unwrap_or(0);
        pb::GetResponse {
            counter: counter.into_string(),
            value,
            complete: true,
            ..Default::default()
        }
    }
}

#[tonic::async_trait]
impl Counter for Ceiling {
    async fn increment(
        &self,
        request: Request<pb::IncrementRequest>,
    ) -> Result<Response<pb::IncrementResponse>, Status> {
        let increment = Increment::try_from(request.into_inner())?;
        self.add(increment.counter, increment.delta)?;
        Ok(Response::new(pb::IncrementResponse::default()))
    }

    /// Validates every item first (one bad item: nothing applied), then
    /// applies them independently, as Tally does: an item that would
    /// overflow is skipped and the call fails naming the first one.
    async fn increment_batch(
        &self,
        request: Request<pb::IncrementBatchRequest>,
    ) -> Result<Response<pb::IncrementBatchResponse>, Status> {
        let increments: Vec<Increment> = validate_batch(request.into_inner().increments)?;
        let mut first_error = None;
        for increment in increments {
            if let Err(status) = self.add(increment.counter, increment.delta) {
                first_error.get_or_insert(status);
            }
        }
        match first_error {
            Some(status) => Err(status),
            None => Ok(Response::new(pb::IncrementBatchResponse::default())),
        }
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let counter = CounterName::try_from(request.into_inner().counter)?;
        Ok(Response::new(self.get(counter)))
    }

    async fn get_batch(
        &self,
        request: Request<pb::GetBatchRequest>,
    ) -> Result<Response<pb::GetBatchResponse>, Status> {
        let counters: Vec<CounterName> = validate_batch(request.into_inner().counters)?;
        Ok(Response::new(pb::GetBatchResponse {
            counters: counters
                .into_iter()
                .map(|counter| self.get(counter))
                .collect(),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let counter = CounterName::try_from(request.into_inner().counter)?;
        self.part(counter.as_str()).remove(counter.as_str());
        Ok(Response::new(pb::DeleteResponse {}))
    }
}

/// The `--listen` address from the command line.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<SocketAddr, String> {
    let mut listen = "127.0.0.1:0".to_string();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or(USAGE)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => match other.strip_prefix("--listen=") {
                Some(value) => listen = value.to_string(),
                None => return Err(format!("unexpected argument {other:?}; {USAGE}")),
            },
        }
    }
    listen
        .parse()
        .map_err(|error| format!("--listen {listen:?}: {error}"))
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let listen = parse_args(std::env::args().skip(1))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|error| format!("cannot listen on {listen}: {error}"))?;
    // Installed before readiness is announced, as in the daemons.
    let shutdown = tally_runtime::process::shutdown_signal();
    let (health_reporter, server) = tally_runtime::process::grpc_server();
    health_reporter
        .set_serving::<CounterServer<Ceiling>>()
        .await;
    println!("listening on {}", listener.local_addr()?);
    server
        .add_service(InterceptedService::new(
            CounterServer::new(Ceiling::new())
                .max_decoding_message_size(tally_coordinator::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(tally_coordinator::MAX_MESSAGE_BYTES),
            tally_coordinator::stamp_arrival,
        ))
        .serve_with_incoming_shutdown(
            tally_runtime::tls::incoming(
                listener,
                None,
                tally_runtime::edge::MAX_CONNECTIONS_PER_SERVER,
            ),
            shutdown,
        )
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tally_runtime::process::init_tracing();
    tally_runtime::process::exit_code("ceiling", run().await)
}
