//! Bounded-time fuzz tests of both daemons' TOML config files, through the
//! public loaders only (`CoordinatorConfig::load`, `ShardConfig::load`, and
//! `tally_runtime::config_file::{load, parse}` beneath them): any text, and
//! copies of the shipped `config/coordinator.toml` and `config/shard-1.toml`
//! with lines dropped, repeated, swapped or renamed, values replaced and
//! bytes damaged.
//!
//! The properties, from `config_file`'s module docs ("every error is one
//! line that names the file and the key"):
//! - loading never panics: it returns a config or a `ConfigError`;
//! - every error is one line and starts with the file's path;
//! - a parse error's line is a line of the file;
//! - where a key is at fault (the text is valid TOML, so the file's
//!   contents and not its syntax are wrong), the error names that key: one
//!   of the keys the shipped files document, or an unknown key by its name.
//!
//! Each property runs a fixed number of cases (`ProptestConfig::cases`),
//! chosen so that the file takes a few seconds in a debug build: CI runs it
//! with every `cargo test`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use tally::coordinator::{CoordinatorConfig, CoordinatorOverrides};
use tally::runtime::config_file::{self, ConfigError};
use tally::shard::{ShardConfig, ShardOverrides};

/// Cases of each test. A case loads one file: a coordinator's builds its
/// ring of 3 × 4,096 tokens, a few milliseconds in a debug build, so each
/// test takes about a second.
const CASES: u32 = 256;

#[derive(Debug, Clone, Copy)]
enum Daemon {
    Coordinator,
    Shard,
}

impl Daemon {
    fn shipped_file(self) -> PathBuf {
        let name = match self {
            Daemon::Coordinator => "coordinator.toml",
            Daemon::Shard => "shard-1.toml",
        };
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name)
    }

    fn shipped(self) -> String {
        std::fs::read_to_string(self.shipped_file()).unwrap()
    }

    /// Loads `path` as the daemon would, with no flags.
    fn load(self, path: &Path) -> Result<(), ConfigError> {
        match self {
            Daemon::Coordinator => {
                CoordinatorConfig::load(path, CoordinatorOverrides::default()).map(drop)
            }
            Daemon::Shard => ShardConfig::load(Some(path), ShardOverrides::default()).map(drop),
        }
    }

    /// The keys the shipped file documents, set or commented out (`# key
    /// = ...`), `nodes` for its `[[nodes]]` tables: what an operator may
    /// write, and so what an error may name.
    fn documented_keys(self) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for line in self.shipped().lines() {
            let line = line.trim_start_matches('#').trim();
            if line == "[[nodes]]" {
                keys.insert("nodes".to_string());
            }
            if let Some((key, _)) = line.split_once(" = ") {
                if !key.is_empty()
                    && key
                        .bytes()
                        .all(|byte| byte.is_ascii_lowercase() || byte == b'_')
                {
                    keys.insert(key.to_string());
                }
            }
        }
        keys
    }
}

/// `nodes[2].address` names the key `address` of a `[[nodes]]` table;
/// `nodes[2]` the table itself, of `nodes`.
fn documented_name(key: &str) -> &str {
    match key.strip_prefix("nodes[") {
        Some(rest) => match rest.split_once("].") {
            Some((_, field)) => field,
            None => "nodes",
        },
        None => key,
    }
}

/// Whether `text` is TOML at all: parsed into a free-form value (no
/// schema), through the same parser as the daemons.
fn is_toml(text: &str) -> bool {
    config_file::parse::<serde_json::Value>(Path::new("syntax-check.toml"), text).is_ok()
}

/// Checks an error of loading `text` from `path` against the properties
/// in the module docs.
fn check_error(
    error: &ConfigError,
    path: &Path,
    text: &str,
    keys: &BTreeSet<String>,
) -> Result<(), TestCaseError> {
    let message = error.to_string();
    let file = path.display().to_string();
    prop_assert!(
        message.starts_with(&file),
        "does not name the file: {message}"
    );
    prop_assert!(!message.contains('\n'), "more than one line: {message:?}");
    match error {
        ConfigError::Read { path: read, .. } => prop_assert_eq!(read, path),
        ConfigError::Parse {
            path: parsed,
            line,
            message,
        } => {
            prop_assert_eq!(parsed, path);
            prop_assert!(
                *line >= 1 && *line <= text.lines().count() + 1,
                "line {line}"
            );
            if is_toml(text) {
                // Valid TOML refused by the schema: a key is at fault, and
                // the error names it, at a line that holds it.
                let unknown = message
                    .strip_prefix("unknown key `")
                    .and_then(|rest| rest.split_once('`'))
                    .map(|(key, _)| key);
                let documented = message
                    .split_once(": ")
                    .map(|(key, _)| documented_name(key))
                    .filter(|key| keys.contains(*key));
                let Some(key) = unknown.or(documented) else {
                    return Err(TestCaseError::fail(format!("names no key: {message}")));
                };
                let at = text.lines().nth(line - 1).unwrap_or_default();
                prop_assert!(
                    at.contains(key),
                    "{key} is not on line {line}, {at:?}: {message}"
                );
            }
        }
        ConfigError::Invalid {
            origin,
            key,
            message: _,
        } => {
            prop_assert_eq!(origin, &file);
            prop_assert!(
                keys.contains(documented_name(key)),
                "undocumented key {key:?}"
            );
            prop_assert!(message.contains(&format!(": {key}: ")), "{message}");
        }
    }
    Ok(())
}

