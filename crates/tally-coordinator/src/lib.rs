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
//! - `auth`: bearer tokens with roles, checked before the dispatch;
//!   [`Security`]: the ports' TLS and the tokens, reloaded on SIGHUP.
//! - `error`: errors and their gRPC codes.
//! - [`Coordinator`] and [`run`]: build, serve, shut down;
//!   [`ClusterHandle::reload`] applies a reloaded membership (SIGHUP in the
//!   binary).
#![deny(missing_docs)]

mod auth;
mod cluster;
pub mod config;
mod deadline;
mod dispatch;
mod error;
mod health;
mod limit;
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
    /// The TLS files cannot be used.
    #[error("tls: {0}")]
    Tls(#[from] tally_runtime::tls::TlsError),
    /// A node's address cannot be dialled over TLS (its host is not a name
    /// or an IP address a certificate can be checked for).
    #[error("node {node}: {message}")]
    NodeAddress {
        /// The node's id.
        node: String,
        /// What is wrong with its address.
        message: String,
    },
    /// The tokens file cannot be used.
    #[error(transparent)]
    Tokens(#[from] tally_runtime::config_file::ConfigError),
    /// The metrics listener has no address.
    #[error("metrics listener: {0}")]
    Listener(#[from] std::io::Error),
}

/// What the coordinator's ports are secured with: TLS on the public and
/// metrics ports, and the tokens the public API checks. Cheap to clone;
/// [`Security::reload`] reads the files again (SIGHUP in the binary).
#[derive(Debug, Clone, Default)]
pub struct Security {
    public_tls: Option<Arc<tally_runtime::tls::ServerTls>>,
    metrics_tls: Option<Arc<tally_runtime::tls::ServerTls>>,
    tokens: Option<(std::path::PathBuf, auth::SharedTokens)>,
}

impl Security {
    /// Loads what `config` names.
    pub fn load(config: &CoordinatorConfig) -> Result<Self, StartError> {
        use tally_runtime::tls::{ClientAuth, ServerTls};
        let (public_tls, metrics_tls) = match &config.tls {
            Some(files) => {
                let (public, metrics) =
                    ServerTls::grpc_and_metrics(files.clone(), ClientAuth::None)?;
                (Some(public), Some(metrics))
            }
            None => (None, None),
        };
        let tokens = match &config.tokens_file {
            Some(path) => {
                let tokens = tally_runtime::tokens::Tokens::load(path)?;
                Some((
                    path.clone(),
                    Arc::new(arc_swap::ArcSwap::from_pointee(tokens)),
                ))
            }
            None => None,
        };
        Ok(Security {
            public_tls,
            metrics_tls,
            tokens,
        })
    }

    /// Reads the TLS files (of both ports, and the certificate the
    /// coordinator presents to shards, which `cluster` holds) and the
    /// tokens file again. All or nothing: on an error, everything in use
    /// stays. Returns a one-line summary.
    pub fn reload(&self, cluster: &ClusterHandle) -> Result<String, String> {
        let tokens = match &self.tokens {
            Some((path, _)) => {
                Some(tally_runtime::tokens::Tokens::load(path).map_err(|error| error.to_string())?)
            }
            None => None,
        };
        let mut reloaded = Vec::new();
        if let Some(public) = &self.public_tls {
            let cluster = cluster.current();
            let servers: Vec<&tally_runtime::tls::ServerTls> = std::iter::once(public)
                .chain(&self.metrics_tls)
                .map(|tls| &**tls)
                .collect();
            let clients: Vec<&tally_runtime::tls::ClientTls> =
                cluster.client_tls().into_iter().map(|tls| &**tls).collect();
            // Swaps nothing unless every configuration builds.
            tally_runtime::tls::reload_together(public.files(), &servers, &clients)
                .map_err(|error| error.to_string())?;
            reloaded.push("tls certificates".to_string());
        }
        if let (Some((_, shared)), Some(tokens)) = (&self.tokens, tokens) {
            reloaded.push(format!("{} tokens", tokens.len()));
            shared.store(Arc::new(tokens));
        }
        Ok(if reloaded.is_empty() {
            "no tls or tokens to reload".to_string()
        } else {
            format!("reloaded {}", reloaded.join(" and "))
        })
    }
}

/// A coordinator ready to serve.
#[derive(Debug)]
pub struct Coordinator {
    cluster: ClusterHandle,
    /// Where to serve metrics while serving, if anywhere.
    metrics_listener: Option<TcpListener>,
    security: Security,
}

impl Coordinator {
    /// Builds the ring and the node clients. Connects lazily: nodes that are
    /// down now are reached when they come up.
    pub fn new(config: CoordinatorConfig) -> Result<Self, StartError> {
        let security = Security::load(&config)?;
        Ok(Coordinator {
            cluster: ClusterHandle::new(Cluster::new(config)?),
            metrics_listener: None,
            security,
        })
    }

    /// [`Coordinator::new`], with its Prometheus series in a registry of
    /// its own, served on `GET /metrics` at `listener` while it serves (as
    /// `tally_shard::ShardNode::with_metrics`).
    pub fn with_metrics(
        config: CoordinatorConfig,
        listener: TcpListener,
    ) -> Result<Self, StartError> {
        let security = Security::load(&config)?;
        let registry = Arc::new(tally_runtime::metrics::Registry::enabled("coordinator"));
        let metrics = Arc::new(metrics::CoordinatorMetrics::new(registry));
        let cluster = ClusterHandle::new(Cluster::with_metrics(config, metrics)?);
        cluster.set_metrics_address(listener.local_addr()?);
        Ok(Coordinator {
            cluster,
            metrics_listener: Some(listener),
            security,
        })
    }

    /// A handle on the running membership, to reload it
    /// ([`ClusterHandle::reload`]) while serving.
    pub fn handle(&self) -> ClusterHandle {
        self.cluster.clone()
    }

    /// The ports' TLS and the tokens, to reload them
    /// ([`Security::reload`]) while serving.
    pub fn security(&self) -> Security {
        self.security.clone()
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
                self.security.metrics_tls.clone(),
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
            tls = self.security.public_tls.is_some(),
            tokens = self.security.tokens.is_some(),
            "serving"
        );
        if self.security.tokens.is_some() && self.security.public_tls.is_none() {
            tracing::warn!(
                "tokens are checked but travel in plaintext: anyone on the path can read \
                 and reuse them; set the [tls] keys"
            );
        }
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
                    auth::Authorize::new(
                        dispatch::Dispatch::new(counter, routes),
                        self.security.tokens.map(|(_, tokens)| tokens),
                    ),
                    api,
                ),
                tally_runtime::tls::incoming(
                    listener,
                    self.security.public_tls,
                    tally_runtime::edge::MAX_CONNECTIONS_PER_SERVER,
                ),
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
