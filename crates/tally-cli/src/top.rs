//! `tallyctl top`: a live view of a cluster, like `redis-cli --stat` or
//! `htop`, drawn with ratatui.
//!
//! Where it reads: `ClusterStatus` names the nodes and where every daemon
//! serves its Prometheus metrics (an unspecified IP is reached at the host
//! the daemon is called at); every interval it scrapes the coordinator's and
//! each shard's `/metrics` and shows rates over the last interval. The
//! status call walks every entry of every node, so it is asked again only
//! every [`DISCOVER_EVERY`] (a node added by a reload shows up then).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use prometheus_parse::{Sample, Scrape, Value};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::Frame;
use tally_proto::pb;
use tally_proto::pb::admin_client::AdminClient;
use tokio::sync::mpsc;

/// How often the node list and metrics addresses are asked again.
const DISCOVER_EVERY: Duration = Duration::from_secs(10);

/// What `tallyctl top` watches, and how.
#[derive(Debug, Clone)]
pub struct TopOptions {
    /// The coordinator, and how to reach it. With TLS, the metrics
    /// endpoints are scraped over https, trusting the same CA.
    pub access: crate::client::Access,
    /// Time between refreshes.
    pub interval: Duration,
    /// Deadline of each call and scrape.
    pub timeout: Duration,
}

/// One daemon's metrics endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    id: String,
    /// `http://host:port/metrics`, if it serves metrics.
    metrics: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct Targets {
    coordinator: Option<String>,
    nodes: Vec<Node>,
}

/// One round of scrapes.
struct Round {
    at: Instant,
    coordinator: Option<Scrape>,
    /// By node id.
    shards: HashMap<String, Scrape>,
}

/// Runs the view until `q`, Esc or Ctrl-C.
pub async fn run(options: TopOptions) -> anyhow::Result<()> {
    let mut http = reqwest::Client::builder().timeout(options.timeout);
    if let Some(ca) = options.access.ca_cert.as_deref() {
        let mut tls = tally_runtime::tls::client_config_trusting(ca)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        http = http.use_preconfigured_tls(tls);
    }
    let http = http.build().context("cannot build an HTTP client")?;
    let scheme = if options.access.tls() {
        "https"
    } else {
        "http"
    };
    let mut targets = discover(&options, scheme).await?;
    let mut discovered = Instant::now();
    let mut last = scrape_all(&http, &targets).await;
    let mut view = View::new(&targets, None, &last);

    // Keys come from a blocking reader thread; drawing and scraping stay
    // on this task.
    let (keys, mut pressed) = mpsc::unbounded_channel();
    let reader = std::thread::spawn(move || read_keys(keys));
    let mut terminal = ratatui::init();
    let mut ticks = tokio::time::interval(options.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let outcome = loop {
        if let Err(error) = terminal.draw(|frame| view.draw(frame)) {
            break Err(error.into());
        }
        tokio::select! {
            _ = ticks.tick() => {
                if discovered.elapsed() >= DISCOVER_EVERY {
                    if let Ok(found) = discover(&options, scheme).await {
                        targets = found;
                    }
                    discovered = Instant::now();
                }
                let now = scrape_all(&http, &targets).await;
                view = View::new(&targets, Some(&last), &now);
                last = now;
            }
            key = pressed.recv() => match key {
                Some(Quit) | None => break Ok(()),
            },
        }
    };
    ratatui::restore();
    drop(pressed);
    // The reader notices the closed channel at its next poll.
    let _ = reader.join();
    outcome
}

/// A key that ends the view.
struct Quit;

fn read_keys(keys: mpsc::UnboundedSender<Quit>) {
    while !keys.is_closed() {
        match event::poll(Duration::from_millis(100)) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(_) => break,
        }
        let Ok(Event::Key(key)) = event::read() else {
            continue;
        };
        let quit = key.kind == KeyEventKind::Press
            && (matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
                || (key.code == KeyCode::Char('c')
                    && key.modifiers.contains(KeyModifiers::CONTROL)));
        if quit {
            let _ = keys.send(Quit);
            break;
        }
    }
}

