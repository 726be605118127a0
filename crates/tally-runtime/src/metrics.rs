//! Prometheus metrics of one daemon, served on `GET /metrics` of their own
//! port (`metrics_listen`).
//!
//! Each daemon owns a [`Registry`]: its own recorder, not the `metrics`
//! crate's global one, because `tallyctl dev` and the tests run several
//! daemons in one process and each must show only its own series. A daemon
//! registers its instruments once, at start, and keeps the handles, so
//! recording on the hot path is an atomic add (a counter or gauge) or a push
//! into a lock-free bucket (a histogram), with no lookup by name. Without
//! `metrics_listen` every handle is a no-op ([`Registry::disabled`]).
//!
//! Exposition is the exporter crate's (`metrics-exporter-prometheus`);
//! process CPU, memory and file descriptors come from `metrics-process`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Bucket bounds of every `_seconds` histogram: 50 µs to 10 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Bucket bounds of every histogram of sizes (increments per call, entries
/// per group commit, counters per read): powers of 4 up to 65,536.
pub const SIZE_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1_024.0, 4_096.0, 16_384.0, 65_536.0,
];

/// How often histograms are folded into their buckets between scrapes, so
/// that what they hold stays bounded.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// One daemon's metrics.
pub struct Registry {
    /// `None`: metrics are off; every handle is a no-op.
    exporter: Option<Exporter>,
}

struct Exporter {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("enabled", &self.exporter.is_some())
            .finish()
    }
}

/// A metric's name, unit and help text, registered once.
#[derive(Debug, Clone, Copy)]
pub struct Describe {
    /// The full name, `tally_` prefixed, with its unit suffix.
    pub name: &'static str,
    /// Its base unit, if any.
    pub unit: Option<Unit>,
    /// The HELP line.
    pub help: &'static str,
}

impl Describe {
    /// A metric named `name` (with its unit suffix) in `unit`, whose HELP
    /// line is `help`.
    pub const fn new(name: &'static str, unit: Option<Unit>, help: &'static str) -> Self {
        Describe { name, unit, help }
    }
}

