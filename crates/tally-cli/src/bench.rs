//! `tallyctl bench`: a load generator in the spirit of `redis-benchmark`.
//!
//! `clients` tasks each keep one call in flight against the coordinator,
//! spread over `connections` HTTP/2 connections, for a duration or a number
//! of calls. A call is an `Increment` of 1 (or an `IncrementBatch` of
//! `batch` increments), or, with probability `read_percent`, a `Get` (or a
//! `GetBatch` of `batch` counters). Counters are picked uniformly from
//! `counters` names that are new to this run (`--counters 1`: one hot
//! counter). Latencies go into HDR histograms, one per client, merged at
//! the end.
//!
//! The run checks its own work: it counts, per counter, the increments that
//! were acknowledged and those whose call failed (which may or may not have
//! been applied), then reads every counter back and fails unless each total
//! lies between the two. A lost acknowledged increment, or one applied
//! twice, fails the run, with one blind spot: when calls failed, a
//! duplicate can hide behind a failed increment that was not applied.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::client::Client;
use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tally_proto::pb;
use tally_proto::pb::counter_client::CounterClient;

/// Counters read back per `GetBatch` during the check.
const CHECK_CHUNK: usize = 1_000;
/// `GetBatch` calls in flight during the check.
const CHECK_CONCURRENCY: usize = 8;
/// Largest latency the histograms hold, in microseconds (one minute).
const MAX_LATENCY_US: u64 = 60_000_000;
/// Errors kept word for word in the report.
const ERRORS_KEPT: usize = 5;

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this long.
    After(Duration),
    /// After this many calls in all.
    Calls(u64),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The coordinator, and how to reach it.
    pub access: crate::client::Access,
    /// Calls in flight at once (one per client task).
    pub clients: usize,
    /// HTTP/2 connections the clients share (0: one per client).
    pub connections: usize,
    /// When to stop.
    pub stop: Stop,
    /// Distinct counters (1: one hot counter).
    pub counters: u64,
    /// Increments per `IncrementBatch` (1: unary `Increment`); counters per
    /// `GetBatch` for reads (1: unary `Get`).
    pub batch: usize,
    /// Share of calls that are reads, in percent.
    pub read_percent: u8,
    /// Give every increment a fresh idempotency key.
    pub keyed: bool,
    /// Counter names are this prefix and a number; empty picks one new to
    /// this run.
    pub prefix: String,
    /// Deadline of each call.
    pub timeout: Duration,
    /// Read every counter back at the end and compare.
    pub check: bool,
    /// Show a progress bar on stderr (only drawn on a terminal).
    pub progress: bool,
}

/// Latency percentiles of one kind of call, in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    /// Calls measured.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Slowest.
    pub max: u64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The coordinator.
    pub endpoint: String,
    /// Calls in flight at once.
    pub clients: usize,
    /// HTTP/2 connections.
    pub connections: usize,
    /// Distinct counters.
    pub counters: u64,
    /// Increments per write call, counters per read call.
    pub batch: usize,
    /// Share of reads, in percent.
    pub read_percent: u8,
    /// Whether increments carried idempotency keys.
    pub keyed: bool,
    /// The counters' name prefix.
    pub prefix: String,
    /// Wall time of the load, in seconds.
    pub elapsed_secs: f64,
    /// Calls made (writes and reads, failed ones included).
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Increments acknowledged.
    pub increments: u64,
    /// Successful calls per second.
    pub ops_per_sec: f64,
    /// Acknowledged increments per second.
    pub increments_per_sec: f64,
    /// Successful read calls per second.
    pub reads_per_sec: f64,
    /// Latency of successful write calls.
    pub write_latency_us: Option<Latency>,
    /// Latency of successful read calls.
    pub read_latency_us: Option<Latency>,
    /// The first few errors, word for word.
    pub first_errors: Vec<String>,
    /// `ok`, `skipped`, or what was wrong.
    pub check: String,
    /// Counters read back by the check.
    pub checked_counters: u64,
}

impl BenchReport {
    /// Whether the self-check found every total as acknowledged (or was
    /// skipped).
    pub fn passed(&self) -> bool {
        self.check == "ok" || self.check == "skipped"
    }
}

