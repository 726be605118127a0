//! Increments under a limit: read the total, decide, apply.
//!
//! An exact global limit would need every limited increment of a counter
//! to pass through one place, or a round of agreement per call. Tally does
//! the honest cheap thing: each coordinator lets the limited increments of
//! one counter take turns ([`Turns`]), and a turn reads the total (every
//! node's part), applies the increment only if the total after it stays at
//! or under the limit, and ends once the increment is acknowledged. So:
//!
//! - through one coordinator, limited increments never pass the limit
//!   together: each decides on a total that holds every one before it;
//! - through several, a coordinator's decision cannot see the limited
//!   increments in flight on the others: the limit may be passed by at
//!   most the sum of the deltas in flight on the other coordinators;
//! - increments without a limit are never held back and count as soon as
//!   they are acknowledged.
//!
//! docs/GUARANTEES.md states this with the tests that hold it to it.

use std::collections::HashMap;
use std::sync::Arc;

use tally_proto::domain::Increment;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::error::{CoordinatorError, Result};

/// The turns of limited increments, one queue per counter (its stored
/// name) while any is waiting or running. Lives as long as the service,
/// across membership reloads.
#[derive(Debug, Default)]
pub struct Turns {
    lanes: parking_lot::Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// A counter's turn: held from before the read to after the increment is
/// acknowledged (or refused). Dropping it, even before it was granted (a
/// cancelled call), lets the next one go and forgets an idle counter.
struct Turn<'a> {
    turns: &'a Turns,
    counter: String,
    lane: Option<Arc<Mutex<()>>>,
    granted: Option<OwnedMutexGuard<()>>,
}

impl Turns {
    async fn take(&self, counter: &str) -> Turn<'_> {
        let lane = self
            .lanes
            .lock()
            .entry(counter.to_string())
            .or_default()
            .clone();
        let mut turn = Turn {
            turns: self,
            counter: counter.to_string(),
            lane: Some(lane.clone()),
            granted: None,
        };
        turn.granted = Some(lane.lock_owned().await);
        turn
    }

    /// Counters with a turn taken or waited for (for tests).
    #[cfg(test)]
    fn busy(&self) -> usize {
        self.lanes.lock().len()
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.granted = None;
        drop(self.lane.take());
        let mut lanes = self.turns.lanes.lock();
        // Clones are made under this lock: one left means only the map's.
        if lanes
            .get(&self.counter)
            .is_some_and(|lane| Arc::strong_count(lane) == 1)
        {
            lanes.remove(&self.counter);
        }
    }
}

/// What a limited increment did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The delta, or 0 when the limit refused it.
    pub applied: i64,
    /// The total read before deciding, plus `applied`.
    pub total: i64,
    /// Every node's part was read.
    pub complete: bool,
}

/// Applies `increment` (no idempotency key, delta >= 0: the edge checked)
/// if the counter's total after it would be at most `limit`.
pub async fn increment_within(
    cluster: &Cluster,
    turns: &Turns,
    increment: Increment,
    limit: i64,
    allow_partial: bool,
    deadline: Option<Instant>,
) -> Result<Limited> {
    let counter = increment.counter.clone();
    let _turn = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, turns.take(counter.as_str()))
            .await
            .map_err(|_| CoordinatorError::DeadlineExceeded)?,
        None => turns.take(counter.as_str()).await,
    };
    let before = cluster
        .totals(vec![counter], allow_partial, deadline)
        .await?
        .pop()
        .expect("one total per counter")
        .into_result()?;
    let after = i128::from(before.value) + i128::from(increment.delta);
    if after > i128::from(limit) {
        return Ok(Limited {
            applied: 0,
            total: before.value,
            complete: before.complete,
        });
    }
    let delta = increment.delta;
    cluster.increment(vec![increment], deadline).await?;
    Ok(Limited {
        applied: delta,
        // At most `limit`, at least the total before (delta >= 0): an i64.
        total: after as i64,
        complete: before.complete,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_of_one_counter_go_one_at_a_time_and_idle_counters_are_forgotten() {
        let turns = Turns::default();
        let first = turns.take("a").await;
        let other = turns.take("b").await;
        assert_eq!(turns.busy(), 2);
        let mut second = Box::pin(turns.take("a"));
        assert!(
            futures::poll!(second.as_mut()).is_pending(),
            "one turn at a time"
        );
        drop(first);
        let second = second.await;
        drop(second);
        drop(other);
        assert_eq!(turns.busy(), 0);
        // A wait given up before its turn leaves nothing behind either.
        let held = turns.take("a").await;
        let mut abandoned = Box::pin(turns.take("a"));
        assert!(futures::poll!(abandoned.as_mut()).is_pending());
        drop(abandoned);
        drop(held);
        assert_eq!(turns.busy(), 0);
    }
}
