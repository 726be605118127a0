//! `tallyctl` without a cluster: offline ring inspection from the shipped
//! config, and clear errors with a non-zero exit.

use std::time::Duration;

use assert_cmd::Command;

/// A binary that should exit at once is killed after this, so a test fails
/// instead of hanging if it ever keeps running.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

fn tallyctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tallyctl"))
        .timeout(EXIT_TIMEOUT)
        .args(args)
        .env_remove("TALLY_ENDPOINT")
        .output()
        .unwrap()
}

const SHIPPED_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/coordinator.toml");

#[test]
fn ring_offline_from_the_shipped_config() {
    let output = tallyctl(&["ring", "--config", SHIPPED_CONFIG]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    for node in ["shard-1", "shard-2", "shard-3"] {
        assert!(text.contains(node), "{text}");
    }
    assert!(text.contains("offline"), "{text}");
    assert!(text.contains("8 stripes per counter"), "{text}");

    let output = tallyctl(&["--json", "ring", "--config", SHIPPED_CONFIG]);
    let ring: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let total: f64 = ring["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node["owned_fraction"].as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-9);
}

#[test]
fn locate_offline_lists_every_stripe() {
    let output = tallyctl(&["--json", "locate", "page:views", "--config", SHIPPED_CONFIG]);
    assert!(output.status.success());
    let located: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let stripes = located["stripes"].as_array().unwrap();
    assert_eq!(stripes.len(), 8);
    for (index, stripe) in stripes.iter().enumerate() {
        assert_eq!(stripe["stripe"], index);
        assert!(stripe["node_id"].as_str().unwrap().starts_with("shard-"));
    }
    let output = tallyctl(&["locate", "", "--config", SHIPPED_CONFIG]);
    assert!(!output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        "tallyctl: error: counter name is empty"
    );
}

#[test]
fn a_bad_config_is_one_line_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:0\"\n[[nodes]]\nid = \"a1\"\naddress = \"x:1\"\nweigth = 2\n",
    )
    .unwrap();
    let output = tallyctl(&["ring", "--config", path.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("{}:5: unknown key `weigth`", path.display())),
        "{stderr}"
    );
}

#[test]
fn no_coordinator_is_a_clear_error() {
    // A port the OS just handed out and took back: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("127.0.0.1:{port}");
    let output = tallyctl(&["--endpoint", &endpoint, "--timeout-ms", "2000", "incr", "x"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with(&format!("tallyctl: error: cannot reach http://{endpoint}")),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(tallyctl(&["incr"]).status.code(), Some(2));
    assert_eq!(tallyctl(&["frobnicate"]).status.code(), Some(2));
    // Client options do nothing for `dev`: refused, before it or after
    // (and nothing starts).
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    for args in [
        &["--json", "dev", "--port", "0", "--data-dir", data_dir][..],
        &[
            "dev",
            "--port",
            "0",
            "--data-dir",
            data_dir,
            "--endpoint",
            "x:1",
        ],
    ] {
        let output = tallyctl(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("--endpoint"),
            "{args:?}"
        );
    }
    assert!(!dir.path().join("data").exists());
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn version_names_the_binary() {
    let output = tallyctl(&["--version"]);
    assert!(output.status.success());
    assert_eq!(
        stdout(&output),
        format!("tallyctl {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_shows_only_the_options_that_apply() {
    let client_options = ["--endpoint", "--json", "--timeout-ms"];
    let dev = stdout(&tallyctl(&["dev", "--help"]));
    for option in client_options {
        assert!(!dev.contains(option), "{dev}");
    }
    assert!(dev.contains("--port"), "{dev}");
    for command in ["incr", "get", "status", "health", "bench", "ring", "drain"] {
        let help = stdout(&tallyctl(&[command, "--help"]));
        for option in client_options {
            assert!(help.contains(option), "{command}: {help}");
        }
    }
}

#[test]
fn bench_help_says_one_default_per_option() {
    let bench = stdout(&tallyctl(&["bench", "--help"]));
    for line in bench.lines() {
        assert!(
            line.matches("default").count() <= 1,
            "two defaults in one line: {line}"
        );
    }
    assert!(
        bench
            .lines()
            .any(|line| line.contains("--connections") && line.contains("one per client")),
        "{bench}"
    );
}

#[test]
fn client_options_go_before_or_after_the_command() {
    for args in [
        &["--json", "ring", "--config", SHIPPED_CONFIG][..],
        &["ring", "--config", SHIPPED_CONFIG, "--json"],
        &[
            "ring",
            "--json",
            "--timeout-ms",
            "100",
            "--config",
            SHIPPED_CONFIG,
        ],
    ] {
        let output = tallyctl(args);
        assert!(output.status.success(), "{args:?}");
        let ring: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(ring["stripes"], 8, "{args:?}");
    }
    // After the command wins over before it, and both over the
    // environment.
    let output = Command::new(env!("CARGO_BIN_EXE_tallyctl"))
        .timeout(EXIT_TIMEOUT)
        .args([
            "--endpoint",
            "127.0.0.1:1",
            "status",
            "--endpoint",
            "127.0.0.1:2",
        ])
        .env("TALLY_ENDPOINT", "127.0.0.1:3")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach http://127.0.0.1:2"),
        "{stderr}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_tallyctl"))
        .timeout(EXIT_TIMEOUT)
        .args(["--endpoint", "127.0.0.1:1", "status"])
        .env("TALLY_ENDPOINT", "127.0.0.1:3")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach http://127.0.0.1:1"),
        "{stderr}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_tallyctl"))
        .timeout(EXIT_TIMEOUT)
        .args(["status"])
        .env("TALLY_ENDPOINT", "127.0.0.1:3")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach http://127.0.0.1:3"),
        "{stderr}"
    );
}

