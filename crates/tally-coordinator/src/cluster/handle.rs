//! The cluster the services use, swapped whole when the membership is
//! reloaded.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tally_proto::pb;

use super::Cluster;
use crate::config::CoordinatorConfig;

/// The cluster the services use, swapped whole when the membership is
/// reloaded. Calls in flight finish on the cluster they started with.
#[derive(Debug, Clone)]
pub struct ClusterHandle(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    /// Read by every call without a lock.
    current: ArcSwap<Cluster>,
    /// One reload at a time: each builds on the cluster before it.
    reloading: parking_lot::Mutex<()>,
    /// Where this coordinator serves metrics, once it does.
    metrics_address: std::sync::OnceLock<std::net::SocketAddr>,
}

/// Why a reloaded config was not applied; the running membership stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config removes a node: its counts would vanish from reads.
    #[error(
        "node {0:?} is missing from the new config, but it is not drained: removing it would drop \
         its counts from every read (`tallyctl drain {0}` first); nothing changed"
    )]
    NodeRemoved(String),
    /// A setting every coordinator must share changed.
    #[error(
        "{0} changed: it decides where keyed increments go, so every coordinator must change it \
         at once, with a restart; nothing changed"
    )]
    Placement(&'static str),
    /// The new membership moves idempotency keys, and their records could
    /// not move now.
    #[error(
        "{0}: the new membership gives idempotency keys new owners, and their records move \
         only with every node up, none standing in for another, being drained or restored; \
         nothing changed (send SIGHUP again once it is)"
    )]
    KeysCannotMove(String),
    /// The new membership does not make a ring or a client.
    #[error("{0}; nothing changed")]
    Invalid(#[from] crate::StartError),
}

impl ClusterHandle {
    /// A handle on `cluster`.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        ClusterHandle(Arc::new(Shared {
            current: ArcSwap::new(cluster),
            reloading: parking_lot::Mutex::new(()),
            metrics_address: std::sync::OnceLock::new(),
        }))
    }

    /// Where this coordinator serves metrics, if it does.
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.0.metrics_address.get().copied()
    }

    /// Records where this coordinator serves metrics (the first call wins).
    pub(crate) fn set_metrics_address(&self, address: std::net::SocketAddr) {
        let _ = self.0.metrics_address.set(address);
    }

    /// The cluster as it is now.
    pub fn current(&self) -> Arc<Cluster> {
        self.0.current.load_full()
    }

    /// Applies a reloaded config's membership: nodes may be added, and may
    /// change address or weight; none may be removed, and `stripes` and
    /// `vnodes_per_weight` must stay. Adding a node moves no data and
    /// changes no total (a counter is the sum over every node, wherever its
    /// entries are); new increments start landing on it at once. Returns a
    /// one-line summary.
    pub fn reload(&self, config: CoordinatorConfig) -> std::result::Result<String, ReloadError> {
        let _one_at_a_time = self.0.reloading.lock();
        let current = self.0.current.load_full();
        let old = current.config();
        let drained = |id: &str| {
            current
                .shards
                .iter()
                .position(|shard| shard.node_id() == id)
                .is_some_and(|index| current.health.drain(index) == pb::DrainState::Drained)
        };
        if let Some(removed) = old
            .nodes
            .iter()
            .find(|node| config.node(&node.id).is_none() && !drained(&node.id))
        {
            return Err(ReloadError::NodeRemoved(removed.id.clone()));
        }
        if config.stripes != old.stripes {
            return Err(ReloadError::Placement("stripes"));
        }
        if config.vnodes_per_weight != old.vnodes_per_weight {
            return Err(ReloadError::Placement("vnodes_per_weight"));
        }
        let added: Vec<&str> = config
            .nodes
            .iter()
            .filter(|node| old.node(&node.id).is_none())
            .map(|node| node.id.as_str())
            .collect();
        let removed: Vec<&str> = old
            .nodes
            .iter()
            .filter(|node| config.node(&node.id).is_none())
            .map(|node| node.id.as_str())
            .collect();
        let mut summary = format!("membership reloaded: {} nodes", config.nodes.len());
        match (added.is_empty(), removed.is_empty()) {
            (true, true) => summary.push_str(", none added"),
            (false, _) => summary.push_str(&format!(", added {}", added.join(", "))),
            (true, false) => {}
        }
        if !removed.is_empty() {
            summary.push_str(&format!(", removed {} (drained)", removed.join(", ")));
        }
        let keys_move = config
            .ring()
            .map_err(crate::StartError::from)?
            .keyed_stamp(config.stripes)
            != current.keyed_stamp();
        if keys_move {
            if let Some(why) = current.keys_cannot_move(&config) {
                return Err(ReloadError::KeysCannotMove(why));
            }
        }
        let rebuilt = Cluster::build(config, Some(&current), current.metrics().clone())?;
        self.0.current.store(rebuilt);
        // Calls still in flight on the old cluster must not start a change
        // of keyed membership back to it.
        current.retire();
        Ok(summary)
    }
}
