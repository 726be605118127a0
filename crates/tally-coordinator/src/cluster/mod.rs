//! What the coordinator does with a request once it is valid: route
//! increments over the ring, fan reads and deletes out to every node, drain
//! and restore nodes, copy their entries to their replicas.
//!
//! A [`Cluster`] is one membership: its ring, a client per node, and what
//! this coordinator knows of each node's health. Its work is split by
//! concern: `write` (routing increments), `read` (reads and deletes),
//! `drain`, `copies` (restores and replication rounds), and
//! `handle` (the current cluster, swapped whole on a reload).

mod align;
mod copies;
mod drain;
mod handle;
mod read;
mod write;

use std::sync::Arc;

use tally_ring::Ring;
use tokio::time::Instant;

use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result, ShardCallError};
use crate::health::{probe_loop, HealthBoard, NodeHealth};
use crate::model::StripeIncrement;
use crate::placement::{write_target, Target};
use crate::shard_client::{BatchSettings, ShardClient};
use tally_proto::domain::Increment;

pub use copies::Copied;
pub use handle::{ClusterHandle, ReloadError};
pub use read::Total;

/// The membership, its ring, and a client per node.
#[derive(Debug)]
pub struct Cluster {
    config: CoordinatorConfig,
    ring: Ring,
    /// Indexed like `ring.nodes()`.
    shards: Vec<ShardClient>,
    /// Indexed like `ring.nodes()`.
    health: Arc<HealthBoard>,
    /// Each node's replicas (by index): fixed by the ring and the
    /// replication factor.
    replicas: Vec<Vec<usize>>,
    /// Each node's stand-in (by index) when no drain recorded an adopter:
    /// the next node of the ring after its first token, the adopter a new
    /// drain picks (`drain`), which takes its keyed writes once it holds
    /// its records (`placement`).
    stand_ins: Vec<Option<usize>>,
    /// Per `(origin, replica)`: the version this coordinator last brought
    /// the replica's copy to, and when (this process's clock) that round
    /// began. A read vouches by it for a copy whose replica restarted and
    /// knows no age (`merge::NodeView::vouched`).
    rounds:
        parking_lot::Mutex<std::collections::HashMap<(usize, usize), (u64, std::time::Instant)>>,
    /// Per node: how long the last replication round that reached a copy
    /// of it took, in ms (from its start to the replica's answer), at most
    /// the shard timeout: part of its copies' allowance.
    round_lag: Vec<std::sync::atomic::AtomicU64>,
    /// Per node: when a restore asked for by a keyed write last finished.
    /// Held across the restore, so concurrent writes wait for one restore
    /// instead of each running their own.
    write_restores: Vec<tokio::sync::Mutex<Option<std::time::Instant>>>,
    /// The membership as keyed increments carry it
    /// (`tally_ring::Ring::keyed_stamp`).
    keyed_stamp: u64,
    /// Where this cluster's change of keyed membership stands (`align`).
    alignment: Arc<align::Alignment>,
    /// The coordinator's series, kept across reloads.
    metrics: Arc<crate::metrics::CoordinatorMetrics>,
    /// The TLS the coordinator speaks to shards with (it presents its
    /// certificate; a shard's must be the CA's): none, plaintext. Loaded
    /// once and kept across reloads; [`Cluster::reload_client_tls`] reads
    /// its files again.
    client_tls: Option<Arc<tally_runtime::tls::ClientTls>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.alignment.close();
    }
}

impl Cluster {
    /// Builds the ring and a lazily connecting client per node, and starts
    /// probing every node's health. Needs a tokio runtime.
    pub fn new(config: CoordinatorConfig) -> std::result::Result<Arc<Self>, crate::StartError> {
        Self::build(
            config,
            None,
            Arc::new(crate::metrics::CoordinatorMetrics::disabled()),
        )
    }

    /// [`Cluster::new`], counting into `metrics`.
    pub fn with_metrics(
        config: CoordinatorConfig,
        metrics: Arc<crate::metrics::CoordinatorMetrics>,
    ) -> std::result::Result<Arc<Self>, crate::StartError> {
        Self::build(config, None, metrics)
    }

