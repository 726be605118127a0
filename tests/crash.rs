//! The crash harness: the real binaries under concurrent load, killed at
//! random moments, and the clients' ledger compared with what the cluster
//! holds at the end.
//!
//! Every client increment carries a unique idempotency key and a random
//! delta from 1 to 1,000; one in ten goes to a counter written only once
//! (so a lost frame that no later write repeats is seen). A call that fails is retried with the same keys
//! until it succeeds (through any coordinator); one acknowledged call in ten
//! is sent again on purpose, as a client does when a response is lost. So in
//! sync mode each increment must be present exactly once: a shortfall means
//! an acknowledged write was dropped, an excess that a retry was applied
//! twice. Figures are sums of deltas; random deltas keep a loss and a
//! duplicate on the same counter from cancelling out.
//!
//! `TALLY_CRASH_CYCLES` sets the number of kills per test (default 20; the
//! README's soak runs use more) and `TALLY_CRASH_SEED` the random seed (one is
//! chosen and printed otherwise, so a failure can be replayed).

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::ledger::{Clients, Connections, Ledger, Outcome, RETRY_LIMIT};
use support::{runtime, Daemon, ProcessCluster};
use tally::proto::pb;

/// Distinct counters the load spreads over.
const COUNTERS: usize = 16;
/// Concurrent client tasks.
const WORKERS: usize = 8;

