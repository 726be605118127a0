//! The shard's storage with the real binaries: a data directory of the
//! previous format migrated at start, a really full filesystem (tmpfs and a
//! loop-mounted ext4), a file size limit, and crashes at chosen points of a
//! checkpoint.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use support::Daemon;
use tally::proto::pb;
use tally::proto::pb::counter_client::CounterClient;

/// A coordinator over `shards` (ids `shard-1`...), with `stripes`, and
/// replication as given.
fn coordinator(dir: &Path, shards: &[SocketAddr], stripes: u32, replication: u32) -> Daemon {
    let path = dir.join("coordinator.toml");
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\nstripes = {stripes}\nshard_timeout_ms = 5000\n\
         health_interval_ms = 100\nhealth_timeout_ms = 500\n\
         replication_factor = {replication}\nreplication_interval_ms = 100\n"
    );
    for (index, address) in shards.iter().enumerate() {
        text.push_str(&format!(
            "\n[[nodes]]\nid = \"shard-{}\"\naddress = \"{address}\"\n",
            index + 1
        ));
    }
    std::fs::write(&path, text).unwrap();
    Daemon::start(
        "tally-coordinator",
        "coordinator",
        &["--config", path.to_str().unwrap()],
        dir,
    )
}

/// Starts shard `id` on `data_dir` with extra flags.
fn shard(dir: &Path, id: &str, data_dir: &Path, listen: &str, extra: &[&str]) -> Daemon {
    let data = data_dir.to_str().unwrap().to_string();
    let mut args = vec![
        "--node-id",
        id,
        "--listen",
        listen,
        "--data-dir",
        data.as_str(),
    ];
    args.extend_from_slice(extra);
    Daemon::start("tally-shard", id, &args, dir)
}

