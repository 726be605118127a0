//! The public contract, end to end, against a real in-process cluster:
//! coordinator and shard nodes serving gRPC on loopback port 0, with real
//! sled files in a temporary directory.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use tally::cli::local_cluster::{LocalCluster, LocalClusterOptions};
use tally::proto::pb;
use tally::proto::pb::counter_client::CounterClient;
use tally::proto::shard_error::{reason_of, Reason};
use tonic::transport::Channel;
use tonic::Code;

const READY: Duration = Duration::from_secs(30);

struct TestCluster {
    cluster: LocalCluster,
    _data: tempfile::TempDir,
}

async fn start_with(configure: impl FnOnce(&mut LocalClusterOptions)) -> TestCluster {
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

async fn start() -> TestCluster {
    start_with(|_| {}).await
}

fn increment(counter: &str, delta: i64, key: &str) -> pb::IncrementRequest {
    pb::IncrementRequest {
        counter: counter.to_string(),
        delta,
        idempotency_key: key.to_string(),
    }
}

async fn get(
    client: &mut CounterClient<Channel>,
    counter: &str,
) -> Result<pb::GetResponse, tonic::Status> {
    client
        .get(pb::GetRequest {
            counter: counter.to_string(),
            allow_partial: false,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn value(client: &mut CounterClient<Channel>, counter: &str) -> i64 {
    let response = get(client, counter).await.unwrap();
    assert!(response.complete);
    response.value
}

/// Every shard node's own status report, asked directly (not through the
/// coordinator).
async fn shard_statuses(cluster: &LocalCluster) -> Vec<pb::ShardStatusResponse> {
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

/// A key whose idempotency stripe is owned by `node_id`, so a test can
/// aim an increment at one node.
/// The `nth` idempotency key (from 0) whose increment of `counter` lands on
/// `node_id`.
fn key_owned_by(cluster: &LocalCluster, counter: &str, node_id: &str, nth: usize) -> String {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_exact_sums() {
    let test = start().await;
    let client = test.cluster.counter_client().await.unwrap();
    const TASKS: usize = 32;
    const ROUNDS: usize = 60;
    const COUNTERS: usize = 20;

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut ledger: HashMap<String, i64> = HashMap::new();
            for round in 0..ROUNDS {
                let counter = format!("counter-{}", (task * 7 + round) % COUNTERS);
                // Positive and negative deltas, some large.
                let delta = match (task + round) % 4 {
                    0 => 1,
                    1 => -3,
                    2 => 1_000_003,
                    _ => -999_999,
                };
                if round % 5 == 0 {
                    // Every fifth round: a batch of three, over two counters.
                    let other = format!("counter-{}", (task + round + 1) % COUNTERS);
                    client
                        .increment_batch(pb::IncrementBatchRequest {
                            increments: vec![
                                increment(&counter, delta, ""),
                                increment(&other, 2, ""),
                                increment(&counter, 5, ""),
                            ],
                        })
                        .await
                        .unwrap();
                    *ledger.entry(counter).or_default() += delta + 5;
                    *ledger.entry(other).or_default() += 2;
                } else {
                    client
                        .increment(increment(&counter, delta, ""))
                        .await
                        .unwrap();
                    *ledger.entry(counter).or_default() += delta;
                }
            }
            ledger
        }));
    }
    let mut expected: HashMap<String, i64> = HashMap::new();
    for task in tasks {
        for (counter, delta) in task.await.unwrap() {
            *expected.entry(counter).or_default() += delta;
        }
    }

    let mut client = client.clone();
    let names: Vec<String> = (0..COUNTERS)
        .map(|index| format!("counter-{index}"))
        .collect();
    let totals = client
        .get_batch(pb::GetBatchRequest {
            counters: names.clone(),
            allow_partial: false,
        })
        .await
        .unwrap()
        .into_inner()
        .counters;
    for (name, total) in names.iter().zip(&totals) {
        assert_eq!(&total.counter, name);
        assert!(total.complete);
        assert_eq!(
            total.value,
            expected.get(name).copied().unwrap_or(0),
            "{name}"
        );
    }

    // Every node got a share: one counter's stripes spread over the ring.
    let statuses = shard_statuses(&test.cluster).await;
    assert!(
        statuses.iter().all(|status| status.entries > 0),
        "{statuses:?}"
    );
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_increments_share_internal_calls() {
    let test = start().await;
    let client = test.cluster.counter_client().await.unwrap();
    const TASKS: usize = 64;
    const ROUNDS: usize = 40;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let mut client = client.clone();
            tokio::spawn(async move {
                for round in 0..ROUNDS {
                    let counter = format!("hot-{}", (task + round) % 4);
                    client.increment(increment(&counter, 1, "")).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let statuses = shard_statuses(&test.cluster).await;
    let calls: u64 = statuses.iter().map(|status| status.apply_calls).sum();
    let applied: u64 = statuses
        .iter()
        .map(|status| status.increments_applied)
        .sum();
    let sent = (TASKS * ROUNDS) as u64;
    support::report(&format!(
        "{sent} increments reached the shards in {calls} internal apply calls, merged into \
         {applied} entry changes"
    ));
    assert!(
        calls < sent,
        "64 concurrent writers must share internal calls: {calls} calls for {sent} increments"
    );
    // Increments of one (counter, stripe) in one call are merged.
    assert!(applied <= sent, "{applied} applied for {sent} sent");
    let mut client = client.clone();
    let mut total = 0;
    for counter in 0..4 {
        total += value(&mut client, &format!("hot-{counter}")).await;
    }
    assert_eq!(total, (TASKS * ROUNDS) as i64);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn get_batch_answers_in_request_order() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    client.increment(increment("b", 2, "")).await.unwrap();
    client.increment(increment("a", 1, "")).await.unwrap();
    client.increment(increment("c", -3, "")).await.unwrap();
    let order = ["c", "never-written", "a", "b", "a"];
    let totals = client
        .get_batch(pb::GetBatchRequest {
            counters: order.iter().map(|name| name.to_string()).collect(),
            allow_partial: false,
        })
        .await
        .unwrap()
        .into_inner()
        .counters;
    let seen: Vec<(&str, i64)> = totals
        .iter()
        .map(|total| (total.counter.as_str(), total.value))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("c", -3),
            ("never-written", 0),
            ("a", 1),
            ("b", 2),
            ("a", 1)
        ]
    );
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn delete_resets_every_stripe_on_every_node() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    // Enough increments to touch every stripe, and so every node.
    for _ in 0..40 {
        client.increment(increment("gone", 3, "")).await.unwrap();
    }
    client.increment(increment("kept", 9, "")).await.unwrap();
    assert_eq!(value(&mut client, "gone").await, 120);
    client
        .delete(pb::DeleteRequest {
            counter: "gone".into(),
        })
        .await
        .unwrap();
    assert_eq!(value(&mut client, "gone").await, 0);
    assert_eq!(value(&mut client, "kept").await, 9);
    // Deleting again, or a counter that never existed, is fine.
    client
        .delete(pb::DeleteRequest {
            counter: "gone".into(),
        })
        .await
        .unwrap();
    client
        .delete(pb::DeleteRequest {
            counter: "never".into(),
        })
        .await
        .unwrap();
    // A deleted counter starts again from 0, also after a restart.
    client.increment(increment("gone", 4, "")).await.unwrap();
    let mut cluster = test.cluster;
    for shard in 0..3 {
        cluster.restart_shard(shard).await.unwrap();
    }
    cluster.wait_ready(READY).await.unwrap();
    let mut client = cluster.counter_client().await.unwrap();
    assert_eq!(value(&mut client, "gone").await, 4);
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_input_is_rejected_and_changes_nothing() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    let mut admin = test.cluster.admin_client().await.unwrap();
    client.increment(increment("safe", 10, "")).await.unwrap();

    let long_name = "n".repeat(257);
    let long_key = "k".repeat(129);
    let expect_invalid = |result: Result<_, tonic::Status>, what: &str, needle: &str| {
        let status = result.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{what}: {:?}",
            status.message()
        );
    };

    expect_invalid(
        client.increment(increment("", 1, "")).await.map(drop),
        "empty name",
        "counter name is empty",
    );
    expect_invalid(
        client
            .increment(increment(&long_name, 1, ""))
            .await
            .map(drop),
        "long name",
        "257 bytes",
    );
    expect_invalid(
        client
            .increment(increment("safe", 1, &long_key))
            .await
            .map(drop),
        "long key",
        "idempotency key is 129 bytes",
    );
    expect_invalid(
        client
            .increment_batch(pb::IncrementBatchRequest {
                increments: vec![increment("safe", 1, ""); 10_001],
            })
            .await
            .map(drop),
        "batch too large",
        "10001 items",
    );
    // One bad item: nothing of the batch is applied, and the message names it.
    expect_invalid(
        client
            .increment_batch(pb::IncrementBatchRequest {
                increments: vec![
                    increment("safe", 100, ""),
                    increment("other", 100, ""),
                    increment("", 1, ""),
                ],
            })
            .await
            .map(drop),
        "bad item",
        "item 2: counter name is empty",
    );
    expect_invalid(get(&mut client, "").await.map(drop), "get empty", "empty");
    expect_invalid(
        client
            .get_batch(pb::GetBatchRequest {
                counters: vec!["safe".into(), long_name.clone()],
                allow_partial: false,
            })
            .await
            .map(drop),
        "get_batch long name",
        "item 1",
    );
    expect_invalid(
        client
            .get_batch(pb::GetBatchRequest {
                counters: vec!["safe".into(); 10_001],
                allow_partial: false,
            })
            .await
            .map(drop),
        "get_batch too large",
        "10001 items",
    );
    expect_invalid(
        client
            .delete(pb::DeleteRequest {
                counter: String::new(),
            })
            .await
            .map(drop),
        "delete empty",
        "empty",
    );
    expect_invalid(
        admin
            .locate(pb::LocateRequest {
                counter: String::new(),
            })
            .await
            .map(drop),
        "locate empty",
        "empty",
    );

    // The server still serves and nothing changed.
    assert_eq!(value(&mut client, "safe").await, 10);
    assert_eq!(value(&mut client, "other").await, 0);
    // Limits are inclusive: 256-byte names, 128-byte keys, 10,000 items work.
    let max_name = "m".repeat(256);
    client
        .increment(increment(&max_name, 1, &"k".repeat(128)))
        .await
        .unwrap();
    client
        .increment_batch(pb::IncrementBatchRequest {
            increments: vec![increment(&max_name, 1, ""); 10_000],
        })
        .await
        .unwrap();
    assert_eq!(value(&mut client, &max_name).await, 10_001);
    // Delta 0 validates and changes nothing.
    client.increment(increment("safe", 0, "")).await.unwrap();
    expect_invalid(
        client.increment(increment("", 0, "")).await.map(drop),
        "empty name with delta 0",
        "empty",
    );
    assert_eq!(value(&mut client, "safe").await, 10);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn overflow_is_out_of_range_and_applies_nothing() {
    // One stripe: every increment of a counter lands on the same entry.
    let test = start_with(|options| options.stripes = 1).await;
    let mut client = test.cluster.counter_client().await.unwrap();
    client
        .increment(increment("big", i64::MAX, ""))
        .await
        .unwrap();
    let status = client.increment(increment("big", 1, "")).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("\"big\""), "{}", status.message());
    assert_eq!(value(&mut client, "big").await, i64::MAX);

    client
        .increment(increment("small", i64::MIN, ""))
        .await
        .unwrap();
    let status = client
        .increment(increment("small", -1, ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(value(&mut client, "small").await, i64::MIN);

    // Going back into range still works.
    client.increment(increment("big", -1, "")).await.unwrap();
    assert_eq!(value(&mut client, "big").await, i64::MAX - 1);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_batch_on_one_counter_reaches_one_node_as_one_increment() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    let applied_before: u64 = shard_statuses(&test.cluster)
        .await
        .iter()
        .map(|status| status.increments_applied)
        .sum();
    let increments = (1..=100).map(|delta| increment("hot", delta, "")).collect();
    client
        .increment_batch(pb::IncrementBatchRequest { increments })
        .await
        .unwrap();
    let applied: u64 = shard_statuses(&test.cluster)
        .await
        .iter()
        .map(|status| status.increments_applied)
        .sum();
    // One stripe for the counter within the call, merged in the batcher.
    assert_eq!(applied - applied_before, 1);
    assert_eq!(value(&mut client, "hot").await, 5050);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn merged_increments_overflow_one_by_one() {
    // One stripe: concurrent increments of one counter land on one entry and
    // are merged into shared calls. Room for exactly 10 more: 10 of the 64
    // increments must succeed and the rest fail OUT_OF_RANGE, however they
    // were merged.
    let test = start_with(|options| options.stripes = 1).await;
    let mut client = test.cluster.counter_client().await.unwrap();
    client
        .increment(increment("edge", i64::MAX - 10, ""))
        .await
        .unwrap();
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.increment(increment("edge", 1, "")).await })
        })
        .collect();
    let (mut applied, mut refused) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => applied += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((applied, refused), (10, 54));
    assert_eq!(value(&mut client, "edge").await, i64::MAX);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_total_beyond_i64_is_out_of_range() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    // Two different stripes each hold i64::MAX: each entry fits, the sum does
    // not. Idempotency keys pick the stripes.
    let stripes = test.cluster.coordinator_config().stripes;
    let stripe_of = |key: &str| tally::ring::idempotency_stripe(key, stripes);
    let first = "key-0".to_string();
    let second = (1..)
        .map(|index| format!("key-{index}"))
        .find(|key| stripe_of(key) != stripe_of(&first))
        .unwrap();
    client
        .increment(increment("huge", i64::MAX, &first))
        .await
        .unwrap();
    client
        .increment(increment("huge", i64::MAX, &second))
        .await
        .unwrap();
    let status = get(&mut client, "huge").await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("\"huge\""));
    // Back in range once one part shrinks: the sum was exact, never wrapped.
    // (A new key on the first key's stripe: reusing a key is a conflict.)
    let third = (1..)
        .map(|index| format!("again-{index}"))
        .find(|key| stripe_of(key) == stripe_of(&first))
        .unwrap();
    client
        .increment(increment("huge", -i64::MAX, &third))
        .await
        .unwrap();
    assert_eq!(value(&mut client, "huge").await, i64::MAX);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_down_shard_is_named_and_allow_partial_returns_the_rest() {
    // Without replication: no copy of the down node's part exists.
    let test = start_with(|options| options.replication_factor = 1).await;
    let mut cluster = test.cluster;
    let mut client = cluster.counter_client().await.unwrap();
    for node in ["shard-1", "shard-2", "shard-3"] {
        let key = key_owned_by(&cluster, "spread", node, 0);
        client
            .increment(increment("spread", 10, &key))
            .await
            .unwrap();
    }
    assert_eq!(value(&mut client, "spread").await, 30);

    cluster.stop_shard(1).await.unwrap();
    let status = get(&mut client, "spread").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shard-2"), "{}", status.message());
    assert!(
        !status.message().contains("shard-1"),
        "{}",
        status.message()
    );

    let partial = client
        .get(pb::GetRequest {
            counter: "spread".into(),
            allow_partial: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((partial.value, partial.complete), (20, false));

    // A write owned by the down node fails and says which node.
    let key = key_owned_by(&cluster, "spread", "shard-2", 1);
    let status = client
        .increment(increment("spread", 1, &key))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("shard-2"));
    // Writes owned by live nodes still succeed.
    let key = key_owned_by(&cluster, "spread", "shard-3", 1);
    client
        .increment(increment("spread", 1, &key))
        .await
        .unwrap();
    // Delete needs every node.
    let status = client
        .delete(pb::DeleteRequest {
            counter: "spread".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    // The node comes back with its data; reads are complete again.
    cluster.restart_shard(1).await.unwrap();
    cluster.wait_ready(READY).await.unwrap();
    let after = get(&mut client, "spread").await.unwrap();
    assert!(after.complete);
    // Delete reached the live nodes before failing; shard-2 kept its 10.
    assert_eq!(after.value, 10);
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_hung_shard_gives_deadline_exceeded() {
    // A "shard" whose socket accepts connections into the backlog and never
    // answers: the coordinator's calls to it hang.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nodes = vec![tally::coordinator::NodeConfig {
        id: "hung".into(),
        address: hung.local_addr().unwrap().to_string(),
        weight: 1,
    }];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let config = tally::coordinator::CoordinatorConfig::new(address, nodes);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tally::coordinator::run(config, listener, async {
        let _ = stopped.await;
    }));
    tally::cli::local_cluster::wait_serving(address, READY)
        .await
        .unwrap();

    let mut client = CounterClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let mut request = tonic::Request::new(increment("c", 1, ""));
    request.set_timeout(Duration::from_millis(300));
    let status = client.increment(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    let mut request = tonic::Request::new(pb::GetRequest {
        counter: "c".into(),
        allow_partial: true,
    });
    request.set_timeout(Duration::from_millis(300));
    let status = client.get(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // The coordinator itself is fine.
    let mut admin =
        tally::proto::pb::admin_client::AdminClient::connect(format!("http://{address}"))
            .await
            .unwrap();
    assert_eq!(
        admin
            .ring(pb::RingRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes
            .len(),
        1
    );
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    drop(hung);
}

#[tokio::test]
async fn admin_reports_ring_placement_and_status() {
    let test = start().await;
    let mut admin = test.cluster.admin_client().await.unwrap();
    let mut client = test.cluster.counter_client().await.unwrap();

    let ring = admin.ring(pb::RingRequest {}).await.unwrap().into_inner();
    assert_eq!(ring.stripes, 8);
    let ids: Vec<&str> = ring.nodes.iter().map(|node| node.id.as_str()).collect();
    assert_eq!(ids, vec!["shard-1", "shard-2", "shard-3"]);
    let owned: f64 = ring.nodes.iter().map(|node| node.owned_fraction).sum();
    assert!((owned - 1.0).abs() < 1e-9);
    for node in &ring.nodes {
        assert_eq!(node.vnodes, 4096);
        assert!((node.owned_fraction - 1.0 / 3.0).abs() < 0.03, "{node:?}");
    }

    let located = admin
        .locate(pb::LocateRequest {
            counter: "page:views".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(located.stripes.len(), 8);
    let expected_ring = test.cluster.coordinator_config().ring().unwrap();
    for stripe in &located.stripes {
        let owner = expected_ring.owner("page:views", stripe.stripe);
        assert_eq!(stripe.node_id, expected_ring.nodes()[owner].id);
        assert_eq!(
            stripe.hash,
            tally::ring::key_hash("page:views", stripe.stripe)
        );
    }

    for _ in 0..16 {
        client
            .increment(increment("page:views", 1, ""))
            .await
            .unwrap();
    }
    let status = admin
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.nodes.len(), 3);
    // 16 increments rotate over the 8 stripes (per coordinator thread), so
    // between 2 and 8 entries exist; their count is what status reports.
    let entries: u64 = status.nodes.iter().map(|node| node.entries).sum();
    assert!((2..=8).contains(&entries), "{entries} entries");
    for node in &status.nodes {
        assert!(node.reachable, "{node:?}");
        assert_eq!(node.durability, "sync");
        assert!(node.last_flush_unix_ms > 0, "{node:?}");
    }
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_and_reflection_on_coordinator_and_shard_ports() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let test = start().await;
    let mut endpoints = vec![(test.cluster.endpoint(), "tally.v1.Counter")];
    for shard in test.cluster.shard_configs() {
        endpoints.push((format!("http://{}", shard.listen), "tally.v1.Shard"));
    }
    for (endpoint, service) in endpoints {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let answer = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            answer.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );

        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = reflection
            .server_reflection_info(futures::stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("unexpected reflection answer from {endpoint}");
        };
        let names: Vec<String> = list
            .service
            .into_iter()
            .map(|service| service.name)
            .collect();
        assert!(
            names.iter().any(|name| name == service),
            "{endpoint}: {names:?}"
        );
    }
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_graceful_restart_of_every_shard_keeps_every_count() {
    for durability in [
        tally::shard::Durability::Sync,
        tally::shard::Durability::Async,
    ] {
        let test = start_with(|options| options.durability = durability).await;
        let mut cluster = test.cluster;
        let client = cluster.counter_client().await.unwrap();
        let writers: Vec<_> = (0..8)
            .map(|writer| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    for round in 0..25 {
                        let counter = format!("restart-{}", (writer + round) % 5);
                        client.increment(increment(&counter, 2, "")).await.unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        for shard in 0..3 {
            cluster.restart_shard(shard).await.unwrap();
        }
        cluster.wait_ready(READY).await.unwrap();
        let mut client = cluster.counter_client().await.unwrap();
        let mut total = 0;
        for counter in 0..5 {
            total += value(&mut client, &format!("restart-{counter}")).await;
        }
        assert_eq!(total, 8 * 25 * 2, "{durability:?}");
        cluster.shutdown().await.unwrap();
        drop(test._data);
    }
}

#[tokio::test]
async fn a_shard_refuses_requests_meant_for_another_node() {
    let test = start().await;
    let shard = test.cluster.shard_configs().next().unwrap().clone();
    let mut shard_client =
        pb::shard_client::ShardClient::connect(format!("http://{}", shard.listen))
            .await
            .unwrap();
    let status = shard_client
        .apply(pb::ApplyRequest {
            node_id: "shard-9".into(),
            increments: vec![pb::ShardIncrement {
                counter: "c".into(),
                stripe: 0,
                delta: 1,
                idempotency_key: String::new(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason_of(&status), Some(Reason::WrongNode));
    assert!(status.message().contains("shard-9"));
    let mut client = test.cluster.counter_client().await.unwrap();
    assert_eq!(value(&mut client, "c").await, 0);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_shard_says_why_it_refuses_in_a_typed_reason() {
    // Coordinators decide on the reason in a refusal's details, never on its
    // words: each refusal a coordinator acts on carries its reason and code.
    let test = start().await;
    let shard = test.cluster.shard_configs().next().unwrap().clone();
    let node_id = shard.node_id.clone();
    let mut shard_client =
        pb::shard_client::ShardClient::connect(format!("http://{}", shard.listen))
            .await
            .unwrap();
    // A fresh node awaits its (empty) restore until the coordinator sends
    // it, or this test does: the second restore is refused either way.
    let restore_request = pb::RestoreRequest {
        node_id: node_id.clone(),
        entries: Vec::new(),
    };
    let _ = shard_client.restore(restore_request.clone()).await;
    let restore = shard_client.restore(restore_request).await.unwrap_err();
    let adopt = shard_client
        .adopt(pb::AdoptRequest {
            node_id: node_id.clone(),
            origin: "shard-9".into(),
            version: 1,
        })
        .await
        .unwrap_err();
    let replicate_itself = shard_client
        .replicate(pb::ReplicateRequest {
            node_id: node_id.clone(),
            origin: node_id.clone(),
            full: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let bad_stripe = shard_client
        .apply(pb::ApplyRequest {
            node_id: node_id.clone(),
            increments: vec![pb::ShardIncrement {
                counter: "c".into(),
                stripe: u32::MAX,
                delta: 1,
                idempotency_key: String::new(),
            }],
        })
        .await
        .unwrap_err();
    for (status, reason, code) in [
        (
            &restore,
            Reason::NotAwaitingRestore,
            Code::FailedPrecondition,
        ),
        (&adopt, Reason::CopyMissing, Code::FailedPrecondition),
        (
            &replicate_itself,
            Reason::InvalidRequest,
            Code::InvalidArgument,
        ),
        (&bad_stripe, Reason::InvalidRequest, Code::InvalidArgument),
    ] {
        assert_eq!(reason_of(status), Some(reason), "{status:?}");
        assert_eq!(status.code(), code, "{status:?}");
    }

    // Drained through the coordinator: the node refuses its changes as
    // drained, and its writes as draining.
    let mut admin = pb::admin_client::AdminClient::connect(test.cluster.endpoint())
        .await
        .unwrap();
    admin
        .drain(pb::DrainRequest {
            node_id: node_id.clone(),
        })
        .await
        .unwrap();
    let changes = shard_client
        .changes(pb::ChangesRequest {
            node_id: node_id.clone(),
            since: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(reason_of(&changes), Some(Reason::Drained), "{changes:?}");
    let erase = shard_client
        .erase(pb::EraseRequest {
            node_id: node_id.clone(),
            counters: vec!["c".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(reason_of(&erase), Some(Reason::Draining), "{erase:?}");
    assert_eq!(erase.code(), Code::Unavailable);
    test.cluster.shutdown().await.unwrap();
}

/// A running coordinator this test started: its address, the sender that
/// stops it (dropping it does too), and its task.
type OtherCoordinator = (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), tally::coordinator::StartError>>,
);

/// Another coordinator over the cluster's shards, on a port of its own,
/// with `configure` applied to a copy of the cluster's coordinator config.
async fn other_coordinator(
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
async fn second_coordinator(
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

#[tokio::test]
async fn a_retried_increment_is_applied_once_through_any_coordinator() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    let (mut other, _stop) = second_coordinator(&test.cluster).await;
    for _ in 0..3 {
        client
            .increment(increment("likes", 5, "order-1"))
            .await
            .unwrap();
        other
            .increment(increment("likes", 5, "order-1"))
            .await
            .unwrap();
    }
    assert_eq!(value(&mut client, "likes").await, 5);
    // The key belongs to the counter: another counter may use it too.
    client
        .increment(increment("views", 5, "order-1"))
        .await
        .unwrap();
    assert_eq!(value(&mut client, "views").await, 5);
    // Without a key, every call counts.
    for _ in 0..3 {
        client.increment(increment("likes", 1, "")).await.unwrap();
    }
    assert_eq!(value(&mut client, "likes").await, 8);
    let remembered: u64 = shard_statuses(&test.cluster)
        .await
        .iter()
        .map(|status| status.remembered_keys)
        .sum();
    assert_eq!(remembered, 2);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_retried_batch_applies_each_item_once() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    let batch = |items: std::ops::Range<usize>| pb::IncrementBatchRequest {
        increments: items
            .map(|item| increment(&format!("c{}", item % 10), 1, &format!("batch-1/{item}")))
            .collect(),
    };
    // The first attempt reached only half the items (as a failure mid-way
    // would leave it); the client retries the whole batch, twice.
    client.increment_batch(batch(0..500)).await.unwrap();
    client.increment_batch(batch(0..1_000)).await.unwrap();
    client.increment_batch(batch(0..1_000)).await.unwrap();
    for counter in 0..10 {
        assert_eq!(value(&mut client, &format!("c{counter}")).await, 100);
    }
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_key_reused_for_another_delta_is_refused() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    client
        .increment(increment("stock", -3, "pick-7"))
        .await
        .unwrap();
    let status = client
        .increment(increment("stock", -4, "pick-7"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(
        status.message().contains("\"pick-7\"") && status.message().contains("\"stock\""),
        "{}",
        status.message()
    );
    // In a batch, the other items still apply (items are independent).
    let status = client
        .increment_batch(pb::IncrementBatchRequest {
            increments: vec![
                increment("stock", -4, "pick-7"),
                increment("other", 1, "pick-8"),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(value(&mut client, "stock").await, -3);
    assert_eq!(value(&mut client, "other").await, 1);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn keys_survive_a_restart_and_a_delete() {
    let test = start().await;
    let mut cluster = test.cluster;
    let mut client = cluster.counter_client().await.unwrap();
    let keys: Vec<String> = ["shard-1", "shard-2", "shard-3"]
        .iter()
        .map(|node| key_owned_by(&cluster, "visits", node, 0))
        .collect();
    for key in &keys {
        client.increment(increment("visits", 1, key)).await.unwrap();
    }
    for index in 0..3 {
        cluster.stop_shard(index).await.unwrap();
        cluster.restart_shard(index).await.unwrap();
    }
    cluster.wait_ready(READY).await.unwrap();
    for key in &keys {
        client.increment(increment("visits", 1, key)).await.unwrap();
    }
    assert_eq!(value(&mut client, "visits").await, 3);
    // A delete resets the value, not the memory of what was applied: a late
    // retry of an old increment does not bring it back.
    client
        .delete(pb::DeleteRequest {
            counter: "visits".into(),
        })
        .await
        .unwrap();
    client
        .increment(increment("visits", 1, &keys[0]))
        .await
        .unwrap();
    assert_eq!(value(&mut client, "visits").await, 0);
    cluster.shutdown().await.unwrap();
}

/// Polls the coordinator's status until `node` has `health`; bounded.
async fn wait_for_health(cluster: &LocalCluster, node: &str, health: &str) {
    let mut admin = cluster.admin_client().await.unwrap();
    let started = std::time::Instant::now();
    loop {
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
            return;
        }
        assert!(
            started.elapsed() < READY,
            "{node} never became {health}: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn writes_without_a_key_go_around_a_down_node() {
    let test = start().await;
    let mut cluster = test.cluster;
    let mut client = cluster.counter_client().await.unwrap();
    cluster.stop_shard(1).await.unwrap();
    wait_for_health(&cluster, "shard-2", "down").await;

    // Every increment without a key succeeds, the down node's stripes
    // included: they land on the next node of the ring.
    for _ in 0..100 {
        client.increment(increment("spread", 1, "")).await.unwrap();
    }
    // A keyed increment stays with its owner, the only node that can
    // deduplicate it: it fails until the owner is back.
    let key = key_owned_by(&cluster, "spread", "shard-2", 0);
    let status = client
        .increment(increment("spread", 1, &key))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    cluster.restart_shard(1).await.unwrap();
    cluster.wait_ready(READY).await.unwrap();
    wait_for_health(&cluster, "shard-2", "up").await;
    client
        .increment(increment("spread", 1, &key))
        .await
        .unwrap();
    assert_eq!(value(&mut client, "spread").await, 101);
    let on_down_node = shard_statuses(&cluster).await[1].entries;
    assert_eq!(on_down_node, 1, "only the keyed increment reached shard-2");
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_reload_refuses_what_would_move_keys_or_drop_counts() {
    use tally::coordinator::{Cluster, ClusterHandle, NodeConfig, ReloadError};
    let node = |id: &str, port: u16| NodeConfig {
        id: id.into(),
        address: format!("127.0.0.1:{port}"),
        weight: 1,
    };
    let listen = "127.0.0.1:0".parse().unwrap();
    let config =
        tally::coordinator::CoordinatorConfig::new(listen, vec![node("a", 1), node("b", 2)]);
    let handle = ClusterHandle::new(Cluster::new(config.clone()).unwrap());

    let mut restriped = config.clone();
    restriped.stripes = 16;
    assert!(matches!(
        handle.reload(restriped),
        Err(ReloadError::Placement("stripes"))
    ));
    let mut dropped = config.clone();
    dropped.nodes.pop();
    assert!(matches!(handle.reload(dropped), Err(ReloadError::NodeRemoved(id)) if id == "b"));
    assert_eq!(handle.current().shards().len(), 2);

    let mut grown = config.clone();
    grown.nodes.push(node("c", 3));
    assert_eq!(
        handle.reload(grown).unwrap(),
        "membership reloaded: 3 nodes, added c"
    );
    assert_eq!(handle.current().shards().len(), 3);
    assert_eq!(handle.current().ring().nodes().len(), 3);
}

/// Waits until every node's copy holds everything the node had done at the
/// call: each origin's replication version now, reached by a copy of it.
/// Bounded.
/// Polls every node's status until `done` holds (bounded by READY).
async fn wait_for_statuses(
    cluster: &LocalCluster,
    what: &str,
    done: impl Fn(&[pb::ShardStatusResponse]) -> bool,
) -> Vec<pb::ShardStatusResponse> {
    let give_up = std::time::Instant::now() + READY;
    loop {
        let statuses = shard_statuses(cluster).await;
        if done(&statuses) {
            return statuses;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "gave up waiting for {what}: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_replicas_to_catch_up(cluster: &LocalCluster) {
    let targets = support::replication_targets(&shard_statuses(cluster).await);
    wait_for_statuses(cluster, "replication to catch up", |statuses| {
        support::replicas_caught_up(&targets, statuses)
    })
    .await;
}

#[tokio::test]
async fn a_read_stays_complete_while_a_shard_is_down() {
    let test = start_with(|options| options.replication_interval = Duration::from_millis(50)).await;
    let mut cluster = test.cluster;
    let mut client = cluster.counter_client().await.unwrap();
    for node in ["shard-1", "shard-2", "shard-3"] {
        for nth in 0..3 {
            let key = key_owned_by(&cluster, "replicated", node, nth);
            client
                .increment(increment("replicated", 10, &key))
                .await
                .unwrap();
        }
    }
    for _ in 0..30 {
        client
            .increment(increment("replicated", 1, ""))
            .await
            .unwrap();
    }
    wait_for_replicas_to_catch_up(&cluster).await;

    for down in 0..3 {
        cluster.stop_shard(down).await.unwrap();
        let read = get(&mut client, "replicated").await.unwrap();
        assert!(read.complete, "shard {down} down: {read:?}");
        assert_eq!(
            read.value, 120,
            "shard {down} down: counted once, from its copy"
        );
        cluster.restart_shard(down).await.unwrap();
        cluster.wait_ready(READY).await.unwrap();
    }
    // With every node up, each part is read from its own node: no entry
    // counted twice although every one has a copy.
    assert_eq!(value(&mut client, "replicated").await, 120);

    // A node and the node holding its copy, both down: that part is
    // missing, and only that node is named.
    let config = cluster.coordinator_config().clone();
    let ring = config.ring().unwrap();
    let copy_holder = tally::coordinator::replication::replicas_of(&ring, 0, 2)[0];
    cluster.stop_shard(0).await.unwrap();
    cluster.stop_shard(copy_holder).await.unwrap();
    let status = get(&mut client, "replicated").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shard-1"), "{}", status.message());
    cluster.shutdown().await.unwrap();
}

/// Polls until no shard says it awaits a restore; bounded.
async fn wait_until_restored(cluster: &LocalCluster) {
    wait_for_statuses(cluster, "every node to be restored", |statuses| {
        !statuses.iter().any(|status| status.restoring)
    })
    .await;
}

#[tokio::test]
async fn a_shard_restarted_empty_is_refilled_from_its_replica() {
    // Long enough that the node is seen waiting for its restore.
    let test =
        start_with(|options| options.replication_interval = Duration::from_millis(500)).await;
    let mut cluster = test.cluster;
    let mut client = cluster.counter_client().await.unwrap();
    wait_until_restored(&cluster).await;
    let keys: Vec<String> = (0..6)
        .map(|nth| key_owned_by(&cluster, "refill", "shard-2", nth))
        .collect();
    for key in &keys[..5] {
        client
            .increment(increment("refill", 10, key))
            .await
            .unwrap();
    }
    client.increment(increment("refill", 1, "")).await.unwrap();
    wait_for_replicas_to_catch_up(&cluster).await;

    // The disk is replaced: shard-2 comes back with an empty directory.
    cluster.stop_shard(1).await.unwrap();
    let data_dir = cluster.shard_configs().nth(1).unwrap().data_dir.clone();
    std::fs::remove_dir_all(&data_dir).unwrap();
    cluster.restart_shard(1).await.unwrap();
    cluster.wait_ready(READY).await.unwrap();
    assert!(
        shard_statuses(&cluster).await[1].restoring,
        "the node must start out waiting for its restore"
    );

    // At once, before any restore: it takes writes, and a read counts its
    // new entries and, from its replica, its earlier ones, each once.
    client
        .increment(increment("refill", 100, &keys[5]))
        .await
        .unwrap();
    assert_eq!(value(&mut client, "refill").await, 151);
    // Then its earlier entries are added back to its own.
    wait_until_restored(&cluster).await;
    assert_eq!(value(&mut client, "refill").await, 151);
    let entries = shard_statuses(&cluster).await[1].entries;
    assert!(entries > 0, "shard-2 holds its entries again");
    // Its copy is refreshed from its new incarnation: with shard-2 down,
    // the read is complete and exact again.
    wait_for_replicas_to_catch_up(&cluster).await;
    cluster.stop_shard(1).await.unwrap();
    let read = get(&mut client, "refill").await.unwrap();
    assert!(read.complete);
    assert_eq!(read.value, 151);
    cluster.shutdown().await.unwrap();
}

async fn drain(cluster: &LocalCluster, node: &str) -> Result<pb::DrainResponse, tonic::Status> {
    let mut admin = cluster.admin_client().await.unwrap();
    admin
        .drain(pb::DrainRequest {
            node_id: node.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn shard_client(
    cluster: &LocalCluster,
    index: usize,
) -> pb::shard_client::ShardClient<Channel> {
    let address = cluster.shard_configs().nth(index).unwrap().listen;
    pb::shard_client::ShardClient::connect(format!("http://{address}"))
        .await
        .unwrap()
}

/// Writes 60 across every node of `counter`, keyed to each node in turn.
async fn spread(cluster: &LocalCluster, client: &mut CounterClient<Channel>, counter: &str) {
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

#[tokio::test]
async fn a_drain_moves_a_nodes_entries_once_and_routes_around_it() {
    let test = start().await;
    let cluster = test.cluster;
    let mut client = cluster.counter_client().await.unwrap();
    spread(&cluster, &mut client, "drained").await;
    let before = shard_statuses(&cluster).await;
    assert!(before[1].entries > 0);

    let drained = drain(&cluster, "shard-2").await.unwrap();
    assert!(drained.entries > 0);
    assert_eq!(value(&mut client, "drained").await, 60);
    let after = shard_statuses(&cluster).await;
    assert_eq!(after[1].drain_state(), pb::DrainState::Drained);
    // The adopter's own entries now hold shard-2's 20 as well as its own.
    let adopter = after
        .iter()
        .position(|status| status.node_id == drained.adopter)
        .unwrap();
    let own = shard_client(&cluster, adopter)
        .await
        .read(pb::ReadRequest {
            node_id: drained.adopter.clone(),
            counters: vec!["drained".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let own_total: i64 = own.counters[0]
        .entries
        .iter()
        .map(|entry| entry.value)
        .sum();
    assert_eq!(own_total, 40, "the adopter's 20 and shard-2's 20");
    assert!(
        own.replicas.iter().all(|copy| copy.origin != "shard-2"),
        "copy dropped"
    );

    // Writes go around it, keyed ones too; it answers for nothing.
    for nth in 0..3 {
        let key = key_owned_by(&cluster, "drained", "shard-2", 10 + nth);
        client
            .increment(increment("drained", 1, &key))
            .await
            .unwrap();
    }
    client.increment(increment("drained", 1, "")).await.unwrap();
    assert_eq!(value(&mut client, "drained").await, 64);
    assert_eq!(shard_statuses(&cluster).await[1].entries, before[1].entries);
    // Again: nothing more moves.
    assert_eq!(drain(&cluster, "shard-2").await.unwrap().entries, 0);
    assert_eq!(value(&mut client, "drained").await, 64);
    // Unknown nodes and the last node are refused.
    assert_eq!(
        drain(&cluster, "shard-9").await.unwrap_err().code(),
        Code::NotFound
    );
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_drain_cut_off_at_any_step_resumes_and_counts_once() {
    // What a coordinator that died mid-drain leaves, step by step; the
    // totals are exact at each step, and a new drain finishes the job.
    for steps_done in 1..=3 {
        let test = start().await;
        let cluster = test.cluster;
        let mut client = cluster.counter_client().await.unwrap();
        // Fresh nodes are restored (from nothing) first; this test drives
        // the internal calls itself.
        wait_until_restored(&cluster).await;
        spread(&cluster, &mut client, "resumed").await;
        let mut node = shard_client(&cluster, 1).await;
        let adopter_index = {
            let ring = cluster.coordinator_config().ring().unwrap();
            tally::coordinator::replication::replicas_of(&ring, 1, 2)[0]
        };
        let adopter_id = format!("shard-{}", adopter_index + 1);
        node.drain(pb::ShardDrainRequest {
            node_id: "shard-2".into(),
            phase: pb::DrainPhase::StopWrites as i32,
            adopter: String::new(),
            version: 0,
        })
        .await
        .unwrap();
        assert_eq!(value(&mut client, "resumed").await, 60, "stopped writes");
        if steps_done >= 2 {
            let changes = node
                .changes(pb::ChangesRequest {
                    node_id: "shard-2".into(),
                    since: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let changes_version = changes.version;
            let mut adopter = shard_client(&cluster, adopter_index).await;
            adopter
                .replicate(pb::ReplicateRequest {
                    node_id: adopter_id.clone(),
                    origin: "shard-2".into(),
                    base: 0,
                    version: changes.version,
                    full: true,
                    entries: changes.entries,
                    scanned_unix_ms: changes.scanned_unix_ms,
                    directory_id: changes.directory_id,
                })
                .await
                .unwrap();
            node.drain(pb::ShardDrainRequest {
                node_id: "shard-2".into(),
                phase: pb::DrainPhase::HandedOver as i32,
                adopter: adopter_id.clone(),
                version: changes_version,
            })
            .await
            .unwrap();
            assert_eq!(value(&mut client, "resumed").await, 60, "handed over");
            if steps_done >= 3 {
                adopter
                    .adopt(pb::AdoptRequest {
                        node_id: adopter_id.clone(),
                        origin: "shard-2".into(),
                        version: changes_version,
                    })
                    .await
                    .unwrap();
                assert_eq!(value(&mut client, "resumed").await, 60, "adopted");
            }
        }
        let drained = drain(&cluster, "shard-2").await.unwrap();
        assert_eq!(drained.adopter, adopter_id);
        assert_eq!(
            value(&mut client, "resumed").await,
            60,
            "resumed after {steps_done} steps"
        );
        assert_eq!(
            shard_statuses(&cluster).await[1].drain_state(),
            pb::DrainState::Drained
        );
        cluster.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_deleted_counter_does_not_come_back_from_a_copy() {
    let test = start_with(|options| options.replication_interval = Duration::from_millis(50)).await;
    let mut cluster = test.cluster;
    let mut client = cluster.counter_client().await.unwrap();
    wait_until_restored(&cluster).await;
    spread(&cluster, &mut client, "gone").await;
    wait_for_replicas_to_catch_up(&cluster).await;
    client
        .delete(pb::DeleteRequest {
            counter: "gone".into(),
        })
        .await
        .unwrap();
    // A push scanned before the delete may still land just after it (the
    // documented window of one interval); once the copies have caught up
    // with the delete, no copy brings the counter back.
    wait_for_replicas_to_catch_up(&cluster).await;
    // Every node down in turn: its part comes from its copy, which the
    // delete erased too.
    for down in 0..3 {
        cluster.stop_shard(down).await.unwrap();
        let read = get(&mut client, "gone").await.unwrap();
        assert!(read.complete, "{read:?}");
        assert_eq!(read.value, 0, "shard {down} down: the delete came back");
        cluster.restart_shard(down).await.unwrap();
        cluster.wait_ready(READY).await.unwrap();
    }
    cluster.shutdown().await.unwrap();
}

fn bench_options(cluster: &LocalCluster, prefix: &str) -> tally::cli::bench::BenchOptions {
    tally::cli::bench::BenchOptions {
        endpoint: cluster.endpoint(),
        clients: 16,
        connections: 4,
        stop: tally::cli::bench::Stop::Calls(400),
        counters: 50,
        batch: 5,
        read_percent: 20,
        keyed: false,
        prefix: prefix.into(),
        timeout: Duration::from_secs(10),
        check: true,
        progress: false,
    }
}

#[tokio::test]
async fn bench_counts_and_checks_its_own_work() {
    let test = start().await;
    let report = tally::cli::bench::run(bench_options(&test.cluster, "b1-"))
        .await
        .unwrap();
    assert_eq!(report.check, "ok", "{report:?}");
    assert_eq!(report.calls, 400);
    assert_eq!(report.errors, 0, "{:?}", report.first_errors);
    let reads = report.read_latency_us.as_ref().map_or(0, |l| l.count);
    let writes = report.write_latency_us.as_ref().map_or(0, |l| l.count);
    assert_eq!(reads + writes, 400);
    assert_eq!(report.increments, writes * 5);
    assert_eq!(report.checked_counters, 50);
    // The counters hold exactly what the bench acknowledged.
    let mut client = test.cluster.counter_client().await.unwrap();
    let mut total = 0;
    for counter in 0..50 {
        total += value(&mut client, &format!("b1-{counter}")).await;
    }
    assert_eq!(total as u64, report.increments);

    // A counter changed behind the bench's back fails its check.
    client.increment(increment("b2-7", 3, "")).await.unwrap();
    let report = tally::cli::bench::run(bench_options(&test.cluster, "b2-"))
        .await
        .unwrap();
    assert!(!report.passed());
    assert!(
        report.check.contains("b2-7") && report.check.contains("3 extra"),
        "{}",
        report.check
    );
    test.cluster.shutdown().await.unwrap();
}

fn full_copies(statuses: &[pb::ShardStatusResponse]) -> u64 {
    statuses
        .iter()
        .map(|status| status.full_copies_received)
        .sum()
}

#[tokio::test]
async fn a_new_coordinator_sends_change_sets_not_full_copies() {
    // The cluster's own coordinator does not replicate, so every copy
    // below comes from the coordinators this test starts.
    let test = start_with(|options| options.replication_factor = 1).await;
    let replicating = |config: &mut tally::coordinator::CoordinatorConfig| {
        config.replication_factor = 2;
        config.replication_interval = Duration::from_millis(50);
    };
    let mut client = test.cluster.counter_client().await.unwrap();
    let mut write = async |from: usize| {
        for round in from..from + 40 {
            client
                .increment(increment(&format!("n{}", round % 10), 1, ""))
                .await
                .unwrap();
        }
        support::replication_targets(&shard_statuses(&test.cluster).await)
    };
    let targets = write(0).await;
    // A first replicating coordinator: every copy starts as a full copy
    // (3 nodes, factor 2: 3 pairs).
    let (_, stop, first) = other_coordinator(&test.cluster, replicating).await;
    let caught_up = wait_for_statuses(&test.cluster, "the first copies", |statuses| {
        support::replicas_caught_up(&targets, statuses)
    })
    .await;
    assert_eq!(full_copies(&caught_up), 3);
    stop.send(()).unwrap();
    first.await.unwrap().unwrap();

    // Writes that no coordinator replicates now; then a new coordinator
    // (as after a restart or a reload) brings the copies up to date with
    // change sets, not full copies.
    let targets = write(40).await;
    let (_, stop, second) = other_coordinator(&test.cluster, replicating).await;
    let caught_up = wait_for_statuses(&test.cluster, "the copies to catch up", |statuses| {
        support::replicas_caught_up(&targets, statuses)
    })
    .await;
    assert_eq!(
        full_copies(&caught_up),
        3,
        "the new coordinator sent full copies"
    );
    stop.send(()).unwrap();
    second.await.unwrap().unwrap();
    test.cluster.shutdown().await.unwrap();
}