/// Writes `contents` as the daemon's config file and loads it, checking
/// the error if any.
fn load_and_check(
    daemon: Daemon,
    dir: &Path,
    contents: &[u8],
    keys: &BTreeSet<String>,
) -> Result<(), TestCaseError> {
    let path = dir.join(match daemon {
        Daemon::Coordinator => "coordinator.toml",
        Daemon::Shard => "shard.toml",
    });
    std::fs::write(&path, contents).unwrap();
    if let Err(error) = daemon.load(&path) {
        let text = String::from_utf8_lossy(contents);
        check_error(&error, &path, &text, keys)?;
        if std::str::from_utf8(contents).is_err() {
            prop_assert!(matches!(error, ConfigError::Read { .. }), "{error}");
        }
    }
    Ok(())
}

/// Values of every TOML type, and of every range the keys check: zero,
/// negative, past `u32`, `u64` and `i64`, addresses good and bad, URLs,
/// empty and multi-line strings, arrays, tables.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop_oneof![
            Just("0"),
            Just("1"),
            Just("-1"),
            Just("8"),
            Just("1024"),
            Just("1025"),
            Just("4096"),
            Just("65536"),
            Just("1000001"),
            Just("4294967296"),
            Just("9223372036854775807"),
            Just("18446744073709551616"),
            Just("1.5"),
            Just("nan"),
            Just("true"),
            Just("1979-05-27T07:32:00Z"),
            Just("[]"),
            Just("[1, \"a\"]"),
            Just("{ id = \"shard-9\" }"),
            Just("\"\""),
            Just("\"sync\""),
            Just("\"async\""),
            Just("\"json\""),
            Just("\"127.0.0.1:0\""),
            Just("\"[::1]:7700\""),
            Just("\"localhost:7700\""),
            Just("\"host:0\""),
            Just("\"http://127.0.0.1:4317\""),
            Just("\"collector:4317\""),
            Just("\"\"\"\nmulti\nline\"\"\""),
            Just("\"a\\nb\""),
        ]
        .prop_map(str::to_string),
        any::<i64>().prop_map(|number| number.to_string()),
        "\\PC{0,12}".prop_map(|text| format!("{text:?}")),
    ]
}

