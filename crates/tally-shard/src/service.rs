//! The `tally.v1.Shard` gRPC service: the coordinator's only way in.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tally_proto::domain::{CounterName, IdempotencyKey};
use tally_proto::pb;
use tonic::{Request, Response, Status};

use crate::config::Durability;
use crate::flusher::{unix_ms_now, Flusher};
use crate::replicas::{Replicas, Verdict};
use crate::storage::Storage;
use crate::store::{ApplyOutcome, Store, StripeIncrement};

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
    /// Own-entry writes hold it shared; a Restore holds it alone.
    own_writes: Arc<tokio::sync::RwLock<()>>,
    apply_calls: Arc<AtomicU64>,
    increments_applied: Arc<AtomicU64>,
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
        restoring: bool,
    ) -> Self {
        ShardService {
            node_id: node_id.into(),
            durability,
            store,
            flusher,
            storage,
            replicas,
            replica_writes: Arc::default(),
            restoring: Arc::new(AtomicBool::new(restoring)),
            own_writes: Arc::default(),
            apply_calls: Arc::default(),
            increments_applied: Arc::default(),
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
            self.store.apply(&increments, unix_ms_now())
        };
        self.apply_calls.fetch_add(1, Ordering::Relaxed);
        self.increments_applied
            .fetch_add(increments.len() as u64, Ordering::Relaxed);
        self.flusher
            .wait_durable(epoch)
            .await
            .map_err(|error| Status::unavailable(format!("node {}: {error}", self.node_id)))?;
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
        }))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let request = request.into_inner();
        self.check_node_id(&request.node_id)?;
        let restoring = self.restoring.load(Ordering::SeqCst);
        let counters = request
            .counters
            .iter()
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
                version: copy.version,
                scanned_unix_ms: copy.scanned_unix_ms,
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
            incarnation: self.store.incarnation(),
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
            self.store.erase(&counters)
        };
        // Replica copies too: a delete must not come back from a copy read
        // while the counter's origin is down.
        let _replica_writes = self.replica_writes.lock().await;
        let held: Vec<(String, String)> = self
            .replicas
            .held(&counters)
            .into_iter()
            .map(|(origin, counter, _)| (origin, counter))
            .collect();
        if !held.is_empty() {
            let storage = self.storage.clone();
            tokio::task::spawn_blocking(move || storage.erase_replicas(&held))
                .await
                .map_err(|error| Status::internal(error.to_string()))?
                .map_err(|error| Status::unavailable(format!("node {}: {error}", self.node_id)))?;
            self.replicas.erase(&counters);
        }
        self.flusher
            .wait_durable(epoch)
            .await
            .map_err(|error| Status::unavailable(format!("node {}: {error}", self.node_id)))?;
        Ok(Response::new(pb::EraseResponse {}))
    }

    async fn status(
        &self,
        request: Request<pb::ShardStatusRequest>,
    ) -> Result<Response<pb::ShardStatusResponse>, Status> {
        let brief = request.into_inner().brief;
        Ok(Response::new(pb::ShardStatusResponse {
            node_id: self.node_id.to_string(),
            // A walk over every entry: not for frequent probes.
            entries: if brief { 0 } else { self.store.entry_count() },
            last_flush_unix_ms: self.flusher.last_flush_unix_ms(),
            durability: self.durability.as_str().to_string(),
            apply_calls: self.apply_calls.load(Ordering::Relaxed),
            increments_applied: self.increments_applied.load(Ordering::Relaxed),
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
        }))
    }

    async fn copy_of(
        &self,
        request: Request<pb::CopyOfRequest>,
    ) -> Result<Response<pb::CopyOfResponse>, Status> {
        let request = request.into_inner();
        self.check_node_id(&request.node_id)?;
        let response = match self.replicas.copy_of(&request.origin) {
            Some((version, scanned_unix_ms, entries)) => pb::CopyOfResponse {
                found: true,
                version,
                scanned_unix_ms,
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
        // Own writes pause, and everything written so far reaches disk, so
        // that no flush of an older value lands after the restore's batch.
        let _paused = self.own_writes.write().await;
        self.flusher
            .wait_flushed(self.store.open_epoch())
            .await
            .map_err(|error| Status::unavailable(format!("node {}: {error}", self.node_id)))?;
        // The node's earlier entries are added to what it took since it
        // started: each entry's new absolute value.
        let mut added: Vec<(String, u32, i64)> = Vec::with_capacity(request.entries.len());
        for entry in &request.entries {
            let current = self.store.entry(&entry.counter, entry.stripe);
            let value = current.checked_add(entry.value).ok_or_else(|| {
                Status::out_of_range(format!("restoring {:?} overflows", entry.counter))
            })?;
            added.push((entry.counter.clone(), entry.stripe, value));
        }
        let storage = self.storage.clone();
        let added = Arc::new(added);
        {
            let added = added.clone();
            tokio::task::spawn_blocking(move || {
                let entries: Vec<(&str, u32, i64)> = added
                    .iter()
                    .map(|(counter, stripe, value)| (counter.as_str(), *stripe, *value))
                    .collect();
                storage.restore(&entries)
            })
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(|error| Status::unavailable(format!("node {}: {error}", self.node_id)))?;
        }
        for (counter, stripe, value) in added.iter() {
            self.store.load(counter, *stripe, *value);
        }
        self.restoring.store(false, Ordering::SeqCst);
        tracing::info!(
            node_id = &*self.node_id,
            entries = request.entries.len(),
            "restored from replicas"
        );
        Ok(Response::new(pb::RestoreResponse {}))
    }

    async fn changes(
        &self,
        request: Request<pb::ChangesRequest>,
    ) -> Result<Response<pb::ChangesResponse>, Status> {
        let request = request.into_inner();
        self.check_node_id(&request.node_id)?;
        // An empty node's "everything" would replace its good copies.
        self.check_restored()?;
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
        let _replica_writes = self.replica_writes.lock().await;
        match self
            .replicas
            .accepts(&request.origin, request.base, request.version, request.full)
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
        let written = {
            let request = request.clone();
            tokio::task::spawn_blocking(move || {
                let entries: Vec<(&str, u32, i64)> = request
                    .entries
                    .iter()
                    .map(|entry| (entry.counter.as_str(), entry.stripe, entry.value))
                    .collect();
                storage.write_replica(
                    &request.origin,
                    request.full,
                    request.version,
                    request.scanned_unix_ms,
                    &entries,
                )
            })
            .await
            .map_err(|error| Status::internal(error.to_string()))?
        };
        written.map_err(|error| Status::unavailable(format!("node {}: {error}", self.node_id)))?;
        let entries: Vec<(&str, u32, i64)> = request
            .entries
            .iter()
            .map(|entry| (entry.counter.as_str(), entry.stripe, entry.value))
            .collect();
        self.replicas.apply(
            &request.origin,
            request.version,
            request.scanned_unix_ms,
            request.full,
            &entries,
        );
        Ok(Response::new(pb::ReplicateResponse {
            accepted: true,
            version: request.version,
        }))
    }
}