/// The nodes and every metrics endpoint, from `ClusterStatus`.
async fn discover(options: &TopOptions, scheme: &str) -> anyhow::Result<Targets> {
    let status = AdminClient::new(options.access.connect().await?)
        .cluster_status(tally_proto::timed(
            pb::ClusterStatusRequest {},
            options.timeout,
        ))
        .await
        .map_err(|status| anyhow::anyhow!("ClusterStatus: {}", status.message()))?
        .into_inner();
    let coordinator_host = host_of(&options.access.endpoint);
    Ok(Targets {
        coordinator: metrics_url(scheme, &status.metrics_address, &coordinator_host),
        nodes: status
            .nodes
            .iter()
            .map(|node| Node {
                id: node.id.clone(),
                metrics: metrics_url(scheme, &node.metrics_address, &host_of(&node.address)),
            })
            .collect(),
    })
}

/// The host part of `http://host:port`, `host:port` or `[v6]:port`.
fn host_of(address: &str) -> String {
    let address = address.split("://").last().unwrap_or(address);
    let address = address.split('/').next().unwrap_or(address);
    match address.rsplit_once(':') {
        Some((host, _)) => host.to_string(),
        None => address.to_string(),
    }
}

/// `SCHEME://ADDRESS/metrics` for a bound `address`, an unspecified IP
/// replaced by `host` (the one the daemon is reached at). `None`: empty.
fn metrics_url(scheme: &str, address: &str, host: &str) -> Option<String> {
    let bound: SocketAddr = address.parse().ok()?;
    Some(if bound.ip().is_unspecified() {
        format!("{scheme}://{host}:{}/metrics", bound.port())
    } else {
        format!("{scheme}://{bound}/metrics")
    })
}

async fn scrape_all(http: &reqwest::Client, targets: &Targets) -> Round {
    let coordinator = async {
        match &targets.coordinator {
            Some(url) => scrape(http, url).await,
            None => None,
        }
    };
    let shards = futures::future::join_all(targets.nodes.iter().map(|node| async move {
        let scraped = match &node.metrics {
            Some(url) => scrape(http, url).await,
            None => None,
        };
        scraped.map(|scrape| (node.id.clone(), scrape))
    }));
    let (coordinator, shards) = tokio::join!(coordinator, shards);
    Round {
        at: Instant::now(),
        coordinator,
        shards: shards.into_iter().flatten().collect(),
    }
}

async fn scrape(http: &reqwest::Client, url: &str) -> Option<Scrape> {
    let text = http.get(url).send().await.ok()?.text().await.ok()?;
    Scrape::parse(text.lines().map(|line| Ok(line.to_string()))).ok()
}

/// The value of the first sample of `metric` whose labels include `labels`.
fn find<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<&'a Value> {
    scrape
        .samples
        .iter()
        .find(|sample| matches(sample, metric, labels))
        .map(|sample| &sample.value)
}

fn matches(sample: &Sample, metric: &str, labels: &[(&str, &str)]) -> bool {
    sample.metric == metric
        && labels
            .iter()
            .all(|(name, value)| sample.labels.get(name) == Some(*value))
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
        _ => None,
    }
}

/// `metric`'s value in `scrape`.
fn value(scrape: Option<&Scrape>, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    find(scrape?, metric, labels).and_then(number)
}

/// The sum over every sample of `metric` whose labels include `labels`.
fn total(scrape: Option<&Scrape>, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape = scrape?;
    let mut values = scrape
        .samples
        .iter()
        .filter(|sample| matches(sample, metric, labels))
        .filter_map(|sample| number(&sample.value))
        .peekable();
    values.peek()?;
    Some(values.sum())
}

/// The per-second rate of a counter between two scrapes.
fn rate(before: Option<f64>, after: Option<f64>, seconds: f64) -> Option<f64> {
    let (before, after) = (before?, after?);
    (seconds > 0.0 && after >= before).then(|| (after - before) / seconds)
}

