//! Prometheus metrics of real daemons: each coordinator and shard process
//! serves `GET /metrics` on its `metrics_listen` port, and the series move
//! by what the traffic did.

mod support;

use std::collections::BTreeMap;

use support::{scrape, ProcessCluster};
use tally::proto::pb;
use tally::proto::pb::counter_client::CounterClient;

type Scrape = BTreeMap<String, f64>;

/// The value of one series (0 if absent).
fn value(scrape: &Scrape, series: &str) -> f64 {
    scrape.get(series).copied().unwrap_or(0.0)
}

/// The sum of every series named `name` (any labels) whose labels include
/// each of `labels`.
fn sum(scrape: &Scrape, name: &str, labels: &[&str]) -> f64 {
    scrape
        .iter()
        .filter(|(series, _)| {
            let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
            series_name == name && labels.iter().all(|label| series_labels.contains(label))
        })
        .map(|(_, value)| value)
        .sum()
}

/// How much `name` (summed as [`sum`]) grew from `before` to `after`.
fn grew(before: &Scrape, after: &Scrape, name: &str, labels: &[&str]) -> f64 {
    sum(after, name, labels) - sum(before, name, labels)
}

fn shard_scrapes(cluster: &ProcessCluster) -> Vec<Scrape> {
    cluster.shards.iter().flatten().map(scrape).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_shard_series_move_by_what_the_traffic_did() {
    let cluster = ProcessCluster::start("sync");
    let mut client = CounterClient::connect(cluster.coordinator.endpoint())
        .await
        .unwrap();
    // Every node seen up before the first scrape.
    support::wait_until("every node up", support::PATIENCE, || async {
        let now = scrape(&cluster.coordinator);
        let up: Vec<f64> = (1..=3)
            .map(|node| value(&now, &format!("tally_node_up{{node=\"shard-{node}\"}}")))
            .collect();
        if up == [1.0; 3] {
            Ok(())
        } else {
            Err(up)
        }
    })
    .await;
    let coordinator_before = scrape(&cluster.coordinator);
    let shards_before = shard_scrapes(&cluster);

    // 40 unary increments, one batch of 10 on 10 counters, 5 reads, one
    // read of a name that is not one.
    for _ in 0..40 {
        client
            .increment(pb::IncrementRequest {
                counter: "metrics-unary".into(),
                delta: 1,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    client
        .increment_batch(pb::IncrementBatchRequest {
            increments: (0..10)
                .map(|index| pb::IncrementRequest {
                    counter: format!("metrics-batch-{index}"),
                    delta: 1,
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .unwrap();
    for _ in 0..5 {
        let read = client
            .get(pb::GetRequest {
                counter: "metrics-unary".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(read.value, 40);
    }
    let refused = client
        .get(pb::GetRequest {
            counter: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // Three limited increments, one at a time, for two places.
    for _ in 0..3 {
        client
            .increment(pb::IncrementRequest {
                counter: "metrics-limited".into(),
                delta: 1,
                limit: Some(2),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    let coordinator = scrape(&cluster.coordinator);
    let limited = |outcome: &str| {
        grew(
            &coordinator_before,
            &coordinator,
            "tally_limited_increments_total",
            &[&format!("outcome=\"{outcome}\"")],
        )
    };
    assert_eq!(limited("applied"), 2.0);
    assert_eq!(limited("refused"), 1.0);
    assert_eq!(
        grew(
            &coordinator_before,
            &coordinator,
            "tally_limit_group_size_count",
            &[]
        ),
        3.0,
        "one group per call when calls come one at a time"
    );
    let calls = |method: &str, code: &str| {
        grew(
            &coordinator_before,
            &coordinator,
            "tally_requests_total",
            &[&format!("method=\"{method}\""), &format!("code=\"{code}\"")],
        )
    };
    assert_eq!(calls("Increment", "OK"), 43.0);
    assert_eq!(calls("IncrementBatch", "OK"), 1.0);
    assert_eq!(calls("Get", "OK"), 5.0);
    assert_eq!(calls("Get", "INVALID_ARGUMENT"), 1.0);
    let timed = |method: &str| {
        grew(
            &coordinator_before,
            &coordinator,
            "tally_request_duration_seconds_count",
            &[&format!("method=\"{method}\"")],
        )
    };
    assert_eq!(timed("Increment"), 43.0);
    assert_eq!(timed("Get"), 6.0);
    // Every unary increment is one Apply call of one (the refused limited
    // one sends none); the batch is one call per node its 10 counters
    // landed on.
    let increments_sent = grew(
        &coordinator_before,
        &coordinator,
        "tally_shard_apply_increments_sum",
        &[],
    );
    let apply_calls = grew(
        &coordinator_before,
        &coordinator,
        "tally_shard_apply_increments_count",
        &[],
    );
    assert_eq!(increments_sent, 52.0);
    assert!((43.0..=45.0).contains(&apply_calls), "{apply_calls}");
    // Reads: one Read call per node per read (6 public reads, the refused
    // one not sent, and 3 limited increments' reads), each of one counter.
    let read_calls = grew(
        &coordinator_before,
        &coordinator,
        "tally_shard_read_counters_count",
        &[],
    );
    assert_eq!(read_calls, 8.0 * 3.0);
    assert_eq!(
        sum(
            &coordinator,
            "tally_build_info",
            &["daemon=\"coordinator\""]
        ),
        1.0
    );
    assert!(value(&coordinator, "process_resident_memory_bytes") > 0.0);
    // Every call answered: nothing in flight or pending.
    for node in 1..=3 {
        let node = format!("{{node=\"shard-{node}\"}}");
        assert_eq!(
            value(&coordinator, &format!("tally_shard_calls_in_flight{node}")),
            0.0
        );
        assert_eq!(
            value(
                &coordinator,
                &format!("tally_shard_pending_increments{node}")
            ),
            0.0
        );
    }

    // The shards applied what the coordinator sent, in group commits that
    // were timed.
    let shards = shard_scrapes(&cluster);
    let on_shards = |name: &str| -> f64 {
        shards_before
            .iter()
            .zip(&shards)
            .map(|(before, after)| grew(before, after, name, &[]))
            .sum()
    };
    assert_eq!(on_shards("tally_shard_increments_applied_total"), 52.0);
    assert_eq!(on_shards("tally_shard_apply_calls_total"), apply_calls);
    assert!(on_shards("tally_shard_group_commit_seconds_count") >= 1.0);
    assert!(on_shards("tally_shard_group_commit_counters_sum") >= 11.0);
    let entries: f64 = shards.iter().map(|s| value(s, "tally_shard_entries")).sum();
    assert!(entries >= 11.0, "{entries}");
    for shard in &shards {
        assert_eq!(sum(shard, "tally_build_info", &["daemon=\"shard\""]), 1.0);
        assert!(value(shard, "process_resident_memory_bytes") > 0.0);
        assert!(value(shard, "tally_shard_log_bytes") > 0.0);
    }

    // Replication (every 100 ms here): each node's copy on its replica,
    // with its age, and the lag per pair on the coordinator.
    support::wait_until(
        "replicas and their lag shown",
        support::PATIENCE,
        || async {
            let coordinator = scrape(&cluster.coordinator);
            let shards = shard_scrapes(&cluster);
            let lags = coordinator
                .keys()
                .filter(|series| series.starts_with("tally_replication_lag_seconds{"))
                .count();
            // Three copies in all (the ring decides which node keeps which).
            let copies: f64 = shards
                .iter()
                .map(|shard| value(shard, "tally_shard_replica_copies"))
                .sum();
            let ages = shards
                .iter()
                .flat_map(|shard| shard.keys())
                .filter(|series| series.starts_with("tally_shard_replica_copy_age_seconds{"))
                .count();
            if lags == 3 && copies == 3.0 && ages == 3 {
                Ok(())
            } else {
                Err((lags, copies, ages))
            }
        },
    )
    .await;
}

/// Every metric a query of the shipped Grafana dashboard names.
fn dashboard_metrics() -> std::collections::BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/tally.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            names.extend(
                expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|token| token.starts_with("tally_") || token.starts_with("process_"))
                    .map(str::to_string),
            );
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_series_the_daemons_serve() {
    let cluster = ProcessCluster::start("sync");
    let mut client = CounterClient::connect(cluster.coordinator.endpoint())
        .await
        .unwrap();
    // Enough traffic for every histogram to have a sample, and a round of
    // replication for the copies' series.
    client
        .increment(pb::IncrementRequest {
            counter: "dashboard".into(),
            delta: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .get(pb::GetRequest {
            counter: "dashboard".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    support::wait_for_process_replicas(&cluster).await;
    let wanted = dashboard_metrics();
    assert!(wanted.len() >= 20, "{wanted:?}");
    support::wait_until(
        "every dashboard series served",
        support::PATIENCE,
        || async {
            let mut served = std::collections::BTreeSet::new();
            for scrape in
                std::iter::once(scrape(&cluster.coordinator)).chain(shard_scrapes(&cluster))
            {
                served.extend(
                    scrape
                        .keys()
                        .map(|series| series.split('{').next().unwrap().to_string()),
                );
            }
            let missing: Vec<&String> = wanted.difference(&served).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("{missing:?}"))
            }
        },
    )
    .await;
}

/// The text on a terminal `tallyctl top` draws on, as a pseudo-terminal
/// shows it.
struct Terminal {
    screen: std::sync::Arc<std::sync::Mutex<vt100::Parser>>,
    writer: Box<dyn std::io::Write + Send>,
    child: KillOnDrop,
}

/// A process on the pseudo-terminal, killed if the test ends first.
struct KillOnDrop(Box<dyn portable_pty::Child + Send + Sync>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

impl Terminal {
    /// Runs `tallyctl ARGS` on a 30 x 110 pseudo-terminal.
    fn run(args: &[&str]) -> Terminal {
        use portable_pty::{CommandBuilder, PtySize};
        let (rows, cols) = (30, 110);
        let pair = portable_pty::native_pty_system()
            .openpty(PtySize {
                rows,
                cols,
                pixel_width: 0,
                pixel_height: 0,
            })
            .unwrap();
        let mut command = CommandBuilder::new(support::binary("tallyctl"));
        command.args(args);
        command.env("TERM", "xterm-256color");
        let child = pair.slave.spawn_command(command).unwrap();
        drop(pair.slave);
        let mut reader = pair.master.try_clone_reader().unwrap();
        let writer = pair.master.take_writer().unwrap();
        let screen = std::sync::Arc::new(std::sync::Mutex::new(vt100::Parser::new(rows, cols, 0)));
        let fed = screen.clone();
        std::thread::spawn(move || {
            // Keeps the master open as long as the reader runs.
            let _master = pair.master;
            let mut buffer = [0u8; 4096];
            while let Ok(read) = reader.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                fed.lock().unwrap().process(&buffer[..read]);
            }
        });
        Terminal {
            screen,
            writer,
            child: KillOnDrop(child),
        }
    }

    fn contents(&self) -> String {
        self.screen.lock().unwrap().screen().contents()
    }
}

use std::io::Read as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tallyctl_top_shows_each_node_live_and_quits_on_q() {
    let cluster = ProcessCluster::start("sync");
    let endpoint = cluster.coordinator.endpoint();
    // Writers for the whole test, so that rates are not zero.
    let load = {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let mut client = CounterClient::connect(endpoint).await.unwrap();
            for index in 0u64.. {
                let _ = client
                    .increment(pb::IncrementRequest {
                        counter: format!("top-{}", index % 50),
                        delta: 1,
                        ..Default::default()
                    })
                    .await;
            }
        })
    };
    let mut terminal = Terminal::run(&["--endpoint", &endpoint, "top", "--interval", "300ms"]);
    // The first screen, then one with a rate on every node: each row is
    // `NODE HEALTH INCR/S ...` between the table's borders.
    let screen = support::wait_until(
        "top to show every node taking writes",
        support::PATIENCE,
        || async {
            let screen = terminal.contents();
            let live = (1..=3).all(|node| {
                screen.lines().any(|line| {
                    let cells: Vec<&str> = line
                        .trim_matches(|c: char| c == '│' || c.is_whitespace())
                        .split_whitespace()
                        .collect();
                    cells.len() >= 3
                        && cells[0] == format!("shard-{node}")
                        && cells[1] == "up"
                        && cells[2].parse::<f64>().is_ok_and(|rate| rate > 0.0)
                })
            });
            if live && screen.contains("INCR/S") && screen.contains("calls/s") {
                Ok(screen)
            } else {
                Err(screen)
            }
        },
    )
    .await;
    println!("{screen}");
    load.abort();

    use std::io::Write as _;
    terminal.writer.write_all(b"q").unwrap();
    terminal.writer.flush().unwrap();
    let child = std::sync::Mutex::new(terminal.child);
    let screen = terminal.screen;
    let status = support::wait_until("top to quit on q", support::PATIENCE, || async {
        match child.lock().unwrap().0.try_wait().unwrap() {
            Some(status) => Ok(status),
            None => Err(screen.lock().unwrap().screen().contents()),
        }
    })
    .await;
    assert!(status.success(), "{status:?}");
}
