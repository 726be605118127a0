//! Each shard node's health as this coordinator sees it.
//!
//! Two sources: every internal call's outcome, and an active probe per node
//! (a `Status` call every `health_interval_ms`, bounded by
//! `health_timeout_ms`). Any answer marks a node up.
//!
//! Failures are of two kinds, and only one is certain:
//! - **An error** (connection refused or reset, a refusal, a wrong node or
//!   protocol at the address) marks the node down at once: a killed node is
//!   found by its first refused connection.
//! - **A timeout** may be a hung node (SIGSTOP, a disk stuck in the kernel)
//!   or a busy one (a loaded 2-core host, a debug build). It is a *miss*,
//!   and counts only if nothing else the node was asked answered meanwhile:
//!   under load a stream of answers keeps a slow node up, whatever one probe
//!   does. [`MISSES_TO_DOWN`] misses in a row mark it down; after a first
//!   miss the next probe goes at once. A hung node is found within
//!   `health_interval_ms + 2 × health_timeout_ms` (2.5 s by default).
//!
//! While a node is down it is probed with backoff, doubling from
//! `health_interval_ms` up to [`MAX_PROBE_BACKOFF`], so a restarted node is
//! found within that.
//!
//! Routing reads this board (`placement`): an increment without an
//! idempotency key whose owner is down goes to the next healthy node on the
//! ring (correct by the invariant: a counter is the sum of its entries
//! wherever they are); a keyed one only to a node that holds its owner's
//! records.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tally_proto::pb;

use crate::error::ShardCallError;
use crate::placement::WriteState;
use crate::shard_client::ShardClient;

/// Longest pause between probes of a node that is down.
pub const MAX_PROBE_BACKOFF: Duration = Duration::from_secs(2);

/// Timeouts in a row, with no answer from the node in between, that mark it
/// down.
pub const MISSES_TO_DOWN: u32 = 2;

/// One node's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHealth {
    /// Whether the last call or probe succeeded.
    pub up: bool,
    /// Unix ms of the last change between up and down, or of the board's
    /// creation (this coordinator's start, or the reload that added the
    /// node) if there was none.
    pub since_unix_ms: i64,
    /// `since_unix_ms` on this process's monotonic clock: what decisions
    /// use (a copy's age is compared with it, never a wall clock).
    pub since: Instant,
    /// Why the node is down (the last failure); empty when up.
    pub error: String,
    /// The node started with an empty data directory and awaits a restore
    /// from its replicas (as its last status said).
    pub restoring: bool,
    /// Its drain state, as last seen.
    pub drain: pb::DrainState,
    /// The adopter its drain recorded, once it has one (as last seen).
    pub adopter: Option<Arc<str>>,
    /// The nodes it stands in for (as last seen).
    pub standing_in_for: Vec<String>,
    /// Since when a stand-in has taken over its keyed increments, as far as
    /// this coordinator knows (it routed one there, or a stand-in's status
    /// said so); cleared by a later status of that stand-in without it, or
    /// by the reconciliation.
    pub taken_over: Option<(Instant, usize)>,
    /// Copies of its entries to its replicas that failed since this
    /// coordinator started.
    pub replication_failures: u64,
    /// When the node last answered anything (this process's clock).
    pub last_answer: Instant,
    /// Timeouts since that answer (see [`MISSES_TO_DOWN`]).
    pub misses: u32,
    /// When the first of those was counted: a later miss counts only for a
    /// call sent after it, so calls that were in flight together when the
    /// node stalled are one miss, not several.
    pub first_miss: Option<Instant>,
}

/// What a timeout meant for a node's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// Nothing: the node answered something since the call was sent, or
    /// the call was in flight with the miss already counted.
    Ignored,
    /// A first miss: ask again at once.
    First,
    /// The node is down.
    Down,
}

