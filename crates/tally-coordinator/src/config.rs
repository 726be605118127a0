//! The coordinator's configuration: a strict TOML file
//! (`config/coordinator.toml`) with the static membership, whose scalar
//! values command-line flags override.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tally_ring::{NodeSpec, Ring, DEFAULT_VNODES_PER_WEIGHT};
use tally_runtime::config_file::{
    self, check_range, flag_or_file, ConfigError, Observability, ObservabilityKeys, TlsKeys,
};
use tally_runtime::process::LogFormat;
use tally_runtime::tls::TlsFiles;

/// Default stripes per counter.
pub const DEFAULT_STRIPES: u32 = 8;
/// Most stripes per counter: each read of a counter touches all of them.
pub const MAX_STRIPES: u32 = 1024;
/// Default for `shard_timeout_ms`.
pub const DEFAULT_SHARD_TIMEOUT_MS: u64 = 5_000;
/// Default for `max_in_flight_batches_per_shard`.
pub const DEFAULT_MAX_IN_FLIGHT_BATCHES_PER_SHARD: usize = 4;
/// Default for `max_increments_per_shard_batch`.
pub const DEFAULT_MAX_INCREMENTS_PER_SHARD_BATCH: usize = 16_384;
/// Default for `health_interval_ms`.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 500;
/// Default for `health_timeout_ms`.
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 1_000;
/// Default for `replication_factor`.
pub const DEFAULT_REPLICATION_FACTOR: usize = 2;
/// Default for `replication_interval_ms`.
pub const DEFAULT_REPLICATION_INTERVAL_MS: u64 = 1_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinatorConfig {
    listen: Option<String>,
    metrics_listen: Option<String>,
    log_format: Option<LogFormat>,
    otlp_endpoint: Option<String>,
    stripes: Option<u32>,
    vnodes_per_weight: Option<u32>,
    shard_timeout_ms: Option<u64>,
    max_in_flight_batches_per_shard: Option<usize>,
    max_increments_per_shard_batch: Option<usize>,
    health_interval_ms: Option<u64>,
    health_timeout_ms: Option<u64>,
    replication_factor: Option<usize>,
    replication_interval_ms: Option<u64>,
    tls: Option<TlsKeys>,
    tokens_file: Option<PathBuf>,
    #[serde(default)]
    nodes: Vec<RawNode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: String,
    address: String,
    weight: Option<u32>,
}

/// Values from the command line, each overriding the file's.
#[derive(Debug, Default, Clone)]
pub struct CoordinatorOverrides {
    /// `--listen`
    pub listen: Option<String>,
    /// `--metrics-listen`, `--log-format`, `--otlp-endpoint`
    pub observability: ObservabilityKeys,
    /// `--shard-timeout-ms`
    pub shard_timeout_ms: Option<u64>,
    /// `--tls-cert`, `--tls-key`, `--tls-ca`
    pub tls: TlsKeys,
    /// `--tokens-file`
    pub tokens_file: Option<PathBuf>,
}

/// One shard node of the static membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node's id; the shard checks it on every request.
    pub id: String,
    /// `host:port` to reach the node at.
    pub address: String,
    /// Relative share of the ring: vnodes = `vnodes_per_weight * weight`.
    pub weight: u32,
}

/// The coordinator's validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// Address to serve the public API on.
    pub listen: SocketAddr,
    /// Metrics, log lines and spans. Not changed by a reload.
    pub observability: Observability,
    /// Stripes per counter. Must be identical on every coordinator.
    pub stripes: u32,
    /// Ring tokens per unit of node weight.
    pub vnodes_per_weight: u32,
    /// Longest wait for one internal call to a shard.
    pub shard_timeout: Duration,
    /// Internal apply calls a coordinator keeps in flight to one shard;
    /// increments arriving meanwhile gather into the next call.
    pub max_in_flight_batches_per_shard: usize,
    /// Most increments coalesced into one internal apply call. One public
    /// call's share for a node is never split: a larger one goes alone.
    pub max_increments_per_shard_batch: usize,
    /// How often each shard node is probed while it is up.
    pub health_interval: Duration,
    /// How long a probe waits for an answer before the node is down.
    pub health_timeout: Duration,
    /// Copies of each node's entries: its own, and `replication_factor - 1`
    /// replicas on the next distinct nodes of the ring (fewer if there are
    /// not that many other nodes).
    pub replication_factor: usize,
    /// How often each node's changes are copied to its replicas.
    pub replication_interval: Duration,
    /// The shard nodes.
    pub nodes: Vec<NodeConfig>,
    /// TLS on the public and metrics ports, and mutual TLS to the shards:
    /// none, plaintext. The files are read again on a reload; their paths
    /// are not changed by one.
    pub tls: Option<TlsFiles>,
    /// The bearer tokens that may call the public API
    /// (`tally_runtime::tokens`): none, anyone may. Read again on a
    /// reload; its path is not changed by one.
    pub tokens_file: Option<PathBuf>,
}

