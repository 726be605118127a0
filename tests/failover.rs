//! Failures and restarts of shards.
//!
//! Under load with real processes: a shard killed, a shard hung (SIGSTOP),
//! each found by the coordinator's health checks and shown by `tallyctl
//! status` while it lasts; increments without a key keep succeeding once the
//! failure is found; a shard added by SIGHUP, one killed and one drained,
//! without a lost increment.
//!
//! Against an in-process cluster: a down shard named in errors while
//! `allow_partial` reads return the rest, a hung shard's deadline, writes
//! without a key going around a down node, and a graceful restart of every
//! shard keeping every count.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::cluster::{
    get, increment, key_owned_by, shard_statuses, start, start_with, value, wait_for_health,
    wait_for_replicas_to_catch_up, wait_until_restored, READY,
};
use support::ProcessCluster;
use tally::proto::pb;
use tally::proto::pb::counter_client::CounterClient;
use tonic::Code;

const WORKERS: usize = 8;
const COUNTERS: usize = 16;
/// Longest wait for the coordinator to see a change of health.
const DETECTION_LIMIT: Duration = Duration::from_secs(30);

/// One client call: when it started, when it ended, and whether it was
/// acknowledged.
type Call = (Instant, Instant, bool);

/// Unkeyed single increments of 1 from several tasks, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    calls: Arc<Mutex<Vec<Call>>>,
    /// Every failed call's start and error, for messages.
    errors: Arc<Mutex<Vec<(Instant, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(runtime: &tokio::runtime::Runtime, endpoint: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let _runtime = runtime.enter();
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .unwrap()
            .connect_lazy();
        let tasks = (0..WORKERS)
            .map(|worker| {
                let stop = stop.clone();
                let calls = calls.clone();
                let errors = errors.clone();
                let mut client = CounterClient::new(channel.clone());
                runtime.spawn(async move {
                    let mut round = worker;
                    while !stop.load(Ordering::Relaxed) {
                        round += WORKERS;
                        let started = Instant::now();
                        let mut request = tonic::Request::new(pb::IncrementRequest {
                            counter: format!("failover-{}", round % COUNTERS),
                            delta: 1,
                            idempotency_key: String::new(),
                            ..Default::default()
                        });
                        request.set_timeout(Duration::from_secs(10));
                        let result = client.increment(request).await;
                        if let Err(status) = &result {
                            errors
                                .lock()
                                .unwrap()
                                .push((started, status.message().to_string()));
                        }
                        let acknowledged = result.is_ok();
                        calls
                            .lock()
                            .unwrap()
                            .push((started, Instant::now(), acknowledged));
                    }
                })
            })
            .collect();
        Load {
            stop,
            calls,
            errors,
            tasks,
        }
    }

    /// Calls acknowledged by `before`.
    fn acknowledged_before(&self, before: Instant) -> i64 {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, ended, ok)| *ok && *ended < before)
            .count() as i64
    }

    fn finish(self, runtime: &tokio::runtime::Runtime) -> Vec<Call> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            runtime.block_on(task).unwrap();
        }
        std::mem::take(&mut self.calls.lock().unwrap())
    }
}

/// The sum of every test counter, and whether every part was read.
fn total(runtime: &tokio::runtime::Runtime, cluster: &ProcessCluster) -> (bool, i64) {
    let counters: Vec<String> = (0..COUNTERS)
        .map(|index| format!("failover-{index}"))
        .collect();
    let totals = runtime.block_on(support::totals(&cluster.coordinator.endpoint(), &counters));
    (
        totals.iter().all(|total| total.complete),
        totals.iter().map(|total| total.value).sum(),
    )
}

/// An increment with a key whose stripe `node_id` owns.
fn keyed_increment_owned_by(cluster: &ProcessCluster, node_id: &str) -> pb::IncrementRequest {
    let config = tally::coordinator::CoordinatorConfig::load(
        &cluster.coordinator_config,
        Default::default(),
    )
    .unwrap();
    let ring = config.ring().unwrap();
    let key = (0..100_000)
        .map(|attempt| format!("hang-{attempt}"))
        .find(|key| {
            let stripe = tally::ring::idempotency_stripe(key, config.stripes);
            ring.nodes()[ring.owner("failover-keyed", stripe)].id == node_id
        })
        .expect("keys land on every node");
    pb::IncrementRequest {
        counter: "failover-keyed".into(),
        delta: 1,
        idempotency_key: key,
        ..Default::default()
    }
}

