//! The public gRPC services, `tally.v1.Counter` and `tally.v1.Admin`: the
//! edge where wire types become validated domain types and errors become
//! gRPC statuses. The work itself is in [`crate::cluster`].

use std::sync::Arc;

use futures::future::join_all;
use tally_proto::domain::{validate_batch, CounterName, Increment, ProtocolError};
use tally_proto::pb;
use tally_proto::window::{self, Window};
use tally_ring::Ring;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::cluster::{ClusterHandle, Total};
use crate::deadline::{call_budget, request_deadline};
use crate::limit::{self, Turns};
use crate::metrics::{CoordinatorMetrics, Method};

/// Serves `tally.v1.Counter`.
#[derive(Debug, Clone)]
pub struct CounterService {
    cluster: ClusterHandle,
    metrics: Arc<CoordinatorMetrics>,
    /// Limited increments' turns: across membership reloads.
    turns: Arc<Turns>,
}

impl CounterService {
    /// The service over the cluster `cluster` holds (read per call, so a
    /// reloaded membership takes effect for the next call).
    pub fn new(cluster: ClusterHandle) -> Self {
        let metrics = cluster.current().metrics().clone();
        CounterService {
            cluster,
            metrics,
            turns: Arc::default(),
        }
    }
}

/// The counter a call addresses: `counter` itself, or its window of
/// `window_seconds` that this coordinator's clock is in. With the window's
/// end (Unix ms; 0 without a window).
fn addressed(
    counter: CounterName,
    window_seconds: Option<u32>,
) -> Result<(CounterName, i64), ProtocolError> {
    match window_seconds {
        None => Ok((counter, 0)),
        Some(seconds) => {
            let window = Window::current(seconds);
            Ok((counter.in_window(window)?, window.end_unix_ms() as i64))
        }
    }
}

/// One counter's answer to a Get or GetBatch: its total, or why it has
/// none. `counter` is the client's name.
fn to_response(counter: String, total: Total, window_end_unix_ms: i64) -> pb::GetResponse {
    let (error_code, error) = match total.error {
        None => (0, String::new()),
        Some(error) => (error.code() as u32, error.to_string()),
    };
    pb::GetResponse {
        counter,
        value: total.value,
        complete: total.complete,
        error_code,
        error,
        window_end_unix_ms,
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
            let mut increment = Increment::try_from(request.into_inner())?;
            tracing::Span::current().record("counter", increment.counter.as_str());
            let window_end_unix_ms;
            (increment.counter, window_end_unix_ms) =
                addressed(increment.counter, increment.window_seconds)?;
            let cluster = self.cluster.current();
            let delta = increment.delta;
            let Some(read_back) = increment.read_back else {
                let deduplicated = cluster.increment(vec![increment], deadline).await?;
                return Ok(Response::new(pb::IncrementResponse {
                    deduplicated: deduplicated > 0,
                    applied: delta,
                    window_end_unix_ms,
                    ..Default::default()
                }));
            };
            if let Some(limit) = read_back.limit {
                let limited = limit::increment_within(
                    &self.cluster,
                    &self.turns,
                    increment,
                    limit,
                    read_back.allow_partial,
                    deadline,
                )
                .await?;
                return Ok(Response::new(pb::IncrementResponse {
                    deduplicated: false,
                    total: limited.total,
                    complete: limited.complete,
                    applied: limited.applied,
                    window_end_unix_ms,
                }));
            }
            // Read after the acknowledgement: the total holds this
            // increment, and any other acknowledged before the read.
            let counter = increment.counter.clone();
            let deduplicated = cluster.increment(vec![increment], deadline).await?;
            let total = cluster
                .totals(vec![counter], read_back.allow_partial, deadline)
                .await?
                .pop()
                .expect("one total per counter")
                .into_result()?;
            Ok(Response::new(pb::IncrementResponse {
                deduplicated: deduplicated > 0,
                total: total.value,
                complete: total.complete,
                applied: delta,
                window_end_unix_ms,
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
            let mut increments: Vec<Increment> = validate_batch(request.into_inner().increments)?;
            // One clock reading for the batch (if an item has a window),
            // and one tag per window length: the items share them.
            let mut now = None;
            let mut tags: Vec<(u32, window::Tag)> = Vec::new();
            for (index, increment) in increments.iter_mut().enumerate() {
                let in_batch = |error| ProtocolError::InBatch {
                    index,
                    error: Box::new(error),
                };
                increment.check_batchable().map_err(in_batch)?;
                if let Some(seconds) = increment.window_seconds {
                    let tag = match tags.iter().position(|(length, _)| *length == seconds) {
                        Some(known) => &tags[known].1,
                        None => {
                            let now = *now.get_or_insert_with(window::now_unix_ms);
                            tags.push((seconds, Window::containing(now, seconds).tag()));
                            &tags[tags.len() - 1].1
                        }
                    };
                    increment.counter = increment.counter.tagged(tag).map_err(in_batch)?;
                }
            }
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
            let window_seconds = window::seconds_from_wire(request.window_seconds)?;
            let name = window_seconds.map(|_| counter.as_str().to_string());
            let (counter, window_end_unix_ms) = addressed(counter, window_seconds)?;
            let mut total = self
                .cluster
                .current()
                .totals(vec![counter], request.allow_partial, deadline)
                .await?
                .pop()
                .expect("one total per counter")
                .into_result()?;
            let name = name.unwrap_or_else(|| std::mem::take(&mut total.counter));
            Ok(Response::new(to_response(name, total, window_end_unix_ms)))
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
            let window_seconds = window::seconds_from_wire(request.window_seconds)?;
            let counters: Vec<CounterName> = validate_batch(request.counters)?;
            // One window for the whole batch: every counter's as of one
            // clock reading.
            let window = window_seconds.map(Window::current);
            let (names, counters, window_end_unix_ms) = match window {
                None => (None, counters, 0),
                Some(window) => {
                    let names: Vec<String> = counters
                        .iter()
                        .map(|counter| counter.as_str().to_string())
                        .collect();
                    let tag = window.tag();
                    let windows = counters
                        .into_iter()
                        .enumerate()
                        .map(|(index, counter)| {
                            counter
                                .tagged(&tag)
                                .map_err(|error| ProtocolError::InBatch {
                                    index,
                                    error: Box::new(error),
                                })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    (Some(names), windows, window.end_unix_ms() as i64)
                }
            };
            let totals = self
                .cluster
                .current()
                .totals(counters, request.allow_partial, deadline)
                .await?;
            let counters = match names {
                // Each answer under the client's name, not its window's.
                Some(names) => names
                    .into_iter()
                    .zip(totals)
                    .map(|(name, total)| to_response(name, total, window_end_unix_ms))
                    .collect(),
                None => totals
                    .into_iter()
                    .map(|mut total| {
                        let name = std::mem::take(&mut total.counter);
                        to_response(name, total, 0)
                    })
                    .collect(),
            };
            Ok(Response::new(pb::GetBatchResponse { counters }))
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
            let request = request.into_inner();
            let counter = CounterName::try_from(request.counter)?;
            tracing::Span::current().record("counter", counter.as_str());
            let window_seconds = window::seconds_from_wire(request.window_seconds)?;
            let (counter, _) = addressed(counter, window_seconds)?;
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
