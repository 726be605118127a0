//! Increments and erases of the node's own entries.

use std::sync::atomic::Ordering;

use tally_proto::domain::IdempotencyKey;
use tally_proto::pb;
use tally_proto::pb::apply_result::Outcome;

use super::{check_counter_name, check_stripe, ShardService};
use crate::change::{Change, StandInStep};
use crate::meta::KeyedRing;
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
        self.begin_takeovers(&request.increments).await?;
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
            let now_ms = self.state.store.retention_now_ms();
            match self.decide_keyed(&request.increments) {
                // The usual case: the store decides every increment.
                None => {
                    let (applied, epoch) = self.state.store.apply(&increments, now_ms);
                    (applied.into_iter().map(Decided::Store).collect(), epoch)
                }
                Some(decided) => {
                    let to_apply: Vec<StripeIncrement<'_>> = increments
                        .iter()
                        .zip(&decided)
                        .filter(|(_, decided)| decided.is_none())
                        .map(|(increment, _)| *increment)
                        .collect();
                    let (applied, epoch) = self.state.store.apply(&to_apply, now_ms);
                    let mut applied = applied.into_iter();
                    let outcomes: Vec<Decided> = decided
                        .into_iter()
                        .map(|decided| {
                            decided.unwrap_or_else(|| {
                                Decided::Store(
                                    applied.next().expect("one outcome per increment applied"),
                                )
                            })
                        })
                        .collect();
                    (outcomes, epoch)
                }
            }
        };
        self.apply_calls.fetch_add(1, Ordering::Relaxed);
        self.increments_applied
            .fetch_add(increments.len() as u64, Ordering::Relaxed);
        // The wait for the group commit that makes them durable: its own
        // span when traces are exported.
        tracing::Instrument::instrument(
            self.durable(epoch),
            tracing::debug_span!("durable", otel.name = "group commit wait"),
        )
        .await?;
        // Only refused increments come back whole.
        let results = request
            .increments
            .into_iter()
            .zip(outcomes)
            .map(|(increment, outcome)| {
                result(match outcome {
                    Decided::Store(ApplyOutcome::Applied) => {
                        Outcome::Applied(pb::apply_result::Applied {})
                    }
                    Decided::Store(ApplyOutcome::Duplicate) => {
                        Outcome::Duplicate(pb::apply_result::Applied {})
                    }
                    Decided::Store(ApplyOutcome::Overflow) => {
                        Outcome::Overflow(Box::new(increment))
                    }
                    Decided::Store(ApplyOutcome::Conflict { recorded_delta }) => {
                        Outcome::Conflict(Box::new(pb::apply_result::Conflict {
                            increment: Some(increment),
                            recorded_delta,
                        }))
                    }
                    Decided::Store(ApplyOutcome::Expired {
                        end_unix_ms,
                        now_unix_ms,
                    }) => Outcome::Expired(self.state.store.windows().refusal(
                        &increment.counter,
                        end_unix_ms,
                        now_unix_ms,
                    )),
                    Decided::AwaitsRestore => Outcome::AwaitsRestore(Box::new(increment)),
                    Decided::Unavailable(why) => Outcome::Unavailable(why),
                    Decided::OwnerBack => Outcome::OwnerBack(Box::new(increment)),
                    Decided::RingRefused(ring) => Outcome::RingRefused(Box::new(pb::RingRefused {
                        increment: Some(increment),
                        ring: ring.stamp,
                        sealed: ring.sealed,
                    })),
                })
            })
            .collect();
        Ok(pb::ApplyResponse { results })
    }

    /// What becomes of each keyed increment before the store sees it
    /// (`None`: the store decides):
    /// - while this node awaits its restore, its idempotency records are
    ///   not back yet: a retry of a key applied before its disk was lost
    ///   would apply again. Given back unapplied (the coordinator restores
    ///   the node and sends it again);
    /// - standing in for another node (`on_behalf_of`): a key that node
    ///   applied, as this node's copy of its records says, is a duplicate
    ///   (or a conflict), not applied again. The copy no longer moves by
    ///   then: final (a drain's hand-over) or frozen (a takeover, begun
    ///   first; closed: given back for the owner); a copy holds only what
    ///   its origin's log holds, and is visible once durable here. A node
    ///   with no copy of it (not its adopter: a stale sender) refuses.
    ///
    /// A keyed increment of an ended window is left to the store, which
    /// refuses it (`expired`).
    ///
    /// `None` when no increment needs it (no key, or neither a restore nor
    /// a stand-in in play): the usual call pays no more than this look.
    fn decide_keyed(&self, increments: &[pb::ShardIncrement]) -> Option<Vec<Option<Decided>>> {
        let (restoring, ring) = {
            let meta = self.state.meta.lock();
            (meta.awaiting_restore, meta.keyed_ring)
        };
        let in_play = |increment: &pb::ShardIncrement| {
            !increment.idempotency_key.is_empty()
                && increment.delta != 0
                && (restoring || !increment.on_behalf_of.is_empty() || !ring.takes(increment.ring))
        };
        if !increments.iter().any(in_play) {
            return None;
        }
        let windows = self.state.store.windows();
        let decided = increments
            .iter()
            .map(|increment| {
                if increment.idempotency_key.is_empty() || increment.delta == 0 {
                    return None;
                }
                if increment.counter.starts_with('\0')
                    && windows
                        .ended(&increment.counter, windows.now_ms())
                        .is_some()
                {
                    // An ended window is refused whoever's records would
                    // say what: the store refuses it.
                    return None;
                }
                if restoring {
                    return Some(Decided::AwaitsRestore);
                }
                if !ring.takes(increment.ring) {
                    // Sent for another membership than this node's: its
                    // key's record may be on another node (`ring`).
                    return Some(Decided::RingRefused(ring));
                }
                let origin = &increment.on_behalf_of;
                if origin.is_empty() || self.is_retired(origin) {
                    // Its own records decide (an adopted node's are among
                    // them).
                    return None;
                }
                if !self.state.replicas.has_copy(origin) {
                    return Some(Decided::Unavailable(format!(
                        "node {} holds no copy of {origin}'s idempotency records: it cannot stand \
                         in for it",
                        self.node_id
                    )));
                }
                if increment.takeover_max_copy_age_ms > 0 {
                    match self.state.meta.lock().standing_in_for.get(origin) {
                        Some(stand_in) if !stand_in.closed => {}
                        Some(_) => return Some(Decided::OwnerBack),
                        None => {
                            return Some(Decided::Unavailable(format!(
                                "node {}'s copy of {origin} is too old (or of unknown age) to \
                                 stand in for it",
                                self.node_id
                            )))
                        }
                    }
                }
                let recorded = self.state.replicas.record(
                    &increment.on_behalf_of,
                    &increment.counter,
                    &increment.idempotency_key,
                )?;
                Some(Decided::Store(if recorded == increment.delta {
                    ApplyOutcome::Duplicate
                } else {
                    ApplyOutcome::Conflict {
                        recorded_delta: recorded,
                    }
                }))
            })
            .collect();
        Some(decided)
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

impl ShardService {
    /// Begins a takeover of each down node an increment is sent on behalf
    /// of (`takeover_max_copy_age_ms` set), unless one runs: if this node's
    /// copy of it is recent enough by the sender's bound, the takeover is
    /// logged (its start is its id) before anything is applied for it. From then the copy is frozen (pushes are
    /// refused) and reads count it as that node's part.
    async fn begin_takeovers(&self, increments: &[pb::ShardIncrement]) -> Result<(), Refusal> {
        let mut origins: Vec<(&str, u64, u64)> = increments
            .iter()
            .filter(|increment| {
                increment.takeover_max_copy_age_ms > 0 && !increment.idempotency_key.is_empty()
            })
            .map(|increment| {
                (
                    increment.on_behalf_of.as_str(),
                    increment.takeover_max_copy_age_ms,
                    increment.ring,
                )
            })
            .collect();
        if origins.is_empty() {
            return Ok(());
        }
        origins.sort_unstable();
        origins.dedup_by_key(|(origin, _, _)| *origin);
        for (origin, max_age_ms, ring) in origins {
            if self.is_retired(origin)
                || !self.state.replicas.has_copy(origin)
                || self.state.meta.lock().standing_in_for.contains_key(origin)
            {
                continue;
            }
            // On its own task to its end: the call's deadline must not drop
            // the copy's lock while the start is still queued (see
            // `to_the_end`).
            let service = self.clone();
            let origin = origin.to_string();
            tokio::spawn(async move { service.begin_takeover(&origin, max_age_ms, ring).await })
                .await
                .map_err(Refusal::from)??;
        }
        Ok(())
    }
}

impl ShardService {
    async fn begin_takeover(
        &self,
        origin: &str,
        max_age_ms: u64,
        ring: u64,
    ) -> Result<(), Refusal> {
        // One replica change at a time: the copy is frozen at a version,
        // never mid-push.
        let _replica_writes = self.replica_writes.lock().await;
        if self.state.meta.lock().standing_in_for.contains_key(origin) {
            return Ok(());
        }
        let fresh = self
            .copy_ages
            .age_ms(origin)
            .is_some_and(|age| age <= max_age_ms);
        if !fresh {
            return Ok(());
        }
        // Own reads and writes paused: a read sees own entries and the
        // takeover's fence together (nothing is applied for the node before
        // the start, and a read that saw no takeover saw none of it).
        let _paused = self.own_writes.write().await;
        let own = self.state.meta.lock().keyed_ring;
        if !own.takes(ring) {
            // Sealed for a membership change, or sent for another
            // membership: the increments are given back, none is taken.
            return Ok(());
        }
        // The node must have been open to this very membership and change
        // as of the copy: one sealed for it and never opened (it failed in
        // between) lacks the records handed on for its keys, and so does
        // the copy; a retry of such a key would apply again.
        if self.copy_ages.keyed_ring_of(origin) != Some(own) {
            return Ok(());
        }
        // Its id: greater than every earlier takeover's, and every record
        // applied from here on is dated at or after it, whatever the wall
        // clock did across restarts. The records it lists are those.
        let last = self.state.meta.lock().last_takeover;
        let started_ms = self.state.store.mark_after_records(last + 1);
        self.submit(Change::StandIn {
            origin: origin.to_string(),
            step: StandInStep::Start { started_ms },
        })
        .await?;
        tracing::warn!(
            node_id = &*self.node_id,
            origin,
            "standing in for a node shown down: taking its keyed increments"
        );
        Ok(())
    }
}

/// What became of one increment of an Apply.
enum Decided {
    /// As the store answered (or as a stand-in's copy of records says).
    Store(ApplyOutcome),
    /// Not applied: the node awaits its restore.
    AwaitsRestore,
    /// Not applied, and why.
    Unavailable(String),
    /// Not applied: a takeover this node closed (its owner is back).
    OwnerBack,
    /// Not applied: sent for a membership this node's keyed increments are
    /// not open to (this one's).
    RingRefused(KeyedRing),
}

/// One increment's result, for the Apply answer.
fn result(outcome: pb::apply_result::Outcome) -> pb::ApplyResult {
    pb::ApplyResult {
        outcome: Some(outcome),
    }
}
