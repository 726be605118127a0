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
}
