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
//!
//! A [`Mode`] other than the default makes every increment ask for more:
//! the total after it (`get`), a fixed window (`window_seconds`, reads too)
//! or a limit (`limit`). With a limit, the report counts the increments
//! applied and those the limit refused, and the check also fails if a total
//! passed the limit. With a window, the check is skipped if the window
//! ended during the run (its counters started again at 0).

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

/// What every increment asks for besides being applied; the default,
/// nothing: a plain increment of 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mode {
    /// Increment-and-get: every increment asks for the counter's total
    /// after it (`return_total`). Unary only (`batch` 1).
    pub get: bool,
    /// The counters' fixed window of this many seconds, for increments and
    /// reads (`window_seconds`); 0: none.
    pub window_seconds: u32,
    /// Every increment applies only if the total after it is at most this
    /// (`limit`; answers the total too). Unary only, without `keyed`.
    pub limit: Option<i64>,
}

impl Mode {
    /// What the increments do, as the report names it: `increment`,
    /// `increment-and-get` or `limit`.
    pub fn name(&self) -> &'static str {
        if self.limit.is_some() {
            "limit"
        } else if self.get {
            "increment-and-get"
        } else {
            "increment"
        }
    }
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
    /// What the increments did: `increment`, `increment-and-get` or
    /// `limit` (see [`Mode::name`]).
    pub mode: &'static str,
    /// The counters' fixed window, in seconds, if they had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<u32>,
    /// The limit of every increment, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    /// The counters' name prefix.
    pub prefix: String,
    /// Wall time of the load, in seconds.
    pub elapsed_secs: f64,
    /// Calls made (writes and reads, failed ones included).
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Increments acknowledged (with a limit: applied or refused).
    pub increments: u64,
    /// With a limit: acknowledged increments that were applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
    /// With a limit: acknowledged increments the limit refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<u64>,
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
    /// `ok`, `skipped` (perhaps with why), or what was wrong.
    pub check: String,
    /// Counters read back by the check.
    pub checked_counters: u64,
}

impl BenchReport {
    /// Whether the self-check found every total as acknowledged (or was
    /// skipped).
    pub fn passed(&self) -> bool {
        self.check == "ok" || self.check.starts_with("skipped")
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
    mode: Mode,
    /// Whether a unary increment's answer says anything (not in the
    /// default mode, whose hot path reads none).
    answers_matter: bool,
    /// Set when an answer shows the coordinator ignored the mode (it is
    /// older than this bench): the run fails.
    ignored: AtomicBool,
    /// With a window: the earliest and the latest window end seen (Unix
    /// ms), from the answers and, for batches (which answer none), this
    /// host's clock. They differ if the window ended during the run.
    window_ends: WindowEnds,
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

/// The earliest and latest window ends seen, Unix ms.
struct WindowEnds {
    earliest: AtomicI64,
    latest: AtomicI64,
}

impl WindowEnds {
    fn new() -> Self {
        WindowEnds {
            earliest: AtomicI64::new(i64::MAX),
            latest: AtomicI64::new(i64::MIN),
        }
    }

    fn saw(&self, end_unix_ms: i64) {
        self.earliest.fetch_min(end_unix_ms, Ordering::Relaxed);
        self.latest.fetch_max(end_unix_ms, Ordering::Relaxed);
    }

    /// Whether two different windows were seen (none seen: earliest is
    /// above latest).
    fn rolled_over(&self) -> bool {
        self.earliest.load(Ordering::Relaxed) < self.latest.load(Ordering::Relaxed)
    }

    /// The current window's end by this host's clock.
    fn saw_local(&self, window_seconds: u32) {
        let end = tally_proto::window::Window::current(window_seconds).end_unix_ms();
        self.saw(i64::try_from(end).unwrap_or(i64::MAX));
    }
}

/// One client's results.
struct ClientResult {
    writes: Histogram<u64>,
    reads: Histogram<u64>,
    errors: u64,
    /// Acknowledged increments the limit refused.
    refused: u64,
}

/// What an acknowledged write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// Every increment of the call was applied.
    Applied,
    /// The limit refused the (unary) increment: nothing was applied.
    Refused,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Runs the load of plain increments, then the check. An `Err` is a run
/// that could not start or finish (no coordinator); a failed check is in
/// the report (see [`BenchReport::passed`]).
pub async fn run(options: BenchOptions) -> anyhow::Result<BenchReport> {
    run_with(options, Mode::default()).await
}

/// [`run`], with increments that ask for what `mode` says.
pub async fn run_with(mut options: BenchOptions, mode: Mode) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(options.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(options.counters > 0, "--counters must be at least 1");
    anyhow::ensure!(
        (1..=tally_proto::domain::MAX_BATCH_ITEMS).contains(&options.batch),
        "--batch must be 1 to {}",
        tally_proto::domain::MAX_BATCH_ITEMS
    );
    anyhow::ensure!(options.read_percent <= 100, "--reads must be 0 to 100");
    anyhow::ensure!(
        options.batch == 1 || !(mode.get || mode.limit.is_some()),
        "--get and --limit need --batch 1: IncrementBatch answers no total"
    );
    anyhow::ensure!(
        !(options.keyed && mode.limit.is_some()),
        "--limit does not go with --keyed: a limited increment takes no idempotency key"
    );
    anyhow::ensure!(
        mode.limit.is_none_or(|limit| limit >= 0),
        "--limit must be 0 or more"
    );
    anyhow::ensure!(
        mode.window_seconds <= tally_proto::window::MAX_WINDOW_SECONDS,
        "--window must be at most 366 days"
    );
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
        mode,
        answers_matter: mode != Mode::default(),
        ignored: AtomicBool::new(false),
        window_ends: WindowEnds::new(),
        ledger: Ledger::new(options.counters),
        started: AtomicU64::new(0),
        stopped: AtomicBool::new(false),
        next_key: AtomicU64::new(0),
        errors: Default::default(),
        options,
    });
    let progress = progress_bar(&shared.options);

