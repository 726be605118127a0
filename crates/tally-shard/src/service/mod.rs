//! The `tally.v1.Shard` gRPC service: the coordinator's only way in.

mod copies;
mod drain;
mod read;
mod ring;
mod takeover;
#[cfg(test)]
mod tests;
mod write;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tally_proto::domain::{CounterName, IdempotencyKey};
use tally_proto::pb;
use tonic::{Request, Response, Status};

use crate::change::{Change, Entry, OwnChange};
use crate::config::Durability;
use crate::journal::{Journal, NodeState};
use crate::meta::DrainState;
use crate::refusal::Refusal;
use crate::replicas::CopyRecord;
use crate::store::{decode_record_key, encode_record_key_into, MAX_STRIPES};

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
    /// When each copy was last brought up to date (`copies::CopyAges`).
    copy_ages: Arc<copies::CopyAges>,
    /// Where this node serves metrics, as bound (empty: it does not).
    metrics_address: Arc<str>,
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
            copy_ages: Arc::default(),
            metrics_address: "".into(),
        }
    }

    /// Names the address metrics are served on, in status reports.
    pub fn with_metrics_address(mut self, address: std::net::SocketAddr) -> Self {
        self.metrics_address = address.to_string().into();
        self
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
    async fn add_to_own(
        &self,
        entries: Vec<Entry>,
        records: Vec<CopyRecord>,
        why: OwnChange,
    ) -> Result<usize, Refusal> {
        let _paused = self.own_writes.write().await;
        if !records.is_empty() {
            self.supersede_seal().await?;
        }
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
        self.submit(Change::SetOwn {
            why,
            entries: own,
            records,
        })
        .await?;
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

/// Idempotency records from the wire: counter names and keys checked.
fn records(values: Vec<pb::KeyRecord>) -> Result<Vec<CopyRecord>, Refusal> {
    let mut key = Vec::new();
    values
        .into_iter()
        .map(|record| {
            check_counter_name(&record.counter)?;
            if record.key.is_empty() {
                return Err(Refusal::InvalidRequest(
                    "an idempotency record has an empty key".into(),
                ));
            }
            IdempotencyKey::validate(&record.key)?;
            encode_record_key_into(&mut key, &record.counter, &record.key);
            Ok((key.as_slice().into(), record.delta, record.applied_unix_ms))
        })
        .collect()
}

/// Idempotency records for the wire.
fn records_to_wire(records: Vec<CopyRecord>) -> Vec<pb::KeyRecord> {
    records
        .into_iter()
        .filter_map(|(key, delta, applied_unix_ms)| {
            let (counter, key) = decode_record_key(&key)?;
            Some(pb::KeyRecord {
                counter: counter.to_string(),
                key: key.to_string(),
                delta,
                applied_unix_ms,
            })
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
}

/// The gRPC surface: each call goes to the concern that serves it
/// (`write`, `read`, `copies`, `drain`); a refusal becomes a status with its
/// reason ([`Refusal`]). Handlers that hold a lock across a log write run
/// to their end on a task of their own.
#[tonic::async_trait]
impl pb::shard_server::Shard for ShardService {
    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        // Traces on: a child of the coordinator's Apply span (`traceparent`).
        let span = tracing::debug_span!("apply", otel.name = "Apply");
        tally_runtime::traces::adopt(&span, request.metadata());
        let answer =
            tracing::Instrument::instrument(self.apply_increments(request.into_inner()), span)
                .await?;
        Ok(Response::new(answer))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let span = tracing::debug_span!("read", otel.name = "Read");
        tally_runtime::traces::adopt(&span, request.metadata());
        let answer =
            tracing::Instrument::instrument(self.read_counters(request.into_inner()), span).await?;
        Ok(Response::new(answer))
    }

    async fn erase(
        &self,
        request: Request<pb::EraseRequest>,
    ) -> Result<Response<pb::EraseResponse>, Status> {
        let span = tracing::debug_span!("erase", otel.name = "Erase");
        tally_runtime::traces::adopt(&span, request.metadata());
        let request = request.into_inner();
        tracing::Instrument::instrument(
            self.to_the_end(move |service| async move { service.erase_to_the_end(request).await }),
            span,
        )
        .await
        .map(Response::new)
    }

    async fn status(
        &self,
        request: Request<pb::ShardStatusRequest>,
    ) -> Result<Response<pb::ShardStatusResponse>, Status> {
        Ok(Response::new(
            self.status_report(request.into_inner()).await?,
        ))
    }

    async fn copy_of(
        &self,
        request: Request<pb::CopyOfRequest>,
    ) -> Result<Response<pb::CopyOfResponse>, Status> {
        Ok(Response::new(
            self.copy_of_origin(request.into_inner()).await?,
        ))
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

    async fn stand_in(
        &self,
        request: Request<pb::StandInRequest>,
    ) -> Result<Response<pb::StandInResponse>, Status> {
        let request = request.into_inner();
        self.to_the_end(move |service| async move { service.stand_in_to_the_end(request).await })
            .await
            .map(Response::new)
    }

    async fn reconcile(
        &self,
        request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        let request = request.into_inner();
        self.to_the_end(move |service| async move { service.reconcile_to_the_end(request).await })
            .await
            .map(Response::new)
    }

    async fn realign(
        &self,
        request: Request<pb::RealignRequest>,
    ) -> Result<Response<pb::RealignResponse>, Status> {
        let request = request.into_inner();
        self.to_the_end(move |service| async move { service.realign_to_the_end(request).await })
            .await
            .map(Response::new)
    }

    async fn changes(
        &self,
        request: Request<pb::ChangesRequest>,
    ) -> Result<Response<pb::ChangesResponse>, Status> {
        Ok(Response::new(
            self.changes_since(request.into_inner()).await?,
        ))
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
