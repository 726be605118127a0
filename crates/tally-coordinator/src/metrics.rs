//! The coordinator's Prometheus series (`metrics_listen`). Public calls,
//! internal calls, failovers and redirects are counted as they happen,
//! through handles registered once (per method at start, per node when a
//! membership is built), so the hot path does no lookup by name. Health,
//! queues and replication lag are read from the cluster when scraped.

use std::sync::Arc;
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, Unit};
use tally_runtime::metrics::{Describe, Registry};

use crate::cluster::Cluster;

macro_rules! describe {
    ($name:literal, $unit:expr, $help:literal) => {
        Describe {
            name: $name,
            unit: $unit,
            help: $help,
        }
    };
}

const REQUESTS: Describe = describe!(
    "tally_requests_total",
    None,
    "Public gRPC calls answered, by method and status code."
);
const REQUEST_SECONDS: Describe = describe!(
    "tally_request_duration_seconds",
    Some(Unit::Seconds),
    "Time to answer a public gRPC call, by method."
);
const APPLY_INCREMENTS: Describe = describe!(
    "tally_shard_apply_increments",
    None,
    "Increments per internal Apply call to a shard (after coalescing)."
);
const READ_COUNTERS: Describe = describe!(
    "tally_shard_read_counters",
    None,
    "Counters per internal Read call to a shard."
);
const CALL_SECONDS: Describe = describe!(
    "tally_shard_call_duration_seconds",
    Some(Unit::Seconds),
    "Time of an internal call to a shard, by node and call (apply, read)."
);
const CALLS_IN_FLIGHT: Describe = describe!(
    "tally_shard_calls_in_flight",
    None,
    "Internal Apply calls in flight to a shard."
);
const QUEUED_INCREMENTS: Describe = describe!(
    "tally_shard_queued_increments",
    None,
    "Increments waiting in this coordinator for a call slot to a shard."
);
const NODE_UP: Describe = describe!(
    "tally_node_up",
    None,
    "1 while this coordinator sees the shard node up, else 0."
);
const FAILOVERS: Describe = describe!(
    "tally_failovers_total",
    None,
    "Writes placed on another node because their stripe's owner could not take them (down, draining, handed over or taken over); a batch counts once per counter."
);
const REDIRECTS: Describe = describe!(
    "tally_redirects_total",
    None,
    "Increments a node gave back and this coordinator sent again, by why."
);
const REPLICATION_LAG: Describe = describe!(
    "tally_replication_lag_seconds",
    Some(Unit::Seconds),
    "Time since the last successful replication round from a node to its replica began."
);

/// Public methods, as `tally_requests_total{method}` names them
/// ([`METHODS`], in this order).
#[derive(Debug, Clone, Copy)]
pub enum Method {
    /// `Counter.Increment`
    Increment,
    /// `Counter.IncrementBatch`
    IncrementBatch,
    /// `Counter.Get`
    Get,
    /// `Counter.GetBatch`
    GetBatch,
    /// `Counter.Delete`
    Delete,
    /// `Admin.Ring`
    Ring,
    /// `Admin.Locate`
    Locate,
    /// `Admin.ClusterStatus`
    ClusterStatus,
    /// `Admin.Drain`
    Drain,
}

/// Each [`Method`]'s name.
pub const METHODS: [&str; 9] = [
    "Increment",
    "IncrementBatch",
    "Get",
    "GetBatch",
    "Delete",
    "Ring",
    "Locate",
    "ClusterStatus",
    "Drain",
];

/// Why a node gave increments back (`tally_redirects_total{reason}`).
#[derive(Debug, Clone, Copy)]
pub enum Redirect {
    /// The node is being drained.
    Draining = 0,
    /// The owner is back from a takeover.
    OwnerBack = 1,
    /// The node awaits the restore of its records.
    AwaitsRestore = 2,
    /// The node's keyed increments follow another membership (a change
    /// is under way).
    Membership = 3,
}

const REDIRECT_REASONS: [&str; 4] = ["draining", "owner_back", "awaits_restore", "membership"];

/// Handles of one public method.
#[derive(Debug)]
struct MethodMetrics {
    ok: Counter,
    seconds: Histogram,
}

/// The coordinator's instruments, kept across reloads.
#[derive(Debug)]
pub struct CoordinatorMetrics {
    registry: Arc<Registry>,
    methods: Vec<MethodMetrics>,
}