#[test]
fn tables_have_no_trailing_spaces() {
    let output = tallyctl(&["ring", "--config", SHIPPED_CONFIG]);
    assert!(output.status.success());
    let text = stdout(&output);
    assert!(text.lines().count() > 3, "{text}");
    for line in text.lines() {
        assert_eq!(line, line.trim_end(), "{text}");
    }
    let output = tallyctl(&["locate", "page:views", "--config", SHIPPED_CONFIG]);
    for line in stdout(&output).lines() {
        assert_eq!(line, line.trim_end());
    }
}

#[test]
fn an_error_says_each_cause_once() {
    // tonic's error for a name that does not resolve repeats `dns error`.
    let output = tallyctl(&[
        "--endpoint",
        "http://tally.invalid:1",
        "--timeout-ms",
        "2000",
        "status",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr.trim();
    assert!(line.starts_with("tallyctl: error: cannot reach"), "{line}");
    let parts: Vec<&str> = line.split(": ").collect();
    for pair in parts.windows(2) {
        assert_ne!(pair[0], pair[1], "{line}");
    }
}

#[test]
fn a_closed_stdout_is_a_quiet_exit() {
    // A ring of many nodes prints more than a pipe holds, so the write
    // meets the closed pipe whenever it starts.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    let mut config = String::from("listen = \"127.0.0.1:0\"\nvnodes_per_weight = 1\n");
    for index in 0..2000 {
        config.push_str(&format!(
            "[[nodes]]\nid = \"node-{index}\"\naddress = \"127.0.0.1:{}\"\n",
            10_000 + index
        ));
    }
    std::fs::write(&path, config).unwrap();
    for json in [false, true] {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tallyctl"));
        if json {
            command.arg("--json");
        }
        let mut child = command
            .args(["ring", "--config", path.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{:?}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stderr), "");
    }
}

/// The flags of rate limits and windows that clap refuses before any call:
/// exit 2, with a message that says what is wrong. The endpoint is one
/// nothing listens on, so a flag that got through would fail with 1.
#[test]
fn window_and_limit_usage_errors_exit_2() {
    let nowhere = "127.0.0.1:1";
    for (args, says) in [
        (
            &["incr", "x", "--window", "500ms"][..],
            "less than a second",
        ),
        (&["incr", "x", "--window", "0"], "no window"),
        (&["incr", "x", "--window", "367d"], "longer than 366 days"),
        (&["incr", "x", "--window", "soon"], "e.g. 90, 60s"),
        (
            &["get", "x", "--window", "1s500ms"],
            "whole number of seconds",
        ),
        (&["delete", "x", "--window", "400d"], "longer than 366 days"),
        (
            &["bench", "--window", "10ms", "-n", "1"],
            "less than a second",
        ),
        (&["incr", "x", "--limit", "5", "--key", "k"], "--key"),
        (&["incr", "x", "-1", "--limit", "5"], "DELTA of 0 or more"),
        (&["incr", "x", "--allow-partial"], "--get"),
        (&["incr", "x", "--limit", "ten"], "invalid digit"),
        (&["bench", "--limit", "5", "--keyed"], "--keyed"),
    ] {
        let mut args = args.to_vec();
        args.extend(["--endpoint", nowhere]);
        let output = tallyctl(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    // What clap lets through goes to the server: 1, cannot reach it.
    for args in [
        &["incr", "x", "--window", "90"][..],
        &[
            "incr",
            "x",
            "--window",
            "1d",
            "--limit",
            "5",
            "--allow-partial",
        ],
        &["incr", "x", "--get", "--allow-partial"],
        &["incr", "x", "0", "--limit", "-3"],
        &["get", "x", "--window", "5m"],
        &["delete", "x", "--window", "1h"],
    ] {
        let mut args = args.to_vec();
        args.extend(["--endpoint", nowhere, "--timeout-ms", "2000"]);
        let output = tallyctl(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("cannot reach"), "{args:?}: {stderr}");
    }
}

#[test]
fn incr_help_documents_the_refusal_exit_status() {
    let help = stdout(&tallyctl(&["incr", "--help"]));
    for option in ["--get", "--window", "--limit", "--allow-partial"] {
        assert!(help.contains(option), "{help}");
    }
    assert!(help.contains("exits 3"), "{help}");
    let bench = stdout(&tallyctl(&["bench", "--help"]));
    for option in ["--get", "--window", "--limit"] {
        assert!(bench.contains(option), "{bench}");
    }
}
