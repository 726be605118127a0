//! Draining a node: its entries to the next node of the ring, exactly
//! once, so that it can leave the membership.

use tally_proto::pb;

use super::Cluster;
use crate::error::{CoordinatorError, Result, ShardCallError};

impl Cluster {
    /// Drains node `node_id`: moves its entries to the next node of the
    /// ring exactly once, so that it can leave the membership. Each step is
    /// safe to repeat, so a drain interrupted by a crash (of anything)
    /// resumes when asked again:
    ///
    /// 1. the node stops taking writes (and flushes);
    /// 2. its whole final state goes to the adopter's copy of it;
    /// 3. it records the hand-over: reads now count the adopter's copy;
    /// 4. the adopter adds the copy to its own entries and drops it, in one
    ///    atomic batch (reads see before or after, never both);
    /// 5. the node records that it is drained: a reload may now drop it.
    ///
    /// Returns the adopter and how many entries it took.
    pub async fn drain(&self, node_id: &str) -> Result<(String, u64)> {
        let node = self
            .shards
            .iter()
            .position(|shard| shard.node_id() == node_id)
            .ok_or_else(|| CoordinatorError::UnknownNode(node_id.to_string()))?;
        let budget = self.config.shard_timeout;
        let failed = |node: usize, error: ShardCallError| self.unavailable(node, error);
        let shard = &self.shards[node];
        // A node that started empty must get its earlier entries back
        // before it can hand them on.
        let status = shard
            .brief_status(budget)
            .await
            .map_err(|error| failed(node, error))?;
        if status.restoring {
            self.restore_node(node)
                .await
                .map_err(|error| failed(node, error))?;
        }
        // A drain that got as far as the hand-over resumes with the adopter
        // and version the node recorded, whatever the ring says now.
        let adopter_id = if status.drain_adopter.is_empty() {
            let successor = self.stand_ins[node].ok_or_else(|| {
                CoordinatorError::Precondition("the last node cannot be drained".into())
            })?;
            self.shards[successor].node_id().to_string()
        } else {
            status.drain_adopter.clone()
        };
        let adopter = self
            .shards
            .iter()
            .position(|shard| shard.node_id() == adopter_id)
            .ok_or_else(|| {
                CoordinatorError::Precondition(format!(
                    "{node_id} was handed over to {adopter_id}, which is not in the membership"
                ))
            })?;
        let adopter_status = self.shards[adopter]
            .brief_status(budget)
            .await
            .map_err(|error| failed(adopter, error))?;
        if adopter_status.drain_state() != pb::DrainState::Serving {
            return Err(CoordinatorError::Precondition(format!(
                "{adopter_id}, which would take {node_id}'s entries, is being drained itself"
            )));
        }

        // 1. Route around it here at once. Writes already on their way to
        // it, from here or from coordinators that learn of the drain later
        // from their probes, come back unapplied (REDIRECT) and are routed
        // again: none fails.
        self.health.set_drain(node, pb::DrainState::Draining);
        shard
            .drain(pb::DrainPhase::StopWrites, "", 0, budget)
            .await
            .map_err(|error| failed(node, error))?;
        let status = shard
            .brief_status(budget)
            .await
            .map_err(|error| failed(node, error))?;
        let state = status.drain_state();
        if state == pb::DrainState::Serving {
            // It acknowledged the stop but says it takes writes: handing
            // over a copy now could lose what it takes next.
            return Err(CoordinatorError::Precondition(format!(
                "{node_id} acknowledged the stop of writes but reports none: nothing was handed \
                 over; run the drain again"
            )));
        }
        let version = if state == pb::DrainState::Draining {
            // 2. Its whole final state to the adopter's copy.
            let began = std::time::Instant::now();
            let changes = shard
                .changes(0, budget)
                .await
                .map_err(|error| failed(node, error))?;
            let version = changes.version;
            let answer = self.shards[adopter]
                .replicate(node_id, 0, changes, began, budget)
                .await
                .map_err(|error| failed(adopter, error))?;
            if !answer.accepted || answer.version < version {
                return Err(CoordinatorError::Precondition(format!(
                    "{adopter_id} did not take the final copy of {node_id}"
                )));
            }
            // 3. The hand-over: reads count the adopter's copy.
            shard
                .drain(pb::DrainPhase::HandedOver, &adopter_id, version, budget)
                .await
                .map_err(|error| failed(node, error))?;
            version
        } else {
            status.drain_version
        };
        self.health.set_drain(node, pb::DrainState::HandedOver);

        // 4. The adopter adds the copy to its own entries.
        let entries = self.shards[adopter]
            .adopt(node_id, version, budget)
            .await
            .map_err(|error| failed(adopter, error))?;
        // Before the node may leave, the adopter's replicas must hold what
        // it adopted: else a failure of the adopter now would lose it.
        self.wait_for_copies_of(adopter).await?;
        // Nobody else may count an old copy of it again.
        for (other, client) in self.shards.iter().enumerate() {
            if other != node && other != adopter {
                client
                    .drop_copy(node_id, budget)
                    .await
                    .map_err(|error| failed(other, error))?;
            }
        }
        // 5. Drained: a reload may drop it now.
        shard
            .drain(pb::DrainPhase::Adopted, &adopter_id, version, budget)
            .await
            .map_err(|error| failed(node, error))?;
        self.health.set_drain(node, pb::DrainState::Drained);
        tracing::info!(node_id, adopter = adopter_id, entries, "drained");
        Ok((adopter_id, entries))
    }

    /// Waits until every replica of node `origin` holds a copy at the
    /// version `origin` has now (the replication loop brings it there
    /// within an interval). Bounded; an error says to resume later.
    async fn wait_for_copies_of(&self, origin: usize) -> Result<()> {
        let budget = self.config.shard_timeout;
        let origin_id = self.shards[origin].node_id();
        let failed = |node: usize, error: ShardCallError| self.unavailable(node, error);
        let target = self.shards[origin]
            .brief_status(budget)
            .await
            .map_err(|error| failed(origin, error))?
            .replication_version;
        let limit = (self.config.replication_interval + budget) * 4;
        let started = tokio::time::Instant::now();
        for &replica in &self.replicas[origin] {
            loop {
                let status = self.shards[replica]
                    .brief_status(budget)
                    .await
                    .map_err(|error| failed(replica, error))?;
                let caught_up = status
                    .replicas
                    .iter()
                    .any(|copy| copy.origin == origin_id && copy.version >= target);
                if caught_up {
                    break;
                }
                if started.elapsed() > limit {
                    return Err(CoordinatorError::Precondition(format!(
                        "{origin_id}'s replicas have not caught up after adopting; run the \
                         drain again to finish it"
                    )));
                }
                tokio::time::sleep(self.config.replication_interval / 4).await;
            }
        }
        Ok(())
    }
}
