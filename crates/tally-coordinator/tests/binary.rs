//! The `tally-coordinator` binary's start-up errors: one line on stderr that
//! names the file and the key, and a non-zero exit.

use std::time::Duration;

use assert_cmd::Command;

/// A binary that should exit at once is killed after this, so a test fails
/// instead of hanging if it ever keeps running.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

const GOOD: &str = r#"listen = "127.0.0.1:0"

[[nodes]]
id = "shard-1"
address = "127.0.0.1:7701"

[[nodes]]
id = "shard-2"
address = "127.0.0.1:7702"
"#;

/// Runs the binary on a config with `text`; returns stderr with the file's
/// path replaced by `FILE`.
fn start_with(text: &str, extra_args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tally-coordinator"))
        .timeout(EXIT_TIMEOUT)
        .arg("--config")
        .arg(&path)
        .args(extra_args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stderr =
        String::from_utf8_lossy(&output.stderr).replace(&path.display().to_string(), "FILE");
    (output.status.success(), stderr)
}

#[test]
fn config_errors_are_one_line_naming_file_and_key() {
    let cases = [
        (
            format!("{GOOD}\nretries = 3\n"),
            "FILE:11: unknown key `retries`",
        ),
        (
            GOOD.replace("shard-2", "shard-1"),
            "FILE: nodes[1].id: duplicate node id \"shard-1\"",
        ),
        (
            GOOD.replace("127.0.0.1:7702", "127.0.0.1"),
            "FILE: nodes[1].address: \"127.0.0.1\" is not a host:port address",
        ),
        (
            format!("vnodes_per_weight = 0\n{GOOD}"),
            "FILE: vnodes_per_weight: must be at least 1",
        ),
        (
            GOOD.replace("127.0.0.1:0", "everywhere"),
            "FILE: listen: \"everywhere\" is not an ip:port address",
        ),
        ("listen = [1, 2\n".to_string(), "FILE:2: invalid array"),
    ];
    for (text, expected) in cases {
        let (succeeded, stderr) = start_with(&text, &[]);
        assert!(!succeeded, "{expected}");
        let line = stderr.trim();
        assert_eq!(line.lines().count(), 1, "{stderr}");
        let message = line
            .strip_prefix("tally-coordinator: error: ")
            .unwrap_or_else(|| panic!("{line}"));
        assert!(
            message.starts_with(expected),
            "{message:?} should start with {expected:?}"
        );
    }
}

#[test]
fn a_bad_flag_is_blamed_on_the_command_line() {
    let (succeeded, stderr) = start_with(GOOD, &["--listen", "nowhere"]);
    assert!(!succeeded);
    assert_eq!(
        stderr.trim(),
        "tally-coordinator: error: command line: listen: \"nowhere\" is not an ip:port address"
    );
}

#[test]
fn a_missing_file_is_named() {
    let output = Command::new(env!("CARGO_BIN_EXE_tally-coordinator"))
        .timeout(EXIT_TIMEOUT)
        .args(["--config", "/nonexistent/coordinator.toml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("tally-coordinator: error: /nonexistent/coordinator.toml: cannot read:"),
        "{stderr}"
    );
}
