//! Helpers shared by the integration tests. Every test file does
//! `mod support;` and uses a part:
//!
//! - [`process`]: the real `tally-shard`, `tally-coordinator` and `tallyctl`
//!   binaries as processes (its items are re-exported here);
//! - [`cluster`]: an in-process cluster and the client calls its tests share;
//! - [`ledger`]: the process harnesses' clients, which retry with their keys
//!   and keep a ledger of what was acknowledged;
//! - here: [`wait_until`], the one way a test waits for a condition, and
//!   what several kinds of test use (replication targets, totals, reports).

#![allow(dead_code)] // each test file uses a part

pub mod cluster;
pub mod ledger;
pub mod process;

// The process harness's items, as `support::Daemon` and so on; a test file
// that runs no process uses none.
#[allow(unused_imports)]
pub use process::*;

use std::fmt;
use std::future::Future;
use std::time::Duration;

/// How often [`wait_until`] checks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A generous bound for a condition a test waits for, on a small, busy CI
/// machine.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Runs `check` until it returns `Ok`, every [`POLL_INTERVAL`], and returns
/// the `Ok` value. An `Err` carries what the check observed. After `timeout`
/// (a check still running included), panics naming `what` and the last
/// observation.
///
/// The one way tests wait for a condition; none sleeps to wait for
/// readiness. Its clock is tokio's, so it also works under
/// `tokio::time::pause()`. A plain `#[test]` runs it with
/// `runtime.block_on(..)`.
pub async fn wait_until<T, E, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    E: fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let give_up = tokio::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        match tokio::time::timeout_at(give_up, check()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(observed)) => last = Some(observed),
            Err(_) => panic!(
                "gave up after {timeout:?} waiting for {what}: a check was still running; \
                 the one before saw {last:?}"
            ),
        }
        if tokio::time::Instant::now() >= give_up {
            panic!("gave up after {timeout:?} waiting for {what}; last seen: {last:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Text shown as it is in [`wait_until`]'s message (a log, not an escaped
/// string).
pub struct Verbatim(pub String);

impl fmt::Debug for Verbatim {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "\n{}", self.0)
    }
}

/// Each node's replication version in `statuses`: a copy of the node at
/// that version or later holds everything the node had done by then.
pub fn replication_targets(
    statuses: &[tally::proto::pb::ShardStatusResponse],
) -> std::collections::HashMap<String, u64> {
    statuses
        .iter()
        .map(|status| (status.node_id.clone(), status.replication_version))
        .collect()
}

/// Whether every node in `targets` has a copy somewhere in `statuses` at
/// its target version or later.
pub fn replicas_caught_up(
    targets: &std::collections::HashMap<String, u64>,
    statuses: &[tally::proto::pb::ShardStatusResponse],
) -> bool {
    targets.iter().all(|(origin, target)| {
        statuses.iter().any(|status| {
            status
                .replicas
                .iter()
                .any(|copy| &copy.origin == origin && copy.version >= *target)
        })
    })
}

/// A two-thread runtime for tests that drive load from plain `#[test]`s.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Every counter's total through the coordinator at `endpoint`, in order.
pub async fn totals(endpoint: &str, counters: &[String]) -> Vec<tally::proto::pb::GetResponse> {
    let mut client = tally::proto::pb::counter_client::CounterClient::connect(endpoint.to_string())
        .await
        .unwrap();
    client
        .get_batch(tally::proto::pb::GetBatchRequest {
            counters: counters.to_vec(),
            allow_partial: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .counters
}

/// Sends `batch(0)`, `batch(1)`, … until one is refused (at most `rounds`):
/// returns the refused round (so the number acknowledged before it) and its
/// status. Panics with `never` if every round was acknowledged.
pub async fn write_until_refused(
    client: &mut tally::proto::pb::counter_client::CounterClient<tonic::transport::Channel>,
    batch: impl Fn(usize) -> tally::proto::pb::IncrementBatchRequest,
    rounds: usize,
    never: &str,
) -> (usize, tonic::Status) {
    for round in 0..rounds {
        if let Err(status) = client.increment_batch(batch(round)).await {
            return (round, status);
        }
    }
    panic!("{never}");
}

/// Prints a test's result line where CI shows it: straight to stderr, which
/// the test harness does not capture (it captures `println!`).
pub fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}
