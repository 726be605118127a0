//! The service's handling of counters with a fixed window
//! (`crate::windows`): Apply's `expired` outcome and Read's flags.

use std::sync::Arc;
use std::time::Duration;

use tally_proto::pb;
use tally_proto::pb::apply_result::Outcome;
use tally_proto::window::{describe, Window};

use super::ShardService;
use crate::change::Change;
use crate::config::Durability;
use crate::journal::{Journal, JournalParts, LogSettings};
use crate::replicas::CopyStamp;
use crate::storage::Storage;
use crate::store::KeyRetention;

/// A node's service over a fresh data directory, its log thread running.
struct Node {
    service: ShardService,
    _storage: Storage,
    _dir: tempfile::TempDir,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let recovered = Storage::open(dir.path(), "shard-1", KeyRetention::default(), 1 << 20).unwrap();
    // Not awaiting a restore, open to membership RING: keyed increments
    // of it reach the store.
    {
        let mut meta = recovered.state.meta.lock();
        meta.awaiting_restore = false;
        meta.keyed_ring.stamp = RING;
    }
    let journal = Journal::start(
        recovered.state.clone(),
        JournalParts {
            dir: dir.path().to_path_buf(),
            log: recovered.log,
            witness: recovered.witness,
            checkpoint_position: recovered.checkpoint_position,
            checkpoint: recovered.checkpoint,
            checkpoint_hash: recovered.checkpoint_hash,
            pending_start: recovered.pending_start,
            commit_metrics: Default::default(),
        },
        LogSettings {
            durability: Durability::Sync,
            flush_interval: Duration::from_millis(5),
            segment_bytes: 1 << 20,
            checkpoint_bytes: 1 << 40,
            checkpoint_interval: Duration::from_secs(3600),
        },
    )
    .unwrap();
    Node {
        service: ShardService::new(
            "shard-1",
            Durability::Sync,
            recovered.state,
            Arc::new(journal),
        ),
        _storage: recovered.storage,
        _dir: dir,
    }
}

/// The membership the test node's keyed increments are open to.
const RING: u64 = 42;

fn increment(counter: &str, stripe: u32, delta: i64, key: &str) -> pb::ShardIncrement {
    pb::ShardIncrement {
        counter: counter.into(),
        stripe,
        delta,
        idempotency_key: key.into(),
        ring: if key.is_empty() { 0 } else { RING },
        ..Default::default()
    }
}

async fn apply(service: &ShardService, increments: Vec<pb::ShardIncrement>) -> Vec<Outcome> {
    service
        .apply_increments(pb::ApplyRequest {
            node_id: "shard-1".into(),
            increments,
            protocol_version: tally_proto::SHARD_PROTOCOL_VERSION,
        })
        .await
        .unwrap()
        .results
        .into_iter()
        .map(|result| result.outcome.unwrap())
        .collect()
}

async fn read(service: &ShardService, counters: &[&str]) -> pb::ReadResponse {
    service
        .read_counters(pb::ReadRequest {
            node_id: "shard-1".into(),
            counters: counters.iter().map(|counter| counter.to_string()).collect(),
        })
        .await
        .unwrap()
}

/// A window of `seconds` that ended `ago_ms` to `ago_ms + seconds` s ago.
fn ended_ago(name: &str, seconds: u32, ago_ms: u64) -> String {
    let before = crate::journal::unix_ms_now() - ago_ms - u64::from(seconds) * 1000;
    Window::containing(before, seconds).stored_name(name)
}

