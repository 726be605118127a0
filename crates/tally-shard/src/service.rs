//! The `tally.v1.Shard` gRPC service: the coordinator's only way in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tally_proto::domain::{CounterName, IdempotencyKey};
use tally_proto::pb;
use tally_proto::pb::apply_result::Outcome;
use tonic::{Request, Response, Status};

use crate::change::{Change, Entry, OwnChange};
use crate::config::Durability;
use crate::journal::{unix_ms_now, Journal, NodeState};
use crate::meta::{DrainState, DrainStep};
use crate::refusal::Refusal;
use crate::replicas::{CopyStamp, Verdict};
use crate::store::{ApplyOutcome, StripeIncrement, MAX_STRIPES};

/// Serves one node's state.
#[derive(Debug, Clone)]
pub struct ShardService {
    node_id: Arc<str>,
    durability: Durability,
    state: NodeState,
    journal: Arc<Journal>,
    /// One replica change (or erase of copies) at a time: its check, write
    /// and apply must not interleave with another's.
    replica_writes: Arc<tokio::sync::Mutex<()>>,
    /// Own-entry writes and reads hold it shared; a Restore, an Adopt and
    /// the start of a drain hold it alone (so a read sees an adoption
    /// whole, and no write slips past a drain's stop).
    own_writes: Arc<tokio::sync::RwLock<()>>,
    apply_calls: Arc<AtomicU64>,
    increments_applied: Arc<AtomicU64>,
    /// Full replica copies received (see `ShardStatusResponse`).
    full_copies_received: Arc<AtomicU64>,
}

impl ShardService {
    /// A service over `state`, making changes durable through `journal`.
    pub fn new(
        node_id: &str,
        durability: Durability,
        state: NodeState,
        journal: Arc<Journal>,
    ) -> Self {
        ShardService {
            node_id: node_id.into(),
            durability,
            state,
            journal,
            replica_writes: Arc::default(),
            own_writes: Arc::default(),
            apply_calls: Arc::default(),
            increments_applied: Arc::default(),
            full_copies_received: Arc::default(),
        }
    }

    /// A failure of this node's log, as the coordinator sees it:
    /// UNAVAILABLE, naming the node.
    fn storage_failed(&self, error: impl std::fmt::Display) -> Refusal {
        Refusal::storage(&self.node_id, error)
    }

    /// Returns once changes stamped with `epoch` are durable by the node's
    /// mode.
    async fn durable(&self, epoch: u64) -> Result<(), Refusal> {
        self.journal
            .wait_durable(epoch)
            .await
            .map_err(|error| self.storage_failed(error))
    }

    /// Returns once every change stamped with `epoch` is in the log.
    async fn flushed(&self, epoch: u64) -> Result<(), Refusal> {
        self.journal
            .wait_flushed(epoch)
            .await
            .map_err(|error| self.storage_failed(error))
    }

    /// Writes `change` to the log, then applies it.
    async fn submit(&self, change: Change) -> Result<(), Refusal> {
        self.journal
            .submit(change)
            .await
            .map_err(|error| self.storage_failed(error))
    }

    /// Adds `entries` to this node's own, outside the increment path (a
    /// restore, an adoption), with `why` in the same log frame. Own reads
    /// and writes pause, so none sees it half done; the log thread writes
    /// every own change made before in the frame ahead of it. Returns how
    /// many entries were set.
    async fn add_to_own(&self, entries: Vec<Entry>, why: OwnChange) -> Result<usize, Refusal> {
        let _paused = self.own_writes.write().await;
        let store = &self.state.store;
        let mut own = Vec::with_capacity(entries.len());
        for (counter, stripe, value) in entries {
            let sum = store
                .entry(&counter, stripe)
                .checked_add(value)
                .ok_or_else(|| Refusal::Overflow(counter.clone()))?;
            own.push((counter, stripe, sum));
        }
        let count = own.len();
        self.submit(Change::SetOwn { why, entries: own }).await?;
        Ok(count)
    }

    /// Refuses writes of own entries once a drain has begun. Called with
    /// `own_writes` held shared.
    fn check_not_draining(&self) -> Result<(), Refusal> {
        match self.state.meta.lock().drain {
            DrainState::Serving => Ok(()),
            _ => Err(Refusal::Draining(self.node_id.to_string())),
        }
    }

    fn restoring(&self) -> bool {
        self.state.meta.lock().awaiting_restore
    }

