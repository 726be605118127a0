//! A shard node's configuration: a strict TOML file (`config/shard-1.toml`)
//! whose values command-line flags override.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tally_runtime::config_file::{
    self, flag_or_file, ranged_setting, ConfigError, Observability, ObservabilityKeys, TlsKeys,
    COMMAND_LINE,
};
use tally_runtime::process::LogFormat;
use tally_runtime::tls::TlsFiles;

use crate::store::{KeyRetention, DEFAULT_KEY_RETENTION, DEFAULT_MAX_KEYS};
use crate::windows::{DEFAULT_WINDOW_GRACE_MS, MAX_WINDOW_GRACE_MS};

/// When an increment is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Once the log write that holds it is on disk (group commit: one
    /// write and one fdatasync serve every increment that arrived while the
    /// previous one ran).
    Sync,
    /// Once in memory; in the log within the flush interval. A crash may
    /// lose that window.
    Async,
}

impl Durability {
    /// `"sync"` or `"async"`, as in the config file.
    pub fn as_str(self) -> &'static str {
        tally_proto::pb::Durability::from(self).public_name()
    }
}

impl From<Durability> for tally_proto::pb::Durability {
    fn from(durability: Durability) -> Self {
        match durability {
            Durability::Sync => tally_proto::pb::Durability::Sync,
            Durability::Async => tally_proto::pb::Durability::Async,
        }
    }
}

impl std::str::FromStr for Durability {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "sync" => Ok(Durability::Sync),
            "async" => Ok(Durability::Async),
            other => Err(format!(
                "{other:?} is not a durability; use \"sync\" or \"async\""
            )),
        }
    }
}

/// Default for `flush_interval_ms`.
pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 50;
/// Default for `log_segment_bytes`: 16 MiB.
pub const DEFAULT_LOG_SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// Default for `checkpoint_log_bytes`: 64 MiB, replayed in well under a
/// second at a start after a crash.
pub const DEFAULT_CHECKPOINT_LOG_BYTES: u64 = 64 * 1024 * 1024;
/// Default for `checkpoint_interval_ms`: one minute.
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 60_000;
/// Longest `idempotency_retention_secs`: 30 days.
const MAX_RETENTION_SECS: u64 = 30 * 24 * 60 * 60;
/// Largest `idempotency_max_keys`: about 20 GB of memory at ~200 bytes a key.
const MAX_KEYS_LIMIT: usize = 100_000_000;

/// The file as written: every key optional here, so that flags can supply
/// what the file leaves out; [`ShardConfig::load`] checks what is required.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShardConfig {
    node_id: Option<String>,
    listen: Option<String>,
    metrics_listen: Option<String>,
    log_format: Option<LogFormat>,
    otlp_endpoint: Option<String>,
    data_dir: Option<PathBuf>,
    durability: Option<Durability>,
    flush_interval_ms: Option<u64>,
    idempotency_retention_secs: Option<u64>,
    idempotency_max_keys: Option<usize>,
    log_segment_bytes: Option<u64>,
    checkpoint_log_bytes: Option<u64>,
    checkpoint_interval_ms: Option<u64>,
    window_grace_ms: Option<u64>,
    tls: Option<TlsKeys>,
}

