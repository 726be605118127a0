//! The `tally.v1.Shard` gRPC service: the coordinator's only way in.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tally_proto::domain::{CounterName, IdempotencyKey};
use tally_proto::pb;
use tonic::{Request, Response, Status};

use crate::config::Durability;
use crate::flusher::{unix_ms_now, Flusher};
use crate::replicas::{CopyStamp, Replicas, Verdict};
use crate::storage::{DrainState, OwnChange, Storage};
use crate::store::{ApplyOutcome, Store, StripeIncrement};

/// What a node's data directory says about its role, as found at start.
#[derive(Debug, Clone, Default)]
pub struct NodeState {
    /// Created empty; its earlier entries await a restore from replicas.
    pub restoring: bool,
    /// Where a drain of the node stands.
    pub drain: DrainState,
    /// Drained nodes it adopted, or whose copy it dropped.
    pub retired: Vec<String>,
}

/// Serves one node's store.
#[derive(Debug, Clone)]
pub struct ShardService {
    node_id: Arc<str>,
    durability: Durability,
    store: Arc<Store>,
    flusher: Arc<Flusher>,
    storage: Arc<Storage>,
    replicas: Arc<Replicas>,
    /// One replica change (or erase of copies) at a time: its check, write
    /// and apply must not interleave with another's.
    replica_writes: Arc<tokio::sync::Mutex<()>>,
    /// The node started with an empty data directory: its earlier entries
    /// (if it existed before) are only in its replicas' copies, which a
    /// read adds to its own part, and which it must not overwrite (no
    /// Changes) until a Restore adds them to its own entries.
    restoring: Arc<AtomicBool>,
    /// Own-entry writes and reads hold it shared; a Restore, an Adopt and
    /// the start of a drain hold it alone (so a read sees an adoption
    /// whole, and no write slips past a drain's stop).
    own_writes: Arc<tokio::sync::RwLock<()>>,
    drain: Arc<parking_lot::Mutex<DrainState>>,
    /// Drained origins whose copies this node no longer takes: adopted into
    /// its own entries, or whose copy it dropped.
    retired: Arc<parking_lot::Mutex<std::collections::HashSet<String>>>,
    apply_calls: Arc<AtomicU64>,
    increments_applied: Arc<AtomicU64>,
    /// Full replica copies received (see `ShardStatusResponse`).
    full_copies_received: Arc<AtomicU64>,
}

impl ShardService {
    /// A service over `store`, acknowledging writes through `flusher`, and
    /// over the replica copies this node holds.
    pub fn new(
        node_id: &str,
        durability: Durability,
        store: Arc<Store>,
        flusher: Arc<Flusher>,
        storage: Arc<Storage>,
        replicas: Arc<Replicas>,
        state: NodeState,
    ) -> Self {
        ShardService {
            node_id: node_id.into(),
            durability,
            store,
            flusher,
            storage,
            replicas,
            replica_writes: Arc::default(),
            restoring: Arc::new(AtomicBool::new(state.restoring)),
            own_writes: Arc::default(),
            drain: Arc::new(parking_lot::Mutex::new(state.drain)),
            retired: Arc::new(parking_lot::Mutex::new(state.retired.into_iter().collect())),
            apply_calls: Arc::default(),
            increments_applied: Arc::default(),
            full_copies_received: Arc::default(),
        }
    }

    /// A failure of this node's storage or flusher, as the coordinator
    /// sees it: UNAVAILABLE, naming the node.
    fn unavailable(&self, error: impl std::fmt::Display) -> Status {
        Status::unavailable(format!("node {}: {error}", self.node_id))
    }

