//! The keyed harness: real processes, writers that send only keyed
//! increments, and every way a key's home can change.
//!
//! Eight writers send increments with unique idempotency keys and random
//! deltas (1 to 1,000; one call in five a batch of 2 to 10) to 16 counters.
//! A call that fails is retried with the same keys until it is
//! acknowledged; one acknowledged call in ten is sent again, as a client
//! does when a response is lost. A reader reads every counter every 100 ms
//! and checks that no total ever exceeds what was sent (acknowledged plus
//! in doubt): a retry applied twice would show, even for a moment. Phases,
//! one after the other, under that load:
//!
//! 1. shard-2 SIGKILLed, left down 10 s, started again with its data;
//! 2. shard-3 SIGSTOPped for 5 s;
//! 3. shard-1 restarted with an empty data directory (a replaced disk),
//!    once its last changes reached its replica (replication is
//!    asynchronous: a disk lost sooner loses what the last round had not
//!    copied, see docs/GUARANTEES.md);
//! 4. shard-2 drained;
//! 5. shard-2 removed from the membership and shard-4 added, by SIGHUP,
//!    the writers going on across the reload (keys move to new owners with
//!    their records);
//! 6. the coordinator SIGKILLed and started again;
//! 7. a second coordinator started, the writers split between the two
//!    (each retry goes to the other), and shard-3 SIGKILLed, left down 5 s
//!    and started again: two coordinators that each find the failure on
//!    their own, take its keyed increments over and reconcile it;
//! 8. shard-1 SIGKILLed once its last changes reached its replica, its
//!    keyed increments taken over, and started again with an empty data
//!    directory while the takeover is open: restored from the stand-in's
//!    frozen copy, then reconciled.
//!
//! Each phase prints the share of keyed calls that succeeded, counting
//! calls that began outside the detection window after a failure
//! (`health_interval_ms + 2 × health_timeout_ms`, 1.1 s here). The end
//! waits for every takeover to be reconciled, prints `acknowledged N,
//! present N, lost 0, duplicated 0` and asserts it, that no read exceeded
//! its bound, and that the killed shard's keyed increments kept succeeding
//! (its stand-in takes them over: docs/GUARANTEES.md, "the takeover").

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::ledger::{Clients, Connections, Ledger, RETRY_LIMIT};
use support::ProcessCluster;
use tally::proto::pb;
use tonic::Code;

const WRITERS: usize = 8;
const COUNTERS: usize = 16;
/// `health_interval_ms + 2 × health_timeout_ms` of the test cluster.
const DETECTION_WINDOW: Duration = Duration::from_millis(1_100);

fn counter_name(index: usize) -> String {
    format!("keyed-{index}")
}

/// One call: its phase, when it began, whether it was acknowledged.
type Attempt = (usize, Instant, bool);

/// What the writers, the reader and the phases share.
#[derive(Default)]
struct Shared {
    phase: AtomicUsize,
    /// Writers start no new call while set.
    paused: AtomicBool,
    /// Writers in a call (retries included).
    busy: AtomicUsize,
    stop: AtomicBool,
    attempts: Mutex<Vec<Attempt>>,
    /// Per counter, the deltas of every increment sent at least once:
    /// acknowledged or in doubt. No read may exceed it.
    sent: Mutex<HashMap<String, i64>>,
    /// Reads that exceeded it, for the message.
    over: Mutex<Vec<String>>,
    /// Per phase: complete reads, and reads that were not.
    reads: Mutex<HashMap<usize, (u64, u64)>>,
    /// Per phase, why calls failed (the status, cut short) and how often:
    /// printed with the phase, to tell a lapse's cause from the output.
    failures: Mutex<HashMap<usize, HashMap<String, usize>>>,
}

