//! Copies of each node's entries: restoring a node that started empty from
//! its replicas, and one replication round for an (origin, replica) pair
//! (the loop that drives them is [`crate::replication`]).

use futures::future::join_all;
use tally_proto::pb;
use tally_proto::shard_error::Reason;

use super::Cluster;
use crate::error::ShardCallError;

/// Where a replication round left one (origin, replica) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// The replica's copy is at this version of the origin.
    At(u64),
    /// The next round must send the whole copy.
    NeedsFull,
    /// Nothing was sent (a node is down): as before.
    Unchanged,
}

impl Cluster {
    /// Nodes that said they await a restore and are up.
    pub fn restoring_nodes(&self) -> Vec<usize> {
        (0..self.shards.len())
            .filter(|&node| self.health.is_up(node) && self.health.is_restoring(node))
            .collect()
    }

    /// Adds to node `node`, which started with an empty data directory, its
    /// earlier entries: the freshest copy among its replicas. Every replica
    /// must answer (the freshest copy may be on the one that did not); with
    /// no copy anywhere (a new node) the restore is empty.
    pub async fn restore_node(&self, node: usize) -> std::result::Result<(), ShardCallError> {
        let budget = self.config.shard_timeout;
        let id = self.shards[node].node_id();
        let candidates = &self.replicas[node];
        let copies = join_all(candidates.iter().map(|&candidate| {
            // A replica shown down gets a probe's time: every one
            // must answer, and a hung one must not hold the restore
            // (and the keyed writes waiting on it) for long.
            self.shards[candidate].copy_of(id, self.budget_for(candidate, budget))
        }))
        .await;
        let mut best: Option<pb::CopyOfResponse> = None;
        for copy in copies {
            let copy = copy?;
            if copy.found && best.as_ref().is_none_or(|best| copy.version > best.version) {
                best = Some(copy);
            }
        }
        let (version, entries, records) = best.map_or((0, Vec::new(), Vec::new()), |best| {
            (best.version, best.entries, best.records)
        });
        let count = entries.len();
        match self.shards[node].restore(entries, records, budget).await {
            Ok(()) if count == 0 => {
                tracing::info!(node_id = id, "a node started empty; no copies to restore");
            }
            Ok(()) => {
                tracing::info!(
                    node_id = id,
                    entries = count,
                    copy_version = version,
                    "restored a node that started empty"
                );
            }
            // Another coordinator (or an earlier answer that was lost) did it.
            Err(error) if error.reason() == Some(Reason::NotAwaitingRestore) => {}
            Err(error) => return Err(error),
        }
        self.health.set_restoring(node, false);
        Ok(())
    }

    /// Every (origin, replica) pair of the membership, by node index.
    pub fn replica_pairs(&self) -> Vec<(usize, usize)> {
        self.replicas
            .iter()
            .enumerate()
            .flat_map(|(origin, replicas)| replicas.iter().map(move |&replica| (origin, replica)))
            .collect()
    }

    /// Copies `origin`'s changes since `since` to `replica`, if both are
    /// up. `since`: the version the replica was last brought to; `Some(0)`
    /// for everything; `None` if this coordinator does not know (it just
    /// started, or reloaded its membership): then it asks the replica
    /// which version its copy is at, so that a coordinator restart costs a
    /// change set, not a full copy of every node.
    pub async fn replicate_pair(
        &self,
        origin: usize,
        replica: usize,
        since: Option<u64>,
    ) -> std::result::Result<Copied, ShardCallError> {
        if !self.health.is_up(origin) || !self.health.is_up(replica) {
            return Ok(Copied::Unchanged);
        }
        if self.health.is_restoring(origin) {
            // Its copies hold its earlier entries until the restore.
            return Ok(Copied::NeedsFull);
        }
        if self.health.drain(origin).handed_over() {
            // Its entries are with its adopter; it has no changes to give.
            return Ok(Copied::NeedsFull);
        }
        let budget = self.config.shard_timeout;
        let origin_id = self.shards[origin].node_id();
        let since = match since {
            Some(since) => since,
            None => {
                // The replica checks the base of every change set against
                // its copy, and the origin sends everything for a version
                // from another start: a wrong guess costs a full copy, never
                // a wrong one.
                let status = self.shards[replica].brief_status(budget).await;
                self.observe(replica, &status);
                status?
                    .replicas
                    .iter()
                    .find(|copy| copy.origin == origin_id)
                    .map_or(0, |copy| copy.version)
            }
        };
        let began = std::time::Instant::now();
        let changes = self.shards[origin].changes(since, budget).await;
        match changes.as_ref().err().and_then(ShardCallError::reason) {
            Some(Reason::AwaitsRestore) => {
                // Not a failure: the node started empty; restore it first.
                self.health.set_restoring(origin, true);
                return Ok(Copied::NeedsFull);
            }
            Some(Reason::Drained) => return Ok(Copied::NeedsFull),
            _ => {}
        }
        self.observe(origin, &changes);
        let answer = self.shards[replica]
            .replicate(origin_id, since, changes?, began, budget)
            .await;
        self.observe(replica, &answer);
        let answer = answer?;
        Ok(if answer.accepted {
            self.rounds
                .lock()
                .insert((origin, replica), (answer.version, began));
            Copied::At(answer.version)
        } else {
            Copied::NeedsFull
        })
    }
}
