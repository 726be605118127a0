//! Rate limits and quotas, end to end against a real in-process cluster:
//! increment-and-get, fixed windows, limits (through one coordinator and
//! through two), the per-item status of GetBatch, and the input rules of
//! every new field. docs/GUARANTEES.md ("Rate limits and quotas") states
//! what these hold the service to.

mod support;

use std::sync::Arc;

use support::cluster::{
    get, increment, second_coordinator, start, value, wait_for_health,
    wait_for_replicas_to_catch_up,
};
use tally::proto::pb;
use tally::proto::pb::counter_client::CounterClient;
use tonic::transport::Channel;
use tonic::Code;

/// A window that does not end while a test runs (unless it runs across
/// one of its ends, which come 366 days apart).
const LONG: u32 = tally::proto::window::MAX_WINDOW_SECONDS;

fn with_total(counter: &str, delta: i64) -> pb::IncrementRequest {
    pb::IncrementRequest {
        return_total: true,
        ..increment(counter, delta, "")
    }
}

fn limited(counter: &str, delta: i64, limit: i64, window_seconds: u32) -> pb::IncrementRequest {
    pb::IncrementRequest {
        limit: Some(limit),
        window_seconds,
        ..increment(counter, delta, "")
    }
}

fn windowed(counter: &str, delta: i64, window_seconds: u32) -> pb::IncrementRequest {
    pb::IncrementRequest {
        window_seconds,
        return_total: true,
        ..increment(counter, delta, "")
    }
}

