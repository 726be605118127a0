//! The Tally shard node: keeps counters in memory, writes them behind to
//! sled, and recovers them on restart.
//!
//! A node holds entries `(counter, stripe) -> i64`. A counter's value is the
//! sum of its entries over every node, so a node never needs to know what the
//! others hold: it applies batches of increments, answers reads of its own
//! entries, and erases counters, all asked by coordinators over the internal
//! `tally.v1.Shard` gRPC service.
//!
//! # Layout
//!
//! - [`config`]: the TOML file and flags ([`ShardConfig`], [`Durability`]).
//! - [`store`]: the in-memory map, segmented for concurrent writers, with
//!   dirty tracking, flush epochs for group commit, and idempotency records.
//! - [`keys`]: the on-disk key and value layout.
//! - [`replicas`]: copies of other nodes' entries, for reads while they
//!   are down.
//! - [`storage`]: sled on disk, the data directory lock, damage detection
//!   and [`storage::verify`].
//! - [`flusher`]: the write-behind task, sync and async durability.
//! - [`service`]: the gRPC service.
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

pub mod config;
pub mod flusher;
pub mod keys;
pub mod replicas;
pub mod service;
pub mod storage;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use tally_proto::pb;
use tokio::net::TcpListener;

pub use config::{Durability, ShardConfig, ShardOverrides};
pub use storage::{DrainState, StorageError};

/// Largest internal request a node accepts. A full public batch (10,000
/// increments of 256-byte names with 128-byte keys) is about 4 MiB, and the
/// coordinator may coalesce more than one.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Why a shard node stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The data directory cannot be used.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The listener has no local address.
    #[error("listener: {0}")]
    Listener(#[from] std::io::Error),
}

/// A node whose data is loaded and locked, ready to serve.
#[derive(Debug)]
pub struct ShardNode {
    config: ShardConfig,
    store: Arc<Store>,
    storage: Arc<storage::Storage>,
    replicas: Arc<replicas::Replicas>,
    state: service::NodeState,
}

use store::Store;

impl ShardNode {
    /// Locks the data directory and loads every entry into memory.
    pub async fn open(config: ShardConfig) -> Result<ShardNode, ShardError> {
        let data_dir = config.data_dir.clone();
        let node_id = config.node_id.clone();
        let retention = config.key_retention;
        let opened = tokio::task::spawn_blocking(move || {
            let storage = storage::Storage::open(&data_dir, &node_id)?;
            let store = Store::with_retention(retention);
            store.set_incarnation(storage.incarnation());
            let replicas = replicas::Replicas::default();
            let report = storage.load_into(&store, &replicas)?;
            Ok::<_, StorageError>((storage, store, replicas, report))
        })
        .await
        .unwrap_or_else(|join_error| {
            Err(StorageError::Damaged {
                dir: config.data_dir.clone(),
                message: format!("opening panicked: {join_error}"),
            })
        })?;
        let (storage, store, replicas, report) = opened;
        tracing::info!(
            node_id = config.node_id,
            data_dir = %config.data_dir.display(),
            entries = report.entries,
            idempotency_keys = report.records,
            replica_entries = report.foreign_entries,
            awaiting_restore = report.awaiting_restore,
            flush_sequence = report.sequence,
            durability = config.durability.as_str(),
            "recovered"
        );
        Ok(ShardNode {
            config,
            store: Arc::new(store),
            storage: Arc::new(storage),
            replicas: Arc::new(replicas),
            state: service::NodeState {
                restoring: report.awaiting_restore,
                drain: report.drain.clone(),
                retired: report.retired.clone(),
            },
        })
    }

    /// Serves until `shutdown` completes, then stops accepting, lets
    /// in-flight requests finish (each durable or failed, never dropped after
    /// an acknowledgement), flushes, and releases the data directory.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ShardError> {
        let address = listener.local_addr()?;
        let flusher = Arc::new(flusher::Flusher::start(
            self.store.clone(),
            self.storage.clone(),
            self.config.durability,
            self.config.flush_interval,
        ));
        let service = service::ShardService::new(
            &self.config.node_id,
            self.config.durability,
            self.store.clone(),
            flusher.clone(),
            self.storage.clone(),
            self.replicas.clone(),
            self.state.clone(),
        );
        let (health_reporter, server) = tally_proto::process::grpc_server();
        health_reporter
            .set_serving::<pb::shard_server::ShardServer<service::ShardService>>()
            .await;

        tracing::info!(node_id = self.config.node_id, %address, "serving");
        let served = server
            .add_service(
                pb::shard_server::ShardServer::new(service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(tally_proto::process::incoming(listener), shutdown)
            .await;

        // Every connection has closed; a request task that outlived its
        // connection still gets its answer from this last flush.
        let flushed = flusher.stop().await;
        // Only after a successful last flush may the files be marked as
        // cleanly stopped.
        let closed = match (&flushed, Arc::try_unwrap(self.storage)) {
            (Ok(()), Ok(storage)) => tokio::task::spawn_blocking(move || storage.close())
                .await
                .unwrap_or_else(|join_error| {
                    Err(StorageError::Damaged {
                        dir: self.config.data_dir.clone(),
                        message: format!("closing panicked: {join_error}"),
                    })
                }),
            (Ok(()), Err(_)) => {
                tracing::warn!("storage still in use at stop; not marked as a clean stop");
                Ok(())
            }
            (Err(_), _) => Ok(()),
        };
        tracing::info!(node_id = self.config.node_id, "stopped");
        served?;
        flushed?;
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