fn signal(cluster: &ProcessCluster, index: usize, signal: Signal) {
    let pid = cluster.shards[index].as_ref().unwrap().pid();
    kill(Pid::from_raw(pid as i32), signal).unwrap();
}

#[test]
fn increments_without_a_key_keep_succeeding_through_a_kill_and_a_hang() {
    const OUTAGE: Duration = Duration::from_secs(1);
    let runtime = support::runtime();
    let mut cluster = ProcessCluster::start("sync");
    let load = Load::start(&runtime, &cluster.coordinator.endpoint());
    // Long enough that the read during the kill has settled increments to
    // find in the replica.
    std::thread::sleep(Duration::from_millis(1_500));

    // A crash.
    let killed_at = Instant::now();
    let shard = cluster.shards[1].take().unwrap();
    let address = shard.address;
    shard.stop_with(Signal::SIGKILL);
    let (kill_seen, kill_line) =
        support::wait_for_shown_health(&runtime, &cluster, "shard-2", "down");
    // Reads stay complete: shard-2's part comes from its replica, which has
    // everything acknowledged well before the kill (100 ms interval, 1 s
    // of slack for a loaded machine).
    let settled = load.acknowledged_before(killed_at - Duration::from_secs(1));
    let (read_complete, read_during_kill) = total(&runtime, &cluster);
    // Calls in flight when the read began may land before it answers:
    // bound by the calls started by its end, counted once every call has
    // finished (a call in flight now is not listed yet).
    let read_done = Instant::now();
    std::thread::sleep(OUTAGE);
    cluster.restart_shard(1, address);
    let (kill_over, _) = support::wait_for_shown_health(&runtime, &cluster, "shard-2", "up");
    // shard-2 is shard-3's stand-in: a restarted node knows its copies'
    // ages again after a replication round.
    runtime.block_on(support::wait_for_process_replicas(&cluster));

    // A hang: the process accepts connections and never answers.
    let stopped_at = Instant::now();
    signal(&cluster, 2, Signal::SIGSTOP);
    let (hang_seen, hang_line) =
        support::wait_for_shown_health(&runtime, &cluster, "shard-3", "down");
    // A keyed increment of the hung owner, shown down, is not sent to queue
    // behind the calls hanging there (the shard timeout, 5 s here, is past
    // the client's 3 s deadline): the owner's stand-in takes it over.
    let keyed = keyed_increment_owned_by(&cluster, "shard-3");
    let answer = runtime.block_on(async {
        let mut client = CounterClient::connect(cluster.coordinator.endpoint())
            .await
            .unwrap();
        client
            .increment(tally::proto::timed(keyed, Duration::from_secs(3)))
            .await
    });
    let answer = answer.expect("a keyed increment of a hung owner, taken over");
    assert!(!answer.into_inner().deduplicated);
    std::thread::sleep(OUTAGE);
    signal(&cluster, 2, Signal::SIGCONT);
    let (hang_over, _) = support::wait_for_shown_health(&runtime, &cluster, "shard-3", "up");
    std::thread::sleep(Duration::from_millis(300));

    let calls = load.finish(&runtime);
    let during = |from: Instant, to: Instant| {
        calls
            .iter()
            .filter(move |(started, _, _)| *started >= from && *started < to)
    };
    let most = calls
        .iter()
        .filter(|(started, _, _)| *started < read_done)
        .count() as i64;
    let acknowledged = calls.iter().filter(|(_, _, ok)| *ok).count() as i64;
    let failed = calls.len() as i64 - acknowledged;
    let after_detection: Vec<&Call> = during(kill_seen, kill_over)
        .chain(during(hang_seen, hang_over))
        .collect();
    let failed_after_detection = after_detection.iter().filter(|(_, _, ok)| !ok).count();
    let before_detection = during(killed_at, kill_seen)
        .chain(during(stopped_at, hang_seen))
        .filter(|(_, _, ok)| !ok)
        .count();

    // Every acknowledged increment is there; a failed call may or may not
    // have been applied (it has no key to retry with).
    let (complete, read) = total(&runtime, &cluster);
    assert!(complete, "a read was incomplete with every node up");
    let availability = 100.0 * (after_detection.len() - failed_after_detection) as f64
        / after_detection.len().max(1) as f64;
    support::report(&format!(
        "kill found in {} ms, hang found in {} ms; while shown down: {} calls, write availability \
         {availability:.0}%; {before_detection} calls failed before detection; acknowledged \
         {acknowledged}, read {read} (failed calls {failed}, applied or not)",
        kill_seen.duration_since(killed_at).as_millis(),
        hang_seen.duration_since(stopped_at).as_millis(),
        after_detection.len(),
    ));
    support::report(&format!(
        "read while shard-2 was down: complete {read_complete}, {read_during_kill} \
         (acknowledged 1 s before the kill: {settled})"
    ));
    support::report(&format!(
        "tallyctl status during the kill: {kill_line}\ntallyctl status during the hang: {hang_line}"
    ));
    assert!(
        read_complete,
        "a read was incomplete while one shard was down"
    );
    assert!(settled > 0, "no load before the kill");
    assert!(
        read_during_kill >= settled,
        "the replica missed increments acknowledged 1 s before the kill"
    );
    assert!(
        read_during_kill <= most,
        "read {read_during_kill} while only {most} calls were made: counted twice"
    );
    assert!(kill_line.contains("DOWN"), "{kill_line}");
    assert!(hang_line.contains("DOWN"), "{hang_line}");
    assert!(after_detection.len() > 10, "too little load to judge");
    assert_eq!(
        failed_after_detection, 0,
        "a write failed while the failure was known"
    );
    // A call sent to the hung node before it was found down is let go
    // (in doubt) when it is found, not held for the shard timeout (5 s).
    let held = during(stopped_at, hang_seen)
        .filter(|(_, ended, _)| *ended > hang_seen + Duration::from_secs(1))
        .count();
    assert_eq!(held, 0, "calls to the hung node held past its detection");
    assert!(
        (acknowledged..=acknowledged + failed).contains(&read),
        "read {read}, acknowledged {acknowledged}, failed {failed}"
    );
}

