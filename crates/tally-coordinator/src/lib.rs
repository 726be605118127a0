//! The Tally coordinator: takes the public gRPC calls, routes each increment
//! over the consistent-hash ring to a shard node, and fans reads out to every
//! node and sums their parts.
//!
//! The invariant that keeps it simple: a counter's value is the sum, over
//! every shard node, of that node's entries for it. So where an increment
//! lands changes locality, never correctness, and a read asks every node.
//!
//! # Layout
//!
//! - [`config`]: the TOML file with the static membership.
//! - `cluster`: what a valid request becomes ([`Cluster`]), by concern:
//!   writes (routing, failover), reads and deletes, drain, copies (restores
//!   and replication rounds), and the handle swapped on a reload.
//! - `shard_client`: one client per node, speaking `model`'s types: the
//!   Apply and Read batchers, coalescing, and the wire edge (`rpc`).
//! - `model`: the internal hop in the coordinator's own types
//!   (`StripeIncrement`, `Outcome`, `NodeRead`).
//! - The pure rules, plain functions over plain data: `merge` (which
//!   answers make up each node's part of a read) and `placement` (where a
//!   write goes when its owner cannot take it).
//! - `health`: each node's health, from probes and call outcomes.
//! - `replication`: the loop that copies each node's entries to its
//!   replicas.
//! - `service`: the public `Counter` and `Admin` gRPC services;
//!   `dispatch` sends `Counter` calls to it before tonic's router.
//! - `deadline`: the client's deadline, from `grpc-timeout`.
//! - `error`: errors and their gRPC codes.
//! - [`Coordinator`] and [`run`]: build, serve, shut down;
//!   [`ClusterHandle::reload`] applies a reloaded membership (SIGHUP in the
//!   binary).
#![deny(missing_docs)]

mod cluster;
pub mod config;
mod deadline;
mod dispatch;
mod error;
mod health;
mod merge;
pub mod metrics;
mod model;
mod placement;
mod replication;
mod service;
mod shard_client;

use std::future::Future;
use std::sync::Arc;

use tally_proto::pb;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

pub use cluster::{Cluster, ClusterHandle, ReloadError, Total};
pub use config::{CoordinatorConfig, CoordinatorOverrides, NodeConfig};
pub use deadline::stamp_arrival;
pub use error::{CoordinatorError, ShardCallError};
pub use health::NodeHealth;
pub use replication::replicas_of;
pub use service::{locate_response, ring_response, AdminService, CounterService};
pub use shard_client::ShardClient;

/// Largest public request or answer message, in bytes
/// ([`tally_runtime::edge::MAX_PUBLIC_MESSAGE_BYTES`], where it is
/// explained).
pub const MAX_MESSAGE_BYTES: usize = tally_runtime::edge::MAX_PUBLIC_MESSAGE_BYTES;

/// Why the coordinator could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The membership does not make a ring.
    #[error("membership: {0}")]
    Ring(#[from] tally_ring::RingError),
    /// A node address cannot be used, or the server failed.
    #[error("grpc: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A coordinator ready to serve.
#[derive(Debug)]
pub struct Coordinator {
    cluster: ClusterHandle,
    /// Where to serve metrics while serving, if anywhere.
    metrics_listener: Option<TcpListener>,
}

impl Coordinator {
    /// Builds the ring and the node clients. Connects lazily: nodes that are
    /// down now are reached when they come up.
    pub fn new(config: CoordinatorConfig) -> Result<Self, StartError> {
        Ok(Coordinator {
            cluster: ClusterHandle::new(Cluster::new(config)?),
            metrics_listener: None,
        })
    }

    /// [`Coordinator::new`], with its Prometheus series in a registry of
    /// its own, served on `GET /metrics` at `listener` while it serves (as
    /// `tally_shard::ShardNode::with_metrics`).
    pub fn with_metrics(
        config: CoordinatorConfig,
        listener: TcpListener,
    ) -> Result<Self, StartError> {
        let registry = Arc::new(tally_runtime::metrics::Registry::enabled("coordinator"));
        let metrics = Arc::new(metrics::CoordinatorMetrics::new(registry));
        let cluster = ClusterHandle::new(Cluster::with_metrics(config, metrics)?);
        if let Ok(address) = listener.local_addr() {
            cluster.set_metrics_address(address);
        }
        Ok(Coordinator {
            cluster,
            metrics_listener: Some(listener),
        })
    }

    /// A handle on the running membership, to reload it
    /// ([`ClusterHandle::reload`]) while serving.
    pub fn handle(&self) -> ClusterHandle {
        self.cluster.clone()
    }

    /// Serves the public API until `shutdown` completes, then stops accepting
    /// and lets in-flight calls finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        // Ends when serving does (dropped at the end of this function).
        let _metrics_server = self.metrics_listener.map(|listener| {
            let handle = self.cluster.clone();
            let registry = handle.current().metrics().registry().clone();
            tally_runtime::process::AbortOnDrop(tokio::spawn(tally_runtime::metrics::serve(
                listener,
                registry,
                move || {
                    let cluster = handle.current();
                    cluster.metrics().publish(&cluster);
                },
                std::future::pending(),
            )))
        });
        let counter = service::CounterService::new(self.cluster.clone());
        let admin = service::AdminService::new(self.cluster.clone());
        let api = &tally_runtime::process::COORDINATOR_API;
        let (health_reporter, routes) = tally_runtime::process::grpc_routes(api);
        health_reporter
            .set_serving::<pb::counter_server::CounterServer<service::CounterService>>()
            .await;
        health_reporter
            .set_serving::<pb::admin_server::AdminServer<service::AdminService>>()
            .await;

        let address = listener.local_addr().ok();
        let cluster = self.cluster.current();
        tracing::info!(
            address = ?address,
            nodes = cluster.shards().len(),
            stripes = cluster.config().stripes,
            "serving"
        );
        // tonic's decoding limit is the backstop of the edge's, which
        // answers a message over it RESOURCE_EXHAUSTED first.
        let counter = pb::counter_server::CounterServer::new(counter)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        // Counter calls never reach the router (see `dispatch`).
        let routes = routes
            .add_service(InterceptedService::new(
                pb::admin_server::AdminServer::new(admin)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
                deadline::stamp_arrival,
            ))
            .prepare();
        tally_runtime::process::server_builder()
            .serve_with_incoming_shutdown(
                tally_runtime::process::explain_unimplemented(
                    dispatch::Dispatch::new(counter, routes),
                    api,
                ),
                tally_runtime::edge::limit_connections(tally_runtime::process::incoming(listener)),
                shutdown,
            )
            .await?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Builds a coordinator from `config` and serves it on `listener` until
/// `shutdown` completes.
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    Coordinator::new(config)?.serve(listener, shutdown).await
}