    // Batches answer no window end: this host's clock says which window
    // the run began and ended in.
    let batches_in_window = mode.window_seconds != 0 && shared.options.batch > 1;
    if batches_in_window {
        shared.window_ends.saw_local(mode.window_seconds);
    }
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
    let mut refused = 0;
    for client in clients {
        let result = client.await.context("a bench client panicked")?;
        writes.add(&result.writes).expect("same bounds");
        reads.add(&result.reads).expect("same bounds");
        errors += result.errors;
        refused += result.refused;
    }
    let elapsed = begin.elapsed();
    if batches_in_window {
        shared.window_ends.saw_local(mode.window_seconds);
    }
    ticker.abort();
    progress.finish_and_clear();

    anyhow::ensure!(
        !shared.ignored.load(Ordering::Relaxed),
        "the coordinator ignored --get, --window or --limit: it is older than this tallyctl \
         (upgrade it); the increments were applied without them"
    );
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
        mode: mode.name(),
        window_seconds: (mode.window_seconds != 0).then_some(mode.window_seconds),
        limit: mode.limit,
        prefix: options.prefix.clone(),
        elapsed_secs: elapsed.as_secs_f64(),
        calls: successes + errors,
        errors,
        increments,
        applied: mode.limit.map(|_| increments - refused),
        refused: mode.limit.map(|_| refused),
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
        report.check = if shared.window_ends.rolled_over() {
            format!(
                "skipped: the window of {} ended during the run, and its counters started \
                 again at 0",
                crate::window_arg::describe_window(mode.window_seconds)
            )
        } else {
            verdict
        };
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
        refused: 0,
    };
    let mut picked = Vec::with_capacity(options.batch);
    while may_start(&shared) {
        picked.clear();
        picked.extend((0..options.batch).map(|_| fastrand::usize(..options.counters as usize)));
        let is_read = options.read_percent > 0 && fastrand::u8(..100) < options.read_percent;
        let begin = Instant::now();
        let outcome = if is_read {
            read(&shared, &mut client, &picked)
                .await
                .map(|()| Written::Applied)
        } else {
            write(&shared, &mut client, &picked).await
        };
        let micros = (begin.elapsed().as_micros() as u64).clamp(1, MAX_LATENCY_US);
        match outcome {
            Ok(_) if is_read => result.reads.saturating_record(micros),
            Ok(Written::Applied) => {
                result.writes.saturating_record(micros);
                shared.ledger.record(&picked, true);
            }
            Ok(Written::Refused) => {
                result.writes.saturating_record(micros);
                result.refused += 1;
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
        return_total: shared.mode.get,
        allow_partial: false,
        window_seconds: shared.mode.window_seconds,
        limit: shared.mode.limit,
    }
}

async fn write(
    shared: &Shared,
    client: &mut CounterClient<Client>,
    picked: &[usize],
) -> Result<Written, tonic::Status> {
    if let [index] = picked {
        let answer = client
            .increment(timed(shared, increment(shared, *index)))
            .await?;
        if shared.answers_matter {
            return Ok(written(shared, answer.get_ref()));
        }
    } else {
        let increments = picked
            .iter()
            .map(|&index| increment(shared, index))
            .collect();
        client
            .increment_batch(timed(shared, pb::IncrementBatchRequest { increments }))
            .await?;
    }
    Ok(Written::Applied)
}

/// What a unary increment of 1 in a mode other than the default did.
fn written(shared: &Shared, answer: &pb::IncrementResponse) -> Written {
    if shared.mode.window_seconds != 0 {
        shared.window_ends.saw(answer.window_end_unix_ms);
    }
    // The mode's fields as every increment of the run carries them (no
    // strings: nothing is allocated).
    let asked = pb::IncrementRequest {
        return_total: shared.mode.get,
        window_seconds: shared.mode.window_seconds,
        limit: shared.mode.limit,
        ..Default::default()
    };
    if crate::client::ignored_by_increment(&asked, answer).is_some() {
        shared.ignored.store(true, Ordering::Relaxed);
    }
    if shared.mode.limit.is_some() && answer.applied == 0 {
        Written::Refused
    } else {
        Written::Applied
    }
}

async fn read(
    shared: &Shared,
    client: &mut CounterClient<Client>,
    picked: &[usize],
) -> Result<(), tonic::Status> {
    let window_seconds = shared.mode.window_seconds;
    if let [index] = picked {
        let answer = client
            .get(timed(
                shared,
                pb::GetRequest {
                    counter: counter_name(shared, *index),
                    allow_partial: false,
                    window_seconds,
                },
            ))
            .await?;
        if window_seconds != 0 {
            shared.window_ends.saw(answer.get_ref().window_end_unix_ms);
        }
    } else {
        let counters = picked
            .iter()
            .map(|&index| counter_name(shared, index))
            .collect();
        let answer = client
            .get_batch(timed(
                shared,
                pb::GetBatchRequest {
                    counters,
                    allow_partial: false,
                    window_seconds,
                },
            ))
            .await?;
        if window_seconds != 0 {
            if let Some(first) = answer.get_ref().counters.first() {
                shared.window_ends.saw(first.window_end_unix_ms);
            }
        }
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
                        window_seconds: shared.mode.window_seconds,
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
    let (mut over, mut unreadable) = (0u64, 0u64);
    for (range, totals) in totals {
        anyhow::ensure!(
            totals.len() == range.len(),
            "the check asked for {} counters and got {}",
            range.len(),
            totals.len()
        );
        for (index, total) in range.zip(totals) {
            if shared.mode.window_seconds != 0 {
                shared.window_ends.saw(total.window_end_unix_ms);
            }
            if total.error_code != 0 {
                // Unreadable (e.g. its window ended by a shard's clock):
                // nothing to compare.
                unreadable += 1;
                if wrong.len() < 3 {
                    wrong.push(format!("{}: {}", total.counter, total.error));
                }
                continue;
            }
            let acknowledged = shared.ledger.acknowledged[index].load(Ordering::Relaxed);
            let uncertain = shared.ledger.uncertain[index].load(Ordering::Relaxed);
            let over_limit = shared.mode.limit.is_some_and(|limit| total.value > limit);
            match judge(total.value, acknowledged, uncertain) {
                Verdict::Exact if !over_limit => continue,
                Verdict::Exact => {}
                Verdict::Lost(n) => lost += n,
                Verdict::Extra(n) => extra += n,
            }
            if over_limit {
                over += 1;
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
        let mut found = Vec::new();
        if unreadable > 0 {
            found.push(format!("{unreadable} counter(s) could not be read"));
        }
        if over > 0 {
            found.push(format!(
                "{over} counter(s) over the limit {}",
                shared.mode.limit.unwrap_or_default()
            ));
        }
        found.push(format!(
            "{lost} acknowledged increments missing, {extra} extra"
        ));
        format!("FAILED: {}; e.g. {}", found.join(", "), wrong.join("; "))
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
        let mut mode = String::new();
        if self.mode != "increment" {
            mode += &format!(", {}", self.mode);
        }
        if let Some(limit) = self.limit {
            mode += &format!(" {limit}");
        }
        if let Some(seconds) = self.window_seconds {
            mode += &format!(", window {}", crate::window_arg::describe_window(seconds));
        }
        let mut out = format!(
            "{} clients over {} connections, {:.1} s, {} counter(s), {calls}, {}% reads{}{mode}\n",
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
        if let (Some(applied), Some(refused)) = (self.applied, self.refused) {
            out += &format!(
                "  limit:      {applied:>12} applied {refused:>12} refused by the limit\n"
            );
        }
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
            "ok" if self.limit.is_some() => format!(
                "  check: ok, {} counter(s) read back, every applied increment there, none twice, \
                 none over the limit",
                self.checked_counters
            ),
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

    fn report(mode: Mode) -> BenchReport {
        BenchReport {
            endpoint: "http://127.0.0.1:7700".into(),
            clients: 4,
            connections: 4,
            counters: 1,
            batch: 1,
            read_percent: 0,
            keyed: false,
            mode: mode.name(),
            window_seconds: (mode.window_seconds != 0).then_some(mode.window_seconds),
            limit: mode.limit,
            prefix: "p-".into(),
            elapsed_secs: 1.0,
            calls: 10,
            errors: 0,
            increments: 10,
            applied: mode.limit.map(|_| 4),
            refused: mode.limit.map(|_| 6),
            ops_per_sec: 10.0,
            increments_per_sec: 10.0,
            reads_per_sec: 0.0,
            write_latency_us: None,
            read_latency_us: None,
            first_errors: Vec::new(),
            check: "ok".into(),
            checked_counters: 1,
        }
    }

    #[test]
    fn the_report_says_which_mode_ran() {
        let plain = report(Mode::default());
        let text = plain.human();
        let header = text.lines().next().unwrap();
        assert!(header.ends_with("0% reads"), "{header}");
        assert!(!text.contains("limit"), "{text}");
        let json = serde_json::to_value(&plain).unwrap();
        assert_eq!(json["mode"], "increment");
        for absent in ["window_seconds", "limit", "applied", "refused"] {
            assert!(json.get(absent).is_none(), "{absent}: {json}");
        }

        let get = report(Mode {
            get: true,
            window_seconds: 60,
            ..Mode::default()
        });
        let header = get.human().lines().next().unwrap().to_string();
        assert!(
            header.ends_with("0% reads, increment-and-get, window 1m"),
            "{header}"
        );

        let limited = report(Mode {
            limit: Some(4),
            ..Mode::default()
        });
        let text = limited.human();
        assert!(
            text.lines().next().unwrap().ends_with(", limit 4"),
            "{text}"
        );
        assert!(
            text.contains("4 applied            6 refused by the limit"),
            "{text}"
        );
        assert!(text.contains("none over the limit"), "{text}");
        let json = serde_json::to_value(&limited).unwrap();
        assert_eq!(json["mode"], "limit");
        assert_eq!(json["limit"], 4);
        assert_eq!(json["applied"], 4);
        assert_eq!(json["refused"], 6);
    }

    #[test]
    fn a_check_skipped_for_a_reason_passes() {
        let mut skipped = report(Mode::default());
        skipped.check = "skipped: the window of 1m ended during the run".into();
        assert!(skipped.passed());
        skipped.check = "FAILED: 1 acknowledged increments missing, 0 extra".into();
        assert!(!skipped.passed());
    }

    #[test]
    fn a_window_rolls_over_when_two_ends_were_seen() {
        let ends = WindowEnds::new();
        assert!(!ends.rolled_over());
        ends.saw(60_000);
        ends.saw(60_000);
        assert!(!ends.rolled_over());
        ends.saw(120_000);
        assert!(ends.rolled_over());
    }

    #[test]
    fn mode_names() {
        assert_eq!(Mode::default().name(), "increment");
        let get = Mode {
            get: true,
            ..Mode::default()
        };
        assert_eq!(get.name(), "increment-and-get");
        // A limit answers the total anyway: it names the mode.
        let limit = Mode {
            get: true,
            limit: Some(0),
            ..Mode::default()
        };
        assert_eq!(limit.name(), "limit");
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
