//! A shard's Prometheus series (`metrics_listen`). Group commits are
//! measured by the log thread as they happen ([`crate::journal::CommitMetrics`]);
//! everything else is read from the node's state when scraped, so the
//! increment path records nothing of its own.

use std::sync::Arc;

use metrics::{Counter, Gauge, Unit};
use tally_runtime::metrics::{Describe, Registry};

use crate::journal::CommitMetrics;

const APPLY_CALLS: Describe = Describe::new(
    "tally_shard_apply_calls_total",
    None,
    "Apply calls answered (each carries many increments).",
);
const INCREMENTS_APPLIED: Describe = Describe::new(
    "tally_shard_increments_applied_total",
    None,
    "Increments applied to this node's own entries (duplicates of a key not counted).",
);
const GROUP_COMMIT_COUNTERS: Describe = Describe::new(
    "tally_shard_group_commit_counters",
    None,
    "Counters written by one group commit of own entries.",
);
const GROUP_COMMIT_SECONDS: Describe = Describe::new(
    "tally_shard_group_commit_seconds",
    Some(Unit::Seconds),
    "Time of one successful group commit of own entries: its log write and sync (fdatasync in sync mode)."
);
const LOG_COMMITS: Describe = Describe::new(
    "tally_shard_log_commits_total",
    None,
    "Group commits written to the log.",
);
const LOG_BYTES: Describe = Describe::new(
    "tally_shard_log_bytes",
    Some(Unit::Bytes),
    "Bytes of log on disk (since the last checkpoint).",
);
const LOG_SEGMENTS: Describe = Describe::new(
    "tally_shard_log_segments",
    None,
    "Log segment files on disk.",
);
const CHECKPOINTS: Describe = Describe::new(
    "tally_shard_checkpoints_total",
    None,
    "Checkpoints finished since start.",
);
const CHECKPOINT_FAILURES: Describe = Describe::new(
    "tally_shard_checkpoint_failures_total",
    None,
    "Checkpoints failed since start.",
);
const CHECKPOINT_AGE: Describe = Describe::new(
    "tally_shard_checkpoint_age_seconds",
    Some(Unit::Seconds),
    "Time since the last durable checkpoint finished (0 before the first since start).",
);
const ENTRIES: Describe = Describe::new(
    "tally_shard_entries",
    None,
    "This node's own entries (counter stripes), counted at each scrape.",
);
const REMEMBERED_KEYS: Describe = Describe::new(
    "tally_shard_remembered_keys",
    None,
    "Idempotency keys remembered for retries.",
);
const KEYS_FORGOTTEN_EARLY: Describe = Describe::new(
    "tally_shard_keys_forgotten_early_total",
    None,
    "Idempotency keys forgotten before their retention window ended (idempotency_max_keys reached)."
);
const REPLICA_COPIES: Describe = Describe::new(
    "tally_shard_replica_copies",
    None,
    "Copies of other nodes' entries this node holds.",
);
const REPLICA_ENTRIES: Describe = Describe::new(
    "tally_shard_replica_entries",
    None,
    "Entries in the copies this node holds, counted at each scrape.",
);
const REPLICA_COPY_AGE: Describe = Describe::new(
    "tally_shard_replica_copy_age_seconds",
    Some(Unit::Seconds),
    "Time since the replication round that last brought a copy up to date began (NaN: unknown, as after this node started or a takeover ended)."
);

const WINDOWS_RECLAIMED: Describe = Describe::new(
    "tally_shard_windows_reclaimed_total",
    None,
    "Counter windows reclaimed (ended by this node's clock, plus window_grace_ms and 10 s): from own entries, and from each replica copy held.",
);

/// A shard's instruments.
#[derive(Debug, Clone)]
pub struct ShardMetrics {
    pub(crate) registry: Arc<Registry>,
    pub(crate) apply_calls: Counter,
    pub(crate) increments_applied: Counter,
    pub(crate) log_commits: Counter,
    pub(crate) log_bytes: Gauge,
    pub(crate) log_segments: Gauge,
    pub(crate) checkpoints: Counter,
    pub(crate) checkpoint_failures: Counter,
    pub(crate) checkpoint_age: Gauge,
    pub(crate) entries: Gauge,
    pub(crate) remembered_keys: Gauge,
    pub(crate) keys_forgotten_early: Counter,
    pub(crate) replica_copies: Gauge,
    pub(crate) replica_entries: Gauge,
    pub(crate) windows_reclaimed: Counter,
    commits: CommitMetrics,
    /// The origins whose copy age the last scrape showed: a copy dropped
    /// since gets NaN, not its last age.
    aged: Arc<parking_lot::Mutex<Vec<String>>>,
}

impl ShardMetrics {
    /// Registers every series of a shard in `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        let none = &[];
        ShardMetrics {
            apply_calls: registry.counter(APPLY_CALLS, none),
            increments_applied: registry.counter(INCREMENTS_APPLIED, none),
            log_commits: registry.counter(LOG_COMMITS, none),
            log_bytes: registry.gauge(LOG_BYTES, none),
            log_segments: registry.gauge(LOG_SEGMENTS, none),
            checkpoints: registry.counter(CHECKPOINTS, none),
            checkpoint_failures: registry.counter(CHECKPOINT_FAILURES, none),
            checkpoint_age: registry.gauge(CHECKPOINT_AGE, none),
            entries: registry.gauge(ENTRIES, none),
            remembered_keys: registry.gauge(REMEMBERED_KEYS, none),
            keys_forgotten_early: registry.counter(KEYS_FORGOTTEN_EARLY, none),
            replica_copies: registry.gauge(REPLICA_COPIES, none),
            replica_entries: registry.gauge(REPLICA_ENTRIES, none),
            windows_reclaimed: registry.counter(WINDOWS_RECLAIMED, none),
            commits: CommitMetrics {
                counters: registry.histogram(GROUP_COMMIT_COUNTERS, none),
                seconds: registry.histogram(GROUP_COMMIT_SECONDS, none),
            },
            registry,
            aged: Arc::default(),
        }
    }

    /// The log thread's histograms.
    pub(crate) fn commits(&self) -> CommitMetrics {
        self.commits.clone()
    }

    /// Sets each copy's age (`None`: unknown), by origin; a copy shown
    /// before and gone now is NaN.
    pub(crate) fn set_copy_ages(&self, ages: Vec<(String, Option<u64>)>) {
        let gauge = |origin: &str| {
            self.registry
                .gauge(REPLICA_COPY_AGE, &[("origin", origin.to_string())])
        };
        let mut aged = self.aged.lock();
        for origin in aged.iter() {
            if !ages.iter().any(|(now, _)| now == origin) {
                gauge(origin).set(f64::NAN);
            }
        }
        for (origin, age_ms) in &ages {
            gauge(origin).set(age_ms.map_or(f64::NAN, |ms| ms as f64 / 1_000.0));
        }
        *aged = ages.into_iter().map(|(origin, _)| origin).collect();
    }
}
