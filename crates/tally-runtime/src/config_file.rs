//! Strict TOML configuration files, shared by every Tally binary.
//!
//! A daemon's config is parsed in two steps, as quickwit does: a raw serde
//! struct with `deny_unknown_fields` (so a typo is an error, not a silently
//! ignored key), then validation into the runtime config. Every error is one
//! line that names the file and the key, so an operator can fix it without
//! reading a stack of context.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::process::LogFormat;

/// Where a configuration value came from, for error messages.
pub const COMMAND_LINE: &str = "command line";

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: cannot read: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why. Not a `source`: the message already says it, once.
        reason: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the
    /// wrong type.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A key has a value that parses but cannot be used.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        /// The file, or [`COMMAND_LINE`] for a flag.
        origin: String,
        /// The key, as written in the file (`nodes[1].address`).
        key: String,
        /// What is wrong with the value.
        message: String,
    },
}

impl ConfigError {
    /// An invalid value of `key` read from `origin`.
    pub fn invalid(
        origin: impl Into<String>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            origin: origin.into(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Reads and parses a TOML file into `T` (which should use
/// `#[serde(deny_unknown_fields)]`).
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|reason| ConfigError::Read {
        path: path.to_path_buf(),
        reason,
    })?;
    parse(path, &text)
}

/// Parses TOML text that was read from `path`.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let deserializer = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        // The key path (`nodes[1].weight`) as serde walked it; "." when the
        // error is not under a key (a syntax error, a missing key).
        let key = error.path().to_string();
        let error = error.into_inner();
        let line = error
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1)
            .unwrap_or(1);
        // serde says "field"; operators write "keys".
        let message = error
            .message()
            .trim()
            .replace("unknown field", "unknown key")
            .replace("missing field", "missing key")
            .replace("duplicate field", "duplicate key")
            .replace('\n', " ");
        // An unknown key's message already names it.
        let message = if key == "." || message.starts_with("unknown key") {
            message
        } else {
            format!("{key}: {message}")
        };
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            message,
        }
    })
}

/// `value` of `key` if it lies in `range`; otherwise an error that names
/// where it came from and the range to use.
pub fn check_range<T>(
    origin: &str,
    key: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: PartialOrd + std::fmt::Display,
{
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::invalid(
            origin,
            key,
            format!(
                "{value} is out of range; use {} to {}",
                range.start(),
                range.end()
            ),
        ))
    }
}

/// A flag's value if given, else the file's, with where it came from:
/// [`COMMAND_LINE`] or `file_origin`.
pub fn flag_or_file<T>(flag: Option<T>, file: Option<T>, file_origin: &str) -> (Option<T>, &str) {
    match flag {
        Some(value) => (Some(value), COMMAND_LINE),
        None => (file, file_origin),
    }
}

/// A numeric setting from the command line or the file (the flag wins), or
/// `default`, checked against `range`; an error names where it came from.
pub fn ranged_setting<T>(
    flag: Option<T>,
    file: Option<T>,
    file_origin: &str,
    key: &str,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: PartialOrd + std::fmt::Display,
{
    let (value, origin) = flag_or_file(flag, file, file_origin);
    check_range(origin, key, value.unwrap_or(default), range)
}

pub use tally_proto::domain::validate_node_id;

/// Checks an address to connect to: `host:port`, where host is a name, an
/// IPv4 address or a bracketed IPv6 address, and port is 1 to 65535.
pub fn validate_connect_address(address: &str) -> Result<(), String> {
    let invalid = || format!("{address:?} is not a host:port address");
    let (host, port) = address.rsplit_once(':').ok_or_else(invalid)?;
    let port: u16 = port.parse().map_err(|_| invalid())?;
    if port == 0 || host.is_empty() {
        return Err(invalid());
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(invalid)?;
        inner.parse::<std::net::Ipv6Addr>().map_err(|_| invalid())?;
        return Ok(());
    }
    let is_name = host
        .chars()
        .all(|character| character.is_ascii_alphanumeric() || "-.".contains(character));
    if !is_name {
        return Err(invalid());
    }
    Ok(())
}

/// Parses an address to listen on: `ip:port` (port 0 picks a free port).
pub fn parse_listen_address(address: &str) -> Result<std::net::SocketAddr, String> {
    address
        .parse()
        .map_err(|_| format!("{address:?} is not an ip:port address"))
}

/// What every daemon is watched through, as given (flags, or a file's
/// keys of the same names).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ObservabilityKeys {
    /// Address to serve Prometheus metrics on (GET /metrics), ip:port;
    /// overrides `metrics_listen`.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// How log lines are written, text or json; overrides `log_format`.
    #[arg(long)]
    pub log_format: Option<LogFormat>,
    /// Export spans over OTLP/gRPC to this http:// URL; overrides
    /// `otlp_endpoint`.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
}