fn cycles() -> usize {
    std::env::var("TALLY_CRASH_CYCLES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(20)
}

/// Coordinator kills in the mid-batch test: fewer than shard kills, each
/// costs a 2,000-increment batch.
fn cycles_wanted() -> usize {
    cycles().min(10)
}

fn seeded_rng(test: &str) -> fastrand::Rng {
    let seed = std::env::var("TALLY_CRASH_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    support::report(&format!("{test}: TALLY_CRASH_SEED={seed}"));
    fastrand::Rng::with_seed(seed)
}

fn counter_name(index: usize) -> String {
    format!("crash-{index}")
}

/// How the load behaves.
#[derive(Clone, Copy)]
struct LoadShape {
    /// One call in five is a batch of 2 to 20 increments.
    batches: bool,
    /// One acknowledged call in ten is sent again.
    resend: bool,
}

/// Client tasks running until `stop`.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Ledger>>,
}

impl Load {
    fn start(runtime: &tokio::runtime::Runtime, clients: &Clients, shape: LoadShape) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..WORKERS)
            .map(|worker| {
                let clients = clients.clone();
                let stop = stop.clone();
                runtime.spawn(async move {
                    let mut rng = fastrand::Rng::with_seed(worker as u64);
                    let mut connections = Connections::default();
                    let mut ledger = Ledger::default();
                    let mut sequence = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let size = if shape.batches && rng.u8(..5) == 0 {
                            rng.usize(2..=20)
                        } else {
                            1
                        };
                        let items: Vec<pb::IncrementRequest> = (0..size)
                            .map(|_| {
                                sequence += 1;
                                pb::IncrementRequest {
                                    // One in ten goes to a counter of its
                                    // own, written once: a crash that
                                    // loses a frame no later write
                                    // repeats shows there.
                                    counter: if rng.u8(..10) == 0 {
                                        format!("crash-once-{worker}-{sequence}")
                                    } else {
                                        counter_name(rng.usize(..COUNTERS))
                                    },
                                    delta: rng.i64(1..=1_000),
                                    idempotency_key: format!("w{worker}-{sequence}"),
                                    ..Default::default()
                                }
                            })
                            .collect();
                        ledger.retried +=
                            connections.send_until_acknowledged(&clients, &items).await;
                        ledger.record(&items);
                        if shape.resend && rng.u8(..10) == 0 {
                            ledger.retried +=
                                connections.send_until_acknowledged(&clients, &items).await;
                            ledger.resent += 1;
                        }
                    }
                    ledger
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops the clients once their calls in flight are acknowledged.
    fn finish(self, runtime: &tokio::runtime::Runtime) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        let mut ledger = Ledger::default();
        for task in self.tasks {
            ledger.merge(runtime.block_on(task).unwrap());
        }
        ledger
    }
}

/// Reads every counter and compares it with the ledger, once every
/// takeover of a killed node's keyed increments has been reconciled.
fn compare(
    runtime: &tokio::runtime::Runtime,
    cluster: &ProcessCluster,
    endpoint: &str,
    ledger: &Ledger,
) -> Outcome {
    runtime.block_on(support::wait_until_reconciled(cluster));
    let mut counters: Vec<String> = (0..COUNTERS).map(counter_name).collect();
    counters.extend(
        ledger
            .expected
            .keys()
            .filter(|counter| counter.starts_with("crash-once-"))
            .cloned(),
    );
    let totals: Vec<_> = counters
        .chunks(tally::proto::domain::MAX_BATCH_ITEMS)
        .flat_map(|chunk| runtime.block_on(support::totals(endpoint, chunk)))
        .collect();
    ledger.against(totals)
}

/// What a stop of a shard interrupted, read from its log.
#[derive(Debug, Default, Clone, Copy)]
struct Interrupted {
    /// A checkpoint round was running.
    checkpoint: bool,
}

/// Stops shard `index` with `signal` and starts it again on its address.
fn bounce_shard(
    cluster: &mut ProcessCluster,
    index: usize,
    signal: Signal,
) -> (Instant, Interrupted) {
    let shard = cluster.shards[index].take().unwrap();
    let address = shard.address;
    let at = Instant::now();
    let log = if signal == Signal::SIGTERM {
        let log = shard.log();
        shard.terminate();
        log
    } else {
        let mut shard = shard;
        shard.signal(signal);
        shard.log()
    };
    let started = log.rfind("checkpoint started");
    let finished = log.rfind("checkpoint finished");
    let interrupted = Interrupted {
        checkpoint: started.is_some() && finished < started,
    };
    cluster.restart_shard(index, address);
    (at, interrupted)
}

/// A sync cluster of real processes with client load running on it.
fn start_sync_load(
    test: &str,
    shape: LoadShape,
) -> (fastrand::Rng, tokio::runtime::Runtime, ProcessCluster, Load) {
    let rng = seeded_rng(test);
    let runtime = runtime();
    let cluster = ProcessCluster::start("sync");
    let clients = Clients::new(vec![cluster.coordinator.endpoint()]);
    let load = Load::start(&runtime, &clients, shape);
    (rng, runtime, cluster, load)
}

#[test]
fn sync_mode_loses_and_duplicates_nothing_across_shard_sigkills() {
    let (mut rng, runtime, mut cluster, load) = start_sync_load(
        "sync SIGKILL",
        LoadShape {
            batches: true,
            resend: true,
        },
    );
    let cycles = cycles();
    let mut during_checkpoints = 0;
    for _ in 0..cycles {
        std::thread::sleep(Duration::from_millis(rng.u64(50..400)));
        let (_, interrupted) = bounce_shard(&mut cluster, rng.usize(..3), Signal::SIGKILL);
        during_checkpoints += usize::from(interrupted.checkpoint);
    }
    let ledger = load.finish(&runtime);
    let outcome = compare(&runtime, &cluster, &cluster.coordinator.endpoint(), &ledger);
    support::report(&format!(
        "sync mode, {cycles} shard SIGKILLs ({during_checkpoints} during a checkpoint; {} calls \
         retried, {} resent): {outcome}",
        ledger.retried, ledger.resent
    ));
    assert!(ledger.retried > 0, "no call ever failed: the kills missed");
    assert_eq!((outcome.lost, outcome.duplicated), (0, 0), "{outcome}");
    assert_eq!(outcome.present, outcome.acknowledged);
}

#[test]
fn crashes_at_each_step_of_a_checkpoint_lose_and_duplicate_nothing() {
    let (_rng, runtime, mut cluster, load) = start_sync_load(
        "crash points",
        LoadShape {
            batches: true,
            resend: true,
        },
    );
    let mut reached = Vec::new();
    for point in tally::shard::crash_point::POINTS {
        // shard-1 runs with the hook until it crashes itself there.
        let address = cluster.shards[0]
            .take()
            .unwrap()
            .stop_with_address(Signal::SIGKILL);
        cluster.restart_shard_with_env(0, address, &[], &[("TALLY_SHARD_CRASH_AT", point)]);
        let shard = cluster.shards[0].as_mut().unwrap();
        runtime.block_on(support::wait_until(
            &format!("shard-1 to reach {point}"),
            Duration::from_secs(60),
            || {
                std::future::ready(if shard.is_running() {
                    Err(support::Verbatim(shard.log()))
                } else {
                    Ok(())
                })
            },
        ));
        let log = shard.log();
        assert!(log.contains(&format!("crashing at {point}")), "{log}");
        reached.push(point);
        cluster.restart_shard(0, address);
        std::thread::sleep(Duration::from_millis(300));
    }
    let ledger = load.finish(&runtime);
    let outcome = compare(&runtime, &cluster, &cluster.coordinator.endpoint(), &ledger);
    support::report(&format!(
        "crashes at {reached:?} ({} calls retried, {} resent): {outcome}",
        ledger.retried, ledger.resent
    ));
    if outcome.lost != 0 || outcome.duplicated != 0 {
        support::print_trail(&cluster, &[]);
    }
    assert_eq!((outcome.lost, outcome.duplicated), (0, 0), "{outcome}");
}

#[test]
fn async_mode_loses_at_most_the_last_flush_interval() {
    const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
    /// A flush's own write and fsync on top of the interval, and the flush
    /// tick delayed behind a slow one: generous, so a loaded machine does
    /// not fail the bound for no reason.
    const FLUSH_SLACK: Duration = Duration::from_millis(500);
    let mut rng = seeded_rng("async SIGKILL");
    let runtime = runtime();
    let mut cluster = ProcessCluster::start("async");
    // The harness's configs flush every 20 ms; make the window visible.
    let interval = FLUSH_INTERVAL.as_millis().to_string();
    for index in 0..3 {
        let address = cluster.shards[index].take().unwrap().address;
        cluster.restart_shard_with(index, address, &["--flush-interval-ms", &interval]);
    }
    let config = tally::coordinator::CoordinatorConfig::load(
        &cluster.coordinator_config,
        Default::default(),
    )
    .unwrap();
    let ring = config.ring().unwrap();
    let owner = |counter: &str, key: &str| {
        let stripe = tally::ring::idempotency_stripe(key, config.stripes);
        ring.nodes()[ring.owner(counter, stripe)].id.clone()
    };

    let clients = Clients::new(vec![cluster.coordinator.endpoint()]);
    // No resends: a resend of a lost increment would put it back.
    let load = Load::start(
        &runtime,
        &clients,
        LoadShape {
            batches: false,
            resend: false,
        },
    );
    let cycles = cycles();
    let mut kills = Vec::new();
    for _ in 0..cycles {
        std::thread::sleep(Duration::from_millis(rng.u64(50..400)));
        let index = rng.usize(..3);
        let (at, _) = bounce_shard(&mut cluster, index, Signal::SIGKILL);
        kills.push((at, format!("shard-{}", index + 1)));
    }
    let ledger = load.finish(&runtime);
    let outcome = compare(&runtime, &cluster, &cluster.coordinator.endpoint(), &ledger);

    // Increments acknowledged by a node shortly before it was killed: the
    // most a kill can take.
    let at_risk = |window: Duration| {
        ledger
            .acks
            .iter()
            .filter(|(acked, counter, key, _)| {
                let node = owner(counter, key);
                kills.iter().any(|(killed, killed_node)| {
                    *killed_node == node
                        && *acked + window >= *killed
                        && *acked <= *killed + FLUSH_SLACK
                })
            })
            .map(|(_, _, _, delta)| delta)
            .sum::<i64>()
    };
    let within_interval = at_risk(FLUSH_INTERVAL);
    let bound = at_risk(FLUSH_INTERVAL + FLUSH_SLACK);
    support::report(&format!(
        "async mode (flush_interval_ms = {}), {cycles} shard SIGKILLs: {outcome}; \
         acknowledged within flush_interval_ms before a kill: {within_interval}, \
         within flush_interval_ms + {} ms: {bound}",
        FLUSH_INTERVAL.as_millis(),
        FLUSH_SLACK.as_millis()
    ));
    assert_eq!(outcome.duplicated, 0, "{outcome}");
    assert!(
        outcome.lost <= bound,
        "lost {} > {bound} acknowledged within the window before a kill",
        outcome.lost
    );
}

/// Increments the shard nodes at `endpoints` have applied since they
/// started, asked directly.
async fn increments_applied(endpoints: &[String]) -> u64 {
    let mut applied = 0;
    for endpoint in endpoints {
        let mut client = pb::shard_client::ShardClient::connect(endpoint.clone())
            .await
            .unwrap();
        applied += client
            .status(pb::ShardStatusRequest::default())
            .await
            .unwrap()
            .into_inner()
            .increments_applied;
    }
    applied
}

#[test]
fn a_batch_cut_by_a_coordinator_sigkill_is_retried_exactly_once() {
    const BATCH: usize = 2_000;
    let mut rng = seeded_rng("coordinator SIGKILL");
    let runtime = runtime();
    let mut cluster = ProcessCluster::start("sync");
    let config = cluster.coordinator_config.to_str().unwrap().to_string();
    let dir = cluster.dir.path().to_path_buf();
    let start_coordinator = || {
        Daemon::start(
            "tally-coordinator",
            "coordinator-a",
            &["--config", &config],
            &dir,
        )
    };
    let coordinator_config = tally::coordinator::CoordinatorConfig::load(
        &cluster.coordinator_config,
        Default::default(),
    )
    .unwrap();
    let ring = coordinator_config.ring().unwrap();
    let mut first = start_coordinator();
    let second = cluster.coordinator.endpoint();
    let clients = Clients::new(vec![second.clone()]);

    let mut ledger = Ledger::default();
    let mut cut = 0;
    let cycles = cycles_wanted();
    for cycle in 0..cycles {
        let items: Vec<pb::IncrementRequest> = (0..BATCH)
            .map(|item| pb::IncrementRequest {
                counter: counter_name(item % COUNTERS),
                delta: 1,
                idempotency_key: format!("batch-{cycle}/{item}"),
                ..Default::default()
            })
            .collect();
        let endpoint = first.endpoint();
        let send = |items: Vec<pb::IncrementRequest>| {
            runtime.spawn(async move { Connections::default().send(&endpoint, &items).await })
        };
        let before = ledger.acknowledged;
        if cycle % 2 == 0 {
            // A kill at a random moment: before, during or after the
            // batch's internal calls.
            let sent = send(items.clone());
            std::thread::sleep(Duration::from_millis(rng.u64(0..30)));
            first.stop_with(Signal::SIGKILL);
            let _ = runtime.block_on(sent).unwrap();
        } else {
            // A kill known to fall mid-batch: shard-3 is stopped, the others
            // apply their share, then the coordinator dies, and shard-3 too
            // (the call waiting in its socket dies with it).
            let on_others = items
                .iter()
                .filter(|item| {
                    let stripe = tally::ring::idempotency_stripe(
                        &item.idempotency_key,
                        coordinator_config.stripes,
                    );
                    ring.nodes()[ring.owner(&item.counter, stripe)].id != "shard-3"
                })
                .count() as u64;
            let others: Vec<String> = cluster.shards[..2]
                .iter()
                .map(|shard| shard.as_ref().unwrap().endpoint())
                .collect();
            let applied_before = runtime.block_on(increments_applied(&others));
            let stopped = cluster.shards[2].take().unwrap();
            let address = stopped.address;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(stopped.pid() as i32),
                Signal::SIGSTOP,
            )
            .unwrap();
            let sent = send(items.clone());
            runtime.block_on(support::wait_until(
                "the batch to reach shard-1 and shard-2",
                RETRY_LIMIT,
                || async {
                    let applied = increments_applied(&others).await;
                    if applied >= applied_before + on_others {
                        Ok(())
                    } else {
                        Err(applied)
                    }
                },
            ));
            first.stop_with(Signal::SIGKILL);
            stopped.stop_with(Signal::SIGKILL);
            assert!(runtime.block_on(sent).unwrap().is_err());
            cluster.restart_shard(2, address);
        }
        // How much of the batch landed before the kill.
        let present = compare(&runtime, &cluster, &second, &ledger).present;
        if present > before && present < before + BATCH as i64 {
            cut += 1;
        }
        // The client cannot know; it retries through the other coordinator.
        runtime.block_on(Connections::default().send_until_acknowledged(&clients, &items));
        ledger.record(&items);
        first = start_coordinator();
    }
    let outcome = compare(&runtime, &cluster, &second, &ledger);
    support::report(&format!(
        "{cycles} coordinator SIGKILLs during a {BATCH}-increment batch, {cut} cut part-way, \
         each retried through another coordinator: {outcome}"
    ));
    assert_eq!((outcome.lost, outcome.duplicated), (0, 0), "{outcome}");
    assert!(cut >= cycles / 2, "only {cut} batches were cut part-way");
}

#[test]
fn sigterm_under_load_drops_nothing_acknowledged() {
    let (mut rng, runtime, mut cluster, load) = start_sync_load(
        "SIGTERM",
        LoadShape {
            batches: true,
            resend: false,
        },
    );
    let cycles = cycles().min(8);
    for cycle in 0..cycles {
        std::thread::sleep(Duration::from_millis(rng.u64(50..400)));
        if cycle == cycles / 2 {
            // The coordinator too: in-flight calls finish, new ones fail
            // until it is back on its address.
            let address = cluster.coordinator.address.to_string();
            let status = cluster.coordinator.signal(Signal::SIGTERM);
            assert!(status.success(), "coordinator exited with {status}");
            let config = cluster.coordinator_config.to_str().unwrap().to_string();
            cluster.coordinator = Daemon::start(
                "tally-coordinator",
                "coordinator",
                &["--config", &config, "--listen", &address],
                cluster.dir.path(),
            );
            continue;
        }
        let index = rng.usize(..3);
        bounce_shard(&mut cluster, index, Signal::SIGTERM);
        let log = cluster.shards[index].as_ref().unwrap().log();
        assert!(
            !log.contains("checking a copy"),
            "a clean stop must be recognized at the next start:\n{log}"
        );
    }
    let ledger = load.finish(&runtime);
    let outcome = compare(&runtime, &cluster, &cluster.coordinator.endpoint(), &ledger);
    support::report(&format!(
        "{cycles} SIGTERMs under load (shards and the coordinator, {} calls retried): {outcome}",
        ledger.retried
    ));
    assert_eq!((outcome.lost, outcome.duplicated), (0, 0), "{outcome}");
}