    /// Runs blocking storage work off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, crate::StorageError> + Send + 'static,
    ) -> Result<T, Status> {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(|error| self.unavailable(error))
    }

    /// Returns once changes stamped with `epoch` are durable by the node's
    /// mode.
    async fn durable(&self, epoch: u64) -> Result<(), Status> {
        self.flusher
            .wait_durable(epoch)
            .await
            .map_err(|error| self.unavailable(error))
    }

    /// Returns once every change made so far is on disk.
    async fn flushed(&self, epoch: u64) -> Result<(), Status> {
        self.flusher
            .wait_flushed(epoch)
            .await
            .map_err(|error| self.unavailable(error))
    }

    /// Adds `entries` to this node's own, outside the increment path (a
    /// restore, an adoption), with `why` in the same sled batch. Own reads
    /// and writes pause, so none sees it half done, and everything written
    /// before is flushed first, so no older flush lands after it. Returns
    /// how many entries were set.
    async fn add_to_own(
        &self,
        entries: Vec<(String, u32, i64)>,
        why: OwnChange,
    ) -> Result<usize, Status> {
        // A flush first without the pause, so the one under it is short.
        let _ = self.flusher.wait_flushed(self.store.open_epoch()).await;
        let _paused = self.own_writes.write().await;
        self.flushed(self.store.open_epoch()).await?;
        let mut own = Vec::with_capacity(entries.len());
        for (counter, stripe, value) in entries {
            let sum = self
                .store
                .entry(&counter, stripe)
                .checked_add(value)
                .ok_or_else(|| Status::out_of_range(format!("adding to {counter:?} overflows")))?;
            own.push((counter, stripe, sum));
        }
        let own = Arc::new(own);
        let storage = self.storage.clone();
        let written = own.clone();
        self.blocking(move || {
            let entries: Vec<(&str, u32, i64)> = written
                .iter()
                .map(|(counter, stripe, value)| (counter.as_str(), *stripe, *value))
                .collect();
            storage.set_own(&entries, &why)
        })
        .await?;
        for (counter, stripe, value) in own.iter() {
            self.store.set_flushed(counter, *stripe, *value);
        }
        Ok(own.len())
    }

    /// Refuses writes of own entries once a drain has begun. Called with
    /// `own_writes` held shared.
    fn check_not_draining(&self) -> Result<(), Status> {
        match *self.drain.lock() {
            DrainState::Serving => Ok(()),
            _ => Err(Status::unavailable(format!(
                "node {} is being drained: it takes no more writes",
                self.node_id
            ))),
        }
    }

    /// Refuses to hand out own entries while earlier ones await a restore.
    fn check_restored(&self) -> Result<(), Status> {
        if self.restoring.load(Ordering::SeqCst) {
            Err(Status::failed_precondition(format!(
                "node {} started with an empty data directory and awaits a restore from its \
                 replicas",
                self.node_id
            )))
        } else {
            Ok(())
        }
    }

    /// Refuses a request meant for another node: the sender's membership
    /// points at the wrong address, and writing here would misplace data.
    fn check_node_id(&self, node_id: &str) -> Result<(), Status> {
        if node_id == &*self.node_id {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "this is node {:?}, not {node_id:?}: check the coordinator's membership",
                &*self.node_id
            )))
        }
    }
}

