//! Concurrent writers and the coordinator's batching, against an in-process
//! cluster: exact sums under concurrency, increments sharing internal calls,
//! a batch on one counter merged into one increment, and merged increments
//! that overflow one by one.

mod support;

use std::collections::HashMap;

use support::cluster::{increment, shard_statuses, start, start_with, value};
use tally::proto::pb;
use tonic::Code;

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
            ..Default::default()
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
