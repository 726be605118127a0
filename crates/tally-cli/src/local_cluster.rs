//! A whole Tally cluster in one process: shard nodes and a coordinator on
//! loopback, each a real gRPC server on a real socket with real sled files.
//!
//! `tallyctl dev` runs one for development; the integration tests run one
//! per test on port 0. Listeners are bound before anything starts, so the
//! addresses are known up front and nothing waits on a sleep:
//! [`LocalCluster::wait_ready`] asks each server's gRPC health service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tally_coordinator::{Coordinator, CoordinatorConfig, NodeConfig};
use tally_proto::pb::admin_client::AdminClient;
use tally_proto::pb::counter_client::CounterClient;
use tally_shard::{Durability, ShardConfig, ShardNode};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// What to start.
#[derive(Debug, Clone)]
pub struct LocalClusterOptions {
    /// Directory that holds one data directory per shard (`shard-1`, ...).
    pub data_dir: PathBuf,
    /// Number of shard nodes.
    pub shards: usize,
    /// The coordinator's address; port 0 picks a free port.
    pub coordinator_listen: SocketAddr,
    /// The shards' addresses; empty means `127.0.0.1:0` for each.
    pub shard_listens: Vec<SocketAddr>,
    /// Every shard's durability mode.
    pub durability: Durability,
    /// Stripes per counter.
    pub stripes: u32,
    /// How often each node's entries are copied to its replica.
    pub replication_interval: std::time::Duration,
    /// Copies of each node's entries (1: none).
    pub replication_factor: usize,
    /// Prometheus metrics: `None` off; `Some(port)` the coordinator's on
    /// `port` and shard N's on `port + N` (0: a free port each).
    pub metrics_port: Option<u16>,
    /// TLS on every port and mutual TLS to the shards, every daemon with
    /// these files: none, plaintext.
    pub tls: Option<tally_runtime::tls::TlsFiles>,
    /// The coordinator's tokens file: none, no tokens needed.
    pub tokens_file: Option<PathBuf>,
}

impl LocalClusterOptions {
    /// `shards` nodes on free loopback ports, sync durability, data under
    /// `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>, shards: usize) -> Self {
        LocalClusterOptions {
            data_dir: data_dir.into(),
            shards,
            coordinator_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            shard_listens: Vec::new(),
            durability: Durability::Sync,
            stripes: tally_coordinator::config::DEFAULT_STRIPES,
            replication_interval: std::time::Duration::from_millis(
                tally_coordinator::config::DEFAULT_REPLICATION_INTERVAL_MS,
            ),
            replication_factor: tally_coordinator::config::DEFAULT_REPLICATION_FACTOR,
            metrics_port: None,
            tls: None,
            tokens_file: None,
        }
    }
}

/// A running shard node of a [`LocalCluster`].
#[derive(Debug)]
struct RunningShard {
    config: ShardConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tally_shard::ShardError>>>,
}

/// A running in-process cluster. Shut it down with [`LocalCluster::shutdown`]
/// so every shard flushes; dropping it stops the servers without waiting.
#[derive(Debug)]
pub struct LocalCluster {
    coordinator_address: SocketAddr,
    coordinator_config: CoordinatorConfig,
    coordinator_stop: Option<oneshot::Sender<()>>,
    coordinator_task: Option<JoinHandle<Result<(), tally_coordinator::StartError>>>,
    /// Where the coordinator serves metrics, if it does.
    coordinator_metrics: Option<SocketAddr>,
    shards: Vec<RunningShard>,
}

impl LocalCluster {
    /// Binds every listener, recovers every shard's data, and starts serving.
    pub async fn start(options: LocalClusterOptions) -> anyhow::Result<LocalCluster> {
        anyhow::ensure!(options.shards >= 1, "a cluster needs at least one shard");
        let mut shards = Vec::with_capacity(options.shards);
        let mut nodes = Vec::with_capacity(options.shards);
        for index in 0..options.shards {
            let node_id = format!("shard-{}", index + 1);
            let listen = options
                .shard_listens
                .get(index)
                .copied()
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("{node_id}: cannot listen on {listen}"))?;
            let address = listener.local_addr()?;
            let mut config = ShardConfig::new(&node_id, address, options.data_dir.join(&node_id));
            config.durability = options.durability;
            config.tls = options.tls.clone();
            config.observability.metrics_listen = options
                .metrics_port
                .map(|port| metrics_address(port, index + 1))
                .transpose()?;
            let shard = start_shard(config, listener).await?;
            nodes.push(NodeConfig {
                id: node_id,
                address: address.to_string(),
                weight: 1,
            });
            shards.push(shard);
        }

