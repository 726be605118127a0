//! Replica copies, against an in-process cluster: reads stay complete with
//! a node down, a node restarted empty is refilled from its copy, a deleted
//! counter does not come back from a copy, and a new coordinator catches the
//! copies up with change sets, not full copies.

mod support;

use std::time::Duration;

use support::cluster::{
    get, increment, key_owned_by, other_coordinator, shard_statuses, spread, start_with, value,
    wait_for_replicas_to_catch_up, wait_for_statuses, wait_until_restored, READY,
};
use tally::proto::pb;
use tonic::Code;

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
    let copy_holder = tally::coordinator::replicas_of(&ring, 0, 2)[0];
    cluster.stop_shard(0).await.unwrap();
    cluster.stop_shard(copy_holder).await.unwrap();
    let status = get(&mut client, "replicated").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shard-1"), "{}", status.message());
    cluster.shutdown().await.unwrap();
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

    // At once, before any restore: it takes writes without a key, and a
    // read counts its new entries and, from its replica, its earlier ones,
    // each once.
    client
        .increment(increment("refill", 100, ""))
        .await
        .unwrap();
    assert_eq!(value(&mut client, "refill").await, 151);
    assert!(shard_statuses(&cluster).await[1].restoring);
    // A keyed write must not land before the restore of its idempotency
    // records (a retry of a key applied before the loss would apply
    // again): the node gives it back, and the coordinator restores the node
    // there and then and sends it again. The client sees one success.
    let keyed = client
        .increment(increment("refill", 1_000, &keys[5]))
        .await
        .unwrap()
        .into_inner();
    assert!(!keyed.deduplicated);
    assert!(!shard_statuses(&cluster).await[1].restoring, "restored");
    assert_eq!(value(&mut client, "refill").await, 1_151);
    // Its earlier entries are back in its own, with the records of the
    // keys it had applied: their retries are recognized.
    for key in &keys[..5] {
        let retry = client
            .increment(increment("refill", 10, key))
            .await
            .unwrap()
            .into_inner();
        assert!(retry.deduplicated, "{key}: {retry:?}");
    }
    assert_eq!(value(&mut client, "refill").await, 1_151);
    let entries = shard_statuses(&cluster).await[1].entries;
    assert!(entries > 0, "shard-2 holds its entries again");
    // Its copy is refreshed from its new incarnation: with shard-2 down,
    // the read is complete and exact again.
    wait_for_replicas_to_catch_up(&cluster).await;
    cluster.stop_shard(1).await.unwrap();
    let read = get(&mut client, "refill").await.unwrap();
    assert!(read.complete);
    assert_eq!(read.value, 1_151);
    cluster.shutdown().await.unwrap();
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
            ..Default::default()
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
