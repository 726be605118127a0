//! The coordinator's Prometheus series (`metrics_listen`). Public calls,
//! internal calls, failovers and redirects are counted as they happen,
//! through handles registered once (per method at start, per node when a
//! membership is built; a non-OK code when first answered), so the hot
//! path does no lookup by name. Health, pending increments and replication
//! lag are read from the cluster when scraped.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, Unit};
use parking_lot::Mutex;
use tally_runtime::metrics::{Describe, Registry};

use crate::cluster::Cluster;

const REQUESTS: Describe = Describe::new(
    "tally_requests_total",
    None,
    "Public gRPC calls answered, by method and status code.",
);
const REQUEST_SECONDS: Describe = Describe::new(
    "tally_request_duration_seconds",
    Some(Unit::Seconds),
    "Time to answer a public gRPC call, by method.",
);
const APPLY_INCREMENTS: Describe = Describe::new(
    "tally_shard_apply_increments",
    None,
    "Increments per internal Apply call to a shard (after coalescing).",
);
const READ_COUNTERS: Describe = Describe::new(
    "tally_shard_read_counters",
    None,
    "Counters per internal Read call to a shard.",
);
const CALL_SECONDS: Describe = Describe::new(
    "tally_shard_call_duration_seconds",
    Some(Unit::Seconds),
    "Time of an internal call to a shard, by node and call (apply, read).",
);
const CALLS_IN_FLIGHT: Describe = Describe::new(
    "tally_shard_calls_in_flight",
    None,
    "Internal Apply calls in flight to a shard.",
);
const PENDING_INCREMENTS: Describe = Describe::new(
    "tally_shard_pending_increments",
    None,
    "Increments this coordinator holds for a shard: queued for a call slot, or in an Apply call not answered yet."
);
const NODE_UP: Describe = Describe::new(
    "tally_node_up",
    None,
    "1 while this coordinator sees the shard node up, else 0.",
);
const FAILOVERS: Describe = Describe::new(
    "tally_failovers_total",
    None,
    "Writes placed on another node because their stripe's owner could not take them (down, draining, handed over or taken over): once per increment, but once per counter for a batch's unkeyed increments."
);
const REDIRECTS: Describe = Describe::new(
    "tally_redirects_total",
    None,
    "Increments a node gave back and this coordinator sent again, by why.",
);
const REPLICATION_LAG: Describe = Describe::new(
    "tally_replication_lag_seconds",
    Some(Unit::Seconds),
    "Time since the last successful replication round from a node to its replica began.",
);

const LIMITED: Describe = Describe::new(
    "tally_limited_increments_total",
    None,
    "Increments with a limit decided, by outcome: applied, or refused by the limit.",
);
const LIMIT_GROUP: Describe = Describe::new(
    "tally_limit_group_size",
    None,
    "Increments with a limit decided on one read of their counter's total (a group).",
);

/// Public methods, as `tally_requests_total{method}` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

impl Method {
    /// Every method, in order.
    pub const ALL: [Method; 9] = [
        Method::Increment,
        Method::IncrementBatch,
        Method::Get,
        Method::GetBatch,
        Method::Delete,
        Method::Ring,
        Method::Locate,
        Method::ClusterStatus,
        Method::Drain,
    ];

    /// Its name, as the series label has it.
    pub const fn name(self) -> &'static str {
        match self {
            Method::Increment => "Increment",
            Method::IncrementBatch => "IncrementBatch",
            Method::Get => "Get",
            Method::GetBatch => "GetBatch",
            Method::Delete => "Delete",
            Method::Ring => "Ring",
            Method::Locate => "Locate",
            Method::ClusterStatus => "ClusterStatus",
            Method::Drain => "Drain",
        }
    }
}

/// Why a node gave increments back (`tally_redirects_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect {
    /// The node is being drained.
    Draining,
    /// The owner is back from a takeover.
    OwnerBack,
    /// The node awaits the restore of its records.
    AwaitsRestore,
    /// The node's keyed increments follow another membership (a change
    /// is under way).
    Membership,
}

impl Redirect {
    const ALL: [Redirect; 4] = [
        Redirect::Draining,
        Redirect::OwnerBack,
        Redirect::AwaitsRestore,
        Redirect::Membership,
    ];

    /// Its name, as the series label has it.
    pub const fn name(self) -> &'static str {
        match self {
            Redirect::Draining => "draining",
            Redirect::OwnerBack => "owner_back",
            Redirect::AwaitsRestore => "awaits_restore",
            Redirect::Membership => "membership",
        }
    }
}

