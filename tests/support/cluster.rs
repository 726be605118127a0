//! An in-process cluster for tests: coordinator and shard nodes serving gRPC
//! on loopback port 0, with real files in a temporary directory; the client
//! calls, placement helpers and waits its tests share.

use std::time::Duration;

use tally::cli::local_cluster::{LocalCluster, LocalClusterOptions};
use tally::proto::pb;
use tally::proto::pb::counter_client::CounterClient;
use tonic::transport::Channel;

/// Longest wait for the cluster to serve, or for a condition on it.
pub const READY: Duration = Duration::from_secs(30);

pub struct TestCluster {
    pub cluster: LocalCluster,
    pub _data: tempfile::TempDir,
}

pub async fn start_with(configure: impl FnOnce(&mut LocalClusterOptions)) -> TestCluster {
    let data = tempfile::tempdir().unwrap();
    let mut options = LocalClusterOptions::new(data.path(), 3);
    configure(&mut options);
    let cluster = LocalCluster::start(options).await.unwrap();
    cluster.wait_ready(READY).await.unwrap();
    TestCluster {
        cluster,
        _data: data,
    }
}

pub async fn start() -> TestCluster {
    start_with(|_| {}).await
}

pub fn increment(counter: &str, delta: i64, key: &str) -> pb::IncrementRequest {
    pb::IncrementRequest {
        counter: counter.to_string(),
        delta,
        idempotency_key: key.to_string(),
        ..Default::default()
    }
}

pub async fn get(
    client: &mut CounterClient<Channel>,
    counter: &str,
) -> Result<pb::GetResponse, tonic::Status> {
    client
        .get(pb::GetRequest {
            counter: counter.to_string(),
            allow_partial: false,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

pub async fn value(client: &mut CounterClient<Channel>, counter: &str) -> i64 {
    let response = get(client, counter).await.unwrap();
    assert!(response.complete);
    response.value
}

/// Every shard node's own status report, asked directly (not through the
/// coordinator).
pub async fn shard_statuses(cluster: &LocalCluster) -> Vec<pb::ShardStatusResponse> {
    let mut statuses = Vec::new();
    for shard in cluster.shard_configs() {
        let mut client = pb::shard_client::ShardClient::connect(format!("http://{}", shard.listen))
            .await
            .unwrap();
        statuses.push(
            client
                .status(pb::ShardStatusRequest::default())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    statuses
}

/// The `nth` idempotency key (from 0) whose increment of `counter` lands on
/// `node_id`.
pub fn key_owned_by(cluster: &LocalCluster, counter: &str, node_id: &str, nth: usize) -> String {
    let config = cluster.coordinator_config();
    let ring = config.ring().unwrap();
    (0..100_000)
        .map(|attempt| format!("key-{attempt}"))
        .filter(|key| {
            let stripe = tally::ring::idempotency_stripe(key, config.stripes);
            ring.nodes()[ring.owner(counter, stripe)].id == node_id
        })
        .nth(nth)
        .expect("keys land on every node")
}

/// A client of shard node `index` (0-based), direct.
pub async fn shard_client(
    cluster: &LocalCluster,
    index: usize,
) -> pb::shard_client::ShardClient<Channel> {
    let address = cluster.shard_configs().nth(index).unwrap().listen;
    pb::shard_client::ShardClient::connect(format!("http://{address}"))
        .await
        .unwrap()
}

/// Writes 60 across every node of `counter`, keyed to each node in turn.
pub async fn spread(cluster: &LocalCluster, client: &mut CounterClient<Channel>, counter: &str) {
    for node in ["shard-1", "shard-2", "shard-3"] {
        for nth in 0..2 {
            let key = key_owned_by(cluster, counter, node, nth);
            client
                .increment(increment(counter, 10, &key))
                .await
                .unwrap();
        }
    }
}

/// A running coordinator this test started: its address, the sender that
/// stops it (dropping it does too), and its task.
pub type OtherCoordinator = (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), tally::coordinator::StartError>>,
);

/// Another coordinator over the cluster's shards, on a port of its own,
/// with `configure` applied to a copy of the cluster's coordinator config.
pub async fn other_coordinator(
    cluster: &LocalCluster,
    configure: impl FnOnce(&mut tally::coordinator::CoordinatorConfig),
) -> OtherCoordinator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let mut config = cluster.coordinator_config().clone();
    config.listen = address;
    configure(&mut config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(tally::coordinator::run(config, listener, async {
        let _ = stopped.await;
    }));
    (address, stop, running)
}

/// A second coordinator over the same shards, as another process of the
/// application's fleet would reach: served until the returned sender drops.
pub async fn second_coordinator(
    cluster: &LocalCluster,
) -> (CounterClient<Channel>, tokio::sync::oneshot::Sender<()>) {
    let (address, stop, _running) = other_coordinator(cluster, |_| {}).await;
    tally::cli::local_cluster::wait_serving(address, READY)
        .await
        .unwrap();
    let client = CounterClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    (client, stop)
}

/// Waits (up to [`READY`]) until every node's status, asked directly,
/// satisfies `done`; returns those statuses.
pub async fn wait_for_statuses(
    cluster: &LocalCluster,
    what: &str,
    done: impl Fn(&[pb::ShardStatusResponse]) -> bool,
) -> Vec<pb::ShardStatusResponse> {
    let done = &done;
    super::wait_until(what, READY, || async move {
        let statuses = shard_statuses(cluster).await;
        if done(&statuses) {
            Ok(statuses)
        } else {
            Err(statuses)
        }
    })
    .await
}

/// Waits until every node's copy holds everything the node had done at the
/// call: each origin's replication version now, reached by a copy of it.
pub async fn wait_for_replicas_to_catch_up(cluster: &LocalCluster) {
    let targets = super::replication_targets(&shard_statuses(cluster).await);
    wait_for_statuses(cluster, "replication to catch up", |statuses| {
        super::replicas_caught_up(&targets, statuses)
    })
    .await;
}

/// Waits until no shard says it awaits a restore.
pub async fn wait_until_restored(cluster: &LocalCluster) {
    wait_for_statuses(cluster, "every node to be restored", |statuses| {
        !statuses.iter().any(|status| status.restoring)
    })
    .await;
}

/// Waits until the coordinator's status shows `node` with `health`.
pub async fn wait_for_health(cluster: &LocalCluster, node: &str, health: &str) {
    let admin = cluster.admin_client().await.unwrap();
    super::wait_until(&format!("{node} to become {health}"), READY, || {
        let mut admin = admin.clone();
        async move {
            let mut request = tonic::Request::new(pb::ClusterStatusRequest {});
            request.set_timeout(Duration::from_secs(5));
            let nodes = admin
                .cluster_status(request)
                .await
                .unwrap()
                .into_inner()
                .nodes;
            if nodes
                .iter()
                .any(|status| status.id == node && status.health == health)
            {
                Ok(())
            } else {
                Err(nodes)
            }
        }
    })
    .await
}