/// The coordinator validates names; a shard checks again because it must
/// never store a key it cannot encode, whoever sent it.
fn check_counter_name(counter: &str) -> Result<(), Status> {
    CounterName::validate(counter).map_err(Status::from)
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
                IdempotencyKey::validate(&increment.idempotency_key).map_err(Status::from)?;
                let idempotency_key =
                    Some(increment.idempotency_key.as_str()).filter(|key| !key.is_empty());
                Ok(StripeIncrement {
                    counter: &increment.counter,
                    stripe: increment.stripe,
                    delta: increment.delta,
                    idempotency_key,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let (outcomes, epoch) = {
            let _writing = self.own_writes.read().await;
            if self.check_not_draining().is_err() {
                // Nothing applied: the coordinator sends them elsewhere.
                drop(increments);
                let count = request.increments.len();
                return Ok(Response::new(pb::ApplyResponse {
                    outcomes: vec![pb::ApplyOutcome::Redirect as i32; count],
                    redirected: request.increments,
                    ..Default::default()
                }));
            }
            self.store.apply(&increments, unix_ms_now())
        };
        self.apply_calls.fetch_add(1, Ordering::Relaxed);
        self.increments_applied
            .fetch_add(increments.len() as u64, Ordering::Relaxed);
        self.durable(epoch).await?;
        let mut overflowed = Vec::new();
        let mut conflicts = Vec::new();
        let outcomes = request
            .increments
            .into_iter()
            .zip(outcomes)
            .map(|(increment, outcome)| match outcome {
                ApplyOutcome::Applied => pb::ApplyOutcome::Applied as i32,
                ApplyOutcome::Duplicate => pb::ApplyOutcome::Duplicate as i32,
                ApplyOutcome::Overflow => {
                    overflowed.push(increment);
                    pb::ApplyOutcome::Overflow as i32
                }
                ApplyOutcome::Conflict { recorded_delta } => {
                    conflicts.push(pb::KeyConflict {
                        increment: Some(increment),
                        recorded_delta,
                    });
                    pb::ApplyOutcome::Conflict as i32
                }
            })
            .collect();
        Ok(Response::new(pb::ApplyResponse {
            outcomes,
            overflowed,
            conflicts,
            redirected: Vec::new(),
        }))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let request = request.into_inner();
        self.check_node_id(&request.node_id)?;
        // Own entries and copies as one view: an adoption is seen whole.
        let _reading = self.own_writes.read().await;
        let restoring = self.restoring.load(Ordering::SeqCst);
        let (drained_to, handed_over_version) = self
            .drain
            .lock()
            .handed_to()
            .map_or((String::new(), 0), |(adopter, version)| {
                (adopter.to_string(), version)
            });
        let counters = request
            .counters
            .iter()
            .filter(|_| drained_to.is_empty())
            .map(|counter| pb::CounterEntries {
                entries: self
                    .store
                    .read(counter)
                    .into_iter()
                    .map(|(stripe, value)| pb::StripeValue { stripe, value })
                    .collect(),
            })
            .collect();
        let replicas = self
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
            directory_id: self.storage.directory_id(),
            handed_over_version,
            retired: self.retired.lock().iter().cloned().collect(),
        }))
    }

    async fn erase(
        &self,
        request: Request<pb::EraseRequest>,
    ) -> Result<Response<pb::EraseResponse>, Status> {
        let request = request.into_inner();
        self.check_node_id(&request.node_id)?;
        let counters: Vec<&str> = request.counters.iter().map(String::as_str).collect();
        let epoch = {
            let _writing = self.own_writes.read().await;
            self.check_not_draining()?;
            self.store.erase(&counters)
        };
        // Replica copies too: a delete must not come back from a copy read
        // while the counter's origin is down.
        let _replica_writes = self.replica_writes.lock().await;
        let targets = self.replicas.erase_targets(&counters);
        if !targets.is_empty() {
            let storage = self.storage.clone();
            self.blocking(move || storage.erase_replicas(&targets))
                .await?;
            self.replicas.erase(&counters);
        }
        self.durable(epoch).await?;
        Ok(Response::new(pb::EraseResponse {}))
    }

    async fn status(
        &self,
        request: Request<pb::ShardStatusRequest>,
    ) -> Result<Response<pb::ShardStatusResponse>, Status> {
        let brief = request.into_inner().brief;
        // Copied out under one lock: several guards of one mutex in a
        // single expression would deadlock.
        let drain = self.drain.lock().clone();
        Ok(Response::new(pb::ShardStatusResponse {
            node_id: self.node_id.to_string(),
            // A walk over every entry: not for frequent probes.
            entries: if brief { 0 } else { self.store.entry_count() },
            last_flush_unix_ms: self.flusher.last_flush_unix_ms(),
            durability: self.durability.as_str().to_string(),
            apply_calls: self.apply_calls.load(Ordering::Relaxed),
            increments_applied: self.increments_applied.load(Ordering::Relaxed),
            full_copies_received: self.full_copies_received.load(Ordering::Relaxed),
            remembered_keys: self.store.remembered_keys(),
            keys_forgotten_early: self.store.keys_forgotten_early(),
            flush_sequence: self.flusher.flush_sequence(),
            replicas: self
                .replicas
                .versions()
                .into_iter()
                .map(|(origin, version)| pb::ReplicaPart {
                    origin,
                    version,
                    ..Default::default()
                })
                .collect(),
            restoring: self.restoring.load(Ordering::SeqCst),
            replication_version: self.store.replication_version(),
            drain: drain.as_str().to_string(),
            drain_adopter: drain.adopter().unwrap_or_default().to_string(),
            drain_version: drain.handed_to().map_or(0, |(_, version)| version),
        }))
    }

    async fn copy_of(
        &self,
        request: Request<pb::CopyOfRequest>,
    ) -> Result<Response<pb::CopyOfResponse>, Status> {
        let request = request.into_inner();
        self.check_node_id(&request.node_id)?;
        let response = match self.replicas.copy_of(&request.origin) {
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
        self.check_node_id(&request.node_id)?;
        for entry in &request.entries {
            check_counter_name(&entry.counter)?;
        }
        let _replica_writes = self.replica_writes.lock().await;
        if !self.restoring.load(Ordering::SeqCst) {
            return Err(Status::failed_precondition(format!(
                "node {} is not waiting for a restore",
                self.node_id
            )));
        }
        let entries = request
            .entries
            .into_iter()
            .map(|entry| (entry.counter, entry.stripe, entry.value))
            .collect();
        let count = self.add_to_own(entries, OwnChange::Restored).await?;
        self.restoring.store(false, Ordering::SeqCst);
        tracing::info!(
            node_id = &*self.node_id,
            entries = count,
            "restored from replicas"
        );
        Ok(Response::new(pb::RestoreResponse {}))
    }

    async fn drain(
        &self,
        request: Request<pb::ShardDrainRequest>,
    ) -> Result<Response<pb::ShardDrainResponse>, Status> {
        let request = request.into_inner();
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
            _ => return Err(Status::invalid_argument("unknown drain phase")),
        };
        // Alone: no write is half-way past the check while the state moves.
        let paused = self.own_writes.write().await;
        let current = self.drain.lock().clone();
        let rank = |state: &DrainState| match state {
            DrainState::Serving => 0,
            DrainState::Draining => 1,
            DrainState::HandedOver { .. } => 2,
            DrainState::Drained { .. } => 3,
        };
        if let (Some((adopter, version)), Some((wanted, asked_version))) =
            (current.handed_to(), asked.handed_to())
        {
            if adopter != wanted || version != asked_version {
                return Err(Status::failed_precondition(format!(
                    "node {} is handed over to {adopter} at version {version}, not {wanted} at \
                     {asked_version}",
                    self.node_id
                )));
            }
        }
        if rank(&asked) > rank(&current) + 1 {
            return Err(Status::failed_precondition(format!(
                "node {} is {:?}: drain phases go in order",
                self.node_id,
                current.as_str()
            )));
        }
        // A repeat, or an earlier phase, changes nothing: a drain resumes
        // after a crash.
        if rank(&asked) == rank(&current) + 1 {
            let storage = self.storage.clone();
            let state = asked.clone();
            self.blocking(move || storage.set_drain(&state)).await?;
            *self.drain.lock() = asked.clone();
            tracing::info!(node_id = &*self.node_id, state = asked.as_str(), "drain");
        }
        // Everything written before the stop is on disk before the caller
        // takes the final copy: the epoch now covers it, and no write comes
        // after, so the wait needs no lock.
        let epoch = self.store.open_epoch();
        drop(paused);
        self.flushed(epoch).await?;
        Ok(Response::new(pb::ShardDrainResponse {}))
    }

    async fn drop_copy(
        &self,
        request: Request<pb::DropCopyRequest>,
    ) -> Result<Response<pb::DropCopyResponse>, Status> {
        let request = request.into_inner();
        self.check_node_id(&request.node_id)?;
        let _replica_writes = self.replica_writes.lock().await;
        if self.retired.lock().contains(&request.origin) {
            return Ok(Response::new(pb::DropCopyResponse {}));
        }
        let storage = self.storage.clone();
        let origin = request.origin.clone();
        self.blocking(move || storage.drop_copy(&origin)).await?;
        self.replicas.remove(&request.origin);
        self.retired.lock().insert(request.origin);
        Ok(Response::new(pb::DropCopyResponse {}))
    }

    async fn adopt(
        &self,
        request: Request<pb::AdoptRequest>,
    ) -> Result<Response<pb::AdoptResponse>, Status> {
        let request = request.into_inner();
        self.check_node_id(&request.node_id)?;
        let _replica_writes = self.replica_writes.lock().await;
        if self.retired.lock().contains(&request.origin) {
            return Ok(Response::new(pb::AdoptResponse { entries: 0 }));
        }
        if *self.drain.lock() != DrainState::Serving {
            return Err(Status::failed_precondition(format!(
                "node {} is being drained itself: it cannot adopt {}",
                self.node_id, request.origin
            )));
        }
        let Some((stamp, entries)) = self.replicas.copy_of(&request.origin) else {
            return Err(Status::failed_precondition(format!(
                "node {} holds no copy of {}",
                self.node_id, request.origin
            )));
        };
        let version = stamp.version;
        if version < request.version {
            return Err(Status::failed_precondition(format!(
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
        self.replicas.remove(&request.origin);
        self.retired.lock().insert(request.origin.clone());
        tracing::info!(
            node_id = &*self.node_id,
            origin = request.origin,
            entries = count,
            "adopted a drained node's entries"
        );
        Ok(Response::new(pb::AdoptResponse {
            entries: count as u64,
        }))
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
        if self.drain.lock().adopter().is_some() {
            return Err(Status::failed_precondition(format!(
                "node {} is drained: its entries are with another node",
                self.node_id
            )));
        }
        // Taken before the scan: the copy will hold everything acknowledged
        // before this time.
        let scanned_unix_ms = unix_ms_now();
        let store = self.store.clone();
        let since = request.since;
        // A walk over every entry: off the async workers.
        let changes = tokio::task::spawn_blocking(move || store.changes_since(since))
            .await
            .map_err(|error| Status::internal(error.to_string()))?;
        Ok(Response::new(pb::ChangesResponse {
            scanned_unix_ms,
            directory_id: self.storage.directory_id(),
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
        self.check_node_id(&request.node_id)?;
        if request.origin == *self.node_id {
            return Err(Status::invalid_argument(
                "a node does not hold a replica copy of itself",
            ));
        }
        tally_proto::config_file::validate_node_id(&request.origin)
            .map_err(Status::invalid_argument)?;
        for entry in &request.entries {
            check_counter_name(&entry.counter)?;
        }
        let stamp = CopyStamp {
            version: request.version,
            scanned_unix_ms: request.scanned_unix_ms,
            directory_id: request.directory_id,
        };
        let _replica_writes = self.replica_writes.lock().await;
        if self.retired.lock().contains(&request.origin) {
            // Drained: a late push must not bring its copy back.
            return Ok(Response::new(pb::ReplicateResponse {
                accepted: true,
                version: request.version,
            }));
        }
        match self
            .replicas
            .accepts(&request.origin, request.base, &stamp, request.full)
        {
            Verdict::Apply => {}
            Verdict::Stale => {
                return Ok(Response::new(pb::ReplicateResponse {
                    accepted: true,
                    version: self.replicas.version(&request.origin),
                }))
            }
            Verdict::NeedFull => {
                return Ok(Response::new(pb::ReplicateResponse {
                    accepted: false,
                    version: self.replicas.version(&request.origin),
                }))
            }
        }
        // Durable first, then visible to reads.
        let storage = self.storage.clone();
        let request = Arc::new(request);
        {
            let request = request.clone();
            self.blocking(move || {
                let entries: Vec<(&str, u32, i64)> = request
                    .entries
                    .iter()
                    .map(|entry| (entry.counter.as_str(), entry.stripe, entry.value))
                    .collect();
                storage.write_replica(&request.origin, request.full, stamp, &entries)
            })
            .await?;
        }
        let entries: Vec<(&str, u32, i64)> = request
            .entries
            .iter()
            .map(|entry| (entry.counter.as_str(), entry.stripe, entry.value))
            .collect();
        self.replicas
            .apply(&request.origin, stamp, request.full, &entries);
        if request.full {
            self.full_copies_received.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Response::new(pb::ReplicateResponse {
            accepted: true,
            version: request.version,
        }))
    }
}