impl CoordinatorConfig {
    /// A config with defaults, for tests and the dev cluster.
    pub fn new(listen: SocketAddr, nodes: Vec<NodeConfig>) -> Self {
        CoordinatorConfig {
            listen,
            observability: Observability::default(),
            stripes: DEFAULT_STRIPES,
            vnodes_per_weight: DEFAULT_VNODES_PER_WEIGHT,
            shard_timeout: Duration::from_millis(DEFAULT_SHARD_TIMEOUT_MS),
            max_in_flight_batches_per_shard: DEFAULT_MAX_IN_FLIGHT_BATCHES_PER_SHARD,
            max_increments_per_shard_batch: DEFAULT_MAX_INCREMENTS_PER_SHARD_BATCH,
            health_interval: Duration::from_millis(DEFAULT_HEALTH_INTERVAL_MS),
            health_timeout: Duration::from_millis(DEFAULT_HEALTH_TIMEOUT_MS),
            replication_factor: DEFAULT_REPLICATION_FACTOR,
            replication_interval: Duration::from_millis(DEFAULT_REPLICATION_INTERVAL_MS),
            nodes,
            tls: None,
            tokens_file: None,
        }
    }

    /// Reads the file at `path` and applies `overrides`.
    pub fn load(path: &Path, overrides: CoordinatorOverrides) -> Result<Self, ConfigError> {
        let raw: RawCoordinatorConfig = config_file::load(path)?;
        let file = path.display().to_string();

        let (listen, origin) = flag_or_file(overrides.listen, raw.listen, &file);
        let listen = listen.ok_or_else(|| ConfigError::invalid(origin, "listen", "is required"))?;
        let listen = config_file::parse_listen_address(&listen)
            .map_err(|message| ConfigError::invalid(origin, "listen", message))?;

        let observability = Observability::load(
            overrides.observability,
            ObservabilityKeys {
                metrics_listen: raw.metrics_listen,
                log_format: raw.log_format,
                otlp_endpoint: raw.otlp_endpoint,
            },
            &file,
        )?;

        let stripes = check_range(
            &file,
            "stripes",
            raw.stripes.unwrap_or(DEFAULT_STRIPES),
            1..=MAX_STRIPES,
        )?;
        let vnodes_per_weight = raw.vnodes_per_weight.unwrap_or(DEFAULT_VNODES_PER_WEIGHT);
        if vnodes_per_weight == 0 {
            return Err(ConfigError::invalid(
                &file,
                "vnodes_per_weight",
                "must be at least 1",
            ));
        }

        let (shard_timeout_ms, origin) =
            flag_or_file(overrides.shard_timeout_ms, raw.shard_timeout_ms, &file);
        let shard_timeout_ms = check_range(
            origin,
            "shard_timeout_ms",
            shard_timeout_ms.unwrap_or(DEFAULT_SHARD_TIMEOUT_MS),
            1..=600_000,
        )?;
        let max_in_flight_batches_per_shard = check_range(
            &file,
            "max_in_flight_batches_per_shard",
            raw.max_in_flight_batches_per_shard
                .unwrap_or(DEFAULT_MAX_IN_FLIGHT_BATCHES_PER_SHARD),
            1..=1024,
        )?;
        let max_increments_per_shard_batch = check_range(
            &file,
            "max_increments_per_shard_batch",
            raw.max_increments_per_shard_batch
                .unwrap_or(DEFAULT_MAX_INCREMENTS_PER_SHARD_BATCH),
            1..=100_000,
        )?;

        let health_interval_ms = check_range(
            &file,
            "health_interval_ms",
            raw.health_interval_ms.unwrap_or(DEFAULT_HEALTH_INTERVAL_MS),
            10..=60_000,
        )?;
        let health_timeout_ms = check_range(
            &file,
            "health_timeout_ms",
            raw.health_timeout_ms.unwrap_or(DEFAULT_HEALTH_TIMEOUT_MS),
            10..=60_000,
        )?;

        let replication_factor = check_range(
            &file,
            "replication_factor",
            raw.replication_factor.unwrap_or(DEFAULT_REPLICATION_FACTOR),
            1..=16,
        )?;
        let replication_interval_ms = check_range(
            &file,
            "replication_interval_ms",
            raw.replication_interval_ms
                .unwrap_or(DEFAULT_REPLICATION_INTERVAL_MS),
            10..=600_000,
        )?;

        let nodes = validate_nodes(&file, raw.nodes)?;
        let tls = TlsKeys::load(overrides.tls, raw.tls, Some(path), |files| {
            files.server_config(tally_runtime::tls::ClientAuth::None, true)?;
            files.client_config().map(drop)
        })?;
        let (tokens_file, origin) = match overrides.tokens_file {
            Some(flag) => (Some(flag), config_file::COMMAND_LINE),
            None => (
                raw.tokens_file
                    .map(|relative| path.parent().unwrap_or(Path::new(".")).join(relative)),
                file.as_str(),
            ),
        };
        if let Some(tokens_file) = &tokens_file {
            tally_runtime::tokens::Tokens::load(tokens_file)
                .map_err(|error| ConfigError::invalid(origin, "tokens_file", error.to_string()))?;
        }
        let config = CoordinatorConfig {
            listen,
            observability,
            stripes,
            vnodes_per_weight,
            shard_timeout: Duration::from_millis(shard_timeout_ms),
            max_in_flight_batches_per_shard,
            max_increments_per_shard_batch,
            health_interval: Duration::from_millis(health_interval_ms),
            health_timeout: Duration::from_millis(health_timeout_ms),
            replication_factor,
            replication_interval: Duration::from_millis(replication_interval_ms),
            nodes,
            tls,
            tokens_file,
        };
        // Anything the checks above missed still fails here, not at serve.
        config
            .ring()
            .map_err(|error| ConfigError::invalid(&file, "nodes", error.to_string()))?;
        Ok(config)
    }

