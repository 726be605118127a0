//! Increments under a limit: read the total, decide, apply.
//!
//! An exact global limit would need every limited increment of a counter
//! to pass through one place, or a round of agreement per call. Tally does
//! the honest cheap thing: on each coordinator, the limited increments of
//! one counter take turns in groups. A group is every limited increment
//! of the counter that arrived while the one before was being decided
//! (group commit, as a shard's log does it): one read of the total, a
//! decision for each increment in arrival order against the running total,
//! one write of those admitted, then every answer. So:
//!
//! - through one coordinator, limited increments never pass the limit
//!   together: each group decides on a total that holds every increment
//!   admitted before it, acknowledged;
//! - through several, a coordinator's decision cannot see the limited
//!   increments in flight on the others: the limit may be passed by at
//!   most the sum of the deltas in flight on the other coordinators;
//! - increments without a limit are never held back and count as soon as
//!   they are acknowledged.
//!
//! A hot limited counter costs a read and a write per group, not per call:
//! the more callers wait, the more each group decides.
//!
//! docs/GUARANTEES.md states this with the tests that hold it to it.

use std::collections::HashMap;
use std::sync::Arc;

use tally_proto::domain::Increment;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::Status;

use crate::cluster::ClusterHandle;
use crate::error::CoordinatorError;

/// What a limited increment did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The delta, or 0 when the limit refused it.
    pub applied: i64,
    /// The total the decision saw (the read, plus the increments admitted
    /// before this one in its group), plus `applied`.
    pub total: i64,
    /// Every node's part was read.
    pub complete: bool,
}

/// A lane: one counter's (its stored name's) limited increments, with one
/// `allow_partial` (a group is read one way).
type LaneKey = (String, bool);

/// One limited increment waiting for its group.
struct Waiter {
    increment: Increment,
    limit: i64,
    deadline: Option<Instant>,
    answer: oneshot::Sender<Result<Limited, Status>>,
}

/// The lanes with a leader at work: a counter is here from its first
/// limited increment until its leader finds no one waiting. Lives as long
/// as the service, across membership reloads.
#[derive(Default)]
pub struct Turns {
    lanes: parking_lot::Mutex<HashMap<LaneKey, Vec<Waiter>>>,
}

impl std::fmt::Debug for Turns {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Turns")
            .field("lanes", &self.lanes.lock().len())
            .finish()
    }
}

impl Turns {
    /// Queues `waiter`; true if its lane had no leader, so the caller must
    /// start one.
    fn join(&self, key: &LaneKey, waiter: Waiter) -> bool {
        let mut lanes = self.lanes.lock();
        match lanes.get_mut(key) {
            Some(waiting) => {
                waiting.push(waiter);
                false
            }
            None => {
                lanes.insert(key.clone(), vec![waiter]);
                true
            }
        }
    }

    /// The next group of `key`'s lane, or `None` (and the lane is gone)
    /// when no one waits: a later arrival then leads a new one.
    fn next_group(&self, key: &LaneKey) -> Option<Vec<Waiter>> {
        let mut lanes = self.lanes.lock();
        let waiting = lanes.get_mut(key)?;
        if waiting.is_empty() {
            lanes.remove(key);
            return None;
        }
        Some(std::mem::take(waiting))
    }
}

/// Applies `increment` (no idempotency key, delta >= 0: the edge checked)
/// if the counter's total after it would be at most `limit`.
pub async fn increment_within(
    cluster: &ClusterHandle,
    turns: &Arc<Turns>,
    increment: Increment,
    limit: i64,
    allow_partial: bool,
    deadline: Option<Instant>,
) -> Result<Limited, Status> {
    let key = (increment.counter.as_str().to_string(), allow_partial);
    let (answer, answered) = oneshot::channel();
    let waiter = Waiter {
        increment,
        limit,
        deadline,
        answer,
    };
    if turns.join(&key, waiter) {
        // A task of its own: the caller may give up (its deadline, a
        // cancelled call) while others wait on the lane.
        tokio::spawn(lead(cluster.clone(), turns.clone(), key));
    }
    let answered = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, answered)
            .await
            .map_err(|_| Status::from(CoordinatorError::DeadlineExceeded))?,
        None => answered.await,
    };
    answered.unwrap_or_else(|_| Err(Status::unavailable("the coordinator is shutting down")))
}