        let listener = TcpListener::bind(options.coordinator_listen)
            .await
            .with_context(|| {
                format!(
                    "coordinator: cannot listen on {}",
                    options.coordinator_listen
                )
            })?;
        let coordinator_address = listener.local_addr()?;
        let mut coordinator_config = CoordinatorConfig::new(coordinator_address, nodes);
        coordinator_config.stripes = options.stripes;
        coordinator_config.replication_interval = options.replication_interval;
        coordinator_config.replication_factor = options.replication_factor;
        coordinator_config.tls = options.tls.clone();
        coordinator_config.tokens_file = options.tokens_file.clone();
        let coordinator = match options.metrics_port {
            Some(port) => {
                let address = metrics_address(port, 0)?;
                let listener = TcpListener::bind(address).await.with_context(|| {
                    format!("coordinator: cannot listen on {address} for metrics")
                })?;
                Coordinator::with_metrics(coordinator_config.clone(), listener)?
            }
            None => Coordinator::new(coordinator_config.clone())?,
        };
        let coordinator_metrics = coordinator.handle().metrics_address();
        let (coordinator_stop, stopped) = oneshot::channel::<()>();
        let coordinator_task = tokio::spawn(coordinator.serve(listener, async {
            let _ = stopped.await;
        }));

        Ok(LocalCluster {
            coordinator_address,
            coordinator_config,
            coordinator_stop: Some(coordinator_stop),
            coordinator_task: Some(coordinator_task),
            coordinator_metrics,
            shards,
        })
    }

    /// The coordinator's URL, `http://127.0.0.1:PORT` (`https` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.coordinator_config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.coordinator_address)
    }

    /// The TLS files every daemon runs with, if TLS is on.
    pub fn tls_files(&self) -> Option<&tally_runtime::tls::TlsFiles> {
        self.coordinator_config.tls.as_ref()
    }

    /// The coordinator's configuration, membership included.
    pub fn coordinator_config(&self) -> &CoordinatorConfig {
        &self.coordinator_config
    }

    /// Where the coordinator serves metrics, if it does.
    pub fn coordinator_metrics(&self) -> Option<SocketAddr> {
        self.coordinator_metrics
    }

    /// Each shard's id, address and data directory (and metrics address,
    /// once bound).
    pub fn shard_configs(&self) -> impl Iterator<Item = &ShardConfig> {
        self.shards.iter().map(|shard| &shard.config)
    }

    /// A client of the public `Counter` service (plaintext, no token: for
    /// a cluster started without `tls` and `tokens_file`).
    pub async fn counter_client(&self) -> anyhow::Result<CounterClient<Channel>> {
        Ok(CounterClient::connect(self.endpoint()).await?)
    }

    /// A client of the public `Admin` service (plaintext, no token).
    pub async fn admin_client(&self) -> anyhow::Result<AdminClient<Channel>> {
        Ok(AdminClient::connect(self.endpoint()).await?)
    }

    /// Returns once the coordinator and every running shard answer their
    /// health check with SERVING, or fails after `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let mut addresses = vec![self.coordinator_address];
        addresses.extend(
            self.shards
                .iter()
                .filter(|shard| shard.task.is_some())
                .map(|shard| shard.config.listen),
        );
        let tls = self
            .tls_files()
            .cloned()
            .map(tally_runtime::tls::ClientTls::load)
            .transpose()?;
        for address in addresses {
            wait_serving_with(address, tls.as_ref(), timeout).await?;
        }
        Ok(())
    }

    /// Gracefully stops shard `index` (0-based): it finishes in-flight
    /// requests, flushes and releases its data directory.
    pub async fn stop_shard(&mut self, index: usize) -> anyhow::Result<()> {
        let shard = self.shards.get_mut(index).context("no such shard")?;
        stop(&mut shard.stop, &mut shard.task).await
    }

    /// Starts shard `index` again on the same address and data directory.
    ///
    /// While it was stopped, another process's outgoing connection may
    /// have been given its port (listeners on port 0 and clients' ports
    /// share the kernel's range): binding is tried again for up to 10 s,
    /// as a refused connect attempt lets its port go at once.
    pub async fn restart_shard(&mut self, index: usize) -> anyhow::Result<()> {
        self.stop_shard(index).await?;
        let config = self.shards[index].config.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(config.listen).await {
                Err(error)
                    if error.kind() == std::io::ErrorKind::AddrInUse
                        && tokio::time::Instant::now() < deadline =>
                {
                    // Backing off while another process holds the port.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                bound => {
                    break bound.with_context(|| {
                        format!("{}: cannot listen on {}", config.node_id, config.listen)
                    })?
                }
            }
        };
        self.shards[index] = start_shard(config, listener).await?;
        Ok(())
    }

    /// Stops the coordinator, then every shard, each flushing.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        stop(&mut self.coordinator_stop, &mut self.coordinator_task).await?;
        for shard in &mut self.shards {
            stop(&mut shard.stop, &mut shard.task).await?;
        }
        Ok(())
    }
}

