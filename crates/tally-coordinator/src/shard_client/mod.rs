//! The coordinator's connection to one shard node, with the per-shard
//! batcher that turns many concurrent increments into few internal calls.
//!
//! Batching: every increment bound for a node goes through one queue. A
//! batcher task takes everything queued (up to
//! `max_increments_per_shard_batch`) into one `Apply` call as soon as a call
//! slot is free (`max_in_flight_batches_per_shard`). A job (one public
//! call's increments for this node) is never split, so a job larger than the
//! cap goes alone in a call of its own. When the node is idle an
//! increment is sent at once, alone; under load, increments gather while
//! earlier calls are in flight, and before it takes the queue the batcher
//! lets the tasks that are ready to run add theirs (a yield to the
//! scheduler, see `gather_loop`). No timer adds latency.
//!
//! The queue is bounded by increments, not calls ([`MAX_QUEUED_INCREMENTS`]):
//! a slow node makes callers wait for room instead of growing memory. A job
//! whose caller has given up (deadline passed) is dropped before it is sent.

mod apply;
mod batcher;
mod coalesce;
mod read;
mod rpc;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tally_proto::{pb, timed};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::transport::Endpoint;

use crate::error::ShardCallError;
use crate::metrics::NodeMetrics;
use crate::model::{NodeRead, Outcome, StripeIncrement};
use apply::{batch_loop, ApplyJob};
use read::{read_loop, ReadJob};
use rpc::{call, Grpc};

/// How long to wait for a TCP connection to a shard.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Increments queued for one node before callers wait for room.
pub const MAX_QUEUED_INCREMENTS: usize = 262_144;

/// Largest internal message, matching the shard's limit.
const MAX_MESSAGE_BYTES: usize = tally_runtime::edge::MAX_INTERNAL_MESSAGE_BYTES;

/// The caller's span, kept with its job while traces are exported (none
/// otherwise).
fn job_span() -> tracing::Span {
    if tally_runtime::traces::exported() {
        tracing::Span::current()
    } else {
        tracing::Span::none()
    }
}

/// While traces are exported, the span of one internal call (`name`, to
/// `node_id`) that serves the public calls of `jobs`: the first one's
/// child, linked to the others. `Span::none()` otherwise.
fn call_span<'a>(
    name: &'static str,
    node_id: &str,
    mut jobs: impl Iterator<Item = &'a tracing::Span>,
) -> tracing::Span {
    if !tally_runtime::traces::exported() {
        return tracing::Span::none();
    }
    let first = jobs.next().cloned().unwrap_or_else(tracing::Span::none);
    let span =
        tracing::debug_span!(parent: &first, "internal_call", otel.name = name, node = node_id);
    for job in jobs {
        tally_runtime::traces::link(&span, job);
    }
    span
}

/// Client of one shard node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ShardClient {
    node_id: Arc<str>,
    address: Arc<str>,
    grpc: Grpc,
    jobs: mpsc::UnboundedSender<ApplyJob>,
    /// Reads waiting for the read batcher. Unbounded: each is a public call
    /// waiting for its answer, so the server's concurrency bounds them.
    reads: mpsc::UnboundedSender<ReadJob>,
    /// Permits are increments; bounds the queue (see the module docs).
    queue_room: Arc<Semaphore>,
    /// This node's series (`crate::metrics`).
    metrics: Arc<NodeMetrics>,
}

/// Batching settings for one node's client.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Longest wait for one internal call.
    pub shard_timeout: Duration,
    /// Apply calls in flight at once.
    pub max_in_flight_batches: usize,
    /// Most increments in one call.
    pub max_increments_per_batch: usize,
}