    fn is_retired(&self, origin: &str) -> bool {
        self.state.meta.lock().retired.contains_key(origin)
    }

    /// Refuses to hand out own entries while earlier ones await a restore.
    fn check_restored(&self) -> Result<(), Refusal> {
        if self.restoring() {
            Err(Refusal::AwaitsRestore(self.node_id.to_string()))
        } else {
            Ok(())
        }
    }

    /// Refuses a request meant for another node: the sender's membership
    /// points at the wrong address, and writing here would misplace data.
    fn check_node_id(&self, node_id: &str) -> Result<(), Refusal> {
        if node_id == &*self.node_id {
            Ok(())
        } else {
            Err(Refusal::WrongNode {
                this: self.node_id.to_string(),
                asked: node_id.to_string(),
            })
        }
    }
}

/// The coordinator validates names; a shard checks again because it must
/// never store a key it cannot encode, whoever sent it.
fn check_counter_name(counter: &str) -> Result<(), Refusal> {
    Ok(CounterName::validate(counter)?)
}

/// Stripes are below [`MAX_STRIPES`] (coordinators use at most 1,024).
fn check_stripe(stripe: u32) -> Result<(), Refusal> {
    if stripe < MAX_STRIPES {
        Ok(())
    } else {
        Err(Refusal::InvalidRequest(format!(
            "stripe {stripe} is out of range: a shard stores stripes 0 to {}",
            MAX_STRIPES - 1
        )))
    }
}

/// One increment's result, for the Apply answer.
fn result(outcome: pb::apply_result::Outcome) -> pb::ApplyResult {
    pb::ApplyResult {
        outcome: Some(outcome),
    }
}

/// Checks and moves entries of a request into log entries.
fn entries(values: Vec<pb::EntryValue>) -> Result<Vec<Entry>, Refusal> {
    values
        .into_iter()
        .map(|entry| {
            check_counter_name(&entry.counter)?;
            check_stripe(entry.stripe)?;
            Ok((entry.counter, entry.stripe, entry.value))
        })
        .collect()
}

/// Handlers that hold a lock across a log write. Each runs on its own task
/// to its end ([`ShardService::to_the_end`]).
impl ShardService {
    /// Runs `work` on its own task to its end, whatever becomes of the call:
    /// tonic drops a handler at its deadline or when the client resets the
    /// stream, and a handler that holds a lock (writes paused for a restore,
    /// one replica change at a time) across a log write must not release it
    /// while its change is still queued: a write could then slip in between
    /// the values it read and the frame that sets them.
    async fn to_the_end<T, F>(&self, work: impl FnOnce(ShardService) -> F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, Refusal>> + Send + 'static,
    {
        Ok(tokio::spawn(work(self.clone()))
            .await
            .map_err(Refusal::from)??)
    }

    async fn erase_to_the_end(
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

    async fn restore_to_the_end(
        &self,
        request: pb::RestoreRequest,
    ) -> Result<pb::RestoreResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        let entries = entries(request.entries)?;
        let _replica_writes = self.replica_writes.lock().await;
        if !self.restoring() {
            return Err(Refusal::NotAwaitingRestore(self.node_id.to_string()));
        }
        let count = self.add_to_own(entries, OwnChange::Restored).await?;
        if count == 0 {
            tracing::info!(
                node_id = &*self.node_id,
                "started empty; no copies to restore"
            );
        } else {
            tracing::info!(
                node_id = &*self.node_id,
                entries = count,
                "restored from replicas"
            );
        }
        Ok(pb::RestoreResponse {})
    }

    async fn drain_to_the_end(
        &self,
        request: pb::ShardDrainRequest,
    ) -> Result<pb::ShardDrainResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        let asked = match pb::DrainPhase::try_from(request.phase) {
            Ok(pb::DrainPhase::StopWrites) => DrainState::Draining,
            Ok(pb::DrainPhase::HandedOver) => DrainState::HandedOver {
                adopter: request.adopter.clone(),
                version: request.version,
            },
            Ok(pb::DrainPhase::Adopted) => DrainState::Drained {
                adopter: request.adopter.clone(),
                version: request.version,
            },
            _ => return Err(Refusal::InvalidRequest("unknown drain phase".into())),
        };
        // Alone: no write is half-way past the check while the state moves.
        let paused = self.own_writes.write().await;
        let current = self.state.meta.lock().drain.clone();
        let step = current
            .step_to(&asked)
            .map_err(|why| Refusal::DrainConflict(format!("node {} is {why}", self.node_id)))?;
        if step == DrainStep::Advance {
            self.submit(Change::Drain(asked.clone())).await?;
            tracing::info!(
                node_id = &*self.node_id,
                state = asked.stage().public_name(),
                "drain"
            );
        }
        // Everything written before the stop is in the log before the
        // caller takes the final copy: the epoch now covers it, and no write
        // comes after, so the wait needs no lock.
        let epoch = self.state.store.open_epoch();
        drop(paused);
        self.flushed(epoch).await?;
        Ok(pb::ShardDrainResponse {})
    }