/// What every daemon is watched through: the `metrics_listen`,
/// `log_format` and `otlp_endpoint` keys, checked. None of them changes on
/// a reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observability {
    /// Address to serve Prometheus metrics on (`GET /metrics`); none: off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// Where spans are exported (OTLP/gRPC, an `http://` URL: no TLS to
    /// the collector yet); none: nowhere.
    pub otlp_endpoint: Option<String>,
}

impl Observability {
    /// The keys of `flags`, else of the file named `file_origin`, checked.
    pub fn load(
        flags: ObservabilityKeys,
        file: ObservabilityKeys,
        file_origin: &str,
    ) -> Result<Self, ConfigError> {
        let (metrics_listen, origin) =
            flag_or_file(flags.metrics_listen, file.metrics_listen, file_origin);
        let metrics_listen = metrics_listen
            .map(|address| parse_listen_address(&address))
            .transpose()
            .map_err(|message| ConfigError::invalid(origin, "metrics_listen", message))?;
        let (log_format, _) = flag_or_file(flags.log_format, file.log_format, file_origin);
        let (otlp_endpoint, origin) =
            flag_or_file(flags.otlp_endpoint, file.otlp_endpoint, file_origin);
        if let Some(url) = otlp_endpoint
            .as_deref()
            .filter(|url| !url.starts_with("http://"))
        {
            return Err(ConfigError::invalid(
                origin,
                "otlp_endpoint",
                format!(
                    "{url:?} is not an http:// URL (TLS to the collector is not supported yet)"
                ),
            ));
        }
        Ok(Observability {
            metrics_listen,
            log_format: log_format.unwrap_or_default(),
            otlp_endpoint,
        })
    }

    /// Sets up log lines, and span export if `otlp_endpoint` is set, for
    /// daemon `service` (`service.name`) known as `instance`
    /// (`service.instance.id`). Keep the guard until the process ends.
    pub fn init_tracing(
        &self,
        service: &'static str,
        instance: &str,
    ) -> Result<crate::traces::TracesGuard, String> {
        crate::process::init_tracing_with(
            self.log_format,
            self.otlp_endpoint
                .as_deref()
                .map(|endpoint| crate::traces::Otlp {
                    service,
                    instance,
                    endpoint,
                }),
        )
    }
}

/// The `[tls]` keys of a daemon's file, or its `--tls-*` flags (each flag
/// overrides its key): three PEM files (see [`crate::tls`]), all or none.
/// In a file, relative paths are relative to the file's directory, so a
/// config directory with its `certs/` works from wherever the daemon
/// starts; on the command line, to the working directory.
#[derive(Debug, Clone, Default, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TlsKeys {
    /// This daemon's certificate chain (PEM); overrides `tls.cert`. TLS is
    /// on when cert, key and ca are all given.
    #[arg(long = "tls-cert", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The certificate's private key (PEM); overrides `tls.key`.
    #[arg(long = "tls-key", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The cluster's CA certificate (PEM); overrides `tls.ca`.
    #[arg(long = "tls-ca", value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