impl Shared {
    /// Pauses the writers once their calls in flight are acknowledged.
    async fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        support::wait_until("the writers to pause", RETRY_LIMIT, || async {
            match self.busy.load(Ordering::SeqCst) {
                0 => Ok(()),
                busy => Err(busy),
            }
        })
        .await;
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

/// Sends `items` until acknowledged, recording every attempt.
/// Writer `writer` starts at its own coordinator (when there are several)
/// and tries the next after a failure.
async fn send_until_acknowledged(
    shared: &Shared,
    connections: &mut Connections,
    clients: &Clients,
    writer: usize,
    items: &[pb::IncrementRequest],
) -> u64 {
    let started = Instant::now();
    let mut failed = 0;
    loop {
        let began = Instant::now();
        let endpoint = clients.endpoint(writer + failed as usize);
        let result = connections.send(&endpoint, items).await;
        let phase = shared.phase.load(Ordering::SeqCst);
        shared
            .attempts
            .lock()
            .unwrap()
            .push((phase, began, result.is_ok()));
        match result {
            Ok(()) => return failed,
            Err(status) => {
                let why: String = format!("{:?}: {}", status.code(), status.message())
                    .chars()
                    .take(160)
                    .collect();
                *shared
                    .failures
                    .lock()
                    .unwrap()
                    .entry(phase)
                    .or_default()
                    .entry(why)
                    .or_default() += 1;
                assert!(
                    !matches!(
                        status.code(),
                        Code::AlreadyExists | Code::InvalidArgument | Code::OutOfRange
                    ),
                    "a retry was refused: {status:?}"
                );
                assert!(
                    started.elapsed() < RETRY_LIMIT,
                    "a call failed for {RETRY_LIMIT:?}: {status:?}"
                );
                failed += 1;
                // A client's pause between retries.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn start_writers(
    runtime: &tokio::runtime::Runtime,
    shared: &Arc<Shared>,
    clients: &Clients,
) -> Vec<tokio::task::JoinHandle<Ledger>> {
    (0..WRITERS)
        .map(|writer| {
            let shared = shared.clone();
            let clients = clients.clone();
            runtime.spawn(async move {
                let mut rng = fastrand::Rng::with_seed(writer as u64 + 1);
                let mut connections = Connections::default();
                let mut ledger = Ledger::default();
                let mut sequence = 0u64;
                while !shared.stop.load(Ordering::SeqCst) {
                    if shared.paused.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    shared.busy.fetch_add(1, Ordering::SeqCst);
                    if shared.paused.load(Ordering::SeqCst) {
                        shared.busy.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                    let size = if rng.u8(..5) == 0 {
                        rng.usize(2..=10)
                    } else {
                        1
                    };
                    let items: Vec<pb::IncrementRequest> = (0..size)
                        .map(|_| {
                            sequence += 1;
                            pb::IncrementRequest {
                                counter: counter_name(rng.usize(..COUNTERS)),
                                delta: rng.i64(1..=1_000),
                                idempotency_key: format!("keyed-w{writer}-{sequence}"),
                                ..Default::default()
                            }
                        })
                        .collect();
                    {
                        let mut sent = shared.sent.lock().unwrap();
                        for item in &items {
                            *sent.entry(item.counter.clone()).or_default() += item.delta;
                        }
                    }
                    ledger.retried += send_until_acknowledged(
                        &shared,
                        &mut connections,
                        &clients,
                        writer,
                        &items,
                    )
                    .await;
                    ledger.record(&items);
                    if rng.u8(..10) == 0 {
                        ledger.retried += send_until_acknowledged(
                            &shared,
                            &mut connections,
                            &clients,
                            writer,
                            &items,
                        )
                        .await;
                        ledger.resent += 1;
                    }
                    shared.busy.fetch_sub(1, Ordering::SeqCst);
                }
                ledger
            })
        })
        .collect()
}

/// Reads every counter every 100 ms and checks each total against what was
/// sent.
fn start_reader(
    runtime: &tokio::runtime::Runtime,
    shared: &Arc<Shared>,
    clients: &Clients,
) -> tokio::task::JoinHandle<()> {
    let shared = shared.clone();
    let clients = clients.clone();
    runtime.spawn(async move {
        let counters: Vec<String> = (0..COUNTERS).map(counter_name).collect();
        let mut connections = Connections::default();
        while !shared.stop.load(Ordering::SeqCst) {
            let phase = shared.phase.load(Ordering::SeqCst);
            let mut client = connections.client(&clients.endpoint(0));
            let mut request = tonic::Request::new(pb::GetBatchRequest {
                counters: counters.clone(),
                allow_partial: false,
                ..Default::default()
            });
            request.set_timeout(Duration::from_secs(5));
            let answer = client.get_batch(request).await;
            // Whatever the read counted was sent before it returned.
            let sent = shared.sent.lock().unwrap().clone();
            let complete = match answer {
                Ok(answer) => {
                    for total in answer.into_inner().counters {
                        let bound = sent.get(&total.counter).copied().unwrap_or(0);
                        if total.value > bound {
                            shared.over.lock().unwrap().push(format!(
                                "phase {phase}: {} read {} > {bound} sent",
                                total.counter, total.value
                            ));
                        }
                    }
                    true
                }
                Err(_) => false,
            };
            {
                let mut reads = shared.reads.lock().unwrap();
                let entry = reads.entry(phase).or_default();
                if complete {
                    entry.0 += 1;
                } else {
                    entry.1 += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// A phase's name, when it began, and the failure's moment within it (calls
/// that began within the detection window after it are not counted).
struct Phase {
    name: &'static str,
    began: Instant,
    failure: Option<Instant>,
}

/// SIGKILLs shard `index` (the last phase's failure), leaves it down
/// `down_ms`, starts it again with its data, and waits until the
/// coordinator shows it up.
fn kill_for(
    runtime: &tokio::runtime::Runtime,
    cluster: &mut ProcessCluster,
    phases: &mut [Phase],
    index: usize,
    down_ms: u64,
) {
    let address = cluster.shards[index]
        .take()
        .unwrap()
        .stop_with_address(Signal::SIGKILL);
    phases.last_mut().unwrap().failure = Some(Instant::now());
    std::thread::sleep(Duration::from_millis(down_ms));
    cluster.restart_shard(index, address);
    let name = format!("shard-{}", index + 1);
    support::wait_for_shown_health(runtime, cluster, &name, "up");
}

/// Stops shard `index` with `signal` once the writers are paused and its
/// last changes reached its replica (replication is asynchronous: a disk
/// lost sooner loses what the last round had not copied); returns its
/// address. The writers stay paused.
fn stop_once_copied(
    runtime: &tokio::runtime::Runtime,
    shared: &Shared,
    cluster: &mut ProcessCluster,
    index: usize,
    signal: Signal,
) -> std::net::SocketAddr {
    runtime.block_on(shared.pause());
    runtime.block_on(support::wait_for_process_replicas(cluster));
    cluster.shards[index]
        .take()
        .unwrap()
        .stop_with_address(signal)
}

/// Prints each phase's figures; returns each phase's keyed availability.
fn report(shared: &Shared, phases: &[Phase], ended: Instant) -> Vec<f64> {
    let mut shares = Vec::new();
    let attempts = shared.attempts.lock().unwrap();
    let reads = shared.reads.lock().unwrap();
    for (index, phase) in phases.iter().enumerate() {
        let until = phases.get(index + 1).map_or(ended, |next| next.began);
        let seconds = (until - phase.began).as_secs_f64();
        let acknowledged = attempts
            .iter()
            .filter(|(at, _, ok)| *at == index && *ok)
            .count();
        let counted: Vec<&Attempt> = attempts
            .iter()
            .filter(|(at, began, _)| {
                *at == index
                    && phase.failure.is_none_or(|failure| {
                        !(failure..failure + DETECTION_WINDOW).contains(began)
                    })
            })
            .collect();
        let ok = counted.iter().filter(|(_, _, ok)| *ok).count();
        let share = if counted.is_empty() {
            100.0
        } else {
            ok as f64 * 100.0 / counted.len() as f64
        };
        let (complete, not) = reads.get(&index).copied().unwrap_or_default();
        support::report(&format!(
            "phase {index} ({}, {seconds:.1} s): keyed write availability {share:.1}% ({ok} of \
             {} calls outside the detection window), {:.0} calls acknowledged/s; reads \
             complete {complete}, not {not}",
            phase.name,
            counted.len(),
            acknowledged as f64 / seconds
        ));
        if let Some(failures) = shared.failures.lock().unwrap().get(&index) {
            let mut failures: Vec<(&String, &usize)> = failures.iter().collect();
            failures.sort_by(|left, right| right.1.cmp(left.1));
            for (why, count) in failures.into_iter().take(3) {
                support::report(&format!("  {count} failed: {why}"));
            }
        }
        shares.push(share);
    }
    shares
}

#[test]
fn keyed_writes_are_exactly_once_through_every_change_of_where_a_key_lives() {
    let runtime = support::runtime();
    let mut cluster = ProcessCluster::start("sync");
    let dir = cluster.dir.path().to_path_buf();
    let clients = Clients::new(vec![cluster.coordinator.endpoint()]);
    let shared = Arc::new(Shared::default());
    let writers = start_writers(&runtime, &shared, &clients);
    let reader = start_reader(&runtime, &shared, &clients);
    let mut phases: Vec<Phase> = Vec::new();
    let begin = |phases: &mut Vec<Phase>, name| {
        shared.phase.store(phases.len(), Ordering::SeqCst);
        phases.push(Phase {
            name,
            began: Instant::now(),
            failure: None,
        });
    };
    let run = |time: u64| std::thread::sleep(Duration::from_millis(time));

    begin(&mut phases, "steady");
    run(2_000);

    begin(&mut phases, "shard-2 killed, down 10 s, back with its data");
    kill_for(&runtime, &mut cluster, &mut phases, 1, 10_000);
    run(1_000);

    begin(&mut phases, "shard-3 stopped 5 s");
    let pid = Pid::from_raw(cluster.shards[2].as_ref().unwrap().pid() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    phases.last_mut().unwrap().failure = Some(Instant::now());
    run(5_000);
    kill(pid, Signal::SIGCONT).unwrap();
    support::wait_for_shown_health(&runtime, &cluster, "shard-3", "up");
    run(1_000);

    begin(
        &mut phases,
        "shard-1 restarted with an empty data directory",
    );
    let address = stop_once_copied(&runtime, &shared, &mut cluster, 0, Signal::SIGTERM);
    std::fs::remove_dir_all(dir.join("data/shard-1")).unwrap();
    cluster.restart_shard(0, address);
    shared.resume();
    run(3_000);

    begin(&mut phases, "shard-2 drained");
    let drained = cluster.tallyctl(&["drain", "shard-2"]);
    assert!(
        drained.status.success(),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    run(2_000);

    begin(&mut phases, "shard-2 removed and shard-4 added by SIGHUP");
    let addresses = cluster.start_new_shard(4);
    // The drained node leaves the membership, as the README's drain says:
    // while listed, it stays a replica that can neither hold a fresh copy
    // nor stand in.
    support::write_coordinator_config_of(
        &dir,
        &[
            ("shard-1", addresses[0]),
            ("shard-3", addresses[2]),
            ("shard-4", addresses[3]),
        ],
    );
    kill(
        Pid::from_raw(cluster.coordinator.pid() as i32),
        Signal::SIGHUP,
    )
    .unwrap();
    runtime.block_on(support::wait_until("the reload", support::PATIENCE, || {
        let log = cluster.coordinator.log();
        std::future::ready(if log.contains("added shard-4, removed shard-2") {
            Ok(())
        } else {
            Err(())
        })
    }));
    cluster.shards[1].take().unwrap().terminate();
    run(2_000);

    begin(&mut phases, "coordinator restarted");
    let listen = cluster.coordinator.address.to_string();
    cluster.coordinator.signal(Signal::SIGKILL);
    phases.last_mut().unwrap().failure = Some(Instant::now());
    cluster.coordinator = cluster.start_coordinator("coordinator-2", &listen);
    run(2_000);

    begin(
        &mut phases,
        "two coordinators routing at once, shard-3 killed, down 5 s",
    );
    let second = cluster.start_coordinator("coordinator-b", "127.0.0.1:0");
    clients.set(vec![cluster.coordinator.endpoint(), second.endpoint()]);
    run(1_000);
    kill_for(&runtime, &mut cluster, &mut phases, 2, 5_000);
    run(1_000);

    begin(
        &mut phases,
        "shard-1 killed, taken over, back with an empty data directory",
    );
    let address = stop_once_copied(&runtime, &shared, &mut cluster, 0, Signal::SIGKILL);
    phases.last_mut().unwrap().failure = Some(Instant::now());
    shared.resume();
    runtime.block_on(support::wait_until(
        "a node to stand in for shard-1",
        support::PATIENCE,
        || async {
            let statuses = support::process_statuses(&cluster).await;
            if statuses
                .iter()
                .any(|status| status.standing_in_for.iter().any(|node| node == "shard-1"))
            {
                Ok(())
            } else {
                Err(())
            }
        },
    ));
    run(2_000);
    std::fs::remove_dir_all(dir.join("data/shard-1")).unwrap();
    cluster.restart_shard(0, address);
    support::wait_for_shown_health(&runtime, &cluster, "shard-1", "up");
    run(1_000);

    let ended = Instant::now();
    shared.stop.store(true, Ordering::SeqCst);
    let mut ledger = Ledger::default();
    for writer in writers {
        ledger.merge(runtime.block_on(writer).unwrap());
    }
    runtime.block_on(reader).unwrap();
    let availability = report(&shared, &phases, ended);

    let counters: Vec<String> = (0..COUNTERS).map(counter_name).collect();
    runtime.block_on(support::wait_until_reconciled(&cluster));
    let totals = runtime.block_on(support::totals(&cluster.coordinator.endpoint(), &counters));
    let outcome = ledger.against(totals);
    support::report(&format!(
        "keyed harness ({} calls retried, {} resent): {outcome}",
        ledger.retried, ledger.resent
    ));
    let over = shared.over.lock().unwrap();
    assert!(
        over.is_empty(),
        "{} reads above what was sent, the first: {:?}",
        over.len(),
        &over[..over.len().min(10)]
    );
    if outcome.lost != 0 || outcome.duplicated != 0 {
        support::print_trail(&cluster, &[&second]);
    }
    assert_eq!((outcome.lost, outcome.duplicated), (0, 0), "{outcome}");
    // A killed shard's keyed increments are taken over by its stand-in:
    // every call outside the detection window succeeds (a hung one's wait
    // out the calls already sent to it, and the drain's and the
    // coordinator's restart the calls in flight at that moment).
    // Not phase 8 yet: its availability is printed; under a loaded CI
    // machine its stand-in's copy was found too old to take over at first
    // (98.6%, before the copy allowance counted rounds' duration: see
    // docs/GUARANTEES.md, "Known gaps").
    for phase in [1, 7] {
        assert!(
            availability[phase] >= 99.0,
            "keyed availability with a shard killed (phase {phase}): {:.1}%",
            availability[phase]
        );
    }
    drop(second);
}
