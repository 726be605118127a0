//! The public gRPC services, `tally.v1.Counter` and `tally.v1.Admin`: the
//! edge where wire types become validated domain types and errors become
//! gRPC statuses. The work itself is in [`crate::cluster`].

use std::sync::Arc;

use futures::future::join_all;
use tally_proto::domain::{validate_batch, CounterName, Increment};
use tally_proto::pb;
use tally_ring::Ring;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::cluster::{ClusterHandle, Total};
use crate::deadline::{call_budget, request_deadline};
use crate::metrics::{CoordinatorMetrics, Method};

/// Serves `tally.v1.Counter`.
#[derive(Debug, Clone)]
pub struct CounterService {
    cluster: ClusterHandle,
    metrics: Arc<CoordinatorMetrics>,
}

impl CounterService {
    /// The service over the cluster `cluster` holds (read per call, so a
    /// reloaded membership takes effect for the next call).
    pub fn new(cluster: ClusterHandle) -> Self {
        let metrics = cluster.current().metrics().clone();
        CounterService { cluster, metrics }
    }
}

fn to_response(total: Total) -> pb::GetResponse {
    pb::GetResponse {
        counter: total.counter,
        value: total.value,
        complete: total.complete,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl pb::counter_server::Counter for CounterService {
    async fn increment(
        &self,
        request: Request<pb::IncrementRequest>,
    ) -> Result<Response<pb::IncrementResponse>, Status> {
        let call = self.metrics.call(Method::Increment);
        let result: Result<Response<pb::IncrementResponse>, Status> = async move {
            let deadline = request_deadline(&request);
            let increment = Increment::try_from(request.into_inner())?;
            tracing::Span::current().record("counter", increment.counter.as_str());
            let deduplicated = self
                .cluster
                .current()
                .increment(vec![increment], deadline)
                .await?;
            Ok(Response::new(pb::IncrementResponse {
                deduplicated: deduplicated > 0,
                ..Default::default()
            }))
        }
        .instrument(call.span())
        .await;
        call.finish(&result);
        result
    }

    async fn increment_batch(
        &self,
        request: Request<pb::IncrementBatchRequest>,
    ) -> Result<Response<pb::IncrementBatchResponse>, Status> {
        let call = self.metrics.call(Method::IncrementBatch);
        let result: Result<Response<pb::IncrementBatchResponse>, Status> = async move {
            let deadline = request_deadline(&request);
            let increments: Vec<Increment> = validate_batch(request.into_inner().increments)?;
            let deduplicated = self
                .cluster
                .current()
                .increment(increments, deadline)
                .await?;
            Ok(Response::new(pb::IncrementBatchResponse {
                // At most 10,000 items.
                deduplicated: deduplicated as u32,
            }))
        }
        .instrument(call.span())
        .await;
        call.finish(&result);
        result
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let call = self.metrics.call(Method::Get);
        let result: Result<Response<pb::GetResponse>, Status> = async move {
            let deadline = request_deadline(&request);
            let request = request.into_inner();
            let counter = CounterName::try_from(request.counter)?;
            tracing::Span::current().record("counter", counter.as_str());
            let total = self
                .cluster
                .current()
                .totals(vec![counter], request.allow_partial, deadline)
                .await?
                .pop()
                .expect("one total per counter");
            Ok(Response::new(to_response(total)))
        }
        .instrument(call.span())
        .await;
        call.finish(&result);
        result
    }

    async fn get_batch(
        &self,
        request: Request<pb::GetBatchRequest>,
    ) -> Result<Response<pb::GetBatchResponse>, Status> {
        let call = self.metrics.call(Method::GetBatch);
        let result: Result<Response<pb::GetBatchResponse>, Status> = async move {
            let deadline = request_deadline(&request);
            let request = request.into_inner();
            let counters: Vec<CounterName> = validate_batch(request.counters)?;
            let totals = self
                .cluster
                .current()
                .totals(counters, request.allow_partial, deadline)
                .await?;
            Ok(Response::new(pb::GetBatchResponse {
                counters: totals.into_iter().map(to_response).collect(),
            }))
        }
        .instrument(call.span())
        .await;
        call.finish(&result);
        result
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let call = self.metrics.call(Method::Delete);
        let result: Result<Response<pb::DeleteResponse>, Status> = async move {
            let deadline = request_deadline(&request);
            let counter = CounterName::try_from(request.into_inner().counter)?;
            tracing::Span::current().record("counter", counter.as_str());
            self.cluster.current().delete(counter, deadline).await?;
            Ok(Response::new(pb::DeleteResponse {}))
        }
        .instrument(call.span())
        .await;
        call.finish(&result);
        result
    }
}

/// Serves `tally.v1.Admin`.
#[derive(Debug, Clone)]
pub struct AdminService {
    cluster: ClusterHandle,
    metrics: Arc<CoordinatorMetrics>,
}

impl AdminService {
    /// The service over the cluster `cluster` holds.
    pub fn new(cluster: ClusterHandle) -> Self {
        let metrics = cluster.current().metrics().clone();
        AdminService { cluster, metrics }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn ring(
        &self,
        _request: Request<pb::RingRequest>,
    ) -> Result<Response<pb::RingResponse>, Status> {
        let call = self.metrics.call(Method::Ring);
        let result: Result<Response<pb::RingResponse>, Status> = async move {
            let cluster = self.cluster.current();
            Ok(Response::new(ring_response(
                cluster.ring(),
                cluster.config(),
            )))
        }
        .instrument(call.span())
        .await;
        call.finish(&result);
        result
    }

    async fn locate(
        &self,
        request: Request<pb::LocateRequest>,
    ) -> Result<Response<pb::LocateResponse>, Status> {
        let call = self.metrics.call(Method::Locate);
        let result: Result<Response<pb::LocateResponse>, Status> = async move {
            let counter = CounterName::try_from(request.into_inner().counter)?;
            tracing::Span::current().record("counter", counter.as_str());
            let cluster = self.cluster.current();
            Ok(Response::new(locate_response(
                cluster.ring(),
                cluster.config(),
                &counter,
            )))
        }
        .instrument(call.span())
        .await;
        call.finish(&result);
        result
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let call = self.metrics.call(Method::ClusterStatus);
        let result: Result<Response<pb::ClusterStatusResponse>, Status> = async move {
            let cluster = &self.cluster.current();
            let budget = call_budget(cluster.config().shard_timeout, request_deadline(&request));
            let statuses = cluster
                .shards()
                .iter()
                .enumerate()
                .map(|(index, shard)| async move {
                    // A node known to be down gets a probe's time: one hung
                    // node does not hold the whole status for the shard timeout.
                    let result = shard.status(cluster.budget_for(index, budget)).await;
                    let health = cluster.health(index);
                    let mut node = pb::NodeStatus {
                        id: shard.node_id().to_string(),
                        address: shard.address().to_string(),
                        health: if health.up { "up" } else { "down" }.to_string(),
                        drain: health.drain.public_name().to_string(),
                        health_since_unix_ms: health.since_unix_ms,
                        replication_failures: health.replication_failures,
                        ..Default::default()
                    };
                    match result {
                        Ok(status) => {
                            node.reachable = true;
                            node.entries = status.entries;
                            node.last_flush_unix_ms = status.last_flush_unix_ms;
                            node.durability = status.durability_mode().public_name().to_string();
                            node.remembered_keys = status.remembered_keys;
                            node.keys_forgotten_early = status.keys_forgotten_early;
                            node.log_bytes = status.log_bytes;
                            node.last_checkpoint_unix_ms = status.last_checkpoint_unix_ms;
                            node.standing_in_for = status.standing_in_for;
                            node.metrics_address = status.metrics_address;
                            node.keyed_membership = match status.keyed_ring {
                                _ if status.keyed_ring_sealed => "moving",
                                0 => "none",
                                ring if ring == cluster.keyed_stamp() => "current",
                                _ => "other",
                            }
                            .to_string();
                        }
                        Err(error) => node.error = error.to_string(),
                    }
                    node
                });
            Ok(Response::new(pb::ClusterStatusResponse {
                nodes: join_all(statuses).await,
                metrics_address: self
                    .cluster
                    .metrics_address()
                    .map(|address| address.to_string())
                    .unwrap_or_default(),
            }))
        }
        .instrument(call.span())
        .await;
        call.finish(&result);
        result
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let call = self.metrics.call(Method::Drain);
        let result: Result<Response<pb::DrainResponse>, Status> = async move {
            let node_id = request.into_inner().node_id;
            let (adopter, entries) = self.cluster.current().drain(&node_id).await?;
            Ok(Response::new(pb::DrainResponse { adopter, entries }))
        }
        .instrument(call.span())
        .await;
        call.finish(&result);
        result
    }
}

/// The `Ring` answer for a membership: a pure function of the config, so
/// `tallyctl ring --config` computes it offline without a coordinator.
pub fn ring_response(ring: &Ring, config: &crate::CoordinatorConfig) -> pb::RingResponse {
    pb::RingResponse {
        nodes: ring
            .nodes()
            .iter()
            .map(|node| pb::RingNode {
                id: node.id.clone(),
                address: config
                    .node(&node.id)
                    .map(|node| node.address.clone())
                    .unwrap_or_default(),
                weight: node.weight,
                vnodes: node.vnodes,
                owned_fraction: node.owned_fraction,
            })
            .collect(),
        stripes: config.stripes,
    }
}

/// The `Locate` answer: which node owns each stripe of `counter`.
pub fn locate_response(
    ring: &Ring,
    config: &crate::CoordinatorConfig,
    counter: &CounterName,
) -> pb::LocateResponse {
    pb::LocateResponse {
        counter: counter.to_string(),
        stripes: ring
            .locate(counter.as_str(), config.stripes)
            .into_iter()
            .map(|placement| {
                let node = &ring.nodes()[placement.node_index];
                pb::StripeLocation {
                    stripe: placement.stripe,
                    node_id: node.id.clone(),
                    address: config
                        .node(&node.id)
                        .map(|node| node.address.clone())
                        .unwrap_or_default(),
                    hash: placement.hash,
                }
            })
            .collect(),
    }
}
