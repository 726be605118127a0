//! `tallyctl dev` as a process: what it says at start, and when it cannot
//! start.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest wait for a line of the dev cluster's log.
const LOG_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn a_fresh_cluster_says_its_shards_started_empty() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tallyctl"))
        .args(["dev", "--port", "0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "info")
        .env_remove("TALLY_ENDPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, received) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if lines.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut log = Vec::new();
    let mut empty = 0;
    while empty < 3 {
        let left = LOG_TIMEOUT.saturating_sub(started.elapsed());
        let Ok(line) = received.recv_timeout(left) else {
            let _ = child.kill();
            panic!("not every shard said it started empty:\n{}", log.join("\n"));
        };
        if line.contains("started empty; no copies to restore") {
            empty += 1;
        }
        let restored = line.contains("restored from replicas");
        log.push(line);
        if restored {
            // Nothing was restored: the line says what did not happen.
            let _ = child.kill();
            panic!("{}", log.join("\n"));
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn busy_ports_are_an_error_that_suggests_others() {
    let dir = tempfile::tempdir().unwrap();
    // The coordinator's port is taken (as by a first `tallyctl dev`).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let output = assert_cmd::Command::new(env!("CARGO_BIN_EXE_tallyctl"))
        .timeout(LOG_TIMEOUT)
        .args([
            "dev",
            "--shards",
            "1",
            "--port",
            &port.to_string(),
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("tallyctl: error: "), "{stderr}");
    // The shard takes the port after the coordinator's, and binds first,
    // and the metrics ports lie above: if another process (another test)
    // holds one of those, the error names it instead of ours. Any of them
    // is the error this test is about.
    assert!(stderr.contains("Address already in use"), "{stderr}");
    let named: u16 = stderr
        .split("cannot listen on 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("names no port: {stderr}"));
    assert!(named >= port, "names port {named}, below {port}: {stderr}");
    assert!(stderr.contains("--port 0"), "{stderr}");
}