    /// [`Cluster::new`] for a reloaded membership: nodes that keep their id
    /// and address keep their client (connection, batcher, queued work) and
    /// their health.
    fn build(
        config: CoordinatorConfig,
        previous: Option<&Cluster>,
        metrics: Arc<crate::metrics::CoordinatorMetrics>,
    ) -> std::result::Result<Arc<Self>, crate::StartError> {
        let ring = config.ring()?;
        let client_tls = match (previous, &config.tls) {
            (Some(previous), _) => previous.client_tls.clone(),
            (None, Some(files)) => Some(tally_runtime::tls::ClientTls::load(files.clone())?),
            (None, None) => None,
        };
        let settings = BatchSettings {
            shard_timeout: config.shard_timeout,
            max_in_flight_batches: config.max_in_flight_batches_per_shard,
            max_increments_per_batch: config.max_increments_per_shard_batch,
        };
        let shards = ring
            .nodes()
            .iter()
            .map(|node| {
                let address = &config
                    .node(&node.id)
                    .expect("the ring is built from the config's nodes")
                    .address;
                let kept = previous.and_then(|previous| {
                    previous
                        .shards
                        .iter()
                        .find(|shard| shard.node_id() == node.id && shard.address() == address)
                });
                match kept {
                    Some(shard) => Ok(shard.clone()),
                    None => ShardClient::new(
                        &node.id,
                        address,
                        client_tls.as_ref(),
                        settings,
                        metrics.node(&node.id),
                    ),
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let health = Arc::new(HealthBoard::new(
            ring.nodes().iter().map(|node| Arc::from(node.id.as_str())),
        ));
        if let Some(previous) = previous {
            for (index, shard) in shards.iter().enumerate() {
                let known = previous.shards.iter().position(|old| {
                    old.node_id() == shard.node_id() && old.address() == shard.address()
                });
                if let Some(old_index) = known {
                    health.restore(index, previous.health.get(old_index));
                }
            }
        }
        for (index, shard) in shards.iter().enumerate() {
            tokio::spawn(probe_loop(
                Arc::downgrade(&health),
                index,
                shard.clone(),
                config.health_interval,
                config.health_timeout,
            ));
        }
        let replication_interval = config.replication_interval;
        let replicas = (0..shards.len())
            .map(|node| crate::replication::replicas_of(&ring, node, config.replication_factor))
            .collect();
        let stand_ins: Vec<Option<usize>> = (0..shards.len())
            .map(|node| {
                crate::replication::replicas_of(&ring, node, 2)
                    .first()
                    .copied()
            })
            .collect();
        let shard_count = shards.len();
        let keyed_stamp = ring.keyed_stamp(config.stripes);
        let alignment = Arc::new(align::Alignment::default());
        let cluster = Arc::new(Cluster {
            keyed_stamp,
            alignment: Arc::clone(&alignment),
            config,
            ring,
            shards,
            health,
            replicas,
            write_restores: (0..stand_ins.len()).map(|_| Default::default()).collect(),
            stand_ins,
            rounds: Default::default(),
            round_lag: (0..shard_count).map(|_| Default::default()).collect(),
            metrics,
            client_tls,
        });
        tokio::spawn(align::align_loop(
            Arc::downgrade(&cluster),
            alignment,
            cluster.config.health_interval,
        ));
        // Also without replicas: it restores nodes that started empty.
        tokio::spawn(crate::replication::replication_loop(
            Arc::downgrade(&cluster),
            replication_interval,
        ));
        Ok(cluster)
    }

    /// The TLS the coordinator speaks to shards with, if any (to reload
    /// it: `Security::reload`).
    pub fn client_tls(&self) -> Option<&Arc<tally_runtime::tls::ClientTls>> {
        self.client_tls.as_ref()
    }

    /// The configuration this cluster was built from.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The ring.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The membership as keyed increments carry it
    /// (`tally_ring::Ring::keyed_stamp`).
    pub fn keyed_stamp(&self) -> u64 {
        self.keyed_stamp
    }

    /// The node clients, indexed like `ring().nodes()`.
    pub fn shards(&self) -> &[ShardClient] {
        &self.shards
    }

    /// The coordinator's series.
    pub fn metrics(&self) -> &Arc<crate::metrics::CoordinatorMetrics> {
        &self.metrics
    }

    /// Node `index`'s series.
    pub(crate) fn node_metrics(&self, index: usize) -> &crate::metrics::NodeMetrics {
        self.shards[index].metrics()
    }

    /// Per `(origin, replica)` pair this coordinator has replicated: how
    /// long ago its last successful round began.
    pub(crate) fn last_rounds(&self) -> Vec<(usize, usize, std::time::Duration)> {
        self.rounds
            .lock()
            .iter()
            .map(|(&(origin, replica), &(_, began))| (origin, replica, began.elapsed()))
            .collect()
    }

    /// Node `index`'s health as this coordinator sees it.
    pub fn health(&self, index: usize) -> NodeHealth {
        self.health.get(index)
    }

    /// Counts a failed copy of node `origin`'s entries to a replica (shown
    /// by `ClusterStatus`).
    pub fn record_replication_failure(&self, origin: usize) {
        self.health.record_replication_failure(origin);
    }

    /// Where an increment of `(counter, stripe)` goes now
    /// (`placement::write_target`).
    fn target(&self, counter: &str, stripe: u32, keyed: bool) -> Target {
        let hash = tally_ring::key_hash(counter, stripe);
        let owner = self.ring.owner_of_hash(hash);
        let target = write_target(
            owner,
            || self.ring.successors(hash),
            || self.stand_in(owner),
            |node| self.health.write_state(node),
            keyed,
        );
        if target.node != owner {
            self.node_metrics(owner).failovers.increment(1);
        }
        target
    }

    /// The node that holds `owner`'s records once its drain handed them
    /// over: the adopter the drain recorded (a drain resumed after a reload
    /// keeps its first adopter), else the ring's next node after it.
    fn stand_in(&self, owner: usize) -> Option<usize> {
        match self.health.adopter(owner) {
            Some(adopter) => self
                .shards
                .iter()
                .position(|shard| shard.node_id() == &*adopter),
            None => self.stand_ins[owner],
        }
    }

    /// Waits, a probe's time at most, until this coordinator sees `owner`
    /// up: its stand-in said it is back (another coordinator may have seen
    /// it first), so its probe goes at once.
    async fn wait_until_seen_up(&self, owner: usize) {
        if self.health.is_up(owner) {
            return;
        }
        self.health.probe_soon(owner);
        let until = Instant::now() + self.config.health_interval + self.config.health_timeout;
        while !self.health.is_up(owner) && Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Node `stand_in` refused an increment it was sent on some down
    /// node's behalf (it may no longer stand in for it: another coordinator
    /// saw the node back and reconciled it): probe each down node it
    /// stands in for now, not after the probe's backoff.
    fn probe_owners_stood_in_for_by(&self, stand_in: usize) {
        for owner in 0..self.shards.len() {
            if self.stand_in(owner) == Some(stand_in) && !self.health.is_up(owner) {
                self.health.probe_soon(owner);
            }
        }
    }

    /// `increment` placed on `stripe`, for `target`.
    fn placed(&self, increment: Increment, stripe: u32, target: Target) -> StripeIncrement {
        let mut placed = StripeIncrement::new(increment, stripe);
        if placed.key.is_some() {
            placed.ring = self.keyed_stamp;
        }
        self.stand_in_for(&mut placed, target);
        placed
    }

    /// Marks `increment` for `target`: on behalf of the owner when the
    /// target stands in for it, and, for a takeover, with the oldest copy
    /// that may stand in for the owner (the bound a read would put on it).
    fn stand_in_for(&self, increment: &mut StripeIncrement, target: Target) {
        increment.on_behalf_of = target
            .on_behalf_of
            .map(|owner| self.shards[owner].node_id_arc());
        increment.takeover_max_copy_age_ms = match target.on_behalf_of {
            Some(owner) if target.takeover => {
                // Its writes go around it from now until it has reconciled:
                // reads will count the stand-in's frozen copy as its part.
                self.health.mark_taken_over(owner, target.node);
                let since = self.health.get(owner).since;
                let max = self.copy_allowance(owner).saturating_add(since.elapsed());
                (max.as_millis() as u64).max(1)
            }
            _ => 0,
        };
    }

    /// How much older than node `origin`'s failure (as this coordinator
    /// saw it) a replication round of its copy may have begun for the copy
    /// to stand in for it: one replication interval, the detection window,
    /// and twice its last round's duration (the last round to reach the
    /// copy, and the next, cut short by the failure, which a round slower
    /// than the interval pushes back).
    pub(crate) fn copy_allowance(&self, origin: usize) -> std::time::Duration {
        let round = std::time::Duration::from_millis(
            self.round_lag[origin].load(std::sync::atomic::Ordering::Relaxed),
        );
        self.config.replication_interval
            + self.config.health_interval
            + self.config.health_timeout * crate::health::MISSES_TO_DOWN
            + round * 2
    }

    /// Restores node `node` for a keyed write that found it awaiting its
    /// restore, unless a restore finished since `asked`: one at a time per
    /// node, however many writes ask.
    async fn restore_for_write(&self, node: usize, asked: std::time::Instant) {
        let mut last = self.write_restores[node].lock().await;
        if last.is_some_and(|finished| finished > asked) {
            return;
        }
        match self.restore_node(node).await {
            Ok(()) => *last = Some(std::time::Instant::now()),
            Err(error) => {
                tracing::debug!(node, %error, "a restore asked for by a keyed write failed")
            }
        }
    }

    /// Records a call's outcome on the health board.
    ///
    /// A timeout is only a miss (`health`): the node is down after misses
    /// in a row with no answer between. It counts only if the call had a
    /// probe's time at least: a call cut short by a client's tight deadline
    /// says nothing about the node, and must not take it out of routing
    /// for everyone.
    fn observe<T>(&self, node: usize, result: &std::result::Result<T, ShardCallError>) {
        let least = self.config.shard_timeout.min(self.config.health_timeout);
        match result {
            Ok(_) => self.health.record_success(node),
            Err(error @ ShardCallError::TimedOut(budget)) => {
                if *budget >= least {
                    let now = std::time::Instant::now();
                    let sent = now.checked_sub(*budget).unwrap_or(now);
                    let _ = self.health.record_miss(node, sent, &error.to_string());
                }
            }
            Err(
                ShardCallError::NotSent(_) | ShardCallError::Down(_) | ShardCallError::Abandoned(_),
            ) => {}
            Err(error) => self.health.record_failure(node, &error.to_string()),
        }
    }

    /// A call's budget for node `index`: a node known to be down gets no
    /// more than a probe's, so one hung node does not hold every read for
    /// the whole shard timeout, while a node that is back is still found.
    pub(crate) fn budget_for(
        &self,
        index: usize,
        budget: std::time::Duration,
    ) -> std::time::Duration {
        if self.health.is_up(index) {
            budget
        } else {
            budget.min(self.config.health_timeout)
        }
    }

    /// A call to node `node` failed: UNAVAILABLE naming it.
    fn unavailable(&self, node: usize, error: ShardCallError) -> CoordinatorError {
        CoordinatorError::Unavailable(vec![(self.shards[node].node_id().to_string(), error)])
    }
}

/// Runs `future` until the client's deadline, if there is one.
async fn with_deadline<T>(
    deadline: Option<Instant>,
    future: impl std::future::Future<Output = T>,
) -> Result<T> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, future)
            .await
            .map_err(|_| CoordinatorError::DeadlineExceeded),
        None => Ok(future.await),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_past_the_clients_deadline_is_deadline_exceeded_at_the_deadline() {
        let start = Instant::now();
        let deadline = start + Duration::from_millis(100);
        let late = with_deadline(Some(deadline), tokio::time::sleep(Duration::from_secs(5))).await;
        assert!(matches!(late, Err(CoordinatorError::DeadlineExceeded)));
        assert_eq!(Instant::now(), deadline);
        let in_time = with_deadline(Some(deadline + Duration::from_millis(50)), async { 7 }).await;
        assert_eq!(in_time.unwrap(), 7);
        // No deadline: as long as it takes.
        let slow = with_deadline(None, async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            8
        })
        .await;
        assert_eq!(slow.unwrap(), 8);
    }
}