/// A change to a config file, by line: which line is taken modulo the
/// file's lines.
#[derive(Debug, Clone)]
enum Mutation {
    Drop(usize),
    Repeat(usize),
    Swap(usize, usize),
    /// Sets a `key = value` line's value.
    SetValue(usize, String),
    /// Changes a key's name.
    Rename(usize, String),
    Insert(usize, String),
    /// Bytes: one changed, the text cut, bytes inserted.
    Flip(usize, u8),
    Cut(usize),
    Splice(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let line = any::<usize>;
    prop_oneof![
        2 => line().prop_map(Mutation::Drop),
        1 => line().prop_map(Mutation::Repeat),
        1 => (line(), line()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        6 => (line(), value()).prop_map(|(at, value)| Mutation::SetValue(at, value)),
        1 => (line(), "[a-z_]{1,3}").prop_map(|(at, suffix)| Mutation::Rename(at, suffix)),
        2 => (
            line(),
            prop_oneof![
                (
                    prop_oneof![Just("stripes"), Just("listen"), Just("colour"), Just("node_id")],
                    value()
                )
                    .prop_map(|(key, value)| format!("{key} = {value}")),
                Just("[[nodes]]".to_string()),
                Just("[nodes]".to_string()),
                Just("[[nodes]]\nid = \"shard-9\"\naddress = \"127.0.0.1:7709\"".to_string()),
                "\\PC{0,20}",
            ]
        )
            .prop_map(|(at, line)| Mutation::Insert(at, line)),
        2 => (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
        1 => any::<usize>().prop_map(Mutation::Cut),
        1 => (any::<usize>(), vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Splice(at, bytes)),
    ]
}

/// The `at`-th line (modulo their number) that sets a key, or names one
/// commented out: the shipped files are mostly comments, which a value
/// change would leave alone.
fn key_line(lines: &mut [String], at: usize) -> Option<&mut String> {
    let count = lines.iter().filter(|line| line.contains(" = ")).count();
    if count == 0 {
        return None;
    }
    lines
        .iter_mut()
        .filter(|line| line.contains(" = "))
        .nth(at % count)
}

fn mutate(text: &str, mutations: &[Mutation]) -> Vec<u8> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut bytes = None::<Vec<u8>>;
    for mutation in mutations {
        // Line mutations apply while the text is still whole lines.
        if bytes.is_none() && !lines.is_empty() {
            let count = lines.len();
            match mutation {
                Mutation::Drop(at) => {
                    lines.remove(at % count);
                    continue;
                }
                Mutation::Repeat(at) => {
                    let line = lines[at % count].clone();
                    lines.insert(at % count, line);
                    continue;
                }
                Mutation::Swap(a, b) => {
                    lines.swap(a % count, b % count);
                    continue;
                }
                Mutation::SetValue(at, value) => {
                    if let Some(line) = key_line(&mut lines, *at) {
                        let (key, _) = line.split_once(" = ").expect("a key line");
                        // A key commented out is set too.
                        *line = format!("{} = {value}", key.trim_start_matches("# "));
                    }
                    continue;
                }
                Mutation::Rename(at, suffix) => {
                    if let Some(line) = key_line(&mut lines, *at) {
                        let (key, value) = line.split_once(" = ").expect("a key line");
                        *line = format!("{key}{suffix} = {value}");
                    }
                    continue;
                }
                Mutation::Insert(at, inserted) => {
                    lines.insert(at % (count + 1), inserted.clone());
                    continue;
                }
                _ => {}
            }
        }
        let bytes = bytes.get_or_insert_with(|| (lines.join("\n") + "\n").into_bytes());
        match mutation {
            Mutation::Flip(at, mask) if !bytes.is_empty() => {
                let at = at % bytes.len();
                bytes[at] ^= mask;
            }
            Mutation::Cut(at) => bytes.truncate(at % (bytes.len() + 1)),
            Mutation::Splice(at, inserted) => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, inserted.iter().copied());
            }
            _ => {}
        }
    }
    bytes.unwrap_or_else(|| (lines.join("\n") + "\n").into_bytes())
}

/// Any text: any characters, bytes that are not UTF-8, TOML-like lines,
/// and nesting deep enough to find a parser that recurses without limit.
fn any_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "\\PC{0,120}".prop_map(String::into_bytes),
        vec(any::<u8>(), 0..120),
        vec(
            prop_oneof![
                ("[a-z_]{1,12}", value()).prop_map(|(key, value)| format!("{key} = {value}")),
                Just("[[nodes]]".to_string()),
                "[ -~]{0,30}",
            ],
            0..8
        )
        .prop_map(|lines| lines.join("\n").into_bytes()),
        (
            1..3000usize,
            prop_oneof![Just("["), Just("{ a = "), Just("[[")]
        )
            .prop_map(|(depth, open)| format!("stripes = {}", open.repeat(depth)).into_bytes()),
    ]
}

fn run(daemon: Daemon, contents: impl Strategy<Value = Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let keys = daemon.documented_keys();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: CASES,
        ..ProptestConfig::default()
    });
    runner
        .run(&contents, |contents| {
            load_and_check(daemon, dir.path(), &contents, &keys)
        })
        .unwrap();
}

#[test]
fn the_shipped_files_load() {
    for daemon in [Daemon::Coordinator, Daemon::Shard] {
        daemon.load(&daemon.shipped_file()).unwrap();
        // The key list the checks rely on is read from them.
        assert!(daemon.documented_keys().contains("listen"), "{daemon:?}");
    }
}

#[test]
fn mutated_coordinator_files_load_or_name_file_and_key() {
    let shipped = Daemon::Coordinator.shipped();
    run(
        Daemon::Coordinator,
        vec(mutation(), 1..4).prop_map(move |mutations| mutate(&shipped, &mutations)),
    );
}

#[test]
fn mutated_shard_files_load_or_name_file_and_key() {
    let shipped = Daemon::Shard.shipped();
    run(
        Daemon::Shard,
        vec(mutation(), 1..4).prop_map(move |mutations| mutate(&shipped, &mutations)),
    );
}

#[test]
fn any_text_as_a_coordinator_file_is_refused_naming_the_file() {
    run(Daemon::Coordinator, any_text());
}

#[test]
fn any_text_as_a_shard_file_is_refused_naming_the_file() {
    run(Daemon::Shard, any_text());
}

#[test]
fn a_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    for daemon in [Daemon::Coordinator, Daemon::Shard] {
        let error = daemon.load(&path).unwrap_err();
        check_error(&error, &path, "", &daemon.documented_keys()).unwrap();
        assert!(matches!(error, ConfigError::Read { .. }), "{error}");
    }
}
