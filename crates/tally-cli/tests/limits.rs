//! `tallyctl`'s flags for rate limits and quotas, as the real binary runs
//! them against a real cluster (in this process, on port 0): `incr --get`,
//! `--window`, `--limit` (exit 3 when refused) and `--allow-partial`; `get`
//! and `delete --window`; `get` of a counter that cannot be read; and
//! `bench --get`, `--window`, `--limit`.
//!
//! The windows here are 366 days long, so that none ends during a test (the
//! next ends at a multiple of 366 days since the Unix epoch); the tests
//! still compare every window end they are told, and would say if one did.

use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tally_cli::local_cluster::{LocalCluster, LocalClusterOptions};
use tally_proto::pb;

const READY: Duration = Duration::from_secs(30);
/// A `tallyctl` run that does not end by then is killed and fails the test.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// `--window 366d`, in seconds.
const YEAR_WINDOW: u32 = 31_622_400;

struct Test {
    cluster: LocalCluster,
    _dir: tempfile::TempDir,
}

async fn start(replication_factor: usize) -> Test {
    let dir = tempfile::tempdir().unwrap();
    let mut options = LocalClusterOptions::new(dir.path(), 3);
    options.replication_factor = replication_factor;
    let cluster = LocalCluster::start(options).await.unwrap();
    cluster.wait_ready(READY).await.unwrap();
    Test { cluster, _dir: dir }
}

impl Test {
    /// Runs `tallyctl --endpoint COORDINATOR ARGS` to its end, off the
    /// runtime the cluster serves on.
    async fn tallyctl(&self, args: &[&str]) -> Output {
        let mut command = assert_cmd::Command::new(env!("CARGO_BIN_EXE_tallyctl"));
        command
            .timeout(EXIT_TIMEOUT)
            .arg("--endpoint")
            .arg(self.cluster.endpoint())
            .args(args);
        for variable in [
            "TALLY_ENDPOINT",
            "TALLY_TOKEN",
            "TALLY_CA_CERT",
            "TALLY_CLIENT_CERT",
            "TALLY_CLIENT_KEY",
        ] {
            command.env_remove(variable);
        }
        tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap()
    }

    /// `tallyctl ARGS`, which must exit with `code`; its standard output.
    async fn expect(&self, code: i32, args: &[&str]) -> String {
        let output = self.tallyctl(args).await;
        assert_eq!(
            output.status.code(),
            Some(code),
            "tallyctl {args:?}\nstdout: {}\nstderr: {}",
            stdout(&output),
            stderr(&output)
        );
        stdout(&output)
    }

