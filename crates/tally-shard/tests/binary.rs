//! The `tally-shard` binary's start-up errors: one line on stderr that names
//! the file (or the command line) and the key, a non-zero exit, and no data
//! directory created.

use std::time::Duration;

use assert_cmd::Command;

/// A binary that should exit at once is killed after this, so a test fails
/// instead of hanging if it ever keeps running.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

fn start_with(text: &str, extra_args: &[&str]) -> (bool, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shard.toml");
    std::fs::write(
        &path,
        text.replace("DATA", &dir.path().join("data").display().to_string()),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tally-shard"))
        .timeout(EXIT_TIMEOUT)
        .arg("--config")
        .arg(&path)
        .args(extra_args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stderr =
        String::from_utf8_lossy(&output.stderr).replace(&path.display().to_string(), "FILE");
    (output.status.success(), stderr, dir)
}

const GOOD: &str = "node_id = \"shard-1\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"DATA\"\n";

#[test]
fn config_errors_are_one_line_naming_file_and_key() {
    let cases = [
        (
            format!("{GOOD}cache_mb = 5\n"),
            "FILE:4: unknown key `cache_mb`",
        ),
        (
            format!("{GOOD}durability = \"eventually\"\n"),
            "FILE:4: durability: unknown variant `eventually`",
        ),
        (
            format!("{GOOD}flush_interval_ms = 0\n"),
            "FILE: flush_interval_ms: 0 is out of range",
        ),
        (
            GOOD.replace("127.0.0.1:0", "127.0.0.1:http"),
            "FILE: listen: \"127.0.0.1:http\" is not an ip:port address",
        ),
        (
            GOOD.replace("node_id = \"shard-1\"\n", ""),
            "FILE: node_id: is required",
        ),
        (
            GOOD.replace("shard-1", "shard/1"),
            "FILE: node_id: node id \"shard/1\" has '/'",
        ),
    ];
    for (text, expected) in cases {
        let (succeeded, stderr, dir) = start_with(&text, &[]);
        assert!(!succeeded, "{expected}");
        let line = stderr.trim();
        assert_eq!(line.lines().count(), 1, "{stderr}");
        let message = line
            .strip_prefix("tally-shard: error: ")
            .unwrap_or_else(|| panic!("{line}"));
        assert!(
            message.starts_with(expected),
            "{message:?} should start with {expected:?}"
        );
        assert!(
            !dir.path().join("data").exists(),
            "a bad config must not create the data directory"
        );
    }
}

#[test]
fn flags_are_checked_like_the_file() {
    let (succeeded, stderr, _dir) = start_with(GOOD, &["--durability", "maybe"]);
    assert!(!succeeded);
    assert!(stderr.contains("--durability"), "{stderr}");
    let (succeeded, stderr, _dir) = start_with(GOOD, &["--node-id", ""]);
    assert!(!succeeded);
    assert_eq!(
        stderr.trim(),
        "tally-shard: error: command line: node_id: node id must not be empty"
    );
}
