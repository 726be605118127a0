//! Copies each shard node's own entries to its replicas, so that a read can
//! count a node's part while the node is down.
//!
//! The replicas of a node are the next `replication_factor - 1` distinct
//! nodes on the ring after the node's first token: a pure function of the
//! membership, like the ring. Every `replication_interval_ms`, for every
//! (origin, replica) pair that is up, the coordinator asks the origin for
//! its changes since the version the replica was last brought to (the
//! first time, the version the replica says its copy is at; whenever the
//! replica is not at that base, everything) and hands them to the replica. Copies are only ever of whole origins at
//! one version of theirs, and a read takes one part per origin (the origin's
//! own answer, else the freshest copy), so nothing is counted twice.
//!
//! Several coordinators may replicate the same pair: a replica accepts a
//! change set only if its copy is at or past the set's base and behind its
//! version, so their pushes interleave safely.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::future::join_all;
use tally_ring::Ring;

use crate::cluster::{Cluster, Copied};

/// The replicas of node `origin`: the next `factor - 1` distinct nodes on
/// the ring after its first token (fewer if there are not that many).
pub fn replicas_of(ring: &Ring, origin: usize, factor: usize) -> Vec<usize> {
    let id = &ring.nodes()[origin].id;
    ring.successors(tally_ring::token_hash(id, 0))
        .filter(|&node| node != origin)
        .take(factor.saturating_sub(1))
        .collect()
}

/// Replicates every `interval` until the cluster is dropped (stopped, or
/// replaced by a reloaded membership, whose own loop takes over).
pub async fn replication_loop(cluster: Weak<Cluster>, interval: Duration) {
    // Per (origin, replica): the origin's version the replica was last
    // brought to (0: send everything); absent: not known yet, ask the
    // replica (see `Cluster::replicate_pair`).
    let mut progress: HashMap<(usize, usize), u64> = HashMap::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        for node in cluster.restoring_nodes() {
            if let Err(error) = cluster.restore_node(node).await {
                tracing::warn!(node, %error, "restore of a node that started empty failed; will retry");
            }
        }
        cluster.reconcile_returned().await;
        let rounds = cluster.replica_pairs().into_iter().map(|pair| {
            let since = progress.get(&pair).copied();
            let cluster = Arc::clone(&cluster);
            async move { (pair, cluster.replicate_pair(pair.0, pair.1, since).await) }
        });
        for (pair, result) in join_all(rounds).await {
            match result {
                Ok(Copied::At(version)) => {
                    progress.insert(pair, version);
                }
                Ok(Copied::NeedsFull) => {
                    progress.insert(pair, 0);
                }
                Ok(Copied::Unchanged) => {}
                Err(error) => {
                    // A replica falling behind weakens reads while the
                    // origin is down: an operator must see it.
                    let nodes = cluster.ring().nodes();
                    tracing::warn!(
                        origin = nodes[pair.0].id,
                        replica = nodes[pair.1].id,
                        %error,
                        "copying a node's entries to its replica failed; will retry"
                    );
                    cluster.record_replication_failure(pair.0);
                }
            }
        }
    }
}