/// Handles of one public method: `OK` registered at start, each other code
/// when first answered.
#[derive(Debug)]
struct MethodMetrics {
    seconds: Histogram,
    /// By `tonic::Code as usize` (0 to 16).
    codes: [OnceLock<Counter>; 17],
}

/// The coordinator's instruments, kept across reloads.
#[derive(Debug)]
pub struct CoordinatorMetrics {
    registry: Arc<Registry>,
    /// By `Method as usize`.
    methods: Vec<MethodMetrics>,
    /// Limited increments: applied, refused, and per group.
    limited: [Counter; 2],
    limit_group: Histogram,
    /// The nodes and `(origin, replica)` pairs the last scrape showed: a
    /// later scrape that no longer has one sets its gauges to NaN rather
    /// than leaving its last value (a node removed, a pair no longer
    /// replicating since a reload).
    published: Mutex<Published>,
}

#[derive(Debug, Default)]
struct Published {
    nodes: Vec<(String, NodeGauges)>,
    lags: Vec<((String, String), Gauge)>,
}

/// The gauges of a node a scrape sets (the in-flight gauge is counted up
/// and down by calls, and drops to 0 by itself).
#[derive(Debug, Clone)]
struct NodeGauges {
    up: Gauge,
    pending: Gauge,
}

/// Handles of one shard node, registered when a membership is built.
#[derive(Debug)]
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
    pending: Gauge,
    up: Gauge,
    pub(crate) failovers: Counter,
    redirects: [Counter; 4],
}

impl NodeMetrics {
    /// No-op handles (metrics off).
    pub fn disabled() -> Self {
        NodeMetrics {
            apply_increments: Histogram::noop(),
            read_counters: Histogram::noop(),
            apply_seconds: Histogram::noop(),
            read_seconds: Histogram::noop(),
            calls_in_flight: Gauge::noop(),
            pending: Gauge::noop(),
            up: Gauge::noop(),
            failovers: Counter::noop(),
            redirects: std::array::from_fn(|_| Counter::noop()),
        }
    }

    /// Counts `count` increments the node gave back for `why`.
    pub fn redirected(&self, why: Redirect, count: u64) {
        self.redirects[why as usize].increment(count);
    }

    fn gauges(&self) -> NodeGauges {
        NodeGauges {
            up: self.up.clone(),
            pending: self.pending.clone(),
        }
    }
}