/// Decides `key`'s groups until no one waits.
async fn lead(cluster: ClusterHandle, turns: Arc<Turns>, key: LaneKey) {
    while let Some(group) = turns.next_group(&key) {
        decide(&cluster, &key, group).await;
    }
}

/// One group: one read, a decision each in arrival order, one write.
async fn decide(cluster: &ClusterHandle, (counter, allow_partial): &LaneKey, group: Vec<Waiter>) {
    // A caller that gave up is not waited for: nothing of its is applied
    // (its DEADLINE_EXCEEDED said it may or may not be).
    let group: Vec<Waiter> = group
        .into_iter()
        .filter(|waiter| !waiter.answer.is_closed())
        .collect();
    if group.is_empty() {
        return;
    }
    // The group waits as long as its most patient member.
    let deadline = group
        .iter()
        .map(|waiter| waiter.deadline)
        .reduce(|a, b| a.zip(b).map(|(a, b)| a.max(b)))
        .flatten();
    let cluster = cluster.current();
    let name = group[0].increment.counter.clone();
    let read = cluster
        .totals(vec![name], *allow_partial, deadline)
        .await
        .and_then(|mut totals| totals.pop().expect("one total per counter").into_result());
    let before = match read {
        Ok(total) => total,
        Err(error) => {
            let status = Status::from(error);
            for waiter in group {
                let _ = waiter.answer.send(Err(status.clone()));
            }
            return;
        }
    };
    let mut running = i128::from(before.value);
    let mut admitted = Vec::new();
    let mut decided = Vec::with_capacity(group.len());
    for waiter in group {
        let delta = waiter.increment.delta;
        let applied = if running + i128::from(delta) <= i128::from(waiter.limit) {
            running += i128::from(delta);
            admitted.push(waiter.increment);
            delta
        } else {
            0
        };
        // Between the total before (deltas are >= 0) and a limit: an i64.
        let total = running as i64;
        decided.push((
            waiter.answer,
            Limited {
                applied,
                total,
                complete: before.complete,
            },
        ));
    }
    let written = if admitted.is_empty() {
        Ok(0)
    } else {
        cluster.increment(admitted, deadline).await
    };
    let failed = written.err().map(Status::from);
    tracing::trace!(
        counter,
        decided = decided.len(),
        "limited increments decided"
    );
    for (answer, limited) in decided {
        let _ = answer.send(match &failed {
            // In doubt, like any increment that failed: retry or not.
            Some(status) if limited.applied != 0 => Err(status.clone()),
            _ => Ok(limited),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_proto::domain::CounterName;

    fn waiter(delta: i64) -> (Waiter, oneshot::Receiver<Result<Limited, Status>>) {
        let (answer, answered) = oneshot::channel();
        let counter = CounterName::try_from("c".to_string()).unwrap();
        (
            Waiter {
                increment: Increment::plain(counter, delta, None),
                limit: 10,
                deadline: None,
                answer,
            },
            answered,
        )
    }

    #[test]
    fn a_lane_has_one_leader_who_takes_everyone_waiting_in_groups() {
        let turns = Turns::default();
        let key = ("c".to_string(), false);
        assert!(turns.join(&key, waiter(1).0), "the first leads");
        assert!(!turns.join(&key, waiter(2).0), "the second waits");
        let partial = ("c".to_string(), true);
        assert!(
            turns.join(&partial, waiter(3).0),
            "another lane has its own leader"
        );
        let group = turns.next_group(&key).unwrap();
        assert_eq!(group.len(), 2);
        assert!(
            !turns.join(&key, waiter(4).0),
            "the leader is still at work"
        );
        assert_eq!(turns.next_group(&key).unwrap().len(), 1);
        // No one waits: the lane is gone, and the next arrival leads.
        assert!(turns.next_group(&key).is_none());
        assert!(turns.join(&key, waiter(5).0));
    }
}