/// Handles of one shard node, registered when a membership is built.
#[derive(Debug, Clone)]
pub struct NodeMetrics {
    /// `tally_shard_apply_increments{node}`.
    pub apply_increments: Histogram,
    /// `tally_shard_read_counters{node}`.
    pub read_counters: Histogram,
    /// `tally_shard_call_duration_seconds{node,call="apply"}`.
    pub apply_seconds: Histogram,
    /// `tally_shard_call_duration_seconds{node,call="read"}`.
    pub read_seconds: Histogram,
    /// `tally_shard_calls_in_flight{node}`.
    pub calls_in_flight: Gauge,
    pub(crate) queued: Gauge,
    pub(crate) up: Gauge,
    pub(crate) failovers: Counter,
    redirects: [Counter; 4],
}

impl NodeMetrics {
    /// No-op handles (metrics off).
    pub fn disabled() -> Self {
        CoordinatorMetrics::disabled().node("")
    }

    /// Counts `count` increments the node gave back for `why`.
    pub fn redirected(&self, why: Redirect, count: u64) {
        self.redirects[why as usize].increment(count);
    }
}

impl CoordinatorMetrics {
    /// Registers the coordinator's series in `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        let methods = METHODS
            .iter()
            .map(|&method| MethodMetrics {
                ok: registry.counter(
                    REQUESTS,
                    &[
                        ("method", method.into()),
                        ("code", code_name(tonic::Code::Ok)),
                    ],
                ),
                seconds: registry.histogram(REQUEST_SECONDS, &[("method", method.into())]),
            })
            .collect();
        CoordinatorMetrics { registry, methods }
    }

    /// Metrics off: every handle does nothing.
    pub fn disabled() -> Self {
        CoordinatorMetrics::new(Arc::new(Registry::disabled()))
    }

    /// The registry the series are in.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Counts a public call to `method` that began at `began` and ended
    /// with `code`.
    pub fn observe(&self, method: Method, began: Instant, code: tonic::Code) {
        let method = method as usize;
        let metrics = &self.methods[method];
        metrics.seconds.record(began.elapsed().as_secs_f64());
        if code == tonic::Code::Ok {
            metrics.ok.increment(1);
        } else {
            // Rare: registered when first seen.
            self.registry
                .counter(
                    REQUESTS,
                    &[
                        ("method", METHODS[method].into()),
                        ("code", code_name(code)),
                    ],
                )
                .increment(1);
        }
    }

    /// The handles of node `id`.
    pub fn node(&self, id: &str) -> NodeMetrics {
        let node = || vec![("node", id.to_string())];
        let redirect = |reason: &str| {
            self.registry.counter(
                REDIRECTS,
                &[("node", id.to_string()), ("reason", reason.to_string())],
            )
        };
        NodeMetrics {
            apply_increments: self.registry.histogram(APPLY_INCREMENTS, &node()),
            read_counters: self.registry.histogram(READ_COUNTERS, &node()),
            apply_seconds: self.registry.histogram(
                CALL_SECONDS,
                &[("node", id.to_string()), ("call", "apply".into())],
            ),
            read_seconds: self.registry.histogram(
                CALL_SECONDS,
                &[("node", id.to_string()), ("call", "read".into())],
            ),
            calls_in_flight: self.registry.gauge(CALLS_IN_FLIGHT, &node()),
            queued: self.registry.gauge(QUEUED_INCREMENTS, &node()),
            up: self.registry.gauge(NODE_UP, &node()),
            failovers: self.registry.counter(FAILOVERS, &node()),
            redirects: REDIRECT_REASONS.map(redirect),
        }
    }

    /// Sets what a scrape reads from `cluster`: node health, queues and
    /// replication lag.
    pub fn publish(&self, cluster: &Cluster) {
        for (index, shard) in cluster.shards().iter().enumerate() {
            let node = cluster.node_metrics(index);
            node.up
                .set(if cluster.health(index).up { 1.0 } else { 0.0 });
            node.queued.set(shard.queued_increments() as f64);
        }
        for (origin, replica, since) in cluster.last_rounds() {
            self.registry
                .gauge(
                    REPLICATION_LAG,
                    &[
                        ("origin", cluster.shards()[origin].node_id().to_string()),
                        ("replica", cluster.shards()[replica].node_id().to_string()),
                    ],
                )
                .set(since.as_secs_f64());
        }
    }
}

/// A gRPC code as its canonical name (`OK`, `UNAVAILABLE`, ...).
fn code_name(code: tonic::Code) -> String {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
    .to_string()
}
