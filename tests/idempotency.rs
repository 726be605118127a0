//! Idempotency keys, against an in-process cluster: a retried increment or
//! batch applied once (through any coordinator), a key reused for another
//! delta refused, and keys remembered across a restart and a delete.

mod support;

use support::cluster::{
    increment, key_owned_by, second_coordinator, shard_statuses, start, value, wait_for_health,
    READY,
};
use tally::proto::pb;
use tonic::Code;

#[tokio::test]
async fn a_retried_increment_is_applied_once_through_any_coordinator() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    let (mut other, _stop) = second_coordinator(&test.cluster).await;
    let mut answers = Vec::new();
    for _ in 0..3 {
        for coordinator in [&mut client, &mut other] {
            let answer = coordinator
                .increment(increment("likes", 5, "order-1"))
                .await
                .unwrap();
            answers.push(answer.into_inner().deduplicated);
        }
    }
    assert_eq!(value(&mut client, "likes").await, 5);
    // The caller learns which call was the retry.
    assert_eq!(answers, [false, true, true, true, true, true]);
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
    let mut deduplicated = Vec::new();
    for items in [0..500, 0..1_000, 0..1_000] {
        let answer = client.increment_batch(batch(items)).await.unwrap();
        deduplicated.push(answer.into_inner().deduplicated);
    }
    assert_eq!(deduplicated, [0, 500, 1_000]);
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
    // Serving is not yet seen up: a keyed increment to a node the
    // coordinator still takes for down goes to its stand-in instead.
    for node in ["shard-1", "shard-2", "shard-3"] {
        wait_for_health(&cluster, node, "up").await;
    }
    for key in &keys {
        client.increment(increment("visits", 1, key)).await.unwrap();
    }
    assert_eq!(value(&mut client, "visits").await, 3);
    // A delete resets the value, not the memory of what was applied: a late
    // retry of an old increment does not bring it back.
    client
        .delete(pb::DeleteRequest {
            counter: "visits".into(),
            ..Default::default()
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