impl Registry {
    /// Metrics of daemon `daemon` (`coordinator` or `shard`), exported.
    pub fn enabled(daemon: &'static str) -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|builder| builder.set_buckets(SIZE_BUCKETS))
            .expect("bucket bounds are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let process = metrics_process::Collector::new("");
        metrics::with_local_recorder(&recorder, || process.describe());
        let registry = Registry {
            exporter: Some(Exporter {
                recorder,
                handle,
                process,
            }),
        };
        registry
            .gauge(
                Describe {
                    name: "tally_build_info",
                    unit: None,
                    help: "Always 1; its labels name the daemon and its version.",
                },
                &[
                    ("daemon", daemon.to_string()),
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                ],
            )
            .set(1.0);
        registry
    }

    /// Metrics off: every handle does nothing.
    pub fn disabled() -> Self {
        Registry { exporter: None }
    }

    /// Whether metrics are exported.
    pub fn is_enabled(&self) -> bool {
        self.exporter.is_some()
    }

    /// The counter `describe.name` with `labels`.
    pub fn counter(&self, describe: Describe, labels: &[(&'static str, String)]) -> Counter {
        self.register(describe, labels, |recorder, key, metadata| {
            recorder.describe_counter(describe.name.into(), describe.unit, describe.help.into());
            recorder.register_counter(key, metadata)
        })
        .unwrap_or_else(Counter::noop)
    }

    /// The gauge `describe.name` with `labels`.
    pub fn gauge(&self, describe: Describe, labels: &[(&'static str, String)]) -> Gauge {
        self.register(describe, labels, |recorder, key, metadata| {
            recorder.describe_gauge(describe.name.into(), describe.unit, describe.help.into());
            recorder.register_gauge(key, metadata)
        })
        .unwrap_or_else(Gauge::noop)
    }

    /// The histogram `describe.name` with `labels`: bucketed by
    /// [`SECONDS_BUCKETS`] if its name ends in `_seconds`, else by
    /// [`SIZE_BUCKETS`].
    pub fn histogram(&self, describe: Describe, labels: &[(&'static str, String)]) -> Histogram {
        self.register(describe, labels, |recorder, key, metadata| {
            recorder.describe_histogram(describe.name.into(), describe.unit, describe.help.into());
            recorder.register_histogram(key, metadata)
        })
        .unwrap_or_else(Histogram::noop)
    }

    fn register<T>(
        &self,
        describe: Describe,
        labels: &[(&'static str, String)],
        register: impl FnOnce(&PrometheusRecorder, &Key, &Metadata<'static>) -> T,
    ) -> Option<T> {
        let exporter = self.exporter.as_ref()?;
        let labels: Vec<Label> = labels
            .iter()
            .map(|(name, value)| Label::new(*name, value.clone()))
            .collect();
        let key = Key::from_parts(describe.name, labels);
        let metadata = Metadata::new(module_path!(), metrics::Level::INFO, None);
        Some(register(&exporter.recorder, &key, &metadata))
    }

    /// Every series now, in the Prometheus text format (process figures
    /// read first). Empty when metrics are off.
    pub fn render(&self) -> String {
        let Some(exporter) = &self.exporter else {
            return String::new();
        };
        metrics::with_local_recorder(&exporter.recorder, || exporter.process.collect());
        exporter.handle.render()
    }
}

/// Serves `registry` on `GET /metrics` at `listener` (over TLS with `tls`)
/// until `shutdown` completes. `refresh` runs before each scrape: it sets
/// the gauges read from the daemon's state rather than counted as things
/// happen.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<crate::tls::ServerTls>>,
    registry: Arc<Registry>,
    refresh: impl Fn() + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    use axum::routing::get;

    if let Some(exporter) = &registry.exporter {
        let handle = exporter.handle.clone();
        let upkeep = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                ticks.tick().await;
                handle.run_upkeep();
            }
        });
        // Ends with the server (the task holds only a handle).
        let _upkeep = crate::process::AbortOnDrop(upkeep);
        let refresh = Arc::new(refresh);
        let app = axum::Router::new().route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                let refresh = refresh.clone();
                async move {
                    // Off the async workers: a refresh may walk a shard's
                    // entries.
                    let text = tokio::task::spawn_blocking(move || {
                        refresh();
                        registry.render()
                    })
                    .await
                    .unwrap_or_default();
                    (
                        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                        text,
                    )
                }
            }),
        );
        let incoming = crate::tls::incoming(listener, tls, MAX_METRICS_CONNECTIONS);
        axum::serve(Listener(incoming), app)
            .with_graceful_shutdown(shutdown)
            .await
    } else {
        Ok(())
    }
}

/// Connections the metrics port holds at once: a few Prometheus servers and
/// `tallyctl top`s scrape it, and a flood of connections must not take
/// the file descriptors the daemon's real work needs.
const MAX_METRICS_CONNECTIONS: usize = 16;

/// The metrics server's connections, plaintext or TLS, as axum takes them.
struct Listener(crate::tls::Incoming);

impl axum::serve::Listener for Listener {
    type Io = crate::tls::Connection;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use futures::StreamExt;
        use tonic::transport::server::Connected;
        loop {
            match self.0.next().await {
                Some(Ok(connection)) => {
                    let peer = connection.connect_info().remote_addr();
                    let peer = peer.unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
                    return (connection, peer);
                }
                // `Incoming` pauses after accept errors itself.
                Some(Err(error)) => tracing::debug!("metrics: cannot accept: {error}"),
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// Binds the metrics port and prints `metrics on http://ADDRESS/metrics`
/// (`https` with `tls`) on stdout (a daemon prints it before its
/// `listening on` line).
pub async fn bind(
    address: std::net::SocketAddr,
    tls: bool,
) -> std::io::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| {
            std::io::Error::new(
                error.kind(),
                format!("cannot listen on {address} for metrics: {error}"),
            )
        })?;
    let scheme = if tls { "https" } else { "http" };
    println!("metrics on {scheme}://{}/metrics", listener.local_addr()?);
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLS: Describe = Describe {
        name: "tally_test_calls_total",
        unit: None,
        help: "Calls.",
    };
    const WAIT: Describe = Describe {
        name: "tally_test_wait_seconds",
        unit: Some(Unit::Seconds),
        help: "Waits.",
    };
    const SIZE: Describe = Describe {
        name: "tally_test_size",
        unit: None,
        help: "Sizes.",
    };

    #[test]
    fn each_registry_renders_only_its_own_series_with_buckets() {
        let one = Registry::enabled("shard");
        let two = Registry::enabled("coordinator");
        one.counter(CALLS, &[("method", "Get".into())]).increment(3);
        one.histogram(WAIT, &[]).record(0.003);
        one.histogram(SIZE, &[]).record(100.0);
        two.counter(CALLS, &[("method", "Get".into())]).increment(5);
        let text = one.render();
        assert!(
            text.contains("tally_test_calls_total{method=\"Get\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("tally_test_wait_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tally_test_size_bucket{le=\"256\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# HELP tally_test_calls_total Calls."),
            "{text}"
        );
        assert!(text.contains("tally_build_info{daemon=\"shard\""), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(two
            .render()
            .contains("tally_test_calls_total{method=\"Get\"} 5"));
        let off = Registry::disabled();
        off.counter(CALLS, &[]).increment(1);
        assert_eq!(off.render(), "");
    }
}