#[tokio::test]
async fn apply_refuses_an_ended_window_item_by_item_and_says_why() {
    let node = node();
    let service = &node.service;
    let ended = ended_ago("api:alice", 60, 61_000);
    let current = Window::current(3600).stored_name("api:alice");
    let outcomes = apply(
        service,
        vec![
            increment(&ended, 0, 1, ""),
            increment("plain", 0, 2, ""),
            increment(&current, 1, 3, ""),
            increment(&ended, 2, 4, "key-1"),
            // Of another membership, on behalf of a node this one holds no
            // copy of: refused as expired all the same.
            pb::ShardIncrement {
                ring: RING + 1,
                on_behalf_of: "shard-9".into(),
                ..increment(&ended, 3, 1, "key-2")
            },
        ],
    )
    .await;
    assert!(matches!(outcomes[1], Outcome::Applied(_)), "{outcomes:?}");
    assert!(matches!(outcomes[2], Outcome::Applied(_)), "{outcomes:?}");
    for outcome in [&outcomes[0], &outcomes[3], &outcomes[4]] {
        let Outcome::Expired(reason) = outcome else {
            panic!("{outcomes:?}");
        };
        let end = Window::end_of_stored(&ended).unwrap();
        assert!(
            reason.starts_with(&format!(
                "{} ended at {} ({end} Unix ms); this node's clock reads ",
                describe(&ended),
                crate::windows::rfc3339(end)
            )),
            "{reason}"
        );
        assert!(
            reason.contains(
                "past its end plus the grace of 60000 ms (window_grace_ms): the clocks of the \
                 coordinator and this node differ by more than the grace; nothing applied"
            ),
            "{reason}"
        );
        assert!(!reason.contains('\n') && !reason.contains('\0'), "{reason}");
    }
    let answer = read(service, &[&ended, "plain", &current]).await;
    let values: Vec<Vec<(u32, i64)>> = answer
        .counters
        .iter()
        .map(|entries| {
            entries
                .entries
                .iter()
                .map(|entry| (entry.stripe, entry.value))
                .collect()
        })
        .collect();
    assert_eq!(values, vec![vec![], vec![(0, 2)], vec![(1, 3)]]);
    assert_eq!(service.state.store.remembered_keys(), 0);
}

#[tokio::test]
async fn reads_flag_ended_windows_own_entries_and_copies_alike() {
    let node = node();
    let service = &node.service;
    let windows = service.state.store.windows();
    // Ended 2 to 3 s ago: taken within the default grace of a minute.
    let ended = ended_ago("api:alice", 1, 2_000);
    let only_copied = ended_ago("api:bob", 1, 2_000);
    let current = Window::current(3600).stored_name("api:alice");
    let outcomes = apply(
        service,
        vec![
            increment(&ended, 0, 5, ""),
            increment("plain", 0, 1, ""),
            increment(&current, 0, 1, ""),
        ],
    )
    .await;
    assert!(outcomes
        .iter()
        .all(|outcome| matches!(outcome, Outcome::Applied(_))));
    service
        .submit(Change::Replica {
            origin: "shard-2".into(),
            stamp: CopyStamp {
                version: 1,
                scanned_unix_ms: 0,
                directory_id: 7,
            },
            full: true,
            entries: vec![(ended.clone(), 1, 3), (only_copied.clone(), 0, 2)],
            records: vec![],
        })
        .await
        .unwrap();
    let asked = [
        ended.as_str(),
        "plain",
        current.as_str(),
        only_copied.as_str(),
    ];

    let before = crate::journal::unix_ms_now();
    let answer = read(service, &asked).await;
    assert!(answer.expired.is_empty(), "nothing ended: {answer:?}");
    assert!(answer.now_unix_ms >= before, "{answer:?}");

    // A grace of 1 ms ends them; they are reclaimed only 10 s later.
    windows.set_grace_ms(1);
    let answer = read(service, &asked).await;
    assert_eq!(answer.expired, vec![true, false, false, true], "{answer:?}");
    assert!(answer.now_unix_ms > Window::end_of_stored(&ended).unwrap());
    // The answer is whatever the node holds: flagged, it is no part of a
    // total (the coordinator's to turn into an error).
    assert_eq!(answer.counters[0].entries.len(), 1, "{answer:?}");
    let copy = &answer.replicas[0];
    assert_eq!(copy.origin, "shard-2");
    assert_eq!(copy.counters[0].entries.len(), 1, "{answer:?}");
    assert_eq!(copy.counters[3].entries.len(), 1, "{answer:?}");
    // And an increment of it is refused now.
    let outcomes = apply(service, vec![increment(&ended, 0, 1, "")]).await;
    assert!(matches!(&outcomes[0], Outcome::Expired(_)), "{outcomes:?}");
}
