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

use crate::cluster::{Cluster, ClusterHandle, Total};
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

/// A lane: one counter's (its stored name's) limited increments, however
/// they read. Two lanes for one counter would each decide on the same
/// total, and together pass the limit.
type LaneKey = String;

/// One limited increment waiting for its group.
struct Waiter {
    increment: Increment,
    limit: i64,
    allow_partial: bool,
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
    let key = increment.counter.as_str().to_string();
    let (answer, answered) = oneshot::channel();
    let waiter = Waiter {
        increment,
        limit,
        allow_partial,
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
    // A dropped sender: the lane's leader failed (see `Leader`).
    answered.unwrap_or_else(|_| Err(leader_failed()))
}

fn leader_failed() -> Status {
    Status::internal(
        "the task deciding this counter's limited increments failed; nothing of this call was \
         applied unless its group's write was under way (in doubt)",
    )
}

/// Decides `key`'s groups until no one waits.
async fn lead(cluster: ClusterHandle, turns: Arc<Turns>, key: LaneKey) {
    let mut leader = Leader {
        turns: &turns,
        key: &key,
        done: false,
    };
    while let Some(group) = turns.next_group(&key) {
        decide(&cluster, group).await;
    }
    leader.done = true;
}

/// A lane's leader at work. If it stops without having found its lane
/// empty (a panic unwinding it), the lane goes and everyone still waiting
/// gets an error: a later call leads a new lane instead of queueing behind
/// a leader that is gone. (The group it was deciding holds its own
/// senders: dropped with it, each of its callers gets the same error.)
struct Leader<'a> {
    turns: &'a Turns,
    key: &'a LaneKey,
    done: bool,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let waiting = self.turns.lanes.lock().remove(self.key);
        for waiter in waiting.into_iter().flatten() {
            let _ = waiter.answer.send(Err(leader_failed()));
        }
    }
}

/// Reads the total for `group`: strictly if any member needs a complete
/// total; if that read misses a part, the members who allow a partial
/// total read again without it, and the others get the error. Returns the
/// members left to decide, with their total.
async fn read_for(
    cluster: &Cluster,
    group: Vec<Waiter>,
    deadline: Option<Instant>,
) -> Option<(Vec<Waiter>, Total)> {
    let counter = group[0].increment.counter.clone();
    let read = |allow_partial| {
        let counter = counter.clone();
        async move {
            cluster
                .totals(vec![counter], allow_partial, deadline)
                .await
                .and_then(|mut totals| totals.pop().expect("one total per counter").into_result())
        }
    };
    let strict = group.iter().any(|waiter| !waiter.allow_partial);
    let error = match read(!strict).await {
        Ok(total) => return Some((group, total)),
        Err(error) => error,
    };
    let partial_may_help = strict
        && matches!(error, CoordinatorError::Unavailable(_))
        && group.iter().any(|waiter| waiter.allow_partial);
    let (partial, refused): (Vec<Waiter>, Vec<Waiter>) = if partial_may_help {
        group.into_iter().partition(|waiter| waiter.allow_partial)
    } else {
        (Vec::new(), group)
    };
    let status = Status::from(error);
    for waiter in refused {
        let _ = waiter.answer.send(Err(status.clone()));
    }
    if partial.is_empty() {
        return None;
    }
    match read(true).await {
        Ok(total) => Some((partial, total)),
        Err(error) => {
            let status = Status::from(error);
            for waiter in partial {
                let _ = waiter.answer.send(Err(status.clone()));
            }
            None
        }
    }
}

/// One group: one read, a decision each in arrival order, one write.
async fn decide(cluster: &ClusterHandle, group: Vec<Waiter>) {
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
    let Some((group, before)) = read_for(&cluster, group, deadline).await else {
        return;
    };
    let mut running = i128::from(before.value);
    let mut admitted = Vec::new();
    let mut decided = Vec::with_capacity(group.len());
    for waiter in group {
        // Gave up while the total was read: not applied.
        if waiter.answer.is_closed() {
            continue;
        }
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
    let applied = admitted.len() as u64;
    cluster
        .metrics()
        .limit_group(applied, decided.len() as u64 - applied);
    let written = if admitted.is_empty() {
        Ok(0)
    } else {
        cluster.increment(admitted, deadline).await
    };
    let failed = written.err().map(Status::from);
    tracing::trace!(decided = decided.len(), "limited increments decided");
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

    fn waiter(delta: i64, allow_partial: bool) -> Waiter {
        let (answer, _) = oneshot::channel();
        let counter = CounterName::try_from("c".to_string()).unwrap();
        Waiter {
            increment: Increment::plain(counter, delta, None),
            limit: 10,
            allow_partial,
            deadline: None,
            answer,
        }
    }

    #[test]
    fn a_counter_has_one_lane_and_one_leader_who_takes_everyone_waiting() {
        let turns = Turns::default();
        let key = "c".to_string();
        assert!(turns.join(&key, waiter(1, false)), "the first leads");
        assert!(!turns.join(&key, waiter(2, false)), "the second waits");
        assert!(
            !turns.join(&key, waiter(3, true)),
            "one lane however a call reads: two would each decide on one total"
        );
        assert!(
            turns.join(&"d".to_string(), waiter(4, false)),
            "another counter leads its own"
        );
        assert_eq!(turns.next_group(&key).unwrap().len(), 3);
        assert!(
            !turns.join(&key, waiter(5, false)),
            "the leader is still at work"
        );
        assert_eq!(turns.next_group(&key).unwrap().len(), 1);
        // No one waits: the lane is gone, and the next arrival leads.
        assert!(turns.next_group(&key).is_none());
        assert!(turns.join(&key, waiter(6, false)));
    }

    #[tokio::test]
    async fn a_leader_that_fails_answers_everyone_waiting_and_frees_the_lane() {
        let turns = Turns::default();
        let key = "c".to_string();
        let (answer, answered) = oneshot::channel();
        assert!(turns.join(&key, waiter(1, false)));
        assert!(!turns.join(
            &key,
            Waiter {
                answer,
                ..waiter(2, false)
            }
        ));
        // A leader unwound before it found its lane empty.
        drop(Leader {
            turns: &turns,
            key: &key,
            done: false,
        });
        let status = answered.await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(
            turns.join(&key, waiter(3, false)),
            "a new leader, not a queue behind none"
        );
    }
}
