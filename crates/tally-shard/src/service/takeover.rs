//! Takeovers: a node standing in for a down node's keyed increments, and
//! the reconciliation when that node is back.
//!
//! Why it is exactly once. A stand-in applies a key for the node only if
//! neither its own records nor its copy of the node's records hold it; the
//! copy is frozen from the takeover's start and reads count it as the
//! node's part. So the node can hold a key the stand-in applied too only if
//! it applied that key after the copy's version (in doubt when it failed,
//! or through a sender that still saw it up): counted by the stand-in, not
//! by the frozen copy. Reconciling, the stand-in first closes the takeover
//! (it applies nothing more for the node, with every increment it applied
//! in its log), then lists every record it applied since the start; the
//! node takes each key it also holds out of its entries and records the
//! others, in one frame, once per takeover; then the takeover ends and the
//! node's own answer counts again. From then the node holds every key the
//! stand-in applied for it.

use std::collections::BTreeMap;

use tally_proto::domain::{CounterName, IdempotencyKey};
use tally_proto::pb;

use super::{records_to_wire, ShardService};
use crate::change::{Change, OwnChange, StandInStep};
use crate::refusal::Refusal;
use crate::store::encode_record_key_into;

impl ShardService {
    /// On the stand-in: close the takeover of `origin` and list the records
    /// applied since it began; or end it.
    pub(super) async fn stand_in_to_the_end(
        &self,
        request: pb::StandInRequest,
    ) -> Result<pb::StandInResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        let origin = request.origin;
        // Steps of takeovers one at a time, as they begin
        // (`begin_takeovers`): an end checks the takeover it ends.
        let _replica_writes = self.replica_writes.lock().await;
        let Some(stand_in) = self.state.meta.lock().standing_in_for.get(&origin).copied() else {
            return Ok(pb::StandInResponse::default());
        };
        if request.end {
            if request.takeover != stand_in.started_ms {
                // Late: the takeover it meant has ended, and another began.
                return Ok(pb::StandInResponse {
                    takeover: stand_in.started_ms,
                    records: Vec::new(),
                });
            }
            self.submit(Change::StandIn {
                origin: origin.clone(),
                step: StandInStep::End {
                    copy_version: request.copy_version,
                    directory_id: request.directory_id,
                },
            })
            .await?;
            // Frozen since the takeover began, while the node has been back:
            // no new takeover (another coordinator may still see the node
            // down) begins on it before a round brings it up to date.
            self.copy_ages.forget(&origin);
            tracing::info!(
                node_id = &*self.node_id,
                origin,
                "no longer standing in: the node has reconciled"
            );
            return Ok(pb::StandInResponse {
                takeover: stand_in.started_ms,
                records: Vec::new(),
            });
        }
        if !stand_in.closed {
            // Writes paused: every increment applied for it so far is in
            // the store, and the frame closing the takeover follows their
            // log write (a failed write fails both).
            let _paused = self.own_writes.write().await;
            self.submit(Change::StandIn {
                origin: origin.clone(),
                step: StandInStep::Close,
            })
            .await?;
        }
        // A walk over every record: off the async workers.
        let store = self.state.store.clone();
        let records =
            tokio::task::spawn_blocking(move || store.records_applied_since(stand_in.started_ms))
                .await
                .map_err(Refusal::from)?;
        Ok(pb::StandInResponse {
            takeover: stand_in.started_ms,
            records: records_to_wire(records),
        })
    }

    /// On the node that is back: take out of its entries the keys the
    /// stand-in applied that it applied too, and record the others.
    pub(super) async fn reconcile_to_the_end(
        &self,
        request: pb::ReconcileRequest,
    ) -> Result<pb::ReconcileResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        tally_proto::domain::validate_node_id(&request.stand_in)
            .map_err(Refusal::InvalidRequest)?;
        self.check_restored()?;
        let _replica_writes = self.replica_writes.lock().await;
        // Takeover ids of one stand-in only grow: this one or an earlier
        // one is done (a late call from another coordinator).
        let done = self
            .state
            .meta
            .lock()
            .reconciled
            .get(&request.stand_in)
            .is_some_and(|&last| request.takeover <= last);
        let directory_id = self.state.meta.lock().directory_id;
        if done {
            return Ok(pb::ReconcileResponse {
                reverted: 0,
                version: self.state.store.replication_version(),
                directory_id,
            });
        }
        let _paused = self.own_writes.write().await;
        self.supersede_seal().await?;
        let mut taken: BTreeMap<(String, u32), i64> = BTreeMap::new();
        let mut records = Vec::new();
        let mut record_key = Vec::new();
        let mut reverted = 0;
        for key in request.keys {
            CounterName::validate(&key.counter)?;
            IdempotencyKey::validate(&key.key)?;
            super::check_stripe(key.stripe)?;
            encode_record_key_into(&mut record_key, &key.counter, &key.key);
            match self.state.store.record(&record_key) {
                // Applied here too: the stand-in counts it.
                Some(delta) if delta == key.delta => {
                    *taken.entry((key.counter, key.stripe)).or_default() += delta;
                    reverted += 1;
                }
                // Two increments under one key (a client's mistake): each
                // was applied once where it landed.
                Some(_) => {}
                None => records.push((record_key.as_slice().into(), key.delta, 0)),
            }
        }
        let mut entries = Vec::with_capacity(taken.len());
        for ((counter, stripe), delta) in taken {
            let value = self
                .state
                .store
                .entry(&counter, stripe)
                .checked_sub(delta)
                .ok_or_else(|| Refusal::Overflow(counter.clone()))?;
            entries.push((counter, stripe, value));
        }
        self.submit(Change::SetOwn {
            why: OwnChange::Reconciled {
                stand_in: request.stand_in.clone(),
                takeover: request.takeover,
            },
            entries,
            records,
        })
        .await?;
        tracing::info!(
            node_id = &*self.node_id,
            stand_in = request.stand_in,
            reverted,
            "reconciled with the node that stood in for it"
        );
        // Advanced under the pause: a change set scanned from here on has
        // this version or a later one, and holds the reconciliation; every
        // read answered before it (they wait for the pause) has a lower one.
        let version = self.state.store.advance_replication_version();
        Ok(pb::ReconcileResponse {
            reverted,
            version,
            directory_id,
        })
    }
}