/// Every node's health, indexed like the ring's nodes.
#[derive(Debug)]
pub struct HealthBoard {
    nodes: Box<[Mutex<NodeHealth>]>,
    ids: Box<[Arc<str>]>,
    /// Per node, wakes its probe loop before its pause is over.
    probes: Box<[Arc<tokio::sync::Notify>]>,
    /// Per node, how often it was found hung (marked down by timeouts):
    /// calls waiting on it watch.
    hangs: Box<[tokio::sync::watch::Sender<u64>]>,
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
                        since: Instant::now(),
                        error: String::new(),
                        restoring: false,
                        drain: pb::DrainState::Serving,
                        adopter: None,
                        standing_in_for: Vec::new(),
                        taken_over: None,
                        replication_failures: 0,
                        last_answer: Instant::now(),
                        misses: 0,
                        first_miss: None,
                    })
                })
                .collect(),
            probes: ids.iter().map(|_| Arc::default()).collect(),
            hangs: ids
                .iter()
                .map(|_| tokio::sync::watch::Sender::new(0))
                .collect(),
            ids,
        }
    }

    /// Resolves when node `index` is next found hung (marked down by
    /// timeouts).
    pub fn found_hung(&self, index: usize) -> impl std::future::Future<Output = ()> + 'static {
        let mut hangs = self.hangs[index].subscribe();
        async move {
            if hangs.changed().await.is_err() {
                // The board is gone (a reload): never.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Probes node `index` now rather than after its backoff: something
    /// suggests it is back (its stand-in no longer stands in for it).
    pub fn probe_soon(&self, index: usize) {
        self.probes[index].notify_one();
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
    pub fn failure_view(&self, index: usize) -> (bool, Instant, pb::DrainState) {
        let node = self.nodes[index].lock();
        (node.up, node.since, node.drain)
    }

    /// Sets node `index`'s health as a previous board knew it.
    pub fn restore(&self, index: usize, health: NodeHealth) {
        *self.nodes[index].lock() = health;
    }

    /// A call to or probe of node `index` succeeded.
    pub fn record_success(&self, index: usize) {
        let mut node = self.nodes[index].lock();
        node.last_answer = Instant::now();
        node.misses = 0;
        node.first_miss = None;
        if !node.up {
            tracing::info!(node_id = &*self.ids[index], "shard node is up again");
            node.up = true;
            node.since_unix_ms = unix_ms_now();
            node.since = Instant::now();
            node.error.clear();
        }
    }

    /// Whether node `index` is up, and how far its drain has gone: one
    /// lock, for the write path.
    pub fn write_state(&self, index: usize) -> WriteState {
        let node = self.nodes[index].lock();
        WriteState {
            up: node.up,
            draining: node.drain != pb::DrainState::Serving,
            handed_over: node.drain.handed_over(),
            taken_over: node.taken_over.is_some(),
        }
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

    /// Records the adopter node `index`'s drain recorded.
    pub fn set_adopter(&self, index: usize, adopter: &str) {
        let mut node = self.nodes[index].lock();
        if node.adopter.as_deref() != Some(adopter) {
            node.adopter = Some(adopter.into());
        }
    }

    /// Node `owner`'s keyed increments are taken over by `stand_in`.
    pub fn mark_taken_over(&self, owner: usize, stand_in: usize) {
        let mut node = self.nodes[owner].lock();
        if node.taken_over.is_none_or(|(_, by)| by != stand_in) {
            node.taken_over = Some((Instant::now(), stand_in));
        }
    }

    /// Node `owner` has reconciled with its stand-in.
    pub fn clear_taken_over(&self, owner: usize) {
        self.nodes[owner].lock().taken_over = None;
    }

    /// A status of node `stand_in`, asked at `sent`, listed these nodes it
    /// stands in for: they are taken over; a node it took over before `sent`
    /// and no longer lists is not (reconciled, or the stand-in refused the
    /// takeover).
    fn saw_stand_ins(&self, stand_in: usize, sent: Instant, listed: &[String]) {
        for (owner, id) in self.ids.iter().enumerate() {
            let listed = listed.iter().any(|listed| listed.as_str() == &**id);
            let mut node = self.nodes[owner].lock();
            match node.taken_over {
                None if listed => node.taken_over = Some((sent, stand_in)),
                Some((since, by)) if by == stand_in && !listed && since < sent => {
                    node.taken_over = None
                }
                _ => {}
            }
        }
    }

    /// The nodes node `index` stands in for, as last seen.
    pub fn standing_in_for(&self, index: usize) -> Vec<String> {
        self.nodes[index].lock().standing_in_for.clone()
    }

    /// The adopter node `index`'s drain recorded, if known.
    pub fn adopter(&self, index: usize) -> Option<Arc<str>> {
        self.nodes[index].lock().adopter.clone()
    }

    /// Whether node `index` said it awaits a restore.
    pub fn is_restoring(&self, index: usize) -> bool {
        self.nodes[index].lock().restoring
    }

    /// Records whether node `index` awaits a restore.
    pub fn set_restoring(&self, index: usize, restoring: bool) {
        self.nodes[index].lock().restoring = restoring;
    }

    /// A call to or probe of node `index` failed with an error (not a
    /// timeout): the node is down.
    pub fn record_failure(&self, index: usize, error: &str) {
        let mut node = self.nodes[index].lock();
        self.mark_down(index, &mut node, error);
    }

    /// A call to or probe of node `index`, sent at `sent`, timed out. The
    /// node is down after [`MISSES_TO_DOWN`] such timeouts, each of a call
    /// sent after the previous one was counted, with no answer since the
    /// first was sent. A timeout of a call sent before the node's last
    /// answer, or before the last counted miss, says nothing new.
    pub fn record_miss(&self, index: usize, sent: Instant, error: &str) -> Miss {
        let mut node = self.nodes[index].lock();
        if !node.up {
            node.error = error.to_string();
            return Miss::Down;
        }
        if node.last_answer > sent || node.first_miss.is_some_and(|first| sent <= first) {
            return Miss::Ignored;
        }
        node.misses = node.misses.saturating_add(1);
        node.first_miss = Some(Instant::now());
        if node.misses >= MISSES_TO_DOWN {
            self.mark_down(index, &mut node, error);
            // Found hung: calls waiting on it stop waiting (a node that
            // refused is down too, but its calls fail by themselves, and
            // one refusal must not put every call in flight in doubt).
            self.hangs[index].send_modify(|hangs| *hangs += 1);
            Miss::Down
        } else {
            Miss::First
        }
    }

    fn mark_down(&self, index: usize, node: &mut NodeHealth, error: &str) {
        if node.up {
            tracing::warn!(node_id = &*self.ids[index], error, "shard node is down");
            node.up = false;
            node.since_unix_ms = unix_ms_now();
            node.since = Instant::now();
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
    let Some(wake) = board.upgrade().map(|board| board.probes[index].clone()) else {
        return;
    };
    let mut pause = interval;
    loop {
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = wake.notified() => {}
        }
        let sent = Instant::now();
        let result = shard.brief_status(timeout).await;
        let Some(board) = board.upgrade() else {
            return;
        };
        let backoff = (pause.max(interval) * 2).min(MAX_PROBE_BACKOFF.max(interval));
        pause = match result {
            Ok(status) => {
                board.record_success(index);
                board.set_restoring(index, status.restoring);
                board.set_drain(index, status.drain_state());
                if !status.drain_adopter.is_empty() {
                    board.set_adopter(index, &status.drain_adopter);
                }
                board.saw_stand_ins(index, sent, &status.standing_in_for);
                board.nodes[index].lock().standing_in_for = status.standing_in_for;
                interval
            }
            Err(error @ ShardCallError::TimedOut(_)) => {
                match board.record_miss(index, sent, &error.to_string()) {
                    Miss::Down => backoff,
                    // Ask again at once, so a hung node is found within two
                    // probe timeouts of its first miss.
                    Miss::First => Duration::ZERO,
                    Miss::Ignored => interval,
                }
            }
            Err(error) => {
                board.record_failure(index, &error.to_string());
                backoff
            }
        };
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

    #[test]
    fn timeouts_mark_down_only_in_a_row_and_without_an_answer_between() {
        let board = HealthBoard::new(["a".into()]);
        let sent = Instant::now();
        assert_eq!(
            board.record_miss(0, sent, "timed out"),
            Miss::First,
            "one miss"
        );
        assert!(board.is_up(0));
        // An answer to anything: the node is busy, not hung.
        board.record_success(0);
        assert_eq!(
            board.record_miss(0, sent, "timed out"),
            Miss::Ignored,
            "a timeout of a call sent before the last answer says nothing"
        );
        let sent = Instant::now();
        assert_eq!(board.record_miss(0, sent, "timed out"), Miss::First);
        // Calls that were in flight together when it stalled: one miss.
        assert_eq!(board.record_miss(0, sent, "timed out"), Miss::Ignored);
        assert!(board.is_up(0));
        assert_eq!(
            board.record_miss(0, Instant::now(), "timed out"),
            Miss::Down,
            "two in a row, the second sent after the first was counted"
        );
        let down = board.get(0);
        assert!(!down.up);
        assert_eq!(down.error, "timed out");
        board.record_success(0);
        assert!(board.is_up(0));
        assert_eq!(board.get(0).misses, 0);
        // An error is certain: down at once.
        board.record_failure(0, "connection refused");
        assert!(!board.is_up(0));
    }
}
