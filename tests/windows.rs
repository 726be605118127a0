//! Counters with a fixed window on real `tally-shard` processes, through
//! the shard protocol: a window that ended by a node's clock is refused
//! and flagged, then reclaimed (own entries, idempotency records, a copy
//! on another node) through the log, so that neither a restart after a
//! SIGKILL nor the files on disk bring it back.
//!
//! A window is reclaimed 10 s (a constant margin) after its end plus the
//! grace: with a 3-s window and a grace of 1 s this test takes about 15 s.

mod support;

use std::path::Path;

use nix::sys::signal::Signal;
use support::{Daemon, PATIENCE};
use tally::proto::pb;
use tally::proto::pb::apply_result::Outcome;
use tally::proto::pb::shard_client::ShardClient;
use tally::proto::window::Window;
use tonic::transport::Channel;

/// The keyed membership both nodes are opened to at their restore.
const RING: u64 = 7;

fn start(dir: &Path, id: &str) -> Daemon {
    let data = dir.join(id);
    Daemon::start(
        "tally-shard",
        id,
        &[
            "--node-id",
            id,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--window-grace-ms",
            "1000",
            // Small segments: once a checkpoint covers them, the frames
            // that held the window go with their files.
            "--log-segment-bytes",
            "4096",
        ],
        dir,
    )
}

async fn client(daemon: &Daemon) -> ShardClient<Channel> {
    ShardClient::connect(daemon.endpoint()).await.unwrap()
}

fn increment(counter: &str, stripe: u32, delta: i64, key: &str) -> pb::ShardIncrement {
    pb::ShardIncrement {
        counter: counter.to_string(),
        stripe,
        delta,
        idempotency_key: key.to_string(),
        ring: if key.is_empty() { 0 } else { RING },
        ..Default::default()
    }
}