async fn get_window(
    client: &mut CounterClient<Channel>,
    counter: &str,
    window_seconds: u32,
) -> pb::GetResponse {
    client
        .get(pb::GetRequest {
            counter: counter.to_string(),
            window_seconds,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

fn now_unix_ms() -> i64 {
    tally::proto::window::now_unix_ms() as i64
}

#[tokio::test]
async fn increment_and_get_reads_its_own_write() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    let mut expected = 0;
    for delta in [5, -2, 0, 1_000, 7] {
        expected += delta;
        let answer = client
            .increment(with_total("seen", delta))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.total, expected);
        assert!(answer.complete);
        assert_eq!(answer.applied, delta);
    }
    // Not asked: no read, no total.
    let plain = client
        .increment(increment("seen", 1, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((plain.total, plain.complete, plain.applied), (0, false, 1));

    // Concurrent writers: each total holds the writer's own increments so
    // far and never more than was acknowledged in all.
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut own = 0;
                for _ in 0..20 {
                    let answer = client
                        .increment(with_total("together", 3))
                        .await
                        .unwrap()
                        .into_inner();
                    own += 3;
                    assert!(answer.complete);
                    assert!(
                        (own..=8 * 20 * 3).contains(&answer.total),
                        "total {} after {own} of this writer's own",
                        answer.total
                    );
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(value(&mut client, "together").await, 8 * 20 * 3);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_window_starts_at_zero_and_ends_on_every_stripe_at_once() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    // One writer, one-second windows, for a little over two seconds: the
    // increments of a window spread over every stripe (no key), and each
    // window's total counts exactly the increments sent in it. A window
    // that ended stripe by stripe would show a total above the count (old
    // parts still read) in the next window.
    let mut windows: std::collections::BTreeMap<i64, i64> = Default::default();
    let until = std::time::Instant::now() + std::time::Duration::from_millis(2_300);
    while std::time::Instant::now() < until {
        let before = now_unix_ms();
        let answer = client
            .increment(windowed("api:alice", 1, 1))
            .await
            .unwrap()
            .into_inner();
        let after = now_unix_ms();
        let end = answer.window_end_unix_ms;
        assert_eq!(end % 1_000, 0, "windows are aligned to the epoch");
        assert!(
            end > before - 1_000 && end - 1_000 <= after,
            "window ending {end} for a call between {before} and {after}"
        );
        let count = windows.entry(end).or_default();
        *count += 1;
        assert_eq!(answer.total, *count, "window ending {end}");
    }
    assert!(windows.len() >= 2, "crossed no window's end: {windows:?}");
    // The counter without a window is another counter.
    assert_eq!(value(&mut client, "api:alice").await, 0);
    // A read of the current window, and a fresh window reads 0.
    let hour = get_window(&mut client, "api:alice", LONG).await;
    assert_eq!((hour.value, hour.complete), (0, true));
    assert_eq!(
        hour.window_end_unix_ms % (u64::from(LONG) * 1_000) as i64,
        0
    );
    client
        .increment(windowed("api:alice", 4, LONG))
        .await
        .unwrap();
    assert_eq!(get_window(&mut client, "api:alice", LONG).await.value, 4);
    // Deleting the window deletes it alone.
    client
        .delete(pb::DeleteRequest {
            counter: "api:alice".into(),
            window_seconds: LONG,
        })
        .await
        .unwrap();
    assert_eq!(get_window(&mut client, "api:alice", LONG).await.value, 0);
    // GetBatch of windows answers under the clients' names.
    client
        .increment(windowed("api:bob", 2, LONG))
        .await
        .unwrap();
    let batch = client
        .get_batch(pb::GetBatchRequest {
            counters: vec!["api:bob".into(), "api:carol".into()],
            window_seconds: LONG,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .counters;
    let seen: Vec<(&str, i64, bool)> = batch
        .iter()
        .map(|total| {
            (
                total.counter.as_str(),
                total.value,
                total.window_end_unix_ms > 0,
            )
        })
        .collect();
    assert_eq!(seen, vec![("api:bob", 2, true), ("api:carol", 0, true)]);
    test.cluster.shutdown().await.unwrap();
}

/// Sends `attempts` limited increments of 1 from each of `clients` at once
/// (one task per client), all to `counter`, every other caller allowing a
/// partial total (the two kinds must still share one limit); returns the
/// sum of what was applied and the largest total any answer gave.
async fn race_to_the_limit(
    clients: Vec<CounterClient<Channel>>,
    attempts: usize,
    counter: &str,
    limit: i64,
    window_seconds: u32,
) -> (i64, i64) {
    let start = Arc::new(tokio::sync::Barrier::new(clients.len()));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(caller, mut client)| {
            let start = start.clone();
            let counter = counter.to_string();
            tokio::spawn(async move {
                start.wait().await;
                let (mut applied, mut highest) = (0, 0);
                for _ in 0..attempts {
                    let answer = client
                        .increment(pb::IncrementRequest {
                            allow_partial: caller % 2 == 1,
                            ..limited(&counter, 1, limit, window_seconds)
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(matches!(answer.applied, 0 | 1), "{answer:?}");
                    assert!(answer.complete);
                    applied += answer.applied;
                    highest = highest.max(answer.total);
                }
                (applied, highest)
            })
        })
        .collect();
    let mut applied = 0;
    let mut highest = 0;
    for task in tasks {
        let (own, seen) = task.await.unwrap();
        applied += own;
        highest = highest.max(seen);
    }
    (applied, highest)
}

#[tokio::test]
async fn a_limit_is_never_passed_through_one_coordinator() {
    let test = start().await;
    let client = test.cluster.counter_client().await.unwrap();
    // 16 callers, 240 attempts for 100 places.
    let (applied, highest) = race_to_the_limit(vec![client.clone(); 16], 15, "quota", 100, 0).await;
    let mut client = client;
    assert_eq!(applied, 100);
    assert_eq!(highest, 100);
    assert_eq!(value(&mut client, "quota").await, 100);
    // Refused: nothing applied, the total given.
    let refused = client
        .increment(limited("quota", 1, 100, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((refused.applied, refused.total), (0, 100));
    // An increment that would pass the limit is refused whole, one that
    // lands on it is applied; a delta of 0 changes nothing.
    let fits = client
        .increment(limited("room", 7, 10, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((fits.applied, fits.total), (7, 7));
    let over = client
        .increment(limited("room", 4, 10, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((over.applied, over.total), (0, 7));
    let exact = client
        .increment(limited("room", 3, 10, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((exact.applied, exact.total), (3, 10));
    // A rate limit: the limit per window.
    let (applied, _) = race_to_the_limit(vec![client.clone(); 8], 10, "api:dave", 30, LONG).await;
    assert_eq!(applied, 30);
    assert_eq!(get_window(&mut client, "api:dave", LONG).await.value, 30);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn through_two_coordinators_a_limit_is_passed_by_at_most_the_increments_in_flight() {
    let test = start().await;
    let first = test.cluster.counter_client().await.unwrap();
    let (second, _stop) = second_coordinator(&test.cluster).await;
    // 8 callers on each coordinator, each with one increment of 1 in
    // flight at a time: a decision on one coordinator misses at most the 8
    // in flight on the other.
    let mut clients = vec![first.clone(); 8];
    clients.extend(vec![second; 8]);
    let (applied, _) = race_to_the_limit(clients, 15, "shared-quota", 100, 0).await;
    let mut first = first;
    let total = value(&mut first, "shared-quota").await;
    support::report(&format!(
        "two coordinators, 16 callers, limit 100: {applied} applied, total {total}"
    ));
    assert_eq!(total, applied, "every applied increment counted, no other");
    assert!(
        (100..=108).contains(&total),
        "limit 100 passed by more than the 8 increments in flight: {total}"
    );
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_limit_holds_while_a_node_is_down() {
    let mut test = start().await;
    let client = test.cluster.counter_client().await.unwrap();
    // Half the quota used on every node (no key: the stripes rotate), and
    // copied to the replicas.
    for _ in 0..10 {
        client
            .clone()
            .increment(limited("failover-quota", 1, 20, 0))
            .await
            .unwrap();
    }
    wait_for_replicas_to_catch_up(&test.cluster).await;
    test.cluster.stop_shard(1).await.unwrap();
    wait_for_health(&test.cluster, "shard-2", "down").await;
    // The down node's part is read from its replica's copy, and new
    // increments go around it: the other half, and no more.
    let (applied, highest) =
        race_to_the_limit(vec![client.clone(); 8], 5, "failover-quota", 20, 0).await;
    assert_eq!((applied, highest), (10, 20));
    let mut client = client;
    assert_eq!(value(&mut client, "failover-quota").await, 20);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_unreadable_counter_does_not_sink_a_batch() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    // Parts that each fit an i64 while their sum does not: increments
    // without a key go round the stripes, and one that would overflow the
    // part it lands on is refused, so keep sending until three landed.
    let mut accepted = 0;
    while accepted < 3 {
        if client
            .increment(increment("huge", i64::MAX, ""))
            .await
            .is_ok()
        {
            accepted += 1;
        }
    }
    client.increment(increment("fine", 5, "")).await.unwrap();
    let status = get(&mut client, "huge").await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let batch = client
        .get_batch(pb::GetBatchRequest {
            counters: vec!["huge".into(), "fine".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .counters;
    assert_eq!(batch[0].counter, "huge");
    assert_eq!(batch[0].error_code, Code::OutOfRange as u32);
    assert!(
        batch[0].error.contains("does not fit"),
        "{}",
        batch[0].error
    );
    assert_eq!((batch[0].value, batch[0].complete), (0, false));
    assert_eq!(
        (
            batch[1].counter.as_str(),
            batch[1].value,
            batch[1].error_code
        ),
        ("fine", 5, 0)
    );
    assert!(batch[1].complete && batch[1].error.is_empty());
    // Increment-and-get of it fails the same way, after applying.
    let status = client.increment(with_total("huge", 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // Delete gets it back.
    client
        .delete(pb::DeleteRequest {
            counter: "huge".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(value(&mut client, "huge").await, 0);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_new_field_is_checked_and_nothing_is_applied() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    client.increment(increment("safe", 5, "")).await.unwrap();
    client.increment(windowed("safe", 5, LONG)).await.unwrap();
    let too_long_for_a_window = "w".repeat(233);
    let increments: Vec<(pb::IncrementRequest, &str)> = vec![
        (windowed("safe", 1, 31_622_401), "window_seconds: 31622401"),
        (windowed("safe", 1, u32::MAX), "window_seconds"),
        (
            windowed(&too_long_for_a_window, 1, 60),
            "233 bytes, more than the limit of 232 for a counter with a window",
        ),
        (limited("safe", -1, 10, 0), "limit: delta is -1"),
        (limited("safe", i64::MIN, 10, 60), "limit: delta is"),
        (
            pb::IncrementRequest {
                idempotency_key: "k".into(),
                ..limited("safe", 1, 10, 0)
            },
            "limit: not with an idempotency_key",
        ),
        (
            pb::IncrementRequest {
                allow_partial: true,
                ..increment("safe", 1, "")
            },
            "allow_partial: only with return_total or limit",
        ),
        (increment("\0safe", 1, ""), "starts with U+0000"),
        (
            increment("\u{0}1764633600+60\u{0}safe", 1, ""),
            "starts with U+0000",
        ),
    ];
    for (request, message) in increments {
        let status = client.increment(request.clone()).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{request:?}: {status:?}"
        );
        assert!(
            status.message().contains(message),
            "{request:?}: {status:?}"
        );
    }
    let batches: Vec<(Vec<pb::IncrementRequest>, &str)> = vec![
        (
            vec![increment("safe", 1, ""), with_total("safe", 1)],
            "item 1: return_total: not in IncrementBatch",
        ),
        (
            vec![limited("safe", 1, 10, 0)],
            "item 0: limit: not in IncrementBatch",
        ),
        (
            vec![increment("safe", 1, ""), windowed("safe", 1, 31_622_401)],
            "item 1: window_seconds",
        ),
    ];
    for (increments, message) in batches {
        let status = client
            .increment_batch(pb::IncrementBatchRequest { increments })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(message), "{status:?}");
    }
    let status = client
        .get(pb::GetRequest {
            counter: "safe".into(),
            window_seconds: 31_622_401,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = client
        .get_batch(pb::GetBatchRequest {
            counters: vec!["safe".into(), too_long_for_a_window.clone()],
            window_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("item 1: "), "{status:?}");
    let status = client
        .delete(pb::DeleteRequest {
            counter: "safe".into(),
            window_seconds: 31_622_401,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = client
        .delete(pb::DeleteRequest {
            counter: "\0safe".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Nothing applied, nothing deleted; the server still serves.
    assert_eq!(value(&mut client, "safe").await, 5);
    assert_eq!(get_window(&mut client, "safe", LONG).await.value, 5);
    test.cluster.shutdown().await.unwrap();
}

/// A shard whose clock runs ahead of the coordinator's by more than its
/// `window_grace_ms` has ended (and may have reclaimed) windows the
/// coordinator still writes and reads: it refuses them, and the
/// coordinator answers FAILED_PRECONDITION naming it, never a total with
/// that node's parts missing. Counters without a window are unaffected.
/// Real processes: shard-2 runs 30 s ahead under libfaketime with a grace
/// of 1 s, and the windows are 1 s long, so every window the coordinator
/// picks has ended by shard-2's clock.
#[test]
fn a_shard_whose_clock_runs_ahead_by_more_than_the_grace_refuses_the_window() {
    let Some(faketime) = support::libfaketime() else {
        println!(
            "SKIPPED the clock-skew check: libfaketime is not installed (apt-get install \
             faketime), so no shard can run with its clock ahead"
        );
        return;
    };
    let runtime = support::runtime();
    let mut cluster = support::ProcessCluster::start("sync");
    let address = cluster.shards[1]
        .take()
        .unwrap()
        .stop_with_address(nix::sys::signal::Signal::SIGTERM);
    let lib = faketime.display().to_string();
    cluster.restart_shard_with_env(
        1,
        address,
        &["--window-grace-ms", "1000"],
        &[("LD_PRELOAD", lib.as_str()), ("FAKETIME", "+30s")],
    );
    support::wait_for_shown_health(&runtime, &cluster, "shard-2", "up");
    runtime.block_on(async {
        let mut client = CounterClient::connect(cluster.coordinator.endpoint())
            .await
            .unwrap();
        // Increments without a key go round the stripes: those of shard-2
        // are refused, the others applied.
        let mut refused = 0;
        for _ in 0..16 {
            match client.increment(windowed("skewed", 1, 1)).await {
                Ok(_) => {}
                Err(status) => {
                    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                    assert!(status.message().contains("window_grace_ms"), "{status:?}");
                    refused += 1;
                }
            }
        }
        assert!(refused > 0, "no increment reached shard-2");
        let status = client
            .get(pb::GetRequest {
                counter: "skewed".into(),
                window_seconds: 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("shard-2"), "{status:?}");
        let batch = client
            .get_batch(pb::GetBatchRequest {
                counters: vec!["skewed".into(), "other".into()],
                window_seconds: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .counters;
        for item in &batch {
            assert_eq!(item.error_code, Code::FailedPrecondition as u32, "{item:?}");
            assert!(item.error.contains("shard-2"), "{item:?}");
        }
        // A counter without a window knows no clock.
        client.increment(increment("skewed", 5, "")).await.unwrap();
        assert_eq!(value(&mut client, "skewed").await, 5);
    });
    support::report(&format!(
        "shard-2 30 s ahead, grace 1 s: its windows refused (libfaketime {})",
        faketime.display()
    ));
}