/// Quantile `q` of the samples a histogram took between two scrapes,
/// interpolated within its bucket as Prometheus's `histogram_quantile`
/// does. `None`: no sample in between.
fn quantile(q: f64, before: Option<&Value>, after: Option<&Value>) -> Option<f64> {
    let Some(Value::Histogram(after)) = after else {
        return None;
    };
    let before: HashMap<u64, f64> = match before {
        Some(Value::Histogram(before)) => before
            .iter()
            .map(|bucket| (bucket.less_than.to_bits(), bucket.count))
            .collect(),
        _ => HashMap::new(),
    };
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .map(|bucket| {
            let earlier = before
                .get(&bucket.less_than.to_bits())
                .copied()
                .unwrap_or(0.0);
            (bucket.less_than, bucket.count - earlier)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count = buckets.last()?.1;
    if count <= 0.0 {
        return None;
    }
    let rank = q * count;
    let mut lower = (0.0, 0.0);
    for &(bound, cumulative) in &buckets {
        if cumulative >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let width = cumulative - lower.1;
            let within = if width > 0.0 {
                (rank - lower.1) / width
            } else {
                1.0
            };
            return Some(lower.0 + (bound - lower.0) * within);
        }
        lower = (bound, cumulative);
    }
    Some(lower.0)
}

/// One node's line.
#[derive(Debug, Clone, PartialEq)]
struct NodeLine {
    id: String,
    health: String,
    increments_per_sec: Option<f64>,
    reads_per_sec: Option<f64>,
    p99_seconds: Option<f64>,
    per_commit: Option<f64>,
    entries: Option<f64>,
    memory_bytes: Option<f64>,
}

/// What one frame shows.
#[derive(Debug, Clone, PartialEq)]
struct View {
    calls_per_sec: Option<f64>,
    errors_per_sec: Option<f64>,
    increment_p99: Option<f64>,
    nodes: Vec<NodeLine>,
    coordinator_seen: bool,
}

impl View {
    /// Rates between `before` (none at the first frame) and `now`.
    fn new(targets: &Targets, before: Option<&Round>, now: &Round) -> View {
        let seconds = before.map_or(0.0, |before| (now.at - before.at).as_secs_f64());
        let coordinator_now = now.coordinator.as_ref();
        let coordinator_before = before.and_then(|before| before.coordinator.as_ref());
        let counter_rate = |metric: &str, labels: &[(&str, &str)]| {
            rate(
                total(coordinator_before, metric, labels),
                total(coordinator_now, metric, labels),
                seconds,
            )
        };
        let all_calls = counter_rate("tally_requests_total", &[]);
        let ok_calls = counter_rate("tally_requests_total", &[("code", "OK")]);
        let histogram = |scrape: Option<&Scrape>, metric: &str, labels: &[(&str, &str)]| {
            scrape
                .and_then(|scrape| find(scrape, metric, labels))
                .cloned()
        };
        let nodes = targets
            .nodes
            .iter()
            .map(|node| {
                let id = node.id.as_str();
                let on_node = [("node", id)];
                let shard_now = now.shards.get(id);
                let shard_before = before.and_then(|before| before.shards.get(id));
                let shard_rate = |metric: &str| {
                    rate(
                        value(shard_before, metric, &[]),
                        value(shard_now, metric, &[]),
                        seconds,
                    )
                };
                let increments = shard_rate("tally_shard_increments_applied_total");
                let commits = shard_rate("tally_shard_group_commit_seconds_count");
                let apply = [("node", id), ("call", "apply")];
                NodeLine {
                    id: node.id.clone(),
                    health: match value(coordinator_now, "tally_node_up", &on_node) {
                        Some(up) if up >= 1.0 => "up".into(),
                        Some(_) => "DOWN".into(),
                        None => "?".into(),
                    },
                    increments_per_sec: increments,
                    reads_per_sec: counter_rate("tally_shard_read_counters_count", &on_node),
                    p99_seconds: quantile(
                        0.99,
                        histogram(
                            coordinator_before,
                            "tally_shard_call_duration_seconds",
                            &apply,
                        )
                        .as_ref(),
                        histogram(coordinator_now, "tally_shard_call_duration_seconds", &apply)
                            .as_ref(),
                    ),
                    per_commit: match (increments, commits) {
                        (Some(increments), Some(commits)) if commits > 0.0 => {
                            Some(increments / commits)
                        }
                        _ => None,
                    },
                    entries: value(shard_now, "tally_shard_entries", &[]),
                    memory_bytes: value(shard_now, "process_resident_memory_bytes", &[]),
                }
            })
            .collect();
        View {
            calls_per_sec: all_calls,
            errors_per_sec: match (all_calls, ok_calls) {
                (Some(all), Some(ok)) => Some((all - ok).max(0.0)),
                (Some(all), None) => Some(all),
                _ => None,
            },
            increment_p99: quantile(
                0.99,
                histogram(
                    coordinator_before,
                    "tally_request_duration_seconds",
                    &[("method", "Increment")],
                )
                .as_ref(),
                histogram(
                    coordinator_now,
                    "tally_request_duration_seconds",
                    &[("method", "Increment")],
                )
                .as_ref(),
            ),
            nodes,
            coordinator_seen: now.coordinator.is_some(),
        }
    }

    fn draw(&self, frame: &mut Frame) {
        let [head, body, foot] = Layout::vertical([
            Constraint::Length(3),
            Constraint::Min(3),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        let summary = if self.coordinator_seen {
            format!(
                "calls/s {}   errors/s {}   Increment p99 {}",
                figure(self.calls_per_sec),
                figure(self.errors_per_sec),
                duration(self.increment_p99),
            )
        } else {
            "coordinator metrics unreachable (is metrics_listen set?)".to_string()
        };
        frame.render_widget(
            Paragraph::new(summary).block(Block::bordered().title(" tally top ")),
            head,
        );
        let header = Row::new([
            "NODE",
            "HEALTH",
            "INCR/S",
            "READS/S",
            "APPLY P99",
            "INCR/COMMIT",
            "ENTRIES",
            "RSS",
        ])
        .style(Style::default().add_modifier(Modifier::BOLD));
        let rows = self.nodes.iter().map(|node| {
            Row::new([
                node.id.clone(),
                node.health.clone(),
                figure(node.increments_per_sec),
                figure(node.reads_per_sec),
                duration(node.p99_seconds),
                node.per_commit.map_or("-".into(), |v| format!("{v:.1}")),
                figure(node.entries),
                node.memory_bytes.map_or("-".into(), |bytes| {
                    format!("{:.0} MiB", bytes / 1_048_576.0)
                }),
            ])
        });
        let widths = [
            Constraint::Length(12),
            Constraint::Length(7),
            Constraint::Length(10),
            Constraint::Length(9),
            Constraint::Length(10),
            Constraint::Length(12),
            Constraint::Length(10),
            Constraint::Length(9),
        ];
        frame.render_widget(
            Table::new(rows, widths)
                .header(header)
                .block(Block::bordered().title(" nodes ")),
            body,
        );
        frame.render_widget(Line::from("q quits"), foot);
    }
}

/// A rate or count, `-` when unknown.
fn figure(value: Option<f64>) -> String {
    match value {
        None => "-".into(),
        Some(v) if v >= 10_000_000.0 => format!("{:.1}M", v / 1_000_000.0),
        Some(v) if v >= 100_000.0 => format!("{:.0}k", v / 1_000.0),
        Some(v) => format!("{v:.0}"),
    }
}

/// Seconds as ms or µs, `-` when unknown.
fn duration(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s >= 1.0 => format!("{s:.2} s"),
        Some(s) if s >= 0.001 => format!("{:.1} ms", s * 1_000.0),
        Some(s) => format!("{:.0} µs", s * 1_000_000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_parse::HistogramCount;

    fn histogram(counts: &[(f64, f64)]) -> Value {
        Value::Histogram(
            counts
                .iter()
                .map(|&(less_than, count)| HistogramCount { less_than, count })
                .collect(),
        )
    }

    #[test]
    fn quantiles_are_of_the_samples_between_two_scrapes() {
        let before = histogram(&[(0.001, 10.0), (0.01, 10.0), (f64::INFINITY, 10.0)]);
        // 100 new samples: 90 under 1 ms, 10 between 1 and 10 ms.
        let after = histogram(&[(0.001, 100.0), (0.01, 110.0), (f64::INFINITY, 110.0)]);
        let p50 = quantile(0.5, Some(&before), Some(&after)).unwrap();
        assert!((p50 - 0.001 * 50.0 / 90.0).abs() < 1e-9, "{p50}");
        let p99 = quantile(0.99, Some(&before), Some(&after)).unwrap();
        assert!((p99 - (0.001 + 0.009 * 9.0 / 10.0)).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(0.99, Some(&after), Some(&after)), None);
        // Without an earlier scrape: every sample so far.
        assert!(quantile(0.5, None, Some(&after)).is_some());
    }

    #[test]
    fn metrics_addresses_bound_to_every_interface_are_reached_at_the_daemons_host() {
        assert_eq!(
            metrics_url("http", "0.0.0.0:9701", &host_of("shard-1:7701")),
            Some("http://shard-1:9701/metrics".into())
        );
        assert_eq!(
            metrics_url("http", "127.0.0.1:9700", &host_of("http://10.0.0.5:7700")),
            Some("http://127.0.0.1:9700/metrics".into())
        );
        assert_eq!(
            metrics_url("http", "[::]:9700", &host_of("http://[::1]:7700")),
            Some("http://[::1]:9700/metrics".into())
        );
        assert_eq!(metrics_url("http", "", "localhost"), None);
    }
}