/// How many times the coordinator's log says `needle`.
fn log_count(cluster: &ProcessCluster, needle: &str) -> usize {
    cluster.coordinator.log().matches(needle).count()
}

/// Waits until `observe` sees `expected`; bounded by [`DETECTION_LIMIT`].
fn wait_to_see<T: PartialEq + std::fmt::Debug>(
    runtime: &tokio::runtime::Runtime,
    what: &str,
    expected: T,
    mut observe: impl FnMut() -> T,
) {
    runtime.block_on(support::wait_until(what, DETECTION_LIMIT, || {
        let seen = observe();
        std::future::ready(if seen == expected { Ok(()) } else { Err(seen) })
    }));
}

fn ring_size(cluster: &ProcessCluster) -> usize {
    let output = cluster.tallyctl(&["--json", "ring"]);
    let ring: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    ring["nodes"].as_array().unwrap().len()
}

#[test]
fn a_shard_added_by_sighup_takes_writes_and_changes_no_total() {
    let runtime = support::runtime();
    let mut cluster = ProcessCluster::start("sync");
    let coordinator = Pid::from_raw(cluster.coordinator.pid() as i32);
    let load = Load::start(&runtime, &cluster.coordinator.endpoint());
    std::thread::sleep(Duration::from_millis(300));

    let addresses = cluster.start_new_shard(4);
    let dir = cluster.dir.path();
    let four_nodes = support::write_coordinator_config(dir, &addresses);
    kill(coordinator, Signal::SIGHUP).unwrap();
    wait_to_see(&runtime, "the ring has 4 nodes", 4, || ring_size(&cluster));
    wait_to_see(&runtime, "the reload is logged", 1, || {
        log_count(&cluster, "added shard-4")
    });

    // Refused, and nothing changes: a config that drops a node, then one
    // that does not parse.
    support::write_coordinator_config(dir, &addresses[..3]);
    kill(coordinator, Signal::SIGHUP).unwrap();
    wait_to_see(&runtime, "the removal is refused", 1, || {
        log_count(&cluster, "reload refused")
    });
    assert!(
        cluster
            .coordinator
            .log()
            .contains("node \"shard-4\" is missing from the new config"),
        "{}",
        cluster.coordinator.log()
    );
    std::fs::write(&four_nodes, "nodes = 5\n").unwrap();
    kill(coordinator, Signal::SIGHUP).unwrap();
    wait_to_see(&runtime, "the broken file is refused", 2, || {
        log_count(&cluster, "reload refused")
    });
    assert_eq!(ring_size(&cluster), 4);
    std::thread::sleep(Duration::from_millis(500));

    let calls = load.finish(&runtime);
    let acknowledged = calls.iter().filter(|(_, _, ok)| *ok).count() as i64;
    let (complete, read) = total(&runtime, &cluster);
    assert!(complete, "a read was incomplete with every node up");
    let on_added = support::status(&cluster)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|node| node["id"] == "shard-4")
        .map(|node| node["entries"].as_u64().unwrap())
        .unwrap();
    let availability = 100.0 * acknowledged as f64 / calls.len() as f64;
    support::report(&format!(
        "shard-4 added by SIGHUP under load ({on_added} entries on it): acknowledged \
         {acknowledged}, read {read}, write availability {availability:.0}%"
    ));
    assert_eq!(acknowledged, calls.len() as i64, "a write failed");
    assert_eq!(read, acknowledged);
    assert!(on_added > 0, "no increment reached the added node");
}