    async fn drop_copy_to_the_end(
        &self,
        request: pb::DropCopyRequest,
    ) -> Result<pb::DropCopyResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        tally_proto::config_file::validate_node_id(&request.origin)
            .map_err(Refusal::InvalidRequest)?;
        let _replica_writes = self.replica_writes.lock().await;
        if self.is_retired(&request.origin) {
            return Ok(pb::DropCopyResponse {});
        }
        self.submit(Change::DropCopy {
            origin: request.origin,
        })
        .await?;
        Ok(pb::DropCopyResponse {})
    }

    async fn adopt_to_the_end(
        &self,
        request: pb::AdoptRequest,
    ) -> Result<pb::AdoptResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        let _replica_writes = self.replica_writes.lock().await;
        if self.is_retired(&request.origin) {
            return Ok(pb::AdoptResponse { entries: 0 });
        }
        if self.state.meta.lock().drain != DrainState::Serving {
            return Err(Refusal::DrainConflict(format!(
                "node {} is being drained itself: it cannot adopt {}",
                self.node_id, request.origin
            )));
        }
        let Some((stamp, entries)) = self.state.replicas.copy_of(&request.origin) else {
            return Err(Refusal::CopyMissing(format!(
                "node {} holds no copy of {}",
                self.node_id, request.origin
            )));
        };
        let version = stamp.version;
        if version < request.version {
            return Err(Refusal::CopyMissing(format!(
                "the copy of {} is at version {version}, not yet {}",
                request.origin, request.version
            )));
        }
        let count = self
            .add_to_own(
                entries,
                OwnChange::Adopted {
                    origin: request.origin.clone(),
                    version,
                },
            )
            .await?;
        tracing::info!(
            node_id = &*self.node_id,
            origin = request.origin,
            entries = count,
            "adopted a drained node's entries"
        );
        Ok(pb::AdoptResponse {
            entries: count as u64,
        })
    }

    async fn replicate_to_the_end(
        &self,
        request: pb::ReplicateRequest,
    ) -> Result<pb::ReplicateResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        if request.origin == *self.node_id {
            return Err(Refusal::InvalidRequest(
                "a node does not hold a replica copy of itself".into(),
            ));
        }
        tally_proto::config_file::validate_node_id(&request.origin)
            .map_err(Refusal::InvalidRequest)?;
        let stamp = CopyStamp {
            version: request.version,
            scanned_unix_ms: request.scanned_unix_ms,
            directory_id: request.directory_id,
        };
        let entries = entries(request.entries)?;
        let _replica_writes = self.replica_writes.lock().await;
        if self.is_retired(&request.origin) {
            // Drained: a late push must not bring its copy back.
            return Ok(pb::ReplicateResponse {
                accepted: true,
                version: request.version,
            });
        }
        match self
            .state
            .replicas
            .accepts(&request.origin, request.base, &stamp, request.full)
        {
            Verdict::Apply => {}
            Verdict::Stale => {
                return Ok(pb::ReplicateResponse {
                    accepted: true,
                    version: self.state.replicas.version(&request.origin),
                })
            }
            Verdict::NeedFull => {
                return Ok(pb::ReplicateResponse {
                    accepted: false,
                    version: self.state.replicas.version(&request.origin),
                })
            }
        }
        // Counted before the copy becomes visible, so a status that shows
        // the copy also counts it (the journal makes it visible before
        // `submit` returns).
        if request.full {
            self.full_copies_received.fetch_add(1, Ordering::Relaxed);
        }
        // In the log first, then visible to reads.
        self.submit(Change::Replica {
            origin: request.origin,
            stamp,
            full: request.full,
            entries,
        })
        .await?;
        Ok(pb::ReplicateResponse {
            accepted: true,
            version: request.version,
        })
    }
}