impl TlsKeys {
    /// The TLS files of `flags`, each over the file's `[tls]` key (read
    /// from `file_path`), checked: all three keys or none, each file
    /// readable and holding what it should. `check` builds the daemon's
    /// configurations from them, so that a bad file stops the start with
    /// one line naming the file and the key.
    pub fn load(
        flags: TlsKeys,
        file: Option<TlsKeys>,
        file_path: Option<&Path>,
        check: impl Fn(&crate::tls::TlsFiles) -> Result<(), crate::tls::TlsError>,
    ) -> Result<Option<crate::tls::TlsFiles>, ConfigError> {
        let file = file.unwrap_or_default();
        let file_origin = file_path.map_or_else(String::new, |path| path.display().to_string());
        let base = file_path.and_then(Path::parent);
        // Each key: the flag (relative to the working directory), else the
        // file's (relative to the file's directory), with where it came from.
        let pick = |flag: Option<PathBuf>, in_file: Option<PathBuf>| match (flag, in_file) {
            (Some(flag), _) => Some((flag, COMMAND_LINE)),
            (None, Some(value)) => Some((
                match base {
                    Some(base) if value.is_relative() => base.join(value),
                    _ => value,
                },
                file_origin.as_str(),
            )),
            (None, None) => None,
        };
        let keys = [
            ("cert", pick(flags.cert, file.cert)),
            ("key", pick(flags.key, file.key)),
            ("ca", pick(flags.ca, file.ca)),
        ];
        let given: Vec<_> = keys.iter().filter(|(_, value)| value.is_some()).collect();
        if given.is_empty() {
            return Ok(None);
        }
        if let Some((missing, _)) = keys.iter().find(|(_, value)| value.is_none()) {
            let (_, origin) = given[0].1.as_ref().expect("given keys have a value");
            return Err(ConfigError::invalid(
                *origin,
                format!("tls.{missing}"),
                "is required with the other tls keys (cert, key and ca)",
            ));
        }
        let [(_, Some((cert, cert_origin))), (_, Some((key, key_origin))), (_, Some((ca, ca_origin)))] =
            keys
        else {
            unreachable!("every key has a value")
        };
        let files = crate::tls::TlsFiles { cert, key, ca };
        check(&files).map_err(|error| {
            let (key, origin) = match &error {
                crate::tls::TlsError::Read { path, .. }
                | crate::tls::TlsError::Pem { path, .. }
                    if *path == files.key =>
                {
                    ("tls.key", key_origin)
                }
                crate::tls::TlsError::Read { path, .. }
                | crate::tls::TlsError::Pem { path, .. }
                    if *path == files.ca =>
                {
                    ("tls.ca", ca_origin)
                }
                crate::tls::TlsError::Read { .. } | crate::tls::TlsError::Pem { .. } => {
                    ("tls.cert", cert_origin)
                }
                crate::tls::TlsError::Config { .. } => ("tls", cert_origin),
            };
            ConfigError::invalid(origin, key, error.to_string())
        })?;
        Ok(Some(files))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        listen: String,
        stripes: u32,
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = "listen = \"127.0.0.1:1\"\nstripes = 8\nstripez = 9\n";
        let error = parse::<Sample>(Path::new("config/x.toml"), text).unwrap_err();
        let message = error.to_string();
        assert!(
            message.starts_with("config/x.toml:3: unknown key `stripez`"),
            "{message}"
        );
        assert!(!message.contains('\n'));
    }

    #[test]
    fn wrong_type_names_the_line_and_key() {
        let text = "listen = \"127.0.0.1:1\"\nstripes = \"eight\"\n";
        let message = parse::<Sample>(Path::new("c.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("c.toml:2: stripes: invalid type"),
            "{message}"
        );
    }

    #[test]
    fn missing_file_names_the_file() {
        let message = load::<Sample>(Path::new("/nonexistent/c.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("/nonexistent/c.toml: cannot read"),
            "{message}"
        );
    }

    #[test]
    fn node_ids() {
        assert!(validate_node_id("shard-1").is_ok());
        assert!(validate_node_id("").is_err());
        assert!(validate_node_id("a b").is_err());
        assert!(validate_node_id(&"a".repeat(65)).is_err());
    }

    #[test]
    fn connect_addresses() {
        for good in [
            "127.0.0.1:7701",
            "shard-1:7701",
            "[::1]:7701",
            "localhost:1",
        ] {
            assert!(validate_connect_address(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "127.0.0.1",
            "host:0",
            "host:99999",
            ":80",
            "a b:1",
            "[::1:80",
            "http://x:1",
        ] {
            assert!(validate_connect_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert!(parse_listen_address("127.0.0.1:0").is_ok());
        assert!(parse_listen_address("[::1]:7700").is_ok());
        assert!(parse_listen_address("localhost:7700").is_err());
    }
}