impl ShardClient {
    /// A client of the node `node_id` at `address` (`host:port`). Connects
    /// lazily and reconnects on its own, so a node that is down at start is
    /// picked up when it comes back. Spawns the batcher task.
    ///
    /// With `tls`, it connects over TLS, presenting the coordinator's
    /// certificate and checking the node's against the CA for the host of
    /// `address`.
    pub fn new(
        node_id: &str,
        address: &str,
        tls: Option<&Arc<tally_runtime::tls::ClientTls>>,
        settings: BatchSettings,
        metrics: NodeMetrics,
    ) -> Result<Self, crate::StartError> {
        // The URI's scheme stays http with TLS: tonic would look for a TLS
        // configuration of its own on an https one; the connector does TLS.
        let endpoint = Endpoint::from_shared(format!("http://{address}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel =
            match tls {
                Some(tls) => endpoint.connect_with_connector_lazy(tls.connector(address).map_err(
                    |message| crate::StartError::NodeAddress {
                        node: node_id.to_string(),
                        message,
                    },
                )?),
                None => endpoint.connect_lazy(),
            };
        let grpc = Grpc::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        // Unbounded channel, bounded by `queue_room`.
        let (jobs, queue) = mpsc::unbounded_channel();
        let node_id: Arc<str> = node_id.into();
        let metrics = Arc::new(metrics);
        tokio::spawn(batch_loop(
            node_id.clone(),
            grpc.clone(),
            queue,
            settings,
            metrics.clone(),
        ));
        let (reads, read_queue) = mpsc::unbounded_channel();
        tokio::spawn(read_loop(
            node_id.clone(),
            grpc.clone(),
            read_queue,
            settings,
            metrics.clone(),
        ));
        Ok(ShardClient {
            node_id,
            address: address.into(),
            grpc,
            jobs,
            reads,
            queue_room: Arc::new(Semaphore::new(MAX_QUEUED_INCREMENTS)),
            metrics,
        })
    }

    /// This node's series.
    pub fn metrics(&self) -> &NodeMetrics {
        &self.metrics
    }

    /// Increments this coordinator holds for the node: queued for a call
    /// slot, or in an Apply call not answered yet (their queue room is
    /// given back with the answer).
    pub fn pending_increments(&self) -> usize {
        MAX_QUEUED_INCREMENTS.saturating_sub(self.queue_room.available_permits())
    }

    /// The node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The node's id, shared.
    pub fn node_id_arc(&self) -> Arc<str> {
        self.node_id.clone()
    }

    /// The node's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Applies increments through the batcher. One outcome per increment, in
    /// order. The caller bounds the wait by its own deadline.
    pub async fn apply(
        &self,
        increments: Vec<StripeIncrement>,
    ) -> Result<Vec<Outcome>, ShardCallError> {
        let shutting_down = || ShardCallError::Failed("coordinator is shutting down".into());
        // A job larger than the whole queue takes all of it.
        let room = increments.len().min(MAX_QUEUED_INCREMENTS) as u32;
        let queue_room = self
            .queue_room
            .clone()
            .acquire_many_owned(room)
            .await
            .map_err(|_| shutting_down())?;
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(ApplyJob {
                increments,
                span: job_span(),
                reply,
                queue_room,
            })
            .map_err(|_| shutting_down())?;
        answer
            .await
            .map_err(|_| ShardCallError::Failed("coordinator is shutting down".into()))?
    }

    /// This node's part of each counter (its entries summed), in order, and
    /// each of its replica copies' parts. Concurrent reads share Read
    /// calls, like increments share Apply calls.
    pub async fn read(
        &self,
        counters: Vec<String>,
        budget: Duration,
    ) -> Result<NodeRead, ShardCallError> {
        let shutting_down = || ShardCallError::Failed("coordinator is shutting down".into());
        let (reply, answer) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + budget;
        let sent = Arc::new(AtomicBool::new(false));
        self.reads
            .send(ReadJob {
                counters,
                deadline,
                sent: sent.clone(),
                span: job_span(),
                reply,
            })
            .map_err(|_| shutting_down())?;
        // The shared call waits as long as its most patient caller; this
        // one waits no longer than its own budget. A budget spent queued
        // here is not the node's fault.
        match tokio::time::timeout_at(deadline, answer).await {
            Err(_) if sent.load(Ordering::SeqCst) => Err(ShardCallError::TimedOut(budget)),
            Err(_) => Err(ShardCallError::NotSent(budget)),
            Ok(answer) => answer.map_err(|_| shutting_down())?,
        }
    }

    /// This node's own entries changed since `since` (see the shard's
    /// `Changes`).
    pub async fn changes(
        &self,
        since: u64,
        budget: Duration,
    ) -> Result<pb::ChangesResponse, ShardCallError> {
        let request = pb::ChangesRequest {
            node_id: self.node_id.to_string(),
            since,
        };
        let mut grpc = self.grpc.clone();
        call(budget, grpc.changes(timed(request, budget))).await
    }

    /// This node's whole copy of `origin`'s entries, if it holds one.
    pub async fn copy_of(
        &self,
        origin: &str,
        budget: Duration,
    ) -> Result<pb::CopyOfResponse, ShardCallError> {
        let request = pb::CopyOfRequest {
            node_id: self.node_id.to_string(),
            origin: origin.to_string(),
        };
        let mut grpc = self.grpc.clone();
        call(budget, grpc.copy_of(timed(request, budget))).await
    }

    /// Moves this node's drain on to `phase`.
    pub async fn drain(
        &self,
        phase: pb::DrainPhase,
        adopter: &str,
        version: u64,
        budget: Duration,
    ) -> Result<(), ShardCallError> {
        let request = pb::ShardDrainRequest {
            node_id: self.node_id.to_string(),
            phase: phase as i32,
            adopter: adopter.to_string(),
            version,
        };
        let mut grpc = self.grpc.clone();
        call(budget, grpc.drain(timed(request, budget))).await?;
        Ok(())
    }

    /// Has this node drop its copy of the drained `origin` for good.
    pub async fn drop_copy(&self, origin: &str, budget: Duration) -> Result<(), ShardCallError> {
        let request = pb::DropCopyRequest {
            node_id: self.node_id.to_string(),
            origin: origin.to_string(),
        };
        let mut grpc = self.grpc.clone();
        call(budget, grpc.drop_copy(timed(request, budget))).await?;
        Ok(())
    }

    /// Has this node adopt its copy of the drained `origin`'s entries.
    pub async fn adopt(
        &self,
        origin: &str,
        version: u64,
        budget: Duration,
    ) -> Result<u64, ShardCallError> {
        let request = pb::AdoptRequest {
            node_id: self.node_id.to_string(),
            origin: origin.to_string(),
            version,
        };
        let mut grpc = self.grpc.clone();
        Ok(call(budget, grpc.adopt(timed(request, budget)))
            .await?
            .entries)
    }

    /// On a stand-in: closes its takeover of `origin` and lists the records
    /// it applied since it began (`end` None), or ends a takeover (`end`:
    /// its id, and the origin's answer to its reconciliation).
    pub async fn stand_in(
        &self,
        origin: &str,
        end: Option<(u64, &pb::ReconcileResponse)>,
        budget: Duration,
    ) -> Result<pb::StandInResponse, ShardCallError> {
        let (takeover, reconciled) = end.map_or((0, None), |(id, answer)| (id, Some(answer)));
        let request = pb::StandInRequest {
            node_id: self.node_id.to_string(),
            origin: origin.to_string(),
            end: end.is_some(),
            takeover,
            copy_version: reconciled.map_or(0, |reconciled| reconciled.version),
            directory_id: reconciled.map_or(0, |reconciled| reconciled.directory_id),
        };
        let mut grpc = self.grpc.clone();
        call(budget, grpc.stand_in(timed(request, budget))).await
    }

    /// On a node that is back: reconciles with the stand-in's takeover.
    pub async fn reconcile(
        &self,
        stand_in: &str,
        takeover: u64,
        keys: Vec<pb::ReconcileKey>,
        budget: Duration,
    ) -> Result<pb::ReconcileResponse, ShardCallError> {
        let request = pb::ReconcileRequest {
            node_id: self.node_id.to_string(),
            stand_in: stand_in.to_string(),
            takeover,
            keys,
        };
        let mut grpc = self.grpc.clone();
        call(budget, grpc.reconcile(timed(request, budget))).await
    }

    /// Adds its earlier entries, and the idempotency records that came
    /// with them, to a node that started empty.
    ///
    /// `membership` (stamp and change number, or zeros): what every other
    /// node's keyed increments are open to, to which the node's open too if
    /// it knows none.
    pub async fn restore(
        &self,
        entries: Vec<pb::EntryValue>,
        records: Vec<pb::KeyRecord>,
        membership: (u64, u64),
        budget: Duration,
    ) -> Result<(), ShardCallError> {
        let request = pb::RestoreRequest {
            node_id: self.node_id.to_string(),
            entries,
            records,
            ring: membership.0,
            ring_epoch: membership.1,
        };
        let mut grpc = self.grpc.clone();
        call(budget, grpc.restore(timed(request, budget))).await?;
        Ok(())
    }

    /// A membership change (number `epoch`) on this node: seals it for
    /// membership `ring` (`seal`: the membership; answers the records it
    /// hands on), or opens it with the records handed on for its keys.
    pub async fn realign(
        &self,
        ring: u64,
        epoch: u64,
        seal: Option<pb::RingSpec>,
        records: Vec<pb::KeyRecord>,
        budget: Duration,
    ) -> Result<Vec<pb::KeyRecord>, ShardCallError> {
        let request = pb::RealignRequest {
            node_id: self.node_id.to_string(),
            ring,
            epoch,
            open: seal.is_none(),
            seal,
            records,
        };
        let mut grpc = self.grpc.clone();
        let answer: pb::RealignResponse =
            call(budget, grpc.realign(timed(request, budget))).await?;
        Ok(answer.records)
    }

    /// Stores a change set of `origin`'s entries on this node, as a replica
    /// copy.
    pub async fn replicate(
        &self,
        origin: &str,
        base: u64,
        changes: pb::ChangesResponse,
        round_began: std::time::Instant,
        budget: Duration,
    ) -> Result<pb::ReplicateResponse, ShardCallError> {
        let request = pb::ReplicateRequest::of_changes(
            &self.node_id,
            origin,
            base,
            changes,
            // Rounded up: a copy must never look younger than it is.
            round_began.elapsed().as_micros().div_ceil(1_000) as u64,
        );
        let mut grpc = self.grpc.clone();
        call(budget, grpc.replicate(timed(request, budget))).await
    }

    /// Resets counters to 0 on this node.
    pub async fn erase(
        &self,
        counters: Vec<String>,
        budget: Duration,
    ) -> Result<(), ShardCallError> {
        let request = pb::EraseRequest {
            node_id: self.node_id.to_string(),
            counters,
        };
        let mut request = timed(request, budget);
        // The public Delete's context (traces on only).
        tally_runtime::traces::inject(request.metadata_mut());
        let mut grpc = self.grpc.clone();
        call(budget, grpc.erase(request)).await?;
        Ok(())
    }

    /// The node's own report of its state.
    pub async fn status(
        &self,
        budget: Duration,
    ) -> Result<pb::ShardStatusResponse, ShardCallError> {
        self.status_with(false, budget).await
    }

    /// The node's status without what costs a walk over every entry: for
    /// health probes.
    pub async fn brief_status(
        &self,
        budget: Duration,
    ) -> Result<pb::ShardStatusResponse, ShardCallError> {
        self.status_with(true, budget).await
    }

    async fn status_with(
        &self,
        brief: bool,
        budget: Duration,
    ) -> Result<pb::ShardStatusResponse, ShardCallError> {
        let mut grpc = self.grpc.clone();
        let status = call(
            budget,
            grpc.status(timed(pb::ShardStatusRequest { brief }, budget)),
        )
        .await?;
        if status.node_id != *self.node_id {
            return Err(ShardCallError::Failed(format!(
                "the node at this address is {:?}",
                status.node_id
            )));
        }
        if status.protocol_version != tally_proto::SHARD_PROTOCOL_VERSION {
            return Err(ShardCallError::Failed(format!(
                "the node speaks internal protocol version {}, this coordinator {}: run \
                 coordinators and shard nodes of the same release",
                status.protocol_version,
                tally_proto::SHARD_PROTOCOL_VERSION
            )));
        }
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_read_that_never_left_the_queue_is_not_sent() {
        // A node that accepts connections and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = silent.local_addr().unwrap().to_string();
        let (connected, first_connection) = oneshot::channel();
        let _held = tokio::spawn(async move {
            let mut connected = Some(connected);
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
                if let Some(connected) = connected.take() {
                    let _ = connected.send(());
                }
            }
        });
        let settings = BatchSettings {
            shard_timeout: Duration::from_secs(30),
            max_in_flight_batches: 1,
            max_increments_per_batch: 10,
        };
        let client =
            ShardClient::new("node", &address, None, settings, NodeMetrics::disabled()).unwrap();
        // The first read takes the only call slot and waits on the node.
        let first = {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .read(vec!["a".into()], Duration::from_millis(1_500))
                    .await
            })
        };
        // Connecting means its call was sent and holds the slot.
        first_connection.await.unwrap();
        let second = client
            .read(vec!["b".into()], Duration::from_millis(300))
            .await;
        assert_eq!(
            second,
            Err(ShardCallError::NotSent(Duration::from_millis(300)))
        );
        assert_eq!(
            first.await.unwrap(),
            Err(ShardCallError::TimedOut(Duration::from_millis(1_500)))
        );
        // Nobody waits for the first call any more: it gave its slot back
        // (instead of holding it for the 30 s shard timeout), so the next
        // read is sent.
        let third = client
            .read(vec!["c".into()], Duration::from_millis(1_000))
            .await;
        assert_eq!(
            third,
            Err(ShardCallError::TimedOut(Duration::from_millis(1_000)))
        );
    }
}