/// Values from the command line, each overriding the file's.
#[derive(Debug, Default, Clone)]
pub struct ShardOverrides {
    /// `--node-id`
    pub node_id: Option<String>,
    /// `--listen`
    pub listen: Option<String>,
    /// `--metrics-listen`, `--log-format`, `--otlp-endpoint`
    pub observability: ObservabilityKeys,
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--durability`
    pub durability: Option<Durability>,
    /// `--flush-interval-ms`
    pub flush_interval_ms: Option<u64>,
    /// `--idempotency-retention-secs`
    pub idempotency_retention_secs: Option<u64>,
    /// `--idempotency-max-keys`
    pub idempotency_max_keys: Option<usize>,
    /// `--log-segment-bytes`
    pub log_segment_bytes: Option<u64>,
    /// `--checkpoint-log-bytes`
    pub checkpoint_log_bytes: Option<u64>,
    /// `--checkpoint-interval-ms`
    pub checkpoint_interval_ms: Option<u64>,
    /// `--window-grace-ms`
    pub window_grace_ms: Option<u64>,
    /// `--tls-cert`, `--tls-key`, `--tls-ca`
    pub tls: TlsKeys,
}

/// A shard node's validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardConfig {
    /// This node's id, as the coordinators' membership names it.
    pub node_id: String,
    /// Address to serve gRPC on.
    pub listen: SocketAddr,
    /// Metrics, log lines and spans.
    pub observability: Observability,
    /// Where this node keeps its log and checkpoint.
    pub data_dir: PathBuf,
    /// When increments are acknowledged.
    pub durability: Durability,
    /// Async mode: most time between an acknowledgement and its write to
    /// the log. Both modes: how soon a failed write is tried again when no
    /// new one comes.
    pub flush_interval: Duration,
    /// How long, and how many, idempotency keys are remembered.
    pub key_retention: KeyRetention,
    /// A new log segment starts once the current one holds this many bytes.
    pub log_segment_bytes: u64,
    /// A checkpoint starts once the log holds this many bytes...
    pub checkpoint_log_bytes: u64,
    /// ... or this long after the last one began, if anything changed.
    pub checkpoint_interval: Duration,
    /// How long after a window's end (by this node's clock) the node still
    /// applies to it and reads it; it reclaims the window 10 s later
    /// (`crate::windows`).
    pub window_grace: Duration,
    /// TLS on the node's ports, its internal port served only to clients
    /// with a certificate the CA signed: none, plaintext.
    pub tls: Option<TlsFiles>,
}

impl ShardConfig {
    /// A config for tests and the dev cluster: sync durability, default
    /// flush interval.
    pub fn new(
        node_id: impl Into<String>,
        listen: SocketAddr,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        ShardConfig {
            node_id: node_id.into(),
            listen,
            observability: Observability::default(),
            data_dir: data_dir.into(),
            durability: Durability::Sync,
            flush_interval: Duration::from_millis(DEFAULT_FLUSH_INTERVAL_MS),
            key_retention: KeyRetention::default(),
            log_segment_bytes: DEFAULT_LOG_SEGMENT_BYTES,
            checkpoint_log_bytes: DEFAULT_CHECKPOINT_LOG_BYTES,
            checkpoint_interval: Duration::from_millis(DEFAULT_CHECKPOINT_INTERVAL_MS),
            window_grace: Duration::from_millis(DEFAULT_WINDOW_GRACE_MS),
            tls: None,
        }
    }

    /// Reads the file at `path` (if any) and applies `overrides`.
    pub fn load(path: Option<&Path>, overrides: ShardOverrides) -> Result<Self, ConfigError> {
        let raw: RawShardConfig = match path {
            Some(path) => config_file::load(path)?,
            None => RawShardConfig::default(),
        };
        let file_origin = path.map_or_else(
            || COMMAND_LINE.to_string(),
            |path| path.display().to_string(),
        );
        let missing = |origin: &str, key: &str| {
            ConfigError::invalid(origin, key, "is required (in the file or as a flag)")
        };

        let (node_id, origin) = flag_or_file(overrides.node_id, raw.node_id, &file_origin);
        let node_id = node_id.ok_or_else(|| missing(origin, "node_id"))?;
        config_file::validate_node_id(&node_id)
            .map_err(|message| ConfigError::invalid(origin, "node_id", message))?;

        let (listen, origin) = flag_or_file(overrides.listen, raw.listen, &file_origin);
        let listen = listen.ok_or_else(|| missing(origin, "listen"))?;
        let listen = config_file::parse_listen_address(&listen)
            .map_err(|message| ConfigError::invalid(origin, "listen", message))?;

        let observability = Observability::load(
            overrides.observability,
            ObservabilityKeys {
                metrics_listen: raw.metrics_listen,
                log_format: raw.log_format,
                otlp_endpoint: raw.otlp_endpoint,
            },
            &file_origin,
        )?;

        let (data_dir, origin) = flag_or_file(overrides.data_dir, raw.data_dir, &file_origin);
        let data_dir = data_dir.ok_or_else(|| missing(origin, "data_dir"))?;
        if data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                origin,
                "data_dir",
                "must not be empty",
            ));
        }

        let (durability, _) = flag_or_file(overrides.durability, raw.durability, &file_origin);
        let flush_interval_ms = ranged_setting(
            overrides.flush_interval_ms,
            raw.flush_interval_ms,
            &file_origin,
            "flush_interval_ms",
            DEFAULT_FLUSH_INTERVAL_MS,
            1..=60_000,
        )?;
        let retention_secs = ranged_setting(
            overrides.idempotency_retention_secs,
            raw.idempotency_retention_secs,
            &file_origin,
            "idempotency_retention_secs",
            DEFAULT_KEY_RETENTION.as_secs(),
            1..=MAX_RETENTION_SECS,
        )?;
        let max_keys = ranged_setting(
            overrides.idempotency_max_keys,
            raw.idempotency_max_keys,
            &file_origin,
            "idempotency_max_keys",
            DEFAULT_MAX_KEYS,
            1..=MAX_KEYS_LIMIT,
        )?;
        let log_segment_bytes = ranged_setting(
            overrides.log_segment_bytes,
            raw.log_segment_bytes,
            &file_origin,
            "log_segment_bytes",
            DEFAULT_LOG_SEGMENT_BYTES,
            4096..=1 << 30,
        )?;
        let checkpoint_log_bytes = ranged_setting(
            overrides.checkpoint_log_bytes,
            raw.checkpoint_log_bytes,
            &file_origin,
            "checkpoint_log_bytes",
            DEFAULT_CHECKPOINT_LOG_BYTES,
            4096..=1 << 40,
        )?;
        let checkpoint_interval_ms = ranged_setting(
            overrides.checkpoint_interval_ms,
            raw.checkpoint_interval_ms,
            &file_origin,
            "checkpoint_interval_ms",
            DEFAULT_CHECKPOINT_INTERVAL_MS,
            10..=86_400_000,
        )?;
        let window_grace_ms = ranged_setting(
            overrides.window_grace_ms,
            raw.window_grace_ms,
            &file_origin,
            "window_grace_ms",
            DEFAULT_WINDOW_GRACE_MS,
            1..=MAX_WINDOW_GRACE_MS,
        )?;

        let tls = TlsKeys::load(overrides.tls, raw.tls, path, |files| {
            files
                .server_config(tally_runtime::tls::ClientAuth::Required, true)
                .map(drop)
        })?;

        Ok(ShardConfig {
            node_id,
            listen,
            observability,
            data_dir,
            durability: durability.unwrap_or(Durability::Sync),
            flush_interval: Duration::from_millis(flush_interval_ms),
            key_retention: KeyRetention {
                window: Duration::from_secs(retention_secs),
                max_keys,
            },
            log_segment_bytes,
            checkpoint_log_bytes,
            checkpoint_interval: Duration::from_millis(checkpoint_interval_ms),
            window_grace: Duration::from_millis(window_grace_ms),
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str, overrides: ShardOverrides) -> Result<ShardConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.toml");
        std::fs::write(&path, text).unwrap();
        ShardConfig::load(Some(&path), overrides).map_err(|error| {
            error
                .to_string()
                .replace(&path.display().to_string(), "FILE")
        })
    }

    const GOOD: &str =
        "node_id = \"shard-1\"\nlisten = \"127.0.0.1:7701\"\ndata_dir = \"data/shard-1\"\n";

    #[test]
    fn reads_a_file_with_defaults() {
        let config = load_text(GOOD, ShardOverrides::default()).unwrap();
        assert_eq!(config.node_id, "shard-1");
        assert_eq!(config.durability, Durability::Sync);
        assert_eq!(
            config.flush_interval,
            Duration::from_millis(DEFAULT_FLUSH_INTERVAL_MS)
        );
        assert_eq!(config.window_grace, Duration::from_secs(60));
    }

    #[test]
    fn window_grace_ms_is_read_from_the_file_and_the_flag() {
        let config = load_text(
            &format!("{GOOD}window_grace_ms = 1000\n"),
            ShardOverrides::default(),
        )
        .unwrap();
        assert_eq!(config.window_grace, Duration::from_secs(1));
        let config = load_text(
            &format!("{GOOD}window_grace_ms = 1000\n"),
            ShardOverrides {
                window_grace_ms: Some(86_400_000),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(config.window_grace, Duration::from_secs(86_400));
        let error = load_text(
            GOOD,
            ShardOverrides {
                window_grace_ms: Some(0),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            error.starts_with("command line: window_grace_ms: 0 is out of range"),
            "{error}"
        );
    }

    #[test]
    fn flags_override_the_file() {
        let overrides = ShardOverrides {
            listen: Some("127.0.0.1:0".into()),
            durability: Some(Durability::Async),
            flush_interval_ms: Some(5),
            ..Default::default()
        };
        let config = load_text(GOOD, overrides).unwrap();
        assert_eq!(config.listen.port(), 0);
        assert_eq!(config.durability, Durability::Async);
        assert_eq!(config.flush_interval, Duration::from_millis(5));
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let cases = [
            (
                format!("{GOOD}colour = 1\n"),
                "FILE:4: unknown key `colour`",
            ),
            (
                GOOD.replace("127.0.0.1:7701", "nowhere"),
                "FILE: listen: \"nowhere\" is not an ip:port address",
            ),
            (
                format!("{GOOD}metrics_listen = \"localhost:9701\"\n"),
                "FILE: metrics_listen: \"localhost:9701\" is not an ip:port address",
            ),
            (
                format!("{GOOD}durability = \"maybe\"\n"),
                "FILE:4: durability: unknown variant `maybe`",
            ),
            (
                format!("{GOOD}flush_interval_ms = 0\n"),
                "FILE: flush_interval_ms: 0 is out of range",
            ),
            (
                format!("{GOOD}idempotency_retention_secs = 0\n"),
                "FILE: idempotency_retention_secs: 0 is out of range",
            ),
            (
                format!("{GOOD}idempotency_max_keys = 0\n"),
                "FILE: idempotency_max_keys: 0 is out of range",
            ),
            (
                format!("{GOOD}idempotency_max_keys = -5\n"),
                "FILE:4: idempotency_max_keys: invalid value",
            ),
            (
                format!("{GOOD}log_segment_bytes = 100\n"),
                "FILE: log_segment_bytes: 100 is out of range",
            ),
            (
                format!("{GOOD}checkpoint_log_bytes = 0\n"),
                "FILE: checkpoint_log_bytes: 0 is out of range",
            ),
            (
                format!("{GOOD}checkpoint_interval_ms = 1\n"),
                "FILE: checkpoint_interval_ms: 1 is out of range",
            ),
            (
                format!("{GOOD}window_grace_ms = 0\n"),
                "FILE: window_grace_ms: 0 is out of range",
            ),
            (
                format!("{GOOD}window_grace_ms = 86400001\n"),
                "FILE: window_grace_ms: 86400001 is out of range",
            ),
            (
                format!("{GOOD}window_grace_ms = \"1m\"\n"),
                "FILE:4: window_grace_ms: invalid type",
            ),
            (
                format!("{GOOD}log_format = \"xml\"\n"),
                "FILE:4: log_format: unknown variant `xml`",
            ),
            (
                format!("{GOOD}otlp_endpoint = \"ftp://collector\"\n"),
                "FILE: otlp_endpoint: \"ftp://collector\" is not an http:// URL (TLS to the collector is not supported yet)",
            ),
            (
                GOOD.replace("shard-1\"", "shard 1\""),
                "FILE: node_id: node id \"shard 1\" has ' '",
            ),
            (
                GOOD.replace("node_id = \"shard-1\"\n", ""),
                "FILE: node_id: is required",
            ),
        ];
        for (text, expected) in cases {
            let error = load_text(&text, ShardOverrides::default()).unwrap_err();
            assert!(
                error.starts_with(expected),
                "{error:?} does not start with {expected:?}"
            );
            assert!(!error.contains('\n'), "{error:?}");
        }
    }

    #[test]
    fn a_bad_flag_is_blamed_on_the_command_line() {
        let overrides = ShardOverrides {
            listen: Some("bad".into()),
            ..Default::default()
        };
        let error = load_text(GOOD, overrides).unwrap_err();
        assert!(error.starts_with("command line: listen:"), "{error}");
    }
}