    /// `tallyctl --json ARGS`, which must exit with `code`, as JSON.
    async fn json(&self, code: i32, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let text = self.expect(code, &all).await;
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("{error}: {text}"))
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The window end a `--json` answer holds: the end of a window of
/// `seconds` that contains now.
fn window_end(json: &serde_json::Value, seconds: u32) -> i64 {
    let end = json["window_end_unix_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("no window end: {json}"));
    let length = i64::from(seconds) * 1000;
    assert_eq!(end % length, 0, "not aligned to the epoch: {json}");
    let now = now_unix_ms();
    assert!(end > now - 60_000 && end <= now + length + 60_000, "{json}");
    end
}

/// The RFC 3339 time `tallyctl` prints for a window end.
fn rfc3339(unix_ms: i64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms as u64))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incr_get_prints_the_total_after_the_increment() {
    let test = start(2).await;
    assert_eq!(
        test.expect(0, &["incr", "page:views", "5", "--get"]).await,
        "OK page:views +5, total 5\n"
    );
    // Others' increments are in the total too.
    test.expect(0, &["incr", "page:views", "3"]).await;
    assert_eq!(
        test.expect(0, &["incr", "page:views", "-1", "--get", "--allow-partial"])
            .await,
        "OK page:views -1, total 7\n"
    );
    let json = test.json(0, &["incr", "page:views", "--get"]).await;
    assert_eq!(
        json,
        serde_json::json!({
            "counter": "page:views", "delta": 1, "deduplicated": false,
            "total": 8, "complete": true,
        })
    );
    // A retry of a key: not applied again, and the total says so.
    test.expect(0, &["incr", "likes", "2", "--key", "k1", "--get"])
        .await;
    assert_eq!(
        test.expect(0, &["incr", "likes", "2", "--key", "k1", "--get"])
            .await,
        "OK likes +2 (a retry: the key was applied before, not again), total 2\n"
    );
    // Without --get nothing more is printed, nor asked.
    let json = test.json(0, &["incr", "page:views"]).await;
    assert_eq!(
        json,
        serde_json::json!({ "counter": "page:views", "delta": 1, "deduplicated": false })
    );
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incr_get_allow_partial_answers_without_a_down_shard() {
    // No replicas: a stopped shard's part cannot be read anywhere else.
    let mut test = start(1).await;
    let stopped = test.cluster.shard_configs().nth(2).unwrap().node_id.clone();
    // A key whose stripe an up node owns: the increment itself is applied,
    // only the read of the total misses the stopped node.
    let mut admin = test.cluster.admin_client().await.unwrap();
    let located = admin
        .locate(pb::LocateRequest {
            counter: "partial".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let stripes = test.cluster.coordinator_config().stripes;
    let key_on_an_up_node = |prefix: &str| {
        (0..)
            .map(|index| format!("{prefix}-{index}"))
            .find(|key| {
                let stripe = tally_ring::idempotency_stripe(key, stripes);
                located.stripes[stripe as usize].node_id != stopped
            })
            .unwrap()
    };
    test.expect(0, &["incr", "partial", "4", "--get"]).await;
    test.cluster.stop_shard(2).await.unwrap();

    let key = key_on_an_up_node("a");
    let output = test
        .tallyctl(&["incr", "partial", "1", "--key", &key, "--get"])
        .await;
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(
        stderr(&output).contains("UNAVAILABLE"),
        "{}",
        stderr(&output)
    );

    let key = key_on_an_up_node("b");
    let text = test
        .expect(
            0,
            &[
                "incr",
                "partial",
                "1",
                "--key",
                &key,
                "--get",
                "--allow-partial",
            ],
        )
        .await;
    assert!(
        text.starts_with("OK partial +1, total ")
            && text.ends_with(" (partial: a shard's part is missing)\n"),
        "{text}"
    );
    let key = key_on_an_up_node("c");
    let json = test
        .json(
            0,
            &[
                "incr",
                "partial",
                "1",
                "--key",
                &key,
                "--get",
                "--allow-partial",
            ],
        )
        .await;
    assert_eq!(json["complete"], false, "{json}");
    // Every increment since the stop went to an up node; the stopped one
    // holds at most the first 4.
    let total = json["total"].as_i64().unwrap();
    assert!((3..=7).contains(&total), "{json}");
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_through_incr_get_and_delete() {
    let test = start(2).await;
    let json = test
        .json(0, &["incr", "api:alice", "3", "--window", "366d", "--get"])
        .await;
    let end = window_end(&json, YEAR_WINDOW);
    assert_eq!(json["total"], 3, "{json}");
    assert_eq!(json["window_seconds"], YEAR_WINDOW, "{json}");
    let text = test
        .expect(0, &["incr", "api:alice", "2", "--window", "31622400"])
        .await;
    assert_eq!(
        text,
        format!("OK api:alice +2, window of 366d ends {}\n", rfc3339(end))
    );

    // The window is a counter of its own: the name without it is another.
    test.expect(0, &["incr", "api:alice", "10"]).await;
    let json = test
        .json(0, &["get", "api:alice", "api:bob", "--window", "366d"])
        .await;
    assert_eq!(
        json,
        serde_json::json!([
            { "counter": "api:alice", "value": 5, "complete": true, "window_end_unix_ms": end },
            { "counter": "api:bob", "value": 0, "complete": true, "window_end_unix_ms": end },
        ])
    );
    let text = test
        .expect(0, &["get", "api:alice", "--window", "366d"])
        .await;
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    let rfc = rfc3339(end);
    assert_eq!(
        rows[0],
        ["COUNTER", "VALUE", "COMPLETE", "WINDOW", "ENDS"],
        "{text}"
    );
    assert_eq!(rows[1], ["api:alice", "5", "yes", rfc.as_str()], "{text}");
    assert_eq!(rows[2], ["windows", "of", "366d"], "{text}");
    let json = test.json(0, &["get", "api:alice"]).await;
    assert_eq!(
        json,
        serde_json::json!([{ "counter": "api:alice", "value": 10, "complete": true }])
    );

    // Delete the window: the counter without one stays.
    assert_eq!(
        test.expect(0, &["delete", "api:alice", "--window", "366d"])
            .await,
        "OK api:alice deleted (its current window of 366d)\n"
    );
    let json = test
        .json(0, &["get", "api:alice", "--window", "366d"])
        .await;
    assert_eq!(json[0]["value"], 0, "{json}");
    assert_eq!(json[0]["window_end_unix_ms"], end, "{json}");
    let json = test.json(0, &["delete", "api:alice"]).await;
    assert_eq!(
        json,
        serde_json::json!({ "counter": "api:alice", "deleted": true })
    );
    let json = test.json(0, &["get", "api:alice"]).await;
    assert_eq!(json[0]["value"], 0, "{json}");
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_applies_up_to_it_and_exits_3_past_it() {
    let test = start(2).await;
    let limited = ["--window", "366d", "--limit", "2"];
    let incr = |delta: &'static str| {
        let mut args = vec!["incr", "api:carol", delta];
        args.extend(limited);
        args
    };
    let text = test.expect(0, &incr("1")).await;
    assert!(
        text.starts_with("OK api:carol +1, total 1 (within the limit 2), window of 366d ends "),
        "{text}"
    );
    let json = test.json(0, &incr("1")).await;
    let end = window_end(&json, YEAR_WINDOW);
    assert_eq!(
        json,
        serde_json::json!({
            "counter": "api:carol", "delta": 1, "deduplicated": false,
            "total": 2, "complete": true, "limit": 2, "applied": 1, "refused": false,
            "window_seconds": YEAR_WINDOW, "window_end_unix_ms": end,
        })
    );
    // Past the limit: nothing applied, exit 3, and it says so.
    let text = test.expect(3, &incr("1")).await;
    assert_eq!(
        text,
        format!(
            "REFUSED api:carol +1 (over the limit 2: not applied), total 2, window of 366d \
             ends {}\n",
            rfc3339(end)
        )
    );
    let output = test.tallyctl(&incr("1")).await;
    assert_eq!(stderr(&output), "", "a refusal is no error");
    let json = test.json(3, &incr("1")).await;
    assert_eq!(json["refused"], true, "{json}");
    assert_eq!(json["applied"], 0, "{json}");
    assert_eq!(json["total"], 2, "{json}");
    // A delta of 0 checks the limit without adding.
    test.expect(0, &incr("0")).await;
    test.expect(
        3,
        &["incr", "api:carol", "0", "--window", "366d", "--limit", "1"],
    )
    .await;
    // A limit of more than one: all or nothing.
    test.expect(
        3,
        &["incr", "api:carol", "5", "--window", "366d", "--limit", "6"],
    )
    .await;
    test.expect(
        0,
        &["incr", "api:carol", "4", "--window", "366d", "--limit", "6"],
    )
    .await;
    let json = test
        .json(0, &["get", "api:carol", "--window", "366d"])
        .await;
    assert_eq!(json[0]["value"], 6, "{json}");

    // Without a window, and with --allow-partial, the same.
    test.expect(
        0,
        &["incr", "quota", "3", "--limit", "3", "--allow-partial"],
    )
    .await;
    let text = test
        .expect(3, &["incr", "quota", "1", "--limit", "3"])
        .await;
    assert_eq!(
        text,
        "REFUSED quota +1 (over the limit 3: not applied), total 3\n"
    );

    // What the server refuses is an error (1), not a refusal: a name too
    // long for a window.
    let long = "n".repeat(233);
    let output = test
        .tallyctl(&["incr", &long, "--window", "1h", "--limit", "5"])
        .await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("INVALID_ARGUMENT"),
        "{}",
        stderr(&output)
    );
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_shows_an_unreadable_counter_s_error_instead_of_a_value() {
    let test = start(2).await;
    // Two stripes each hold i64::MAX: each part fits, the total does not.
    // Idempotency keys pick the stripes.
    let stripes = test.cluster.coordinator_config().stripes;
    let stripe_of = |key: &str| tally_ring::idempotency_stripe(key, stripes);
    let second = (1..)
        .map(|index| format!("key-{index}"))
        .find(|key| stripe_of(key) != stripe_of("key-0"))
        .unwrap();
    let max = i64::MAX.to_string();
    test.expect(0, &["incr", "huge", &max, "--key", "key-0"])
        .await;
    test.expect(0, &["incr", "huge", &max, "--key", &second])
        .await;
    test.expect(0, &["incr", "fine", "7"]).await;

    let output = test.tallyctl(&["get", "fine", "huge"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let text = stdout(&output);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["COUNTER", "VALUE", "COMPLETE", "ERROR"], "{text}");
    assert_eq!(rows[1], ["fine", "7", "yes"], "{text}");
    assert_eq!(&rows[2][..4], ["huge", "-", "-", "OUT_OF_RANGE:"], "{text}");
    assert_eq!(
        stderr(&output).trim(),
        "tallyctl: error: 1 of 2 counters could not be read (their errors are printed)"
    );

    let json = test.json(1, &["get", "fine", "huge"]).await;
    assert_eq!(
        json[0],
        serde_json::json!({ "counter": "fine", "value": 7, "complete": true })
    );
    assert_eq!(json[1]["counter"], "huge", "{json}");
    assert_eq!(
        json[1]["error_code"],
        tonic::Code::OutOfRange as u32,
        "{json}"
    );
    assert!(
        json[1]["error"].as_str().unwrap().contains("huge"),
        "{json}"
    );
    assert!(json[1].get("value").is_none(), "{json}");

    // Every counter readable: exit 0 and no ERROR column.
    let text = test.expect(0, &["get", "fine"]).await;
    assert!(!text.contains("ERROR"), "{text}");
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_each_mode_and_says_which() {
    let test = start(2).await;
    let base = ["bench", "-c", "4", "--connections", "2"];
    let bench = |more: &[&'static str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(more);
        args
    };

    // Increment-and-get: every increment acknowledged and checked.
    let report = test
        .json(
            0,
            &bench(&["-n", "60", "--get", "--counters", "2", "--prefix", "g-"]),
        )
        .await;
    assert_eq!(report["mode"], "increment-and-get", "{report}");
    assert_eq!(report["check"], "ok", "{report}");
    assert_eq!(report["increments"], 60, "{report}");
    assert!(report.get("applied").is_none(), "{report}");

    // A limit on one counter, through one coordinator: exactly the limit
    // applied, the rest refused, and the check finds none over it.
    let report = test
        .json(
            0,
            &bench(&[
                "-n", "60", "--limit", "10", "--window", "366d", "--prefix", "l-",
            ]),
        )
        .await;
    assert_eq!(report["mode"], "limit", "{report}");
    assert_eq!(report["limit"], 10, "{report}");
    assert_eq!(report["window_seconds"], YEAR_WINDOW, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["increments"], 60, "{report}");
    assert_eq!(report["applied"], 10, "{report}");
    assert_eq!(report["refused"], 50, "{report}");
    assert_eq!(report["check"], "ok", "{report}");
    let json = test.json(0, &["get", "l-0", "--window", "366d"]).await;
    assert_eq!(json[0]["value"], 10, "{json}");
    let json = test.json(0, &["get", "l-0"]).await;
    assert_eq!(json[0]["value"], 0, "the window's counter only: {json}");

    // Batches and reads of a window: the check reads the window back.
    let report = test
        .json(
            0,
            &bench(&[
                "-n",
                "40",
                "--window",
                "366d",
                "--batch",
                "5",
                "--reads",
                "30",
                "--counters",
                "3",
                "--prefix",
                "w-",
            ]),
        )
        .await;
    assert_eq!(report["mode"], "increment", "{report}");
    assert_eq!(report["window_seconds"], YEAR_WINDOW, "{report}");
    assert_eq!(report["check"], "ok", "{report}");
    let increments = report["increments"].as_i64().unwrap();
    assert!(increments > 0, "{report}");
    let json = test
        .json(0, &["get", "w-0", "w-1", "w-2", "--window", "366d"])
        .await;
    let total: i64 = json
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["value"].as_i64().unwrap())
        .sum();
    assert_eq!(total, increments, "{json}");

    // The human report names the mode and counts the refusals.
    let text = test
        .expect(0, &bench(&["-n", "20", "--limit", "5", "--prefix", "h-"]))
        .await;
    let header = text.lines().next().unwrap();
    assert!(header.ends_with("0% reads, limit 5"), "{text}");
    assert!(
        text.lines()
            .any(|line| line.split_whitespace().collect::<Vec<_>>()
                == ["limit:", "5", "applied", "15", "refused", "by", "the", "limit"]),
        "{text}"
    );
    assert!(text.contains("none over the limit"), "{text}");

    // The default run says nothing of modes.
    let text = test.expect(0, &bench(&["-n", "20"])).await;
    let header = text.lines().next().unwrap();
    assert!(header.ends_with("0% reads"), "{text}");
    assert!(!text.contains("limit"), "{text}");

    // IncrementBatch answers no total.
    let output = test
        .tallyctl(&bench(&["-n", "5", "--get", "--batch", "5"]))
        .await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("--get and --limit need --batch 1"),
        "{}",
        stderr(&output)
    );
    test.cluster.shutdown().await.unwrap();
}