/// Per-counter bookkeeping for the check.
struct Ledger {
    /// Increments acknowledged, per counter.
    acknowledged: Vec<AtomicI64>,
    /// Increments whose call failed: applied or not, nobody knows.
    uncertain: Vec<AtomicI64>,
}

impl Ledger {
    fn new(counters: u64) -> Self {
        let zeros = || (0..counters).map(|_| AtomicI64::new(0)).collect();
        Ledger {
            acknowledged: zeros(),
            uncertain: zeros(),
        }
    }

    fn record(&self, counters: &[usize], acknowledged: bool) {
        let column = if acknowledged {
            &self.acknowledged
        } else {
            &self.uncertain
        };
        for &counter in counters {
            column[counter].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How one counter's total compares with what the run knows of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every acknowledged increment is there, and nothing that was never
    /// sent.
    Exact,
    /// Fewer than the acknowledged increments: some were lost.
    Lost(i64),
    /// More than every increment sent (acknowledged or failed): some were
    /// applied twice, or something else wrote the counter.
    Extra(i64),
}

/// Judges a total read back against `acknowledged` increments of 1 and
/// `uncertain` ones (whose calls failed).
pub fn judge(total: i64, acknowledged: i64, uncertain: i64) -> Verdict {
    if total < acknowledged {
        Verdict::Lost(acknowledged - total)
    } else if total > acknowledged + uncertain {
        Verdict::Extra(total - acknowledged - uncertain)
    } else {
        Verdict::Exact
    }
}

/// What every client task shares.
struct Shared {
    options: BenchOptions,
    ledger: Ledger,
    /// Calls started, for `Stop::Calls` and the progress bar (plus each
    /// client's last attempt, refused when the run is over).
    started: AtomicU64,
    /// Set when the duration is over.
    stopped: AtomicBool,
    /// Counter for fresh idempotency keys.
    next_key: AtomicU64,
    errors: ErrorLog,
}

/// The first few errors, word for word.
#[derive(Default)]
struct ErrorLog(std::sync::Mutex<Vec<String>>);

impl ErrorLog {
    fn push(&self, error: String) {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < ERRORS_KEPT {
            kept.push(error);
        }
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// One client's results.
struct ClientResult {
    writes: Histogram<u64>,
    reads: Histogram<u64>,
    errors: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Runs the load, then the check. An `Err` is a run that could not start
/// or finish (no coordinator); a failed check is in the report (see
/// [`BenchReport::passed`]).
pub async fn run(mut options: BenchOptions) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(options.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(options.counters > 0, "--counters must be at least 1");
    anyhow::ensure!(
        (1..=tally_proto::domain::MAX_BATCH_ITEMS).contains(&options.batch),
        "--batch must be 1 to {}",
        tally_proto::domain::MAX_BATCH_ITEMS
    );
    anyhow::ensure!(options.read_percent <= 100, "--reads must be 0 to 100");
    anyhow::ensure!(
        usize::try_from(options.counters).is_ok_and(|n| n <= 100_000_000),
        "--counters must be at most 100000000"
    );
    if options.prefix.is_empty() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        // Random too: two runs started in the same millisecond must not
        // share counters, or each would fail the other's check.
        options.prefix = format!("bench-{now}-{:08x}-", fastrand::u32(..));
    }
    if options.connections == 0 || options.connections > options.clients {
        options.connections = options.clients;
    }
    let channels = connect(&options).await?;
    let shared = Arc::new(Shared {
        ledger: Ledger::new(options.counters),
        started: AtomicU64::new(0),
        stopped: AtomicBool::new(false),
        next_key: AtomicU64::new(0),
        errors: Default::default(),
        options,
    });
    let progress = progress_bar(&shared.options);

    let begin = Instant::now();
    let clients: Vec<_> = (0..shared.options.clients)
        .map(|index| {
            let client = CounterClient::new(channels[index % channels.len()].clone());
            tokio::spawn(client_loop(shared.clone(), client))
        })
        .collect();
    let ticker = tokio::spawn(tick(shared.clone(), progress.clone(), begin));
    let mut writes = histogram();
    let mut reads = histogram();
    let mut errors = 0;
    for client in clients {
        let result = client.await.context("a bench client panicked")?;
        writes.add(&result.writes).expect("same bounds");
        reads.add(&result.reads).expect("same bounds");
        errors += result.errors;
    }
    let elapsed = begin.elapsed();
    ticker.abort();
    progress.finish_and_clear();

    let options = &shared.options;
    let seconds = elapsed.as_secs_f64().max(1e-9);
    let successes = writes.len() + reads.len();
    // Every acknowledged write call carried `batch` increments.
    let increments = writes.len() * options.batch as u64;
    let mut report = BenchReport {
        endpoint: options.access.endpoint.clone(),
        clients: options.clients,
        connections: options.connections,
        counters: options.counters,
        batch: options.batch,
        read_percent: options.read_percent,
        keyed: options.keyed,
        prefix: options.prefix.clone(),
        elapsed_secs: elapsed.as_secs_f64(),
        calls: successes + errors,
        errors,
        increments,
        ops_per_sec: successes as f64 / seconds,
        increments_per_sec: increments as f64 / seconds,
        reads_per_sec: reads.len() as f64 / seconds,
        write_latency_us: latency(&writes),
        read_latency_us: latency(&reads),
        first_errors: shared.errors.take(),
        check: "skipped".into(),
        checked_counters: 0,
    };
    if options.check {
        let client = CounterClient::new(channels[0].clone());
        let (checked, verdict) = check(&shared, client).await?;
        report.checked_counters = checked;
        report.check = verdict;
    }
    Ok(report)
}

async fn connect(options: &BenchOptions) -> anyhow::Result<Vec<Client>> {
    options.access.connect_many(options.connections).await
}

fn progress_bar(options: &BenchOptions) -> ProgressBar {
    if !options.progress {
        return ProgressBar::hidden();
    }
    let (length, template) = match options.stop {
        Stop::After(duration) => (
            duration.as_millis() as u64,
            "{spinner} [{elapsed_precise}] {wide_bar} {msg}",
        ),
        Stop::Calls(calls) => (
            calls,
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
        ),
    };
    // Draws only when stderr is a terminal.
    ProgressBar::new(length)
        .with_style(ProgressStyle::with_template(template).expect("valid progress template"))
}

/// Moves the progress bar, and ends a timed run.
async fn tick(shared: Arc<Shared>, progress: ProgressBar, begin: Instant) {
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    let end = async {
        match shared.options.stop {
            Stop::After(duration) => tokio::time::sleep_until((begin + duration).into()).await,
            Stop::Calls(_) => std::future::pending().await,
        }
    };
    tokio::pin!(end);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = &mut end => {
                shared.stopped.store(true, Ordering::Relaxed);
                return;
            }
        }
        let elapsed = begin.elapsed();
        let calls = shared.started.load(Ordering::Relaxed);
        let rate = calls as f64 / elapsed.as_secs_f64().max(1e-3);
        progress.set_message(format!("{calls} calls, {rate:.0}/s"));
        match shared.options.stop {
            Stop::After(_) => progress.set_position(elapsed.as_millis() as u64),
            Stop::Calls(_) => progress.set_position(calls),
        }
    }
}

/// Whether another call may start (counted as started if so).
fn may_start(shared: &Shared) -> bool {
    let started = shared.started.fetch_add(1, Ordering::Relaxed);
    match shared.options.stop {
        Stop::After(_) => !shared.stopped.load(Ordering::Relaxed),
        Stop::Calls(calls) => started < calls,
    }
}

async fn client_loop(shared: Arc<Shared>, mut client: CounterClient<Client>) -> ClientResult {
    let options = &shared.options;
    let mut result = ClientResult {
        writes: histogram(),
        reads: histogram(),
        errors: 0,
    };
    let mut picked = Vec::with_capacity(options.batch);
    while may_start(&shared) {
        picked.clear();
        picked.extend((0..options.batch).map(|_| fastrand::usize(..options.counters as usize)));
        let is_read = options.read_percent > 0 && fastrand::u8(..100) < options.read_percent;
        let begin = Instant::now();
        let outcome = if is_read {
            read(&shared, &mut client, &picked).await
        } else {
            write(&shared, &mut client, &picked).await
        };
        let micros = (begin.elapsed().as_micros() as u64).clamp(1, MAX_LATENCY_US);
        match outcome {
            Ok(()) if is_read => result.reads.saturating_record(micros),
            Ok(()) => {
                result.writes.saturating_record(micros);
                shared.ledger.record(&picked, true);
            }
            Err(status) => {
                result.errors += 1;
                if !is_read {
                    shared.ledger.record(&picked, false);
                }
                shared.errors.push(format!(
                    "{}: {:?}: {}",
                    if is_read { "read" } else { "write" },
                    status.code(),
                    status.message()
                ));
            }
        }
    }
    result
}

fn counter_name(shared: &Shared, index: usize) -> String {
    format!("{}{index}", shared.options.prefix)
}

fn timed<T>(shared: &Shared, message: T) -> tonic::Request<T> {
    tally_proto::timed(message, shared.options.timeout)
}

fn increment(shared: &Shared, index: usize) -> pb::IncrementRequest {
    let idempotency_key = if shared.options.keyed {
        let key = shared.next_key.fetch_add(1, Ordering::Relaxed);
        format!("{}k{key}", shared.options.prefix)
    } else {
        String::new()
    };
    pb::IncrementRequest {
        counter: counter_name(shared, index),
        delta: 1,
        idempotency_key,
        ..Default::default()
    }
}

async fn write(
    shared: &Shared,
    client: &mut CounterClient<Client>,
    picked: &[usize],
) -> Result<(), tonic::Status> {
    if let [index] = picked {
        client
            .increment(timed(shared, increment(shared, *index)))
            .await?;
    } else {
        let increments = picked
            .iter()
            .map(|&index| increment(shared, index))
            .collect();
        client
            .increment_batch(timed(shared, pb::IncrementBatchRequest { increments }))
            .await?;
    }
    Ok(())
}

async fn read(
    shared: &Shared,
    client: &mut CounterClient<Client>,
    picked: &[usize],
) -> Result<(), tonic::Status> {
    if let [index] = picked {
        client
            .get(timed(
                shared,
                pb::GetRequest {
                    counter: counter_name(shared, *index),
                    allow_partial: false,
                    ..Default::default()
                },
            ))
            .await?;
    } else {
        let counters = picked
            .iter()
            .map(|&index| counter_name(shared, index))
            .collect();
        client
            .get_batch(timed(
                shared,
                pb::GetBatchRequest {
                    counters,
                    allow_partial: false,
                    ..Default::default()
                },
            ))
            .await?;
    }
    Ok(())
}

/// Reads every counter back and judges it. Returns the counters read and
/// `ok` or what was wrong.
async fn check(shared: &Shared, client: CounterClient<Client>) -> anyhow::Result<(u64, String)> {
    let counters = shared.options.counters as usize;
    let chunks: Vec<_> = (0..counters)
        .step_by(CHECK_CHUNK)
        .map(|first| first..(first + CHECK_CHUNK).min(counters))
        .collect();
    let totals: Vec<(std::ops::Range<usize>, Vec<pb::GetResponse>)> = futures::stream::iter(chunks)
        .map(|range| {
            let mut client = client.clone();
            async move {
                let counters = range.clone().map(|i| counter_name(shared, i)).collect();
                let request = timed(
                    shared,
                    pb::GetBatchRequest {
                        counters,
                        allow_partial: false,
                        ..Default::default()
                    },
                );
                let totals = client.get_batch(request).await?.into_inner().counters;
                Ok::<_, tonic::Status>((range, totals))
            }
        })
        .buffer_unordered(CHECK_CONCURRENCY)
        .try_collect()
        .await
        .map_err(|status| {
            anyhow::anyhow!(
                "the check could not read the counters back: {:?}: {}",
                status.code(),
                status.message()
            )
        })?;
    let (mut lost, mut extra, mut wrong) = (0i64, 0i64, Vec::new());
    for (range, totals) in totals {
        anyhow::ensure!(
            totals.len() == range.len(),
            "the check asked for {} counters and got {}",
            range.len(),
            totals.len()
        );
        for (index, total) in range.zip(totals) {
            let acknowledged = shared.ledger.acknowledged[index].load(Ordering::Relaxed);
            let uncertain = shared.ledger.uncertain[index].load(Ordering::Relaxed);
            match judge(total.value, acknowledged, uncertain) {
                Verdict::Exact => continue,
                Verdict::Lost(n) => lost += n,
                Verdict::Extra(n) => extra += n,
            }
            if wrong.len() < 3 {
                wrong.push(format!(
                    "{} = {} (acknowledged {acknowledged}, failed {uncertain})",
                    total.counter, total.value
                ));
            }
        }
    }
    let verdict = if wrong.is_empty() {
        "ok".to_string()
    } else {
        format!(
            "FAILED: {lost} acknowledged increments missing, {extra} extra; e.g. {}",
            wrong.join("; ")
        )
    };
    Ok((counters as u64, verdict))
}

fn latency(histogram: &Histogram<u64>) -> Option<Latency> {
    (!histogram.is_empty()).then(|| Latency {
        count: histogram.len(),
        mean: histogram.mean(),
        p50: histogram.value_at_quantile(0.50),
        p90: histogram.value_at_quantile(0.90),
        p99: histogram.value_at_quantile(0.99),
        p999: histogram.value_at_quantile(0.999),
        max: histogram.max(),
    })
}

impl BenchReport {
    /// The report as a person reads it.
    pub fn human(&self) -> String {
        let calls = if self.batch == 1 {
            "unary".to_string()
        } else {
            format!("batches of {}", self.batch)
        };
        let mut out = format!(
            "{} clients over {} connections, {:.1} s, {} counter(s), {calls}, {}% reads{}\n",
            self.clients,
            self.connections,
            self.elapsed_secs,
            self.counters,
            self.read_percent,
            if self.keyed { ", keyed" } else { "" }
        );
        out += &format!(
            "  calls:      {:>12} ({} failed)   {:>12.0} ok/s\n",
            self.calls, self.errors, self.ops_per_sec
        );
        out += &format!(
            "  increments: {:>12} acknowledged {:>12.0} /s\n",
            self.increments, self.increments_per_sec
        );
        out += "  latency (µs)      p50      p90      p99    p99.9      max\n";
        for (name, latency) in [
            ("write", &self.write_latency_us),
            ("read", &self.read_latency_us),
        ] {
            if let Some(l) = latency {
                out += &format!(
                    "  {name:<12} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
                    l.p50, l.p90, l.p99, l.p999, l.max
                );
            }
        }
        for error in &self.first_errors {
            out += &format!("  error: {error}\n");
        }
        out += &match self.check.as_str() {
            "ok" => format!(
                "  check: ok, {} counter(s) read back, every acknowledged increment there, none twice",
                self.checked_counters
            ),
            "skipped" => "  check: skipped".to_string(),
            failed => format!("  check: {failed}"),
        };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_allows_only_totals_between_acknowledged_and_sent() {
        assert_eq!(judge(10, 10, 0), Verdict::Exact);
        assert_eq!(judge(12, 10, 3), Verdict::Exact);
        assert_eq!(judge(13, 10, 3), Verdict::Exact);
        assert_eq!(judge(9, 10, 3), Verdict::Lost(1));
        assert_eq!(judge(14, 10, 3), Verdict::Extra(1));
        assert_eq!(judge(0, 0, 0), Verdict::Exact);
        assert_eq!(judge(1, 0, 0), Verdict::Extra(1));
    }

    #[test]
    fn latency_percentiles_come_from_the_histogram() {
        let mut h = histogram();
        for micros in 1..=1000 {
            h.record(micros).unwrap();
        }
        let l = latency(&h).unwrap();
        assert_eq!(l.count, 1000);
        assert_eq!(l.p50, 500);
        assert_eq!(l.p99, 990);
        assert_eq!(l.max, 1000);
        assert!(latency(&histogram()).is_none());
    }
}
