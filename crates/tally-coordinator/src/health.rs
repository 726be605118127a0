//! Each shard node's health as this coordinator sees it.
//!
//! Two sources: every internal call's outcome, and an active probe per node
//! (a `Status` call every `health_interval_ms`, bounded by
//! `health_timeout_ms`). Any failure marks a node down at once; any success
//! marks it up. A node that hangs (SIGSTOP, a full disk stuck in the kernel)
//! accepts connections but does not answer, so the probe's timeout is what
//! finds it: within `health_interval_ms + health_timeout_ms`. While a node
//! is down it is probed with backoff, doubling from `health_interval_ms` up
//! to [`MAX_PROBE_BACKOFF`], so a restarted node is found within that.
//!
//! Routing reads this board: an increment without an idempotency key whose
//! owner is down goes to the next healthy node on the ring (correct by the
//! invariant: a counter is the sum of its entries wherever they are). A keyed
//! increment stays with its owner, the only node that can deduplicate it.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tally_proto::pb;

use crate::shard_client::ShardClient;

/// Longest pause between probes of a node that is down.
pub const MAX_PROBE_BACKOFF: Duration = Duration::from_secs(2);

/// One node's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHealth {
    /// Whether the last call or probe succeeded.
    pub up: bool,
    /// Unix ms of the last change between up and down, or of the board's
    /// creation (this coordinator's start, or the reload that added the
    /// node) if there was none.
    pub since_unix_ms: i64,
    /// Why the node is down (the last failure); empty when up.
    pub error: String,
    /// The node started with an empty data directory and awaits a restore
    /// from its replicas (as its last status said).
    pub restoring: bool,
    /// Its drain state, as last seen.
    pub drain: pb::DrainState,
    /// Copies of its entries to its replicas that failed since this
    /// coordinator started.
    pub replication_failures: u64,
}

/// Every node's health, indexed like the ring's nodes.
#[derive(Debug)]
pub struct HealthBoard {
    nodes: Box<[Mutex<NodeHealth>]>,
    ids: Box<[Arc<str>]>,
}

impl HealthBoard {
    /// Every node starts up, since now: a node that is not is found by the
    /// first call or probe.
    pub fn new(ids: impl IntoIterator<Item = Arc<str>>) -> Self {
        let ids: Box<[Arc<str>]> = ids.into_iter().collect();
        let now = unix_ms_now();
        HealthBoard {
            nodes: ids
                .iter()
                .map(|_| {
                    Mutex::new(NodeHealth {
                        up: true,
                        since_unix_ms: now,
                        error: String::new(),
                        restoring: false,
                        drain: pb::DrainState::Serving,
                        replication_failures: 0,
                    })
                })
                .collect(),
            ids,
        }
    }

    /// Whether node `index` is up.
    pub fn is_up(&self, index: usize) -> bool {
        self.nodes[index].lock().up
    }

    /// Counts a failed copy of node `origin`'s entries to a replica.
    pub fn record_replication_failure(&self, origin: usize) {
        self.nodes[origin].lock().replication_failures += 1;
    }

    /// Node `index`'s health.
    pub fn get(&self, index: usize) -> NodeHealth {
        self.nodes[index].lock().clone()
    }

    /// What a read needs of a node that did not answer, without a copy of
    /// its last error: whether it is up, since when, and its drain state.
    pub fn failure_view(&self, index: usize) -> (bool, i64, pb::DrainState) {
        let node = self.nodes[index].lock();
        (node.up, node.since_unix_ms, node.drain)
    }

    /// Sets node `index`'s health as a previous board knew it.
    pub fn restore(&self, index: usize, health: NodeHealth) {
        *self.nodes[index].lock() = health;
    }

    /// A call to or probe of node `index` succeeded.
    pub fn record_success(&self, index: usize) {
        let mut node = self.nodes[index].lock();
        if !node.up {
            tracing::info!(node_id = &*self.ids[index], "shard node is up again");
            node.up = true;
            node.since_unix_ms = unix_ms_now();
            node.error.clear();
        }
    }

    /// Whether node `index` is up, and whether it is being drained: one
    /// lock, for the write path.
    pub fn write_state(&self, index: usize) -> (bool, bool) {
        let node = self.nodes[index].lock();
        (node.up, node.drain != pb::DrainState::Serving)
    }

    /// Node `index`'s drain state as last seen.
    pub fn drain(&self, index: usize) -> pb::DrainState {
        self.nodes[index].lock().drain
    }

    /// Records node `index`'s drain state. Drain states only move forward
    /// (serving, draining, handed-over, drained): a probe that answered
    /// before a step, or this coordinator's own earlier mark, never takes
    /// one back.
    pub fn set_drain(&self, index: usize, drain: pb::DrainState) {
        let mut node = self.nodes[index].lock();
        node.drain = node.drain.max(drain);
    }

    /// Whether node `index` said it awaits a restore.
    pub fn is_restoring(&self, index: usize) -> bool {
        self.nodes[index].lock().restoring
    }

    /// Records whether node `index` awaits a restore.
    pub fn set_restoring(&self, index: usize, restoring: bool) {
        self.nodes[index].lock().restoring = restoring;
    }

    /// A call to or probe of node `index` failed.
    pub fn record_failure(&self, index: usize, error: &str) {
        let mut node = self.nodes[index].lock();
        if node.up {
            tracing::warn!(node_id = &*self.ids[index], error, "shard node is down");
            node.up = false;
            node.since_unix_ms = unix_ms_now();
        }
        node.error = error.to_string();
    }
}

/// Probes one node until the board is dropped.
pub async fn probe_loop(
    board: Weak<HealthBoard>,
    index: usize,
    shard: ShardClient,
    interval: Duration,
    timeout: Duration,
) {
    let mut pause = interval;
    loop {
        tokio::time::sleep(pause).await;
        let result = shard.brief_status(timeout).await;
        let Some(board) = board.upgrade() else {
            return;
        };
        match result {
            Ok(status) => {
                board.record_success(index);
                board.set_restoring(index, status.restoring);
                board.set_drain(index, status.drain_state());
                pause = interval;
            }
            Err(error) => {
                board.record_failure(index, &error.to_string());
                pause = (pause * 2).min(MAX_PROBE_BACKOFF.max(interval));
            }
        }
    }
}

/// Wall-clock time in ms since the Unix epoch.
pub fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_board_has_every_node_up_since_now() {
        let before = unix_ms_now();
        let board = HealthBoard::new(["a".into(), "b".into()]);
        let after = unix_ms_now();
        for index in 0..2 {
            let health = board.get(index);
            assert!(health.up);
            assert!(
                (before..=after).contains(&health.since_unix_ms),
                "{before} <= {} <= {after}",
                health.since_unix_ms
            );
        }
    }

    #[test]
    fn a_failure_marks_down_and_a_success_up() {
        let board = HealthBoard::new(["a".into(), "b".into()]);
        assert!(board.is_up(0) && board.is_up(1));
        board.record_failure(1, "connection refused");
        assert!(!board.is_up(1));
        let down = board.get(1);
        assert_eq!(down.error, "connection refused");
        assert!(down.since_unix_ms > 0);
        board.record_failure(1, "timed out");
        assert_eq!(
            board.get(1).since_unix_ms,
            down.since_unix_ms,
            "still the same outage"
        );
        assert_eq!(board.get(1).error, "timed out");
        board.record_success(1);
        assert!(board.is_up(1));
        assert_eq!(board.get(1).error, "");
        assert!(board.is_up(0));
    }
}
