//! The Tally shard node: keeps counters in memory, makes every change
//! durable in an append-only log, checkpoints to sled in the background, and
//! recovers from both on restart.
//!
//! A node holds entries `(counter, stripe) -> i64`. A counter's value is the
//! sum of its entries over every node, so a node never needs to know what the
//! others hold: it applies batches of increments, answers reads of its own
//! entries, and erases counters, all asked by coordinators over the internal
//! `tally.v1.Shard` gRPC service.
//!
//! # Layout
//!
//! - `config`: the TOML file and flags ([`ShardConfig`], [`Durability`]).
//! - [`store`]: the in-memory counters, segmented for concurrent writers,
//!   with dirty tracking, flush epochs for group commit, idempotency
//!   records and checkpoint captures; `table` packs each segment's
//!   counters into one arena.
//! - `replicas`: copies of other nodes' entries, for reads while they
//!   are down.
//! - `log`: the append-only, checksummed log (segments, frames, the
//!   recovery scan); `change`: what each kind of frame records and how it
//!   is applied; `codec`: their byte encoding.
//! - `journal`: the log thread (group commit) and the checkpoint rounds
//!   it drives; `checkpoint`: the sled checkpoint and its thread.
//! - `meta`: the node's identity, starts, drain and restore state.
//! - `windows`: counters with a fixed window, refused and flagged once
//!   ended by this node's clock, and reclaimed (an index of them by end).
//! - `storage`: the data directory (lock, marker, witness), recovery and
//!   `storage::verify`; `legacy`: migration of format 2 directories.
//! - `service`: the gRPC service; `refusal`: every way it refuses a
//!   call, with the reason a coordinator decides on.
//! - [`crash_point`]: a test hook that crashes the process at a chosen
//!   moment.
//! - [`ShardNode`] and [`run`]: open, recover, serve, shut down.
//!
//! # Examples
//!
//! Starting a node in-process on an ephemeral port, as the tests do:
//!
//! ```no_run
//! # async fn example() -> Result<(), tally_shard::ShardError> {
//! use tally_shard::{ShardConfig, ShardNode};
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let config = ShardConfig::new("shard-1", listener.local_addr().unwrap(), "/tmp/tally-shard-1");
//! let node = ShardNode::open(config).await?;
//! node.serve(listener, async { /* a shutdown signal */ }).await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod change;
mod checkpoint;
mod codec;
mod config;
pub mod crash_point;
mod journal;
mod legacy;
mod log;
mod meta;
pub mod metrics;
mod refusal;
mod replicas;
mod service;
mod storage;
pub mod store;
mod table;
mod windows;

use std::future::Future;
use std::sync::Arc;

use tally_proto::pb;
use tokio::net::TcpListener;

pub use config::{Durability, ShardConfig, ShardOverrides};
pub use meta::DrainState;
pub use refusal::Refusal;
pub use storage::{verify, DirectoryReport, StorageError, FORMAT_VERSION};

/// Largest internal message a node accepts or sends. A full public batch
/// (10,000 increments of 256-byte names with 128-byte keys) is about 4 MiB,
/// and the coordinator may coalesce more than one; but the largest are full
/// copies ([`tally_runtime::edge::MAX_INTERNAL_MESSAGE_BYTES`], where the
/// limit is explained).
pub const MAX_MESSAGE_BYTES: usize = tally_runtime::edge::MAX_INTERNAL_MESSAGE_BYTES;

