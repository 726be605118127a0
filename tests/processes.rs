//! Behaviour that is about processes: the real `tally-shard`,
//! `tally-coordinator` and `tallyctl` binaries, started from config files,
//! stopped with signals.

mod support;

use std::collections::HashMap;

use nix::sys::signal::Signal;
use support::{run_to_end, ProcessCluster};
use tally::proto::pb;
use tally::proto::pb::counter_client::CounterClient;

/// Waits until every node's copy holds everything the node had done at the
/// call: each origin's replication version now, reached by a copy of it.
/// Bounded.
async fn wait_for_replicas_to_catch_up(cluster: &ProcessCluster) {
    async fn statuses(cluster: &ProcessCluster) -> Vec<pb::ShardStatusResponse> {
        let mut statuses = Vec::new();
        for shard in cluster.shards.iter().flatten() {
            let mut client = pb::shard_client::ShardClient::connect(shard.endpoint())
                .await
                .unwrap();
            statuses.push(
                client
                    .status(pb::ShardStatusRequest { brief: true })
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
        statuses
    }
    let targets = &support::replication_targets(&statuses(cluster).await);
    support::wait_until(
        "replication to catch up",
        support::PATIENCE,
        || async move {
            let now = statuses(cluster).await;
            if support::replicas_caught_up(targets, &now) {
                Ok(())
            } else {
                Err(now)
            }
        },
    )
    .await;
}

/// Concurrent writers through the coordinator; returns the ledger of what
/// was acknowledged.
async fn write_load(endpoint: &str, writers: usize, rounds: usize) -> HashMap<String, i64> {
    let client = CounterClient::connect(endpoint.to_string()).await.unwrap();
    let tasks: Vec<_> = (0..writers)
        .map(|writer| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut ledger: HashMap<String, i64> = HashMap::new();
                for round in 0..rounds {
                    let counter = format!("process-{}", (writer + round) % 10);
                    let delta = if round % 3 == 0 { -7 } else { 11 };
                    client
                        .increment(pb::IncrementRequest {
                            counter: counter.clone(),
                            delta,
                            idempotency_key: String::new(),
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                    *ledger.entry(counter).or_default() += delta;
                }
                ledger
            })
        })
        .collect();
    let mut ledger = HashMap::new();
    for task in tasks {
        for (counter, delta) in task.await.unwrap() {
            *ledger.entry(counter).or_default() += delta;
        }
    }
    ledger
}

async fn assert_totals_match(endpoint: &str, ledger: &HashMap<String, i64>) {
    let names: Vec<String> = ledger.keys().cloned().collect();
    for total in support::totals(endpoint, &names).await {
        assert!(total.complete, "{total:?}");
        assert_eq!(total.value, ledger[&total.counter], "{}", total.counter);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_survive_a_graceful_restart_of_every_shard() {
    for durability in ["sync", "async"] {
        let mut cluster = ProcessCluster::start(durability);
        let endpoint = cluster.coordinator.endpoint();
        let ledger = write_load(&endpoint, 16, 40).await;
        assert_totals_match(&endpoint, &ledger).await;

        for index in 0..3 {
            let shard = cluster.shards[index].take().unwrap();
            let address = shard.address;
            let log = shard.log();
            assert!(log.contains("recovered"), "{log}");
            shard.terminate();
            cluster.restart_shard(index, address);
        }
        // Every shard process is new; the coordinator reconnects by itself.
        assert_totals_match(&endpoint, &ledger).await;
        for shard in cluster.shards.iter().flatten() {
            assert!(shard.log().contains("recovered"));
        }
        cluster.coordinator.terminate();
        for shard in cluster.shards.into_iter().flatten() {
            shard.terminate();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_a_shard_cleanly_too() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_shard_config(dir.path(), 1, "sync");
    let shard = support::start_shard("shard-1", &config, &[]);
    assert!(shard.stop_with(Signal::SIGINT).success());
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tallyctl_against_a_running_cluster() {
    let cluster = ProcessCluster::start("sync");

    let output = cluster.tallyctl(&["incr", "page:views", "5"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), "OK page:views +5");
    assert!(cluster
        .tallyctl(&["incr", "page:views", "-2"])
        .status
        .success());
    assert!(cluster.tallyctl(&["incr", "page:views"]).status.success());
    assert!(cluster
        .tallyctl(&["incr", "likes", "3", "--key", "request-1"])
        .status
        .success());
    // A retry with the same key says so, and counts once.
    let output = cluster.tallyctl(&["incr", "likes", "3", "--key", "request-1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output).trim(),
        "OK likes +3 (a retry: the key was applied before, not again)"
    );

    let output = cluster.tallyctl(&["get", "page:views", "likes", "missing"]);
    assert!(output.status.success());
    let text = stdout(&output);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], vec!["COUNTER", "VALUE", "COMPLETE"]);
    assert_eq!(rows[1], vec!["page:views", "4", "yes"]);
    assert_eq!(rows[2], vec!["likes", "3", "yes"]);
    assert_eq!(rows[3], vec!["missing", "0", "yes"]);

    let output = cluster.tallyctl(&["--json", "get", "page:views"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!([{ "counter": "page:views", "value": 4, "complete": true }])
    );

    // Live ring: three nodes, a third each, all up.
    let output = cluster.tallyctl(&["--json", "ring"]);
    let ring: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(ring["stripes"], 8);
    let nodes = ring["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for node in nodes {
        assert_eq!(node["reachable"], true);
        assert!((node["owned_fraction"].as_f64().unwrap() - 1.0 / 3.0).abs() < 0.03);
    }
    let text = stdout(&cluster.tallyctl(&["ring"]));
    assert!(
        text.starts_with(" NODE") || text.starts_with("NODE"),
        "{text}"
    );
    assert!(
        text.contains("shard-2") && text.contains("up") && text.contains('%'),
        "{text}"
    );

    // Offline ring from the same config file agrees with the live one.
    let output = run_to_end(
        "tallyctl",
        &[
            "--json",
            "ring",
            "--config",
            cluster.coordinator_config.to_str().unwrap(),
        ],
    );
    let offline: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for (live, offline) in nodes.iter().zip(offline["nodes"].as_array().unwrap()) {
        assert_eq!(live["id"], offline["id"]);
        assert_eq!(live["owned_fraction"], offline["owned_fraction"]);
        assert!(offline.get("reachable").is_none());
    }

    // Locate, live and offline, agree.
    let live = stdout(&cluster.tallyctl(&["--json", "locate", "page:views"]));
    let offline = stdout(&run_to_end(
        "tallyctl",
        &[
            "--json",
            "locate",
            "page:views",
            "--config",
            cluster.coordinator_config.to_str().unwrap(),
        ],
    ));
    assert_eq!(live, offline);
    let located: serde_json::Value = serde_json::from_str(&live).unwrap();
    assert_eq!(located["stripes"].as_array().unwrap().len(), 8);

    let output = cluster.tallyctl(&["--json", "status"]);
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let entries: u64 = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| {
            assert_eq!(node["reachable"], true);
            node["entries"].as_u64().unwrap()
        })
        .sum();
    assert!(entries >= 2, "{status}");
    assert!(stdout(&cluster.tallyctl(&["status"])).contains("3 of 3 nodes reachable"));
    assert!(cluster.tallyctl(&["health"]).status.success());

    assert!(cluster.tallyctl(&["delete", "page:views"]).status.success());
    assert!(stdout(&cluster.tallyctl(&["get", "page:views"])).contains(" 0 "));

    // Errors: non-zero exit, one line naming the gRPC code; nothing changes.
    let output = cluster.tallyctl(&["incr", ""]);
    assert!(!output.status.success());
    assert_eq!(
        stderr(&output).trim(),
        "tallyctl: error: INVALID_ARGUMENT: counter name is empty"
    );
    let output = cluster.tallyctl(&["incr", "likes", "1", "--key", &"k".repeat(129)]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("INVALID_ARGUMENT"));
    assert!(stdout(&cluster.tallyctl(&["get", "likes"])).contains(" 3 "));

    // A shard goes down: status shows it; its part comes from its replica;
    // with two down, get fails naming a node, and partial works.
    wait_for_replicas_to_catch_up(&cluster).await;
    let mut cluster = cluster;
    let shard = cluster.shards[2].take().unwrap();
    shard.terminate();
    let text = stdout(&cluster.tallyctl(&["status"]));
    assert!(
        text.contains("DOWN") && text.contains("2 of 3 nodes reachable"),
        "{text}"
    );
    // Its part comes from its replica: the read is still complete.
    let text = stdout(&cluster.tallyctl(&["get", "likes"]));
    assert!(text.contains(" 3 ") && text.contains("yes"), "{text}");
    // Its replica down too: shard-3's part has no reachable copy.
    let config = tally::coordinator::CoordinatorConfig::load(
        &cluster.coordinator_config,
        Default::default(),
    )
    .unwrap();
    let ring = config.ring().unwrap();
    let replica = tally::coordinator::replicas_of(&ring, 2, 2)[0];
    cluster.shards[replica].take().unwrap().terminate();
    let output = cluster.tallyctl(&["get", "likes"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("UNAVAILABLE") && stderr(&output).contains("shard-3"),
        "{}",
        stderr(&output)
    );
    assert!(cluster
        .tallyctl(&["get", "likes", "--allow-partial"])
        .status
        .success());
}

#[test]
fn a_locked_data_directory_is_refused_and_the_owner_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_shard_config(dir.path(), 1, "sync");
    let mut owner = support::start_shard("owner", &config, &[]);
    let output = run_to_end("tally-shard", &["--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    assert!(
        message.contains("is in use by another process"),
        "{message}"
    );
    assert!(message.contains("shard-1"), "{message}");
    assert!(owner.is_running());
    let health = run_to_end("tallyctl", &["--endpoint", &owner.endpoint(), "health"]);
    assert!(health.status.success());
    owner.terminate();
}

#[test]
fn a_data_directory_of_another_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_shard_config(dir.path(), 1, "sync");
    let shard = support::start_shard("shard-1", &config, &[]);
    shard.terminate();
    let output = run_to_end(
        "tally-shard",
        &["--config", config.to_str().unwrap(), "--node-id", "shard-7"],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("belongs to node \"shard-1\", not \"shard-7\""),
        "{}",
        stderr(&output)
    );
}

/// Every file under `dir` but the lock, with its contents.
fn snapshot_files(
    dir: &std::path::Path,
) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        for entry in std::fs::read_dir(&path).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if !path.ends_with("LOCK") {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_data_directory_is_refused_untouched_and_verify_says_why() {
    let mut cluster = ProcessCluster::start("sync");
    let endpoint = cluster.coordinator.endpoint();
    write_load(&endpoint, 8, 40).await;
    let data_dir = cluster.dir.path().join("data/shard-1");
    let data = data_dir.to_str().unwrap();
    let config = cluster.shard_configs[0].clone();

    // A running node's directory is not verified (its files are moving).
    let output = run_to_end("tally-shard", &["verify", data]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("in use by another process"),
        "{}",
        stderr(&output)
    );

    cluster.shards[0].take().unwrap().terminate();
    let output = run_to_end("tally-shard", &["verify", data]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report = stdout(&output);
    assert!(report.contains("node shard-1: sound"), "{report}");
    assert!(
        report.contains("checkpoint files as its last round left them"),
        "{report}"
    );

    // The end of the log disappears, as a bad disk or a careless copy might
    // leave it: frames the node acknowledged are gone.
    let segment = last_log_segment(&data_dir);
    let bytes = std::fs::read(&segment).unwrap();
    std::fs::write(&segment, &bytes[..bytes.len() / 2]).unwrap();
    let before = snapshot_files(&data_dir);

    let refused = |expected: &str| {
        let output = run_to_end("tally-shard", &["--config", config.to_str().unwrap()]);
        assert!(!output.status.success());
        let message = stderr(&output);
        let last = message
            .trim()
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        assert!(
            last.starts_with("tally-shard: error: data directory"),
            "{message}"
        );
        assert!(last.contains(data), "{message}");
        assert!(last.contains(expected), "{message}");
        assert_eq!(snapshot_files(&data_dir), before, "the files were changed");

        let output = run_to_end("tally-shard", &["verify", data]);
        assert!(!output.status.success());
        assert!(stderr(&output).contains(expected), "{}", stderr(&output));
        assert_eq!(
            snapshot_files(&data_dir),
            before,
            "verify changed the files"
        );
    };
    refused("acknowledged writes are missing");

    // A frame damaged in the middle of the log (a flipped byte) is damage
    // too, not the end of the log.
    std::fs::write(&segment, &bytes).unwrap();
    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    std::fs::write(&segment, &flipped).unwrap();
    let before = snapshot_files(&data_dir);
    let refused = |expected: &str| {
        let output = run_to_end("tally-shard", &["--config", config.to_str().unwrap()]);
        assert!(!output.status.success());
        let message = stderr(&output);
        assert!(message.contains(expected), "{message}");
        assert_eq!(snapshot_files(&data_dir), before, "the files were changed");
    };
    refused("bad frame");
}

/// The newest segment of a shard's log.
fn last_log_segment(data_dir: &std::path::Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(data_dir.join("log"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    segments.sort();
    segments.pop().expect("a log segment")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_sync_increments_survive_sigkill_of_every_shard() {
    // sync durability acknowledges only what is on disk, so a crash (not a
    // graceful stop: no final flush) loses nothing acknowledged.
    let mut cluster = ProcessCluster::start("sync");
    let endpoint = cluster.coordinator.endpoint();
    let ledger = write_load(&endpoint, 16, 40).await;
    for index in 0..3 {
        let shard = cluster.shards[index].take().unwrap();
        let address = shard.address;
        let status = shard.stop_with(Signal::SIGKILL);
        assert!(!status.success(), "SIGKILL is not a clean exit");
        cluster.restart_shard(index, address);
    }
    assert_totals_match(&endpoint, &ledger).await;
}

#[test]
fn tallyctl_dev_runs_a_cluster_until_interrupted() {
    use std::io::{BufRead, BufReader};

    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("dev-data");
    let mut child = std::process::Command::new(support::binary("tallyctl"))
        .args([
            "dev",
            "--port",
            "0",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut endpoint = None;
    let mut shards = 0;
    let mut metrics = 0;
    // Read the banner up to its last line; the process prints it once every
    // server answers its health check.
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.trim().strip_prefix("coordinator") {
            endpoint = rest.split_whitespace().next().map(str::to_string);
        }
        if line.contains(" metrics http://127.0.0.1:") {
            metrics += 1;
        }
        if line.trim_start().starts_with("shard-") {
            shards += 1;
        }
        if line.starts_with("Ctrl-C stops the cluster") {
            break;
        }
    }
    let endpoint = endpoint.expect("the banner names the coordinator");
    assert_eq!(shards, 3);
    // Each daemon's metrics endpoint (tests/metrics.rs scrapes them).
    assert_eq!(metrics, 4);

    let incr = run_to_end(
        "tallyctl",
        &["--endpoint", &endpoint, "incr", "dev:counter", "7"],
    );
    assert!(incr.status.success(), "{}", stderr(&incr));
    let get = run_to_end(
        "tallyctl",
        &["--endpoint", &endpoint, "--json", "get", "dev:counter"],
    );
    let json: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(json[0]["value"], 7);

    // Ctrl-C: every shard flushes, the process says so and exits 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGINT,
    )
    .unwrap();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let status = wait_timeout::ChildExt::wait_timeout(&mut child, support::START_TIMEOUT)
        .unwrap()
        .expect("tallyctl dev exits after SIGINT");
    assert!(status.success());
    assert!(
        rest.iter()
            .any(|line| line.starts_with("stopped; data kept in")),
        "{rest:?}"
    );
    for shard in 1..=3 {
        assert!(data_dir.join(format!("shard-{shard}/TALLY")).exists());
    }
}

/// A shard whose files may not grow past `limit` bytes (RLIMIT_FSIZE): a
/// write past it fails with EFBIG, or, if the process did not ignore
/// SIGXFSZ itself, kills it. One log segment large enough to reach the
/// limit, and no checkpoint that would delete it.
fn start_shard_with_file_size_limit(config: &std::path::Path, limit: u64) -> support::Daemon {
    use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
    use std::os::unix::process::CommandExt;

    let mut command = std::process::Command::new(support::binary("tally-shard"));
    command.args([
        "--config",
        config.to_str().unwrap(),
        "--log-segment-bytes",
        "67108864",
        "--checkpoint-log-bytes",
        "1073741824",
        "--checkpoint-interval-ms",
        "3600000",
    ]);
    // SAFETY: only an async-signal-safe call (setrlimit) between fork and
    // exec.
    unsafe {
        command.pre_exec(move || {
            setrlimit(Resource::RLIMIT_FSIZE, limit, RLIM_INFINITY)?;
            Ok(())
        });
    }
    support::Daemon::spawn(command, "shard-1", config.parent().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_size_limit_fails_writes_with_an_error_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let shard_config = support::write_shard_config(dir.path(), 1, "sync");
    let shard = start_shard_with_file_size_limit(&shard_config, 3 << 20);
    let coordinator_config = support::write_coordinator_config(dir.path(), &[shard.address]);
    let coordinator = support::Daemon::start(
        "tally-coordinator",
        "coordinator",
        &["--config", coordinator_config.to_str().unwrap()],
        dir.path(),
    );
    let mut client = CounterClient::connect(coordinator.endpoint())
        .await
        .unwrap();
    let batch = |round: usize| pb::IncrementBatchRequest {
        increments: (0..200)
            .map(|item| pb::IncrementRequest {
                counter: format!("{:0>200}", round * 200 + item),
                delta: 1,
                idempotency_key: format!("r{round}/{item}"),
                ..Default::default()
            })
            .collect(),
    };
    // Fill the disk: distinct long counter names until a write fails.
    let (acknowledged, status) = support::write_until_refused(
        &mut client,
        batch,
        2_000,
        "the file size limit was never reached",
    )
    .await;
    support::report(&format!(
        "disk full after {acknowledged} batches: {status:?}"
    ));
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // The node is still up, and reads still work.
    let read = |client: &mut CounterClient<_>, round: usize| {
        let counters = batch(round)
            .increments
            .into_iter()
            .map(|item| item.counter)
            .collect();
        let mut client = client.clone();
        async move {
            client
                .get_batch(pb::GetBatchRequest {
                    counters,
                    allow_partial: false,
                    ..Default::default()
                })
                .await
                .map(|response| response.into_inner().counters)
        }
    };
    let earlier = read(&mut client, 0).await.unwrap();
    assert!(earlier.iter().all(|total| total.value == 1));

    // Space comes back (prlimit(2) on the running shard); the client's retry
    // with the same keys lands once.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit reads `unlimited` and writes nothing (null old limit).
    let raised = unsafe {
        libc::prlimit(
            shard.pid() as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &unlimited,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(raised, 0, "prlimit: {}", std::io::Error::last_os_error());
    let mut attempts = 0;
    support::wait_until("writes to recover", support::PATIENCE, || {
        attempts += 1;
        let mut client = client.clone();
        let retry = batch(acknowledged);
        async move { client.increment_batch(retry).await }
    })
    .await;
    let retries = attempts - 1;
    support::report(&format!("writes recovered after {retries} retries"));
    // Nothing acknowledged was lost, even across a crash now.
    let address = shard.address;
    shard.stop_with(Signal::SIGKILL);
    let shard = support::start_shard(
        "shard-1",
        &shard_config,
        &["--listen", &address.to_string()],
    );
    for round in 0..=acknowledged {
        let totals = read(&mut client, round).await.unwrap();
        assert!(
            totals.iter().all(|total| total.value == 1),
            "round {round}: {totals:?}"
        );
    }
    shard.terminate();
    coordinator.terminate();
}

/// `log_format = "json"` (here its flag): every line a daemon logs is one
/// JSON object, for log shippers; the default stays text.
#[test]
fn daemons_log_one_json_object_per_line_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_shard_config(dir.path(), 1, "sync");
    let shard = support::start_shard("shard-1", &config, &["--log-format", "json"]);
    let coordinator_config = support::write_coordinator_config(dir.path(), &[shard.address]);
    let coordinator = support::Daemon::start(
        "tally-coordinator",
        "coordinator",
        &[
            "--config",
            coordinator_config.to_str().unwrap(),
            "--log-format",
            "json",
        ],
        dir.path(),
    );
    let (mut shard, mut coordinator) = (shard, coordinator);
    // The coordinator first: a shard's stop waits for its connections.
    assert!(coordinator
        .signal(nix::sys::signal::Signal::SIGTERM)
        .success());
    assert!(shard.signal(nix::sys::signal::Signal::SIGTERM).success());
    let (shard_log, coordinator_log) = (shard.log(), coordinator.log());
    for (name, log) in [("shard", shard_log), ("coordinator", coordinator_log)] {
        let lines: Vec<&str> = log.lines().filter(|line| !line.is_empty()).collect();
        assert!(!lines.is_empty(), "{name} logged nothing");
        for line in &lines {
            let event: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("{name}: not JSON ({error}): {line}"));
            assert!(event["level"].is_string(), "{name}: {line}");
            assert!(event["fields"]["message"].is_string(), "{name}: {line}");
        }
        assert!(
            lines.iter().any(|line| line.contains("\"serving\"")),
            "{name}: {lines:?}"
        );
    }
}
