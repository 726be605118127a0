//! How `tallyctl` reaches a coordinator: plaintext, or TLS trusting a CA
//! certificate file, with a bearer token on every call if it has one.
//!
//! TLS is on when the endpoint is an `https://` URL or a CA certificate is
//! given (`--ca-cert`, `$TALLY_CA_CERT`); the token comes from `--token` or
//! `$TALLY_TOKEN`. A client certificate (`--client-cert`, `--client-key`)
//! is presented when given: a shard's port asks for one signed by the CA.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A channel to a coordinator that sends the token with every call.
pub type Client = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer TOKEN` to every call, if there is a token.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Whether `authority` (`host:port`) names this machine.
fn is_loopback(authority: &str) -> bool {
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where a coordinator is and how to reach it.
#[derive(Debug, Clone)]
pub struct Access {
    /// Its URL: `http://host:port` or `https://host:port`.
    pub endpoint: String,
    /// The CA certificate its certificate must be signed by (TLS on).
    pub ca_cert: Option<PathBuf>,
    /// The bearer token to send.
    pub token: Option<String>,
    /// A certificate and its key to present (mutual TLS).
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// Longest wait to connect, and for each call.
    pub timeout: Duration,
}

impl Access {
    /// A plaintext endpoint without a token.
    pub fn plain(endpoint: impl Into<String>, timeout: Duration) -> Self {
        Access {
            endpoint: endpoint.into(),
            ca_cert: None,
            token: None,
            client_identity: None,
            timeout,
        }
    }

    /// Whether calls go over TLS.
    pub fn tls(&self) -> bool {
        self.endpoint.starts_with("https://") || self.ca_cert.is_some()
    }

    /// The endpoint's `host:port`.
    pub fn authority(&self) -> &str {
        let rest = self
            .endpoint
            .split_once("://")
            .map_or(self.endpoint.as_str(), |(_, rest)| rest);
        rest.split('/').next().unwrap_or(rest)
    }

    /// The interceptor that sends the token. A token goes in plaintext
    /// only to a loopback address: elsewhere anyone on the path could read
    /// and reuse it.
    pub fn bearer(&self) -> anyhow::Result<Bearer> {
        if self.token.is_some() && !self.tls() && !is_loopback(self.authority()) {
            anyhow::bail!(
                "refusing to send the token to {} over plaintext; use an https:// endpoint \
                 with --ca-cert",
                self.endpoint
            );
        }
        self.token
            .as_deref()
            .map(|token| {
                format!("Bearer {token}")
                    .parse()
                    .context("the token has characters a header cannot carry")
            })
            .transpose()
            .map(Bearer)
    }

    /// `count` connections (HTTP/2 channels), each sending the token.
    pub async fn connect_many(&self, count: usize) -> anyhow::Result<Vec<Client>> {
        let bearer = self.bearer()?;
        let authority = self.authority().to_string();
        // The URI's scheme stays http with TLS: the connector does TLS, and
        // tonic would look for a TLS configuration of its own on https.
        let endpoint = Endpoint::from_shared(format!("http://{authority}"))
            .with_context(|| format!("bad endpoint {:?}", self.endpoint))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .tcp_nodelay(true);
        let connector = if self.tls() {
            let ca = self
                .ca_cert
                .as_deref()
                .context("an https endpoint needs --ca-cert (or $TALLY_CA_CERT): the CA certificate the server's is signed by")?;
            let config = match &self.client_identity {
                Some((cert, key)) => tally_runtime::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.to_path_buf(),
                }
                .client_config()?,
                None => tally_runtime::tls::client_config_trusting(ca)?,
            };
            Some(
                tally_runtime::tls::Connector::fixed(config, &authority)
                    .map_err(anyhow::Error::msg)?,
            )
        } else {
            None
        };
        // Up to 16 connections (and handshakes) at once.
        futures::stream::iter(0..count)
            .map(|_| {
                let endpoint = endpoint.clone();
                let connector = connector.clone();
                async move {
                    match connector {
                        Some(connector) => endpoint.connect_with_connector(connector).await,
                        None => endpoint.connect().await,
                    }
                }
            })
            .buffer_unordered(16)
            .map_ok(|channel| InterceptedService::new(channel, bearer.clone()))
            .try_collect()
            .await
            .with_context(|| format!("cannot reach {}", self.endpoint))
    }

    /// One connection, sending the token.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        Ok(self
            .connect_many(1)
            .await?
            .pop()
            .expect("connect_many(1) returns one client"))
    }
}

/// The options a coordinator that predates them ignored, as its answer
/// shows (their fields left at 0), or `None`. A total is always complete
/// unless `allow_partial` said it need not be; a window always ends.
pub fn ignored_by_increment(
    request: &tally_proto::pb::IncrementRequest,
    answer: &tally_proto::pb::IncrementResponse,
) -> Option<&'static str> {
    let reads_total = request.return_total || request.limit.is_some();
    if request.window_seconds != 0 && answer.window_end_unix_ms == 0 {
        Some("--window")
    } else if reads_total && !request.allow_partial && !answer.complete {
        Some(if request.limit.is_some() {
            "--limit"
        } else {
            "--get"
        })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_goes_in_plaintext_only_to_loopback() {
        let access = |endpoint: &str| Access {
            token: Some("tally_00".into()),
            ..Access::plain(endpoint, Duration::from_secs(1))
        };
        for local in [
            "http://127.0.0.1:7700",
            "http://[::1]:7700",
            "http://localhost:7700",
        ] {
            assert!(access(local).bearer().is_ok(), "{local}");
        }
        let remote = access("http://10.0.0.5:7700").bearer().unwrap_err();
        assert!(remote.to_string().contains("plaintext"), "{remote}");
        let mut tls = access("https://10.0.0.5:7700");
        tls.ca_cert = Some("ca.crt".into());
        assert!(tls.bearer().is_ok());
    }
}