/// Why a shard node stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The data directory cannot be used.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The listener has no local address, or a thread cannot start.
    #[error("listener: {0}")]
    Listener(#[from] std::io::Error),
    /// The TLS files cannot be used.
    #[error("tls: {0}")]
    Tls(#[from] tally_runtime::tls::TlsError),
}

/// A node whose data is recovered and locked, ready to serve.
pub struct ShardNode {
    config: ShardConfig,
    recovered: storage::Recovered,
    metrics_listener: Option<TcpListener>,
    tls: Option<ShardTls>,
}

/// A node's TLS: its internal port's (clients need a certificate the CA
/// signed) and its metrics port's. Cheap to clone; [`ShardTls::reload`]
/// reads the files again (SIGHUP in the binary).
#[derive(Debug, Clone)]
pub struct ShardTls {
    internal: Arc<tally_runtime::tls::ServerTls>,
    metrics: Arc<tally_runtime::tls::ServerTls>,
}

impl ShardTls {
    /// Loads `files`.
    pub fn load(
        files: &tally_runtime::tls::TlsFiles,
    ) -> Result<Self, tally_runtime::tls::TlsError> {
        let (internal, metrics) = tally_runtime::tls::ServerTls::grpc_and_metrics(
            files.clone(),
            tally_runtime::tls::ClientAuth::Required,
        )?;
        Ok(ShardTls { internal, metrics })
    }

    /// Reads the files again; connections made after it use them. On an
    /// error both ports keep the files in use.
    pub fn reload(&self) -> Result<(), tally_runtime::tls::TlsError> {
        tally_runtime::tls::reload_together(
            self.internal.files(),
            &[&self.internal, &self.metrics],
            &[],
        )
    }
}

impl std::fmt::Debug for ShardNode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ShardNode")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ShardNode {
    /// Locks the data directory and recovers its state: the checkpoint, then
    /// the log after it.
    pub async fn open(config: ShardConfig) -> Result<ShardNode, ShardError> {
        let data_dir = config.data_dir.clone();
        let node_id = config.node_id.clone();
        let retention = config.key_retention;
        let segment_bytes = config.log_segment_bytes;
        let started = std::time::Instant::now();
        let recovered = tokio::task::spawn_blocking(move || {
            storage::Storage::open(&data_dir, &node_id, retention, segment_bytes)
        })
        .await
        .unwrap_or_else(|join_error| {
            Err(StorageError::Damaged {
                dir: config.data_dir.clone(),
                message: format!("opening panicked: {join_error}"),
            })
        })?;
        // Recovery's buffers (log segments read whole, a checkpoint copy)
        // are free now.
        tally_runtime::process::release_free_memory();
        let report = &recovered.report;
        tracing::info!(
            node_id = config.node_id,
            data_dir = %config.data_dir.display(),
            entries = report.entries,
            idempotency_keys = report.records,
            replica_entries = report.foreign_entries,
            awaiting_restore = report.awaiting_restore,
            checkpoint_position = report.checkpoint_position,
            log_frames = report.log_frames,
            last_frame = report.last_seq,
            durability = config.durability.as_str(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
        let tls = config.tls.as_ref().map(ShardTls::load).transpose()?;
        Ok(ShardNode {
            config,
            recovered,
            metrics_listener: None,
            tls,
        })
    }

    /// The node's TLS, if it has any, to reload it while serving.
    pub fn tls(&self) -> Option<ShardTls> {
        self.tls.clone()
    }

    /// Serves Prometheus metrics on `GET /metrics` at `listener` too, while
    /// the node serves.
    pub fn with_metrics(mut self, listener: TcpListener) -> Self {
        self.metrics_listener = Some(listener);
        self
    }

    /// Serves until `shutdown` completes, then stops accepting, lets
    /// in-flight requests finish (each durable or failed, never dropped after
    /// an acknowledgement), writes the last changes and a last checkpoint,
    /// and releases the data directory.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ShardError> {
        let address = listener.local_addr()?;
        let storage::Recovered {
            storage,
            state,
            log,
            witness,
            checkpoint,
            checkpoint_position,
            checkpoint_hash,
            pending_start,
            ..
        } = self.recovered;
        state
            .store
            .windows()
            .set_grace_ms(self.config.window_grace.as_millis() as u64);
        let metrics = self.metrics_listener.as_ref().map(|_| {
            metrics::ShardMetrics::new(Arc::new(tally_runtime::metrics::Registry::enabled("shard")))
        });
        let journal = Arc::new(journal::Journal::start(
            state.clone(),
            journal::JournalParts {
                dir: storage.dir().to_path_buf(),
                log,
                witness,
                checkpoint_position,
                checkpoint,
                checkpoint_hash,
                pending_start,
                commit_metrics: metrics
                    .as_ref()
                    .map(metrics::ShardMetrics::commits)
                    .unwrap_or_default(),
            },
            journal::LogSettings {
                durability: self.config.durability,
                flush_interval: self.config.flush_interval,
                segment_bytes: self.config.log_segment_bytes,
                checkpoint_bytes: self.config.checkpoint_log_bytes,
                checkpoint_interval: self.config.checkpoint_interval,
            },
        )?);
        let mut service = service::ShardService::new(
            &self.config.node_id,
            self.config.durability,
            state,
            journal.clone(),
        );
        if let Some(listener) = &self.metrics_listener {
            service = service.with_metrics_address(listener.local_addr()?);
        }
        let (health_reporter, server) =
            tally_runtime::process::api_server(&tally_runtime::process::SHARD_API);
        health_reporter
            .set_serving::<pb::shard_server::ShardServer<service::ShardService>>()
            .await;

        // Ends when serving does (dropped at the end of this function).
        let _metrics_server = match (self.metrics_listener, metrics) {
            (Some(listener), Some(metrics)) => {
                let service = service.clone();
                let registry = metrics.registry.clone();
                Some(tally_runtime::process::AbortOnDrop(tokio::spawn(
                    tally_runtime::metrics::serve(
                        listener,
                        self.tls.as_ref().map(|tls| tls.metrics.clone()),
                        registry,
                        move || service.publish_metrics(&metrics),
                        std::future::pending(),
                    ),
                )))
            }
            _ => None,
        };
        tracing::info!(
            node_id = self.config.node_id,
            %address,
            tls = self.tls.is_some(),
            "serving"
        );
        if self.tls.is_none() && !address.ip().is_loopback() {
            tracing::warn!(
                %address,
                "serving the internal API beyond loopback without tls: anyone who can reach \
                 this port can change or delete every counter on this node; set the [tls] keys"
            );
        }
        let served = server
            // tonic's decoding limit is the backstop of the edge's
            // (`SHARD_API`'s), which answers a message over it
            // RESOURCE_EXHAUSTED first.
            .add_service(
                pb::shard_server::ShardServer::new(service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(
                tally_runtime::tls::incoming(
                    listener,
                    self.tls.map(|tls| tls.internal),
                    tally_runtime::edge::MAX_CONNECTIONS_PER_SERVER,
                ),
                shutdown,
            )
            .await;

        // Every connection has closed; a request task that outlived its
        // connection still gets its answer from this last write.
        let stopping = journal.clone();
        let stopped = tokio::task::spawn_blocking(move || stopping.stop())
            .await
            .unwrap_or_else(|join_error| {
                Err(StorageError::Damaged {
                    dir: self.config.data_dir.clone(),
                    message: format!("stopping panicked: {join_error}"),
                })
            });
        // Only after a successful last write may the directory be marked
        // for a start without a copy check.
        let closed = match &stopped {
            Ok(Some(stopped)) => {
                let stopped = *stopped;
                tokio::task::spawn_blocking(move || {
                    storage.close(stopped.last_seq, stopped.checkpoint_hash)
                })
                .await
                .unwrap_or_else(|join_error| {
                    Err(StorageError::Damaged {
                        dir: self.config.data_dir.clone(),
                        message: format!("closing panicked: {join_error}"),
                    })
                })
            }
            _ => Ok(()),
        };
        tracing::info!(node_id = self.config.node_id, "stopped");
        served?;
        stopped?;
        closed?;
        Ok(())
    }
}

/// Opens the node described by `config` and serves it on `listener` until
/// `shutdown` completes.
pub async fn run(
    config: ShardConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ShardError> {
    ShardNode::open(config)
        .await?
        .serve(listener, shutdown)
        .await
}