#[tonic::async_trait]
impl pb::shard_server::Shard for ShardService {
    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let request = request.into_inner();
        self.check_node_id(&request.node_id)?;
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
                    .map(|increment| result(Outcome::Redirect(increment)))
                    .collect();
                return Ok(Response::new(pb::ApplyResponse { results }));
            }
            self.state.store.apply(&increments, unix_ms_now())
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
                    ApplyOutcome::Overflow => Outcome::Overflow(increment),
                    ApplyOutcome::Conflict { recorded_delta } => {
                        Outcome::Conflict(pb::apply_result::Conflict {
                            increment: Some(increment),
                            recorded_delta,
                        })
                    }
                })
            })
            .collect();
        Ok(Response::new(pb::ApplyResponse { results }))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let request = request.into_inner();
        self.check_node_id(&request.node_id)?;
        // Own entries and copies as one view: an adoption is seen whole.
        let _reading = self.own_writes.read().await;
        let (restoring, handed_to, retired, directory_id) = {
            let meta = self.state.meta.lock();
            (
                meta.awaiting_restore,
                meta.drain
                    .handed_to()
                    .map(|(adopter, version)| (adopter.to_string(), version)),
                meta.retired.keys().cloned().collect::<Vec<_>>(),
                meta.directory_id,
            )
        };
        let (drained_to, handed_over_version) = handed_to.unwrap_or_default();
        let counters = request
            .counters
            .iter()
            .filter(|_| drained_to.is_empty())
            .map(|counter| pb::CounterEntries {
                entries: self
                    .state
                    .store
                    .read(counter)
                    .into_iter()
                    .map(|(stripe, value)| pb::StripeValue { stripe, value })
                    .collect(),
            })
            .collect();
        let replicas = self
            .state
            .replicas
            .read(&request.counters)
            .into_iter()
            .map(|copy| pb::ReplicaPart {
                origin: copy.origin,
                version: copy.stamp.version,
                scanned_unix_ms: copy.stamp.scanned_unix_ms,
                directory_id: copy.stamp.directory_id,
                counters: copy
                    .counters
                    .into_iter()
                    .map(|entries| pb::CounterEntries {
                        entries: entries
                            .into_iter()
                            .map(|(stripe, value)| pb::StripeValue { stripe, value })
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ReadResponse {
            counters,
            replicas,
            restoring,
            drained_to,
            directory_id,
            handed_over_version,
            retired,
        }))
    }

    async fn erase(
        &self,
        request: Request<pb::EraseRequest>,
    ) -> Result<Response<pb::EraseResponse>, Status> {
        let request = request.into_inner();
        self.to_the_end(move |service| async move { service.erase_to_the_end(request).await })
            .await
            .map(Response::new)
    }

    async fn status(
        &self,
        request: Request<pb::ShardStatusRequest>,
    ) -> Result<Response<pb::ShardStatusResponse>, Status> {
        let brief = request.into_inner().brief;
        let meta = self.state.meta.lock().clone();
        let stats = self.journal.stats();
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        Ok(Response::new(pb::ShardStatusResponse {
            node_id: self.node_id.to_string(),
            // A walk over every entry: not for frequent probes.
            entries: if brief {
                0
            } else {
                self.state.store.entry_count()
            },
            replica_entries: if brief {
                0
            } else {
                self.state.replicas.entry_count()
            },
            table_bytes: if brief {
                0
            } else {
                self.state.store.table_bytes() + self.state.replicas.table_bytes()
            },
            last_flush_unix_ms: load(&stats.last_flush_unix_ms) as i64,
            durability_mode: pb::Durability::from(self.durability) as i32,
            apply_calls: self.apply_calls.load(Ordering::Relaxed),
            increments_applied: self.increments_applied.load(Ordering::Relaxed),
            full_copies_received: self.full_copies_received.load(Ordering::Relaxed),
            remembered_keys: self.state.store.remembered_keys(),
            keys_forgotten_early: self.state.store.keys_forgotten_early(),
            flush_sequence: load(&stats.last_seq),
            log_bytes: load(&stats.log_bytes),
            log_segments: load(&stats.log_segments),
            log_commits: load(&stats.commits),
            checkpoint_position: load(&stats.checkpoint_position),
            last_checkpoint_unix_ms: load(&stats.last_checkpoint_unix_ms) as i64,
            checkpoints: load(&stats.checkpoints),
            checkpoint_failures: load(&stats.checkpoint_failures),
            replicas: self
                .state
                .replicas
                .versions()
                .into_iter()
                .map(|(origin, version)| pb::ReplicaPart {
                    origin,
                    version,
                    ..Default::default()
                })
                .collect(),
            restoring: meta.awaiting_restore,
            replication_version: self.state.store.replication_version(),
            drain_state: meta.drain.stage() as i32,
            drain_adopter: meta.drain.adopter().unwrap_or_default().to_string(),
            drain_version: meta.drain.handed_to().map_or(0, |(_, version)| version),
        }))
    }

    async fn copy_of(
        &self,
        request: Request<pb::CopyOfRequest>,
    ) -> Result<Response<pb::CopyOfResponse>, Status> {
        let request = request.into_inner();
        self.check_node_id(&request.node_id)?;
        let response = match self.state.replicas.copy_of(&request.origin) {
            Some((stamp, entries)) => pb::CopyOfResponse {
                found: true,
                version: stamp.version,
                scanned_unix_ms: stamp.scanned_unix_ms,
                entries: entries
                    .into_iter()
                    .map(|(counter, stripe, value)| pb::EntryValue {
                        counter,
                        stripe,
                        value,
                    })
                    .collect(),
            },
            None => pb::CopyOfResponse::default(),
        };
        Ok(Response::new(response))
    }

    async fn restore(
        &self,
        request: Request<pb::RestoreRequest>,
    ) -> Result<Response<pb::RestoreResponse>, Status> {
        let request = request.into_inner();
        self.to_the_end(move |service| async move { service.restore_to_the_end(request).await })
            .await
            .map(Response::new)
    }

    async fn drain(
        &self,
        request: Request<pb::ShardDrainRequest>,
    ) -> Result<Response<pb::ShardDrainResponse>, Status> {
        let request = request.into_inner();
        self.to_the_end(move |service| async move { service.drain_to_the_end(request).await })
            .await
            .map(Response::new)
    }

    async fn drop_copy(
        &self,
        request: Request<pb::DropCopyRequest>,
    ) -> Result<Response<pb::DropCopyResponse>, Status> {
        let request = request.into_inner();
        self.to_the_end(move |service| async move { service.drop_copy_to_the_end(request).await })
            .await
            .map(Response::new)
    }

    async fn adopt(
        &self,
        request: Request<pb::AdoptRequest>,
    ) -> Result<Response<pb::AdoptResponse>, Status> {
        let request = request.into_inner();
        self.to_the_end(move |service| async move { service.adopt_to_the_end(request).await })
            .await
            .map(Response::new)
    }

    async fn changes(
        &self,
        request: Request<pb::ChangesRequest>,
    ) -> Result<Response<pb::ChangesResponse>, Status> {
        let request = request.into_inner();
        self.check_node_id(&request.node_id)?;
        // An empty node's "everything" would replace its good copies.
        self.check_restored()?;
        // Held across the scan: a hand-over cannot slip in between the
        // check and the version this scan takes.
        let _reading = self.own_writes.read().await;
        let (drained, directory_id, recorded) = {
            let meta = self.state.meta.lock();
            (
                meta.drain.adopter().is_some(),
                meta.directory_id,
                meta.incarnation,
            )
        };
        if recorded != self.state.store.incarnation() {
            // Versions of an unrecorded start could be handed out again by
            // the next one.
            return Err(self
                .storage_failed("this start is not recorded in the log yet (is its disk full?)")
                .into());
        }
        if drained {
            return Err(Refusal::Drained(self.node_id.to_string()).into());
        }
        // Taken before the scan: the copy will hold everything acknowledged
        // before this time.
        let scanned_unix_ms = unix_ms_now();
        let store = self.state.store.clone();
        let since = request.since;
        // A walk over every entry: off the async workers.
        let changes = tokio::task::spawn_blocking(move || store.changes_since(since))
            .await
            .map_err(Refusal::from)?;
        Ok(Response::new(pb::ChangesResponse {
            scanned_unix_ms,
            directory_id,
            version: changes.version,
            full: changes.full,
            entries: changes
                .entries
                .into_iter()
                .map(|(counter, stripe, value)| pb::EntryValue {
                    counter: counter.into_string(),
                    stripe,
                    value,
                })
                .collect(),
        }))
    }

    async fn replicate(
        &self,
        request: Request<pb::ReplicateRequest>,
    ) -> Result<Response<pb::ReplicateResponse>, Status> {
        let request = request.into_inner();
        self.to_the_end(move |service| async move { service.replicate_to_the_end(request).await })
            .await
            .map(Response::new)
    }
}
