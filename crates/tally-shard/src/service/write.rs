//! Increments and erases of the node's own entries.

use std::sync::atomic::Ordering;

use tally_proto::domain::IdempotencyKey;
use tally_proto::pb;
use tally_proto::pb::apply_result::Outcome;

use super::{check_counter_name, check_stripe, ShardService};
use crate::change::Change;
use crate::refusal::Refusal;
use crate::store::{ApplyOutcome, StripeIncrement};

impl ShardService {
    /// Applies increments to own entries; answers once they are durable by
    /// the node's mode, with one result per increment. A node being
    /// drained applies none and gives each back (redirect).
    pub(super) async fn apply_increments(
        &self,
        request: pb::ApplyRequest,
    ) -> Result<pb::ApplyResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        if request.protocol_version != tally_proto::SHARD_PROTOCOL_VERSION {
            return Err(Refusal::InvalidRequest(format!(
                "this node speaks internal protocol version {}, the sender {}: nothing applied \
                 (run coordinators and shard nodes of the same release)",
                tally_proto::SHARD_PROTOCOL_VERSION,
                request.protocol_version
            )));
        }
        let increments = request
            .increments
            .iter()
            .map(|increment| {
                check_counter_name(&increment.counter)?;
                check_stripe(increment.stripe)?;
                IdempotencyKey::validate(&increment.idempotency_key)?;
                let idempotency_key =
                    Some(increment.idempotency_key.as_str()).filter(|key| !key.is_empty());
                Ok(StripeIncrement {
                    counter: &increment.counter,
                    stripe: increment.stripe,
                    delta: increment.delta,
                    idempotency_key,
                })
            })
            .collect::<Result<Vec<_>, Refusal>>()?;
        let (outcomes, epoch) = {
            let _writing = self.own_writes.read().await;
            if self.check_not_draining().is_err() {
                // Nothing applied: the coordinator sends them elsewhere.
                drop(increments);
                let results = request
                    .increments
                    .into_iter()
                    .map(|increment| result(Outcome::Redirect(Box::new(increment))))
                    .collect();
                return Ok(pb::ApplyResponse { results });
            }
            self.state
                .store
                .apply(&increments, self.state.store.retention_now_ms())
        };
        self.apply_calls.fetch_add(1, Ordering::Relaxed);
        self.increments_applied
            .fetch_add(increments.len() as u64, Ordering::Relaxed);
        self.durable(epoch).await?;
        // Only refused increments come back whole.
        let results = request
            .increments
            .into_iter()
            .zip(outcomes)
            .map(|(increment, outcome)| {
                result(match outcome {
                    ApplyOutcome::Applied => Outcome::Applied(pb::apply_result::Applied {}),
                    ApplyOutcome::Duplicate => Outcome::Duplicate(pb::apply_result::Applied {}),
                    ApplyOutcome::Overflow => Outcome::Overflow(Box::new(increment)),
                    ApplyOutcome::Conflict { recorded_delta } => {
                        Outcome::Conflict(Box::new(pb::apply_result::Conflict {
                            increment: Some(increment),
                            recorded_delta,
                        }))
                    }
                })
            })
            .collect();
        Ok(pb::ApplyResponse { results })
    }

    pub(super) async fn erase_to_the_end(
        &self,
        request: pb::EraseRequest,
    ) -> Result<pb::EraseResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        for counter in &request.counters {
            check_counter_name(counter)?;
        }
        let counters: Vec<&str> = request.counters.iter().map(String::as_str).collect();
        let epoch = {
            let _writing = self.own_writes.read().await;
            self.check_not_draining()?;
            self.state.store.erase(&counters)
        };
        // Replica copies too: a delete must not come back from a copy read
        // while the counter's origin is down. A delete that finds nothing
        // in the copies writes nothing.
        let _replica_writes = self.replica_writes.lock().await;
        if self.state.replicas.holds_any(&counters) {
            self.submit(Change::EraseCopies {
                counters: request.counters.clone(),
            })
            .await?;
        }
        self.durable(epoch).await?;
        Ok(pb::EraseResponse {})
    }
}

/// One increment's result, for the Apply answer.
fn result(outcome: pb::apply_result::Outcome) -> pb::ApplyResult {
    pb::ApplyResult {
        outcome: Some(outcome),
    }
}