impl CoordinatorMetrics {
    /// Registers the coordinator's series in `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        let methods = Method::ALL
            .iter()
            .map(|method| {
                let codes: [OnceLock<Counter>; 17] = Default::default();
                let _ = codes[tonic::Code::Ok as usize].set(registry.counter(
                    REQUESTS,
                    &[
                        ("method", method.name().into()),
                        ("code", code_name(tonic::Code::Ok)),
                    ],
                ));
                MethodMetrics {
                    seconds: registry
                        .histogram(REQUEST_SECONDS, &[("method", method.name().into())]),
                    codes,
                }
            })
            .collect();
        let limited = ["applied", "refused"]
            .map(|outcome| registry.counter(LIMITED, &[("outcome", outcome.into())]));
        CoordinatorMetrics {
            limit_group: registry.histogram(LIMIT_GROUP, &[]),
            limited,
            registry,
            methods,
            published: Mutex::default(),
        }
    }

    /// Metrics off: every handle does nothing.
    pub fn disabled() -> Self {
        CoordinatorMetrics::new(Arc::new(Registry::disabled()))
    }

    /// Counts a group of limited increments decided on one read: how many
    /// were applied and how many the limit refused.
    pub fn limit_group(&self, applied: u64, refused: u64) {
        self.limit_group.record((applied + refused) as f64);
        self.limited[0].increment(applied);
        self.limited[1].increment(refused);
    }

    /// The registry the series are in.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// A public call to `method`, beginning now: counted when finished, or
    /// as `CANCELLED` if dropped first (the client went away, and the
    /// server dropped its handler).
    pub fn call(&self, method: Method) -> Call<'_> {
        Call {
            metrics: self,
            method,
            began: Instant::now(),
            finished: false,
            // `debug`: built only while traces are exported (see
            // `tally_runtime::traces`) or `RUST_LOG` asks for debug lines.
            span: tracing::debug_span!(
                "call",
                otel.name = method.name(),
                counter = tracing::field::Empty,
                otel.status_code = tracing::field::Empty
            ),
        }
    }

    /// Counts a public call to `method` that began at `began` and ended
    /// with `code`.
    pub fn observe(&self, method: Method, began: Instant, code: tonic::Code) {
        let metrics = &self.methods[method as usize];
        metrics.seconds.record(began.elapsed().as_secs_f64());
        metrics.codes[code as usize]
            .get_or_init(|| {
                self.registry.counter(
                    REQUESTS,
                    &[("method", method.name().into()), ("code", code_name(code))],
                )
            })
            .increment(1);
    }

    /// The handles of node `id`.
    pub fn node(&self, id: &str) -> NodeMetrics {
        let node = || vec![("node", id.to_string())];
        let call = |call: &str| vec![("node", id.to_string()), ("call", call.to_string())];
        NodeMetrics {
            apply_increments: self.registry.histogram(APPLY_INCREMENTS, &node()),
            read_counters: self.registry.histogram(READ_COUNTERS, &node()),
            apply_seconds: self.registry.histogram(CALL_SECONDS, &call("apply")),
            read_seconds: self.registry.histogram(CALL_SECONDS, &call("read")),
            calls_in_flight: self.registry.gauge(CALLS_IN_FLIGHT, &node()),
            pending: self.registry.gauge(PENDING_INCREMENTS, &node()),
            up: self.registry.gauge(NODE_UP, &node()),
            failovers: self.registry.counter(FAILOVERS, &node()),
            redirects: Redirect::ALL.map(|why| {
                self.registry.counter(
                    REDIRECTS,
                    &[("node", id.to_string()), ("reason", why.name().to_string())],
                )
            }),
        }
    }

    /// Sets what a scrape reads from `cluster`: node health, pending
    /// increments and replication lag.
    pub fn publish(&self, cluster: &Cluster) {
        let mut nodes = Vec::new();
        for (index, shard) in cluster.shards().iter().enumerate() {
            let node = shard.metrics();
            node.up
                .set(if cluster.health(index).up { 1.0 } else { 0.0 });
            node.pending.set(shard.pending_increments() as f64);
            nodes.push((shard.node_id().to_string(), node.gauges()));
        }
        let mut lags = Vec::new();
        for (origin, replica, since) in cluster.last_rounds() {
            let pair = (
                cluster.shards()[origin].node_id().to_string(),
                cluster.shards()[replica].node_id().to_string(),
            );
            let gauge = self.registry.gauge(
                REPLICATION_LAG,
                &[("origin", pair.0.clone()), ("replica", pair.1.clone())],
            );
            gauge.set(since.as_secs_f64());
            lags.push((pair, gauge));
        }
        let mut published = self.published.lock();
        for (id, gauges) in &published.nodes {
            if !nodes.iter().any(|(now, _)| now == id) {
                for gauge in [&gauges.up, &gauges.pending] {
                    gauge.set(f64::NAN);
                }
            }
        }
        for (pair, gauge) in &published.lags {
            if !lags.iter().any(|(now, _)| now == pair) {
                gauge.set(f64::NAN);
            }
        }
        *published = Published { nodes, lags };
    }
}

/// A public call being answered ([`CoordinatorMetrics::call`]).
#[derive(Debug)]
pub struct Call<'a> {
    metrics: &'a CoordinatorMetrics,
    method: Method,
    began: Instant,
    finished: bool,
    span: tracing::Span,
}

impl Call<'_> {
    /// The call's span, named after the method, with a `counter` field
    /// the handler records where the call has one.
    pub fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    /// Counts the call with the code `result` answers.
    pub fn finish<T>(mut self, result: &Result<T, tonic::Status>) {
        self.finished = true;
        let code = result
            .as_ref()
            .map_or_else(tonic::Status::code, |_| tonic::Code::Ok);
        if code != tonic::Code::Ok {
            self.span.record("otel.status_code", "ERROR");
        }
        self.metrics.observe(self.method, self.began, code);
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics
                .observe(self.method, self.began, tonic::Code::Cancelled);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_dropped_before_its_answer_counts_as_cancelled() {
        let metrics = CoordinatorMetrics::new(Arc::new(Registry::enabled("coordinator")));
        metrics
            .call(Method::Get)
            .finish(&Ok::<(), tonic::Status>(()));
        metrics
            .call(Method::Get)
            .finish(&Err::<(), _>(tonic::Status::unavailable("down")));
        drop(metrics.call(Method::Get));
        let text = metrics.registry().render();
        for code in ["OK", "UNAVAILABLE", "CANCELLED"] {
            let series = format!("tally_requests_total{{method=\"Get\",code=\"{code}\"}} 1");
            assert!(text.contains(&series), "{series} in:\n{text}");
        }
        assert!(
            text.contains("tally_request_duration_seconds_count{method=\"Get\"} 3"),
            "{text}"
        );
    }
}
