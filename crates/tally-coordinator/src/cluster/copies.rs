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
        // The membership the copy says the node was open to: it holds the
        // records handed on to it then.
        let copied_open = best
            .as_ref()
            .filter(|best| !best.keyed_ring_sealed && best.keyed_ring != 0)
            .map(|best| (best.keyed_ring, best.keyed_ring_epoch));
        let (version, entries, records) = best.map_or((0, Vec::new(), Vec::new()), |best| {
            (best.version, best.entries, best.records)
        });
        let count = entries.len();
        let others = self.membership_of_the_others(node).await;
        let membership = if copied_open == Some(others) {
            others
        } else {
            (0, 0)
        };
        match self.shards[node]
            .restore(entries, records, membership, budget)
            .await
        {
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

    /// Reconciles every node that is back with the node that stood in for
    /// it while it was down (a takeover its stand-in still reports):
    /// closes the takeover, sends the node the keys the stand-in applied
    /// for it, ends the takeover. Each step is safe to repeat; a failed one
    /// is tried again next round.
    pub async fn reconcile_returned(&self) {
        for stand_in in 0..self.shards.len() {
            for origin_id in self.health.standing_in_for(stand_in) {
                let Some(origin) = self
                    .shards
                    .iter()
                    .position(|shard| shard.node_id() == origin_id)
                else {
                    continue;
                };
                if !self.health.is_up(origin)
                    || !self.health.is_up(stand_in)
                    || self.health.is_restoring(origin)
                {
                    continue;
                }
                if let Err(error) = self.reconcile(origin, stand_in).await {
                    tracing::warn!(
                        origin = origin_id,
                        stand_in = self.shards[stand_in].node_id(),
                        %error,
                        "reconciling a node with its stand-in failed; will retry"
                    );
                }
            }
        }
    }

    async fn reconcile(&self, origin: usize, stand_in: usize) -> Result<(), ShardCallError> {
        let budget = self.config.shard_timeout;
        let origin_id = self.shards[origin].node_id();
        let stand_in_id = self.shards[stand_in].node_id();
        let closed = self.shards[stand_in]
            .stand_in(origin_id, None, budget)
            .await?;
        if closed.takeover == 0 {
            return Ok(());
        }
        // The stand-in's own keys are among its records: keep the keys of
        // the stripes the origin owns.
        let keys: Vec<pb::ReconcileKey> = closed
            .records
            .into_iter()
            .filter_map(|record| {
                let stripe = tally_ring::idempotency_stripe(&record.key, self.config.stripes);
                (self.ring.owner(&record.counter, stripe) == origin).then_some(pb::ReconcileKey {
                    counter: record.counter,
                    key: record.key,
                    delta: record.delta,
                    stripe,
                })
            })
            .collect();
        let sent = keys.len();
        let reconciled = self.shards[origin]
            .reconcile(stand_in_id, closed.takeover, keys, budget)
            .await?;
        self.shards[stand_in]
            .stand_in(origin_id, Some((closed.takeover, &reconciled)), budget)
            .await?;
        self.health.clear_taken_over(origin);
        tracing::info!(
            origin = origin_id,
            stand_in = stand_in_id,
            keys = sent,
            reverted = reconciled.reverted,
            "reconciled a node that is back with its stand-in"
        );
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
        if answer.as_ref().err().and_then(ShardCallError::reason) == Some(Reason::StandingIn) {
            // Its copy stays frozen until the origin has reconciled.
            return Ok(Copied::Unchanged);
        }
        self.observe(replica, &answer);
        let answer = answer?;
        Ok(if answer.accepted {
            self.rounds
                .lock()
                .insert((origin, replica), (answer.version, began));
            let took = began.elapsed().min(self.config.shard_timeout);
            self.round_lag[origin].store(
                took.as_millis() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            Copied::At(answer.version)
        } else {
            Copied::NeedsFull
        })
    }
}