async fn apply(
    client: &mut ShardClient<Channel>,
    node_id: &str,
    increments: Vec<pb::ShardIncrement>,
) -> Vec<Outcome> {
    client
        .apply(pb::ApplyRequest {
            node_id: node_id.into(),
            increments,
            protocol_version: tally::proto::SHARD_PROTOCOL_VERSION,
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .into_iter()
        .map(|result| result.outcome.unwrap())
        .collect()
}

async fn status(client: &mut ShardClient<Channel>) -> pb::ShardStatusResponse {
    client
        .status(pb::ShardStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
}

async fn read(client: &mut ShardClient<Channel>, counters: &[&str]) -> pb::ReadResponse {
    client
        .read(pb::ReadRequest {
            node_id: "shard-1".into(),
            counters: counters.iter().map(|counter| counter.to_string()).collect(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// A new node awaits a restore (of nothing, here) before it takes keyed
/// increments, and is opened to membership [`RING`] by it.
async fn restore_empty(client: &mut ShardClient<Channel>, node_id: &str) {
    client
        .restore(pb::RestoreRequest {
            node_id: node_id.into(),
            ring: RING,
            ring_epoch: 1,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// One group commit of 300 plain counters: a frame larger than a log
/// segment, so the next frame starts a new one.
async fn fill_a_segment(client: &mut ShardClient<Channel>, node_id: &str, round: usize) {
    let increments = (0..300)
        .map(|index| increment(&format!("filler-{round}-{index:04}"), 0, 1, ""))
        .collect();
    let outcomes = apply(client, node_id, increments).await;
    assert!(outcomes
        .iter()
        .all(|outcome| matches!(outcome, Outcome::Applied(_))));
}

/// Whether any file under `dir` holds `bytes`.
fn files_holding(dir: &Path, bytes: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_holding(&path, bytes));
        } else if std::fs::read(&path)
            .unwrap()
            .windows(bytes.len())
            .any(|window| window == bytes)
        {
            found.push(path.display().to_string());
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_window_is_refused_then_reclaimed_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let one = start(dir.path(), "shard-1");
    let two = start(dir.path(), "shard-2");
    let mut first = client(&one).await;
    let mut second = client(&two).await;
    restore_empty(&mut first, "shard-1").await;
    restore_empty(&mut second, "shard-2").await;

    // The current 3-s window (its end and grace do not pass before the
    // Apply lands, even on a loaded machine), keyed and not; a plain
    // counter, keyed; an hour's window.
    let window = Window::current(3).stored_name("api:alice");
    let hour = Window::current(3600).stored_name("api:alice");
    let outcomes = apply(
        &mut first,
        "shard-1",
        vec![
            increment(&window, 0, 5, ""),
            increment(&window, 1, 2, "key-1"),
            increment("plain", 0, 1, "key-2"),
            increment(&hour, 0, 1, ""),
        ],
    )
    .await;
    assert!(
        outcomes
            .iter()
            .all(|outcome| matches!(outcome, Outcome::Applied(_))),
        "{outcomes:?}"
    );

    // shard-2 holds a copy of shard-1, as a replication round leaves it.
    let changes = first
        .changes(pb::ChangesRequest {
            node_id: "shard-1".into(),
            since: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let replicated = second
        .replicate(pb::ReplicateRequest {
            node_id: "shard-2".into(),
            origin: "shard-1".into(),
            version: changes.version,
            full: true,
            entries: changes.entries,
            scanned_unix_ms: changes.scanned_unix_ms,
            directory_id: changes.directory_id,
            records: changes.records,
            keyed_ring: changes.keyed_ring,
            keyed_ring_epoch: changes.keyed_ring_epoch,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(replicated.accepted);
    assert_eq!(status(&mut second).await.replica_entries, 4);

    // Past its end and the grace: flagged in reads (the answer's parts are
    // no part of a total), refused in writes.
    let flagged = support::wait_until("the window to be flagged", PATIENCE, || {
        let mut first = first.clone();
        let (window, hour) = (window.clone(), hour.clone());
        async move {
            let answer = read(&mut first, &[&window, "plain", &hour]).await;
            if answer.expired.is_empty() {
                Err(answer)
            } else {
                Ok(answer)
            }
        }
    })
    .await;
    assert_eq!(flagged.expired, vec![true, false, false]);
    assert!(flagged.now_unix_ms >= Window::end_of_stored(&window).unwrap() + 1000);
    let outcomes = apply(&mut first, "shard-1", vec![increment(&window, 0, 1, "")]).await;
    let [Outcome::Expired(reason)] = &outcomes[..] else {
        panic!("{outcomes:?}");
    };
    assert!(reason.contains("api:alice (window "), "{reason}");
    assert!(reason.contains("grace of 1000 ms"), "{reason}");

    // 10 s later both nodes reclaim it: own entries and the key's record
    // on shard-1, its copy on shard-2.
    support::wait_until("the window to be reclaimed", PATIENCE, || {
        let (mut first, mut second) = (first.clone(), second.clone());
        async move {
            let (one, two) = (status(&mut first).await, status(&mut second).await);
            let seen = (one.entries, one.remembered_keys, two.replica_entries);
            if seen == (2, 1, 2) {
                Ok(())
            } else {
                Err(seen)
            }
        }
    })
    .await;
    for daemon in [&one, &two] {
        let metrics = support::scrape(daemon);
        assert_eq!(
            metrics.get("tally_shard_windows_reclaimed_total"),
            Some(&1.0),
            "{}",
            daemon.name
        );
    }
    // A sync increment acknowledged now is in a later group commit than
    // the one that logged the reclaim.
    fill_a_segment(&mut first, "shard-1", 0).await;

    // Killed (no last checkpoint) and started again: still gone.
    one.stop_with(Signal::SIGKILL);
    two.stop_with(Signal::SIGKILL);
    let one = start(dir.path(), "shard-1");
    let two = start(dir.path(), "shard-2");
    let (mut first, mut second) = (client(&one).await, client(&two).await);
    let after = status(&mut first).await;
    assert_eq!((after.entries, after.remembered_keys), (2 + 300, 1));
    assert_eq!(status(&mut second).await.replica_entries, 2);
    let answer = read(&mut first, &[&window]).await;
    assert_eq!(answer.expired, vec![true]);
    assert!(answer.counters[0].entries.is_empty(), "{answer:?}");

    // Stopped cleanly (a last checkpoint of everything), after frames that
    // fill a segment each: the segments that held the window are gone, and
    // the checkpoint, with no frame after it, holds none of it.
    for round in 1..3 {
        fill_a_segment(&mut first, "shard-1", round).await;
        fill_a_segment(&mut second, "shard-2", round).await;
    }
    one.terminate();
    two.terminate();
    let name = "api:alice".as_bytes();
    for id in ["shard-1", "shard-2"] {
        let data = dir.path().join(id);
        assert_eq!(
            files_holding(&data.join("log"), name),
            Vec::<String>::new(),
            "{id}"
        );
        let output = support::run_to_end("tally-shard", &["verify", data.to_str().unwrap()]);
        let report = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(output.status.success(), "{report}");
        let line = |prefix: &str| {
            report
                .lines()
                .find_map(|line| line.strip_prefix(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} in {report}"))
                .to_string()
        };
        // No frame after the checkpoint: what it holds is the whole state.
        let last_frame = line("log: ")
            .split_once("last frame ")
            .and_then(|(_, rest)| rest.split_once(' '))
            .map(|(frame, _)| frame.to_string());
        assert_eq!(
            last_frame,
            Some(line("checkpoint covers frames up to ")),
            "{report}"
        );
        if id == "shard-1" {
            assert_eq!(line("entries "), (2 + 3 * 300).to_string(), "{report}");
            assert_eq!(line("idempotency records "), "1", "{report}");
        } else {
            assert_eq!(line("entries of other nodes "), "2", "{report}");
        }
    }
}