async fn totals(endpoint: &str, counters: &[&str]) -> Vec<i64> {
    let counters: Vec<String> = counters.iter().map(|name| name.to_string()).collect();
    support::totals(endpoint, &counters)
        .await
        .into_iter()
        .map(|total| {
            assert!(total.complete, "{total:?}");
            total.value
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_2_directory_is_migrated_at_start_and_keeps_everything() {
    // tests/fixtures/format2.tar.gz: two shards of the previous format,
    // written by the previous build through a coordinator (stripes 4,
    // replication factor 2): shard-1 stopped cleanly, shard-2 killed. Each
    // holds a replica copy of the other, and idempotency records.
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format2.tar.gz");
    let untar = std::process::Command::new("tar")
        .args(["xzf", fixture.to_str().unwrap(), "-C"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(untar.success());
    let data = |id: &str| dir.path().join(id);
    let shards: Vec<Daemon> = ["shard-1", "shard-2"]
        .iter()
        .map(|id| shard(dir.path(), id, &data(id), "127.0.0.1:0", &[]))
        .collect();
    for daemon in &shards {
        assert!(
            daemon.log().contains("migrated to format 3"),
            "{}",
            daemon.log()
        );
    }
    for id in ["shard-1", "shard-2"] {
        let marker = std::fs::read_to_string(data(id).join("TALLY")).unwrap();
        assert!(marker.contains("format_version = 3"), "{marker}");
        for old in ["db", "conf", "FLUSHED", "blobs", "migrate.tmp"] {
            assert!(!data(id).join(old).exists(), "{id}: {old} is left over");
        }
    }
    let addresses: Vec<SocketAddr> = shards.iter().map(|daemon| daemon.address).collect();
    let coordinator = coordinator(dir.path(), &addresses, 4, 2);
    let endpoint = coordinator.endpoint();
    let names = [
        "plain-0", "plain-1", "plain-2", "plain-3", "plain-4", "keyed-0", "keyed-1", "keyed-2",
        "gone", "neg",
    ];
    let expected = vec![50, 34, 38, 42, 46, 21, 28, 21, 0, -12];
    assert_eq!(totals(&endpoint, &names).await, expected);

    // The idempotency records came along: a retry of a key applied before
    // the migration is not applied again.
    let mut client = CounterClient::connect(endpoint.clone()).await.unwrap();
    client
        .increment(pb::IncrementRequest {
            counter: "keyed-1".into(),
            delta: 7,
            idempotency_key: "key-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(totals(&endpoint, &names).await, expected);

    // The replica copies came along: with a shard down, reads stay complete.
    let mut shards = shards;
    let shard_2 = shards.pop().unwrap();
    let address = shard_2.address;
    shard_2.stop_with(Signal::SIGKILL);
    // Found down by the coordinator's probes, then read from the copy.
    let read = support::wait_until(
        "reads to complete from the copy",
        support::PATIENCE,
        || async {
            let read = support::totals(&endpoint, &names.map(String::from)).await;
            if read.iter().all(|total| total.complete) {
                Ok(read)
            } else {
                Err(read)
            }
        },
    )
    .await;
    let values: Vec<i64> = read.iter().map(|total| total.value).collect();
    assert_eq!(values, expected);
    // And a migrated directory starts again as the current format.
    let restarted = shard(
        dir.path(),
        "shard-2",
        &data("shard-2"),
        &address.to_string(),
        &[],
    );
    assert!(!restarted.log().contains("migrat"), "{}", restarted.log());
    assert_eq!(totals(&endpoint, &names).await, expected);
}

/// Why a filesystem test cannot run here, if it cannot.
fn cannot_mount() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not running as root: cannot mount a small filesystem".into());
    }
    None
}

/// A small filesystem mounted for one test, unmounted when dropped.
struct SmallFilesystem {
    mount_point: PathBuf,
    image: Option<PathBuf>,
}

impl SmallFilesystem {
    /// A tmpfs of `megabytes`, or an ext4 image of that size on a loop
    /// device; `Err` says why it cannot be mounted here.
    fn mount(dir: &Path, kind: &str, megabytes: u64) -> Result<SmallFilesystem, String> {
        if let Some(reason) = cannot_mount() {
            return Err(reason);
        }
        let mount_point = dir.join(format!("{kind}-mount"));
        std::fs::create_dir_all(&mount_point).unwrap();
        let run = |program: &str, args: &[&str]| -> Result<(), String> {
            let output = std::process::Command::new(program)
                .args(args)
                .output()
                .map_err(|error| format!("{program}: {error}"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{program} {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
        };
        let target = mount_point.to_str().unwrap();
        let image = match kind {
            "tmpfs" => {
                run(
                    "mount",
                    &[
                        "-t",
                        "tmpfs",
                        "-o",
                        &format!("size={megabytes}m"),
                        "tmpfs",
                        target,
                    ],
                )?;
                None
            }
            _ => {
                let image = dir.join("ext4.img");
                let file = std::fs::File::create(&image).unwrap();
                file.set_len(megabytes << 20).unwrap();
                drop(file);
                run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()])?;
                run("mount", &["-o", "loop", image.to_str().unwrap(), target])?;
                Some(image)
            }
        };
        Ok(SmallFilesystem { mount_point, image })
    }

    /// Bytes free.
    fn free_bytes(&self) -> u64 {
        let stat = nix::sys::statvfs::statvfs(&self.mount_point).unwrap();
        stat.blocks_available() as u64 * stat.fragment_size() as u64
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.mount_point)
            .status();
        if let Some(image) = &self.image {
            let _ = std::fs::remove_file(image);
        }
    }
}

/// A batch of 200 keyed increments of distinct long counters: a full disk
/// comes quickly.
fn batch(round: usize) -> pb::IncrementBatchRequest {
    pb::IncrementBatchRequest {
        increments: (0..200)
            .map(|item| pb::IncrementRequest {
                counter: format!("{:0>200}", round * 200 + item),
                delta: 1,
                idempotency_key: format!("r{round}/{item}"),
                ..Default::default()
            })
            .collect(),
    }
}

async fn read_round(
    client: &mut CounterClient<tonic::transport::Channel>,
    round: usize,
) -> Result<Vec<i64>, tonic::Status> {
    let counters = batch(round)
        .increments
        .into_iter()
        .map(|item| item.counter)
        .collect();
    Ok(client
        .get_batch(pb::GetBatchRequest {
            counters,
            allow_partial: false,
            ..Default::default()
        })
        .await?
        .into_inner()
        .counters
        .into_iter()
        .map(|total| total.value)
        .collect())
}

/// Round `round`'s totals, once the coordinator answers for them (after a
/// restart it may still see the node down for a moment).
async fn read_again(client: &CounterClient<tonic::transport::Channel>, round: usize) -> Vec<i64> {
    support::wait_until("the round to be read", support::PATIENCE, || {
        let mut client = client.clone();
        async move { read_round(&mut client, round).await }
    })
    .await
}

/// A change set asked of `node` while its log cannot be written holds no
/// record of round `refused` (it fails, or leaves them out).
async fn assert_no_change_beyond_the_log(node: &Daemon, refused: usize) {
    let mut shard = pb::shard_client::ShardClient::connect(node.endpoint())
        .await
        .unwrap()
        .max_decoding_message_size(usize::MAX);
    let answer = shard
        .changes(pb::ChangesRequest {
            node_id: "shard-1".into(),
            since: 0,
        })
        .await;
    let refused_prefix = format!("r{refused}/");
    match answer {
        Ok(changes) => {
            let beyond: Vec<String> = changes
                .into_inner()
                .records
                .into_iter()
                .filter(|record| record.key.starts_with(&refused_prefix))
                .map(|record| record.key)
                .collect();
            assert!(
                beyond.is_empty(),
                "a change set handed out records the log does not hold: {beyond:?}"
            );
        }
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
    }
}

/// Fills a small real filesystem until writes fail, then checks: writes
/// fail with UNAVAILABLE, reads work, a restart while full works, the node
/// heals by itself once space returns, and nothing acknowledged is lost.
async fn a_really_full_disk(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let filesystem = match SmallFilesystem::mount(dir.path(), kind, 48) {
        Ok(filesystem) => filesystem,
        Err(reason) => {
            support::report(&format!("skipped the {kind} full-disk test: {reason}"));
            return;
        }
    };
    let data_dir = filesystem.mount_point.join("data");
    // Small segments and frequent checkpoints: the disk fills during both.
    let flags = [
        "--log-segment-bytes",
        "1048576",
        "--checkpoint-interval-ms",
        "200",
        "--checkpoint-log-bytes",
        "4194304",
    ];
    let mut node = shard(dir.path(), "shard-1", &data_dir, "127.0.0.1:0", &flags);
    let address = node.address.to_string();
    let coordinator = coordinator(dir.path(), &[node.address], 8, 1);
    let mut client = CounterClient::connect(coordinator.endpoint())
        .await
        .unwrap();
    // Most of the space goes to a filler file; the node fills the rest.
    let filler = filesystem.mount_point.join("filler");
    let keep = 6 << 20;
    let fill = filesystem.free_bytes().saturating_sub(keep);
    std::fs::File::create(&filler).unwrap().set_len(0).unwrap();
    let status = std::process::Command::new("fallocate")
        .args(["-l", &fill.to_string(), filler.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success(), "fallocate failed");

    let (acknowledged, status) =
        support::write_until_refused(&mut client, batch, 5_000, "the filesystem never filled")
            .await;
    support::report(&format!(
        "{kind}: full after {acknowledged} batches ({} bytes free): {status:?}",
        filesystem.free_bytes()
    ));
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(acknowledged > 0);
    // The refused batch is in the node's memory but not in its log: a
    // replica must not be given it (a copy holding its idempotency records
    // would answer the client's retry as a duplicate, and the node could
    // lose it in a crash).
    assert_no_change_beyond_the_log(&node, acknowledged).await;
    // Still full: writes keep failing, reads work.
    assert!(client.increment_batch(batch(acknowledged)).await.is_err());
    assert_eq!(read_round(&mut client, 0).await.unwrap(), vec![1; 200]);

    // A restart while the disk is still full works, and loses nothing.
    node.stop_with(Signal::SIGKILL);
    node = shard(dir.path(), "shard-1", &data_dir, &address, &flags);
    for round in 0..acknowledged {
        // The coordinator may still see the node down for a moment.
        let read = read_again(&client, round).await;
        assert_eq!(
            read,
            vec![1; 200],
            "round {round} after a restart while full"
        );
    }

    // Space comes back: the node heals by itself; the client's retry with
    // the same keys lands once.
    std::fs::remove_file(&filler).unwrap();
    let mut attempts = 0;
    support::wait_until("writes to recover", support::PATIENCE, || {
        attempts += 1;
        let mut client = client.clone();
        async move { client.increment_batch(batch(acknowledged)).await }
    })
    .await;
    let retries = attempts - 1;
    // And again across a crash now.
    node.stop_with(Signal::SIGKILL);
    let node = shard(dir.path(), "shard-1", &data_dir, &address, &flags);
    for round in 0..=acknowledged {
        let read = read_again(&client, round).await;
        assert_eq!(read, vec![1; 200], "round {round} after space came back");
    }
    support::report(&format!(
        "{kind}: writes recovered after {retries} retries; every acknowledged increment present once"
    ));
    node.terminate();
    coordinator.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tmpfs_fails_writes_keeps_reads_and_heals() {
    a_really_full_disk("tmpfs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_ext4_fails_writes_keeps_reads_and_heals() {
    a_really_full_disk("ext4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_replica_push_is_logged_with_its_pair_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let filesystem = match SmallFilesystem::mount(dir.path(), "tmpfs", 16) {
        Ok(filesystem) => filesystem,
        Err(reason) => {
            support::report(&format!("skipped the replica push test: {reason}"));
            return;
        }
    };
    // shard-1 on the ordinary disk; shard-2, its replica, on a tmpfs that
    // is then filled: shard-2 stays up (its status answers) but cannot
    // write a copy.
    let shard_1 = shard(
        dir.path(),
        "shard-1",
        &dir.path().join("data-1"),
        "127.0.0.1:0",
        &[],
    );
    let shard_2 = shard(
        dir.path(),
        "shard-2",
        &filesystem.mount_point.join("data-2"),
        "127.0.0.1:0",
        &[],
    );
    let filler = filesystem.mount_point.join("filler");
    let status = std::process::Command::new("fallocate")
        .args([
            "-l",
            &filesystem.free_bytes().to_string(),
            filler.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let coordinator = coordinator(dir.path(), &[shard_1.address, shard_2.address], 8, 2);
    let client = CounterClient::connect(coordinator.endpoint())
        .await
        .unwrap();
    let mut waited = 0;
    let coordinator = &coordinator;
    let line = support::wait_until("a failed push to be logged", support::PATIENCE, || {
        // Writes to shard-1 keep giving shard-2 something to copy.
        let write = pb::IncrementRequest {
            counter: format!("c{waited}"),
            delta: 1,
            idempotency_key: String::new(),
            ..Default::default()
        };
        waited += 1;
        let mut client = client.clone();
        async move {
            let _ = client.increment(write).await;
            let log = coordinator.log();
            match log
                .lines()
                .find(|line| line.contains("copying a node's entries to its replica failed"))
            {
                Some(line) => Ok(line.to_string()),
                None => Err(support::Verbatim(log)),
            }
        }
    })
    .await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("replica=\"shard-2\""), "{line}");
    assert!(line.contains("origin=\"shard-1\""), "{line}");
    let output = support::run_to_end(
        "tallyctl",
        &["--endpoint", &coordinator.endpoint(), "--json", "status"],
    );
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let shard_1_status = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|node| node["id"] == "shard-1")
        .unwrap()
        .clone();
    assert!(
        shard_1_status["replication_failures"].as_u64().unwrap() > 0,
        "{status}"
    );
}