    /// The ring of this membership. Every coordinator and `tallyctl` compute
    /// the same ring from the same config.
    pub fn ring(&self) -> Result<Ring, tally_ring::RingError> {
        let specs: Vec<NodeSpec> = self
            .nodes
            .iter()
            .map(|node| NodeSpec {
                id: node.id.clone(),
                weight: node.weight,
            })
            .collect();
        Ring::new(&specs, self.vnodes_per_weight)
    }

    /// The configured node with this id.
    pub fn node(&self, id: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|node| node.id == id)
    }
}

fn validate_nodes(file: &str, raw_nodes: Vec<RawNode>) -> Result<Vec<NodeConfig>, ConfigError> {
    if raw_nodes.is_empty() {
        return Err(ConfigError::invalid(
            file,
            "nodes",
            "at least one [[nodes]] entry is required",
        ));
    }
    let mut seen_ids: HashMap<String, usize> = HashMap::new();
    let mut seen_addresses: HashMap<String, usize> = HashMap::new();
    let mut nodes = Vec::with_capacity(raw_nodes.len());
    for (index, raw) in raw_nodes.into_iter().enumerate() {
        let key = |name: &str| format!("nodes[{index}].{name}");
        config_file::validate_node_id(&raw.id)
            .map_err(|message| ConfigError::invalid(file, key("id"), message))?;
        if let Some(first) = seen_ids.insert(raw.id.clone(), index) {
            return Err(ConfigError::invalid(
                file,
                key("id"),
                format!("duplicate node id {:?} (also nodes[{first}].id)", raw.id),
            ));
        }
        config_file::validate_connect_address(&raw.address)
            .map_err(|message| ConfigError::invalid(file, key("address"), message))?;
        if let Some(first) = seen_addresses.insert(raw.address.clone(), index) {
            return Err(ConfigError::invalid(
                file,
                key("address"),
                format!(
                    "duplicate address {:?} (also nodes[{first}].address)",
                    raw.address
                ),
            ));
        }
        let weight = check_range(file, &key("weight"), raw.weight.unwrap_or(1), 1..=1000)?;
        nodes.push(NodeConfig {
            id: raw.id,
            address: raw.address,
            weight,
        });
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"listen = "127.0.0.1:7700"
stripes = 8

[[nodes]]
id = "shard-1"
address = "127.0.0.1:7701"

[[nodes]]
id = "shard-2"
address = "127.0.0.1:7702"
weight = 2
"#;

    fn load_text(text: &str) -> Result<CoordinatorConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.toml");
        std::fs::write(&path, text).unwrap();
        CoordinatorConfig::load(&path, CoordinatorOverrides::default()).map_err(|error| {
            error
                .to_string()
                .replace(&path.display().to_string(), "FILE")
        })
    }

    #[test]
    fn reads_membership_with_defaults() {
        let config = load_text(GOOD).unwrap();
        assert_eq!(config.nodes.len(), 2);
        assert_eq!(config.nodes[0].weight, 1);
        assert_eq!(config.nodes[1].weight, 2);
        assert_eq!(config.vnodes_per_weight, DEFAULT_VNODES_PER_WEIGHT);
        assert_eq!(config.ring().unwrap().nodes().len(), 2);
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let cases = [
            (
                GOOD.replace("stripes = 8", "stripes = 8\ncolour = 1"),
                "FILE:3: unknown key `colour`",
            ),
            (
                format!("metrics_listen = \"9700\"\n{GOOD}"),
                "FILE: metrics_listen: \"9700\" is not an ip:port address",
            ),
            (
                format!("log_format = \"xml\"\n{GOOD}"),
                "FILE:1: log_format: unknown variant `xml`",
            ),
            (
                format!("otlp_endpoint = \"collector:4317\"\n{GOOD}"),
                "FILE: otlp_endpoint: \"collector:4317\" is not an http:// URL (TLS to the collector is not supported yet)",
            ),
            (
                GOOD.replace("shard-2\"", "shard-1\""),
                "FILE: nodes[1].id: duplicate node id \"shard-1\"",
            ),
            (
                GOOD.replace("127.0.0.1:7702", "127.0.0.1:port"),
                "FILE: nodes[1].address: \"127.0.0.1:port\" is not a host:port address",
            ),
            (
                GOOD.replace("127.0.0.1:7702", "127.0.0.1:7701"),
                "FILE: nodes[1].address: duplicate address",
            ),
            (
                format!("vnodes_per_weight = 0\n{GOOD}"),
                "FILE: vnodes_per_weight: must be at least 1",
            ),
            (
                GOOD.replace("weight = 2", "weight = 0"),
                "FILE: nodes[1].weight: 0 is out of range",
            ),
            (
                GOOD.replace("stripes = 8", "stripes = 0"),
                "FILE: stripes: 0 is out of range",
            ),
            (
                format!("health_interval_ms = 5\n{GOOD}"),
                "FILE: health_interval_ms: 5 is out of range",
            ),
            (
                format!("health_timeout_ms = 0\n{GOOD}"),
                "FILE: health_timeout_ms: 0 is out of range",
            ),
            (
                format!("replication_factor = 0\n{GOOD}"),
                "FILE: replication_factor: 0 is out of range",
            ),
            (GOOD.replace("127.0.0.1:7700", "localhost"), "FILE: listen:"),
            (
                "listen = \"127.0.0.1:1\"\n".to_string(),
                "FILE: nodes: at least one",
            ),
            (
                GOOD.replace("address = \"127.0.0.1:7701\"\n", ""),
                "FILE:4: nodes[0]: missing key `address`",
            ),
            (
                GOOD.replace("weight = 2", "weight = 2\nport = 1"),
                "FILE:12: unknown key `port`",
            ),
        ];
        for (text, expected) in cases {
            let error = load_text(&text).unwrap_err();
            assert!(
                error.starts_with(expected),
                "{error:?} does not start with {expected:?}"
            );
            assert!(!error.contains('\n'), "{error:?}");
        }
    }
}