/// The metrics address of daemon `offset` (0: the coordinator, N: shard N)
/// from the first metrics port.
fn metrics_address(port: u16, offset: usize) -> anyhow::Result<SocketAddr> {
    let port = if port == 0 {
        0
    } else {
        u16::try_from(usize::from(port) + offset).context("the metrics port is too high")?
    };
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

async fn start_shard(
    mut config: ShardConfig,
    listener: TcpListener,
) -> anyhow::Result<RunningShard> {
    let mut node = ShardNode::open(config.clone())
        .await
        .with_context(|| format!("{}: cannot start", config.node_id))?;
    if let Some(address) = config.observability.metrics_listen {
        let metrics = TcpListener::bind(address).await.with_context(|| {
            format!("{}: cannot listen on {address} for metrics", config.node_id)
        })?;
        // A restart serves on the same port.
        config.observability.metrics_listen = Some(metrics.local_addr()?);
        node = node.with_metrics(metrics);
    }
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(node.serve(listener, async {
        let _ = stopped.await;
    }));
    Ok(RunningShard {
        config,
        stop: Some(stop),
        task: Some(task),
    })
}

async fn stop<E>(
    stop: &mut Option<oneshot::Sender<()>>,
    task: &mut Option<JoinHandle<Result<(), E>>>,
) -> anyhow::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    if let Some(stop) = stop.take() {
        let _ = stop.send(());
    }
    if let Some(task) = task.take() {
        task.await.context("server task panicked")??;
    }
    Ok(())
}

/// Asks `address`'s gRPC health service until it says SERVING.
pub async fn wait_serving(address: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    wait_serving_with(address, None, timeout).await
}

/// [`wait_serving`], over TLS with `tls` (presenting its certificate, as a
/// shard's internal port asks).
pub async fn wait_serving_with(
    address: SocketAddr,
    tls: Option<&std::sync::Arc<tally_runtime::tls::ClientTls>>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = String::new();
    let mut backoff = Duration::from_millis(5);
    while tokio::time::Instant::now() < deadline {
        let attempt = async {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?;
            let channel = match tls {
                Some(tls) => {
                    let connector = tls
                        .connector(&address.to_string())
                        .map_err(anyhow::Error::msg)?;
                    endpoint.connect_with_connector(connector).await?
                }
                None => endpoint.connect().await?,
            };
            let mut client = HealthClient::new(channel);
            let response = client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?;
            anyhow::Ok(response.into_inner().status())
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(ServingStatus::Serving)) => return Ok(()),
            Ok(Ok(status)) => last_error = format!("status {status:?}"),
            Ok(Err(error)) => last_error = format!("{error:#}"),
            Err(_) => break,
        }
        // A readiness probe's retry interval, not a guess at start-up time.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
    anyhow::bail!("{address} not serving after {timeout:?}: {last_error}")
}