#[test]
fn a_shard_killed_and_one_drained_under_load_lose_nothing() {
    let runtime = support::runtime();
    let mut cluster = ProcessCluster::start("sync");
    let load = Load::start(&runtime, &cluster.coordinator.endpoint());
    std::thread::sleep(Duration::from_millis(500));

    // shard-1 crashes and comes back.
    let killed_at = Instant::now();
    let shard = cluster.shards[0].take().unwrap();
    let address = shard.address;
    shard.stop_with(Signal::SIGKILL);
    let (kill_seen, _) = support::wait_for_shown_health(&runtime, &cluster, "shard-1", "down");
    std::thread::sleep(Duration::from_millis(500));
    cluster.restart_shard(0, address);
    support::wait_for_shown_health(&runtime, &cluster, "shard-1", "up");

    // shard-2 is drained, removed from the membership, and stopped.
    let output = cluster.tallyctl(&["drain", "shard-2"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let said = String::from_utf8_lossy(&output.stdout).to_string();
    let (_, drained_line) = support::wait_for_shown_health(&runtime, &cluster, "shard-2", "up");
    assert!(drained_line.contains("drained"), "{drained_line}");
    let remaining = [
        ("shard-1", cluster.shards[0].as_ref().unwrap().address),
        ("shard-3", cluster.shards[2].as_ref().unwrap().address),
    ];
    let mut text = String::from(
        "listen = \"127.0.0.1:0\"\nstripes = 8\nshard_timeout_ms = 5000\n\
         health_interval_ms = 100\nhealth_timeout_ms = 500\n\
         replication_factor = 2\nreplication_interval_ms = 100\n",
    );
    for (id, address) in remaining {
        text.push_str(&format!(
            "\n[[nodes]]\nid = \"{id}\"\naddress = \"{address}\"\n"
        ));
    }
    std::fs::write(&cluster.coordinator_config, text).unwrap();
    kill(
        Pid::from_raw(cluster.coordinator.pid() as i32),
        Signal::SIGHUP,
    )
    .unwrap();
    wait_to_see(&runtime, "the ring has 2 nodes", 2, || ring_size(&cluster));
    cluster.shards[1].take().unwrap().terminate();
    std::thread::sleep(Duration::from_millis(300));

    let errors = load.errors.clone();
    let calls = load.finish(&runtime);
    let acknowledged = calls.iter().filter(|(_, _, ok)| *ok).count() as i64;
    let failed = calls.len() as i64 - acknowledged;
    // Only calls in flight between shard-1's death and the coordinator
    // seeing it may fail; they had no key and may or may not have landed.
    let outside_window: Vec<&Call> = calls
        .iter()
        .filter(|(started, ended, _)| !(*started < kill_seen && *ended >= killed_at))
        .collect();
    let failed_outside = outside_window.iter().filter(|(_, _, ok)| !ok).count();
    let (complete, read) = total(&runtime, &cluster);
    let availability =
        100.0 * (outside_window.len() - failed_outside) as f64 / outside_window.len().max(1) as f64;
    support::report(&format!(
        "one shard killed and one drained under load: acknowledged {acknowledged}, read {read}, \
         write availability {availability:.0}% ({failed} calls failed in the {} ms before the \
         kill was seen); {}",
        kill_seen.duration_since(killed_at).as_millis(),
        said.trim()
    ));
    assert!(complete);
    let errors: Vec<(u128, String)> = errors
        .lock()
        .unwrap()
        .iter()
        .map(|(started, error)| (started.duration_since(killed_at).as_millis(), error.clone()))
        .collect();
    assert_eq!(
        failed_outside, 0,
        "a write failed outside the kill's detection (ms after the kill, error): {errors:?}"
    );
    assert!(
        (acknowledged..=acknowledged + failed).contains(&read),
        "read {read}, acknowledged {acknowledged}, failed {failed}"
    );
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
            ..Default::default()
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
            ..Default::default()
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
        ..Default::default()
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
async fn writes_without_a_key_go_around_a_down_node() {
    let test = start().await;
    let mut cluster = test.cluster;
    let mut client = cluster.counter_client().await.unwrap();
    // Its stand-in, new like every node, is restored (from nothing) and
    // holds a copy of it of known age before it fails.
    wait_until_restored(&cluster).await;
    wait_for_replicas_to_catch_up(&cluster).await;
    cluster.stop_shard(1).await.unwrap();
    wait_for_health(&cluster, "shard-2", "down").await;

    // Every increment without a key succeeds, the down node's stripes
    // included: they land on the next node of the ring.
    for _ in 0..100 {
        client.increment(increment("spread", 1, "")).await.unwrap();
    }
    // A keyed increment of the down owner: its stand-in (its first
    // replica, which holds its records) takes it over.
    let key = key_owned_by(&cluster, "spread", "shard-2", 0);
    let first = client
        .increment(increment("spread", 1, &key))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.deduplicated);
    assert_eq!(value(&mut client, "spread").await, 101);
    // The status shows who stands in for it.
    let mut admin = cluster.admin_client().await.unwrap();
    let nodes = admin
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let stand_ins: Vec<(&str, &[String])> = nodes
        .iter()
        .filter(|node| !node.standing_in_for.is_empty())
        .map(|node| (node.id.as_str(), node.standing_in_for.as_slice()))
        .collect();
    assert!(
        matches!(stand_ins.as_slice(), [(_, [down])] if down == "shard-2"),
        "{stand_ins:?}"
    );

    // Back: its retry is recognized (by the stand-in, or by the owner once
    // reconciled), never applied again.
    cluster.restart_shard(1).await.unwrap();
    cluster.wait_ready(READY).await.unwrap();
    wait_for_health(&cluster, "shard-2", "up").await;
    let retry = client
        .increment(increment("spread", 1, &key))
        .await
        .unwrap()
        .into_inner();
    assert!(retry.deduplicated, "{retry:?}");
    assert_eq!(value(&mut client, "spread").await, 101);
    // Nothing landed on shard-2: the increments without a key went around
    // it, and the keyed one stays its stand-in's (shard-2 only recorded
    // its key when it reconciled).
    let on_down_node = shard_statuses(&cluster).await[1].entries;
    assert_eq!(
        on_down_node, 0,
        "an increment reached shard-2 while it was down"
    );
    cluster.shutdown().await.unwrap();
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

/// Adds 1 to each of `counters`, `rounds` times, through `endpoint`;
/// returns how many increments were acknowledged (all, or it panics).
async fn add_to_each(endpoint: &str, counters: &[String], rounds: usize) -> i64 {
    let mut client = CounterClient::connect(endpoint.to_string()).await.unwrap();
    for _ in 0..rounds {
        client
            .increment_batch(pb::IncrementBatchRequest {
                increments: counters
                    .iter()
                    .map(|counter| pb::IncrementRequest {
                        counter: counter.clone(),
                        delta: 1,
                        idempotency_key: String::new(),
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .unwrap();
    }
    (counters.len() * rounds) as i64
}

/// Whether a copy may stand in for a down shard is decided by how long ago
/// a replication round reached it (a duration on the replica's clock) and
/// when the coordinator saw the failure (its clock): never by comparing
/// the clocks of two nodes. Run with shard-2's wall clock 5 minutes behind
/// (its fresh copy must stand in) and 10 minutes ahead with its replication
/// stalled (its old copy must not: the read is UNAVAILABLE, not complete
/// and short). Before, both went wrong (the copy's scan time, by the
/// origin's clock, was compared with the failure's, by the coordinator's).
#[test]
fn a_copy_stands_in_by_its_age_never_by_comparing_clocks() {
    let runtime = support::runtime();
    let mut cluster = ProcessCluster::start("sync");
    let faketime = support::libfaketime();
    if faketime.is_none() {
        println!(
            "libfaketime is not installed (apt-get install faketime): shard-2 runs with the \
             true clock; the rules are checked, the skew is not"
        );
    }
    let skewed = |cluster: &mut ProcessCluster, address, offset: &str| {
        let lib = faketime
            .as_ref()
            .map(|path| path.display().to_string())
            .unwrap_or_default();
        let env: Vec<(&str, &str)> = if faketime.is_some() {
            vec![("LD_PRELOAD", lib.as_str()), ("FAKETIME", offset)]
        } else {
            Vec::new()
        };
        cluster.restart_shard_with_env(1, address, &[], &env);
    };
    let counters: Vec<String> = (0..12).map(|index| format!("skew-{index}")).collect();

    // 1. shard-2's clock 5 minutes behind; its copy caught up; killed.
    let address = cluster.shards[1]
        .take()
        .unwrap()
        .stop_with_address(Signal::SIGTERM);
    skewed(&mut cluster, address, "-5m");
    support::wait_for_shown_health(&runtime, &cluster, "shard-2", "up");
    let mut acknowledged =
        runtime.block_on(add_to_each(&cluster.coordinator.endpoint(), &counters, 20));
    runtime.block_on(support::wait_for_process_replicas(&cluster));
    let address = cluster.shards[1]
        .take()
        .unwrap()
        .stop_with_address(Signal::SIGKILL);
    let totals = runtime.block_on(support::totals(&cluster.coordinator.endpoint(), &counters));
    assert!(
        totals.iter().all(|total| total.complete),
        "clock 5 min behind, fresh copy: {totals:?}"
    );
    let read: i64 = totals.iter().map(|total| total.value).sum();
    assert_eq!(
        read, acknowledged,
        "clock 5 min behind: every increment, once"
    );

    // 2. shard-2's clock 10 minutes ahead; copy caught up; then replication
    // stalls (the replicating coordinator dies; writes go through one that
    // replicates every 10 minutes), the copy ages, shard-2 is killed, and a
    // new coordinator reads.
    skewed(&mut cluster, address, "+10m");
    support::wait_for_shown_health(&runtime, &cluster, "shard-2", "up");
    runtime.block_on(support::wait_for_process_replicas(&cluster));
    cluster.coordinator.signal(Signal::SIGKILL);
    let slow_config = cluster.dir.path().join("coordinator-slow.toml");
    std::fs::write(
        &slow_config,
        std::fs::read_to_string(&cluster.coordinator_config)
            .unwrap()
            .replace(
                "replication_interval_ms = 100",
                "replication_interval_ms = 600000",
            ),
    )
    .unwrap();
    let slow = support::Daemon::start(
        "tally-coordinator",
        "coordinator-slow",
        &["--config", slow_config.to_str().unwrap()],
        cluster.dir.path(),
    );
    acknowledged += runtime.block_on(add_to_each(&slow.endpoint(), &counters, 20));
    // Older than a round and a detection window of the reading coordinator
    // (100 ms + 100 ms + 2 × 500 ms).
    std::thread::sleep(Duration::from_millis(2_000));
    cluster.shards[1].take().unwrap().stop_with(Signal::SIGKILL);
    cluster.coordinator = support::Daemon::start(
        "tally-coordinator",
        "coordinator-new",
        &["--config", cluster.coordinator_config.to_str().unwrap()],
        cluster.dir.path(),
    );
    let answer = runtime.block_on(async {
        let mut client = CounterClient::connect(cluster.coordinator.endpoint())
            .await
            .unwrap();
        client
            .get_batch(pb::GetBatchRequest {
                counters: counters.clone(),
                allow_partial: false,
                ..Default::default()
            })
            .await
    });
    let status = answer.expect_err("a stale copy stood in for shard-2");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shard-2"), "{}", status.message());
    println!(
        "clock skew (libfaketime: {}): 5 min behind, fresh copy: complete, {read} of {read}; \
         10 min ahead, stalled copy: {:?} ({acknowledged} acknowledged)",
        faketime.is_some(),
        status.code()
    );
    slow.terminate();
}
