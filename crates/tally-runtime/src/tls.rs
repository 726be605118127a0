//! TLS on every port: the public port, the shards' internal port and the
//! metrics ports (rustls, with ring's cryptography).
//!
//! A daemon names three PEM files (the `[tls]` keys, [`TlsFiles`]): its
//! certificate chain, its private key, and the cluster's CA certificate.
//! The CA verifies the other side: a shard accepts only clients presenting
//! a certificate the CA signed (mutual TLS, [`ClientAuth::Required`]), and a
//! coordinator accepts a shard only if the CA signed its certificate for the
//! name the coordinator dials. The same node certificate serves as server
//! and as client certificate (`tallyctl certs create-node` makes it for
//! both uses), as CockroachDB's node certificates do.
//!
//! # Parts
//!
//! - [`ServerTls`] and [`ClientTls`]: the current rustls configuration
//!   behind an [`ArcSwap`], so a SIGHUP can load renewed files
//!   ([`reload_together`]: read once, every port swapped or none) without a
//!   restart; connections made after it use the new files, open ones keep
//!   theirs.
//! - [`Incoming`]: the connections a server accepts, plaintext or after a
//!   TLS handshake. Handshakes run concurrently and time out, so a client
//!   that connects and says nothing holds up no one.
//! - [`Connector`]: a TLS connector for tonic channels
//!   (`Endpoint::connect_with_connector_lazy`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Longest a client may take to finish its TLS handshake after connecting:
/// a handshake takes two round trips, so 5 s is generous for any network a
/// cluster runs on, and short for a peer that connects and says nothing
/// (it holds one of the server's connections meanwhile).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a connection may go without a first byte from its peer once
/// accepted (after its TLS handshake, with TLS): an HTTP/2 client sends its
/// preface at once, so a peer that does not holds a connection for nothing.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// How long accepting pauses after an error that is not about one
/// connection (out of file descriptors, say), instead of failing again at
/// once in a loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The files a daemon's TLS is made of, as named by its `[tls]` keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This daemon's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The private key of that certificate (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The cluster's CA certificate(s) (PEM): what the other side's
    /// certificate must be signed by.
    pub ca: PathBuf,
}

/// Why TLS cannot be set up from the files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("{path}: cannot read: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: io::Error,
    },
    /// A file holds no usable PEM item of the kind expected.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The files do not make a configuration (a key that is not the
    /// certificate's, a CA that is not a CA certificate ...).
    #[error("{cert}: {message}")]
    Config {
        /// The certificate file the configuration was built around.
        cert: PathBuf,
        /// rustls's reason.
        message: String,
    },
}

/// Whether a server asks its clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Anyone may connect (the public port: tokens authenticate callers;
    /// the metrics port).
    None,
    /// Only clients with a certificate the CA signed complete the
    /// handshake (a shard's internal port).
    Required,
}

/// The crypto provider every configuration is built with. Named, not the
/// process default, so that no other crate's choice changes ours.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// gRPC is HTTP/2 only; metrics are served over HTTP/1.1.
fn alpn(http2_only: bool) -> Vec<Vec<u8>> {
    if http2_only {
        vec![b"h2".to_vec()]
    } else {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|reason| TlsError::Read {
        path: path.to_path_buf(),
        reason,
    })
}

/// Every certificate in the PEM file at `path`; at least one.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |message: String| TlsError::Pem {
        path: path.to_path_buf(),
        message,
    };
    let bytes = read(path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error(format!("not a PEM certificate file: {error}")))?;
    if certificates.is_empty() {
        return Err(pem_error("holds no CERTIFICATE".to_string()));
    }
    Ok(certificates)
}

/// The private key in the PEM file at `path`.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| TlsError::Pem {
        path: path.to_path_buf(),
        message: format!("holds no usable private key: {error}"),
    })
}

/// The CA certificates in the PEM file at `path`, as trust roots.
fn read_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in read_certificates(path)? {
        roots.add(certificate).map_err(|error| TlsError::Pem {
            path: path.to_path_buf(),
            message: format!("not a usable CA certificate: {error}"),
        })?;
    }
    Ok(Arc::new(roots))
}

/// What a daemon's three files hold, read once: every configuration of a
/// (re)load is built from the same bytes, so a renewal written between two
/// reads cannot give the ports different certificates.
struct Material<'a> {
    files: &'a TlsFiles,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<rustls::RootCertStore>,
}

impl Material<'_> {
    fn config_error(&self, error: impl std::fmt::Display) -> TlsError {
        TlsError::Config {
            cert: self.files.cert.clone(),
            message: error.to_string(),
        }
    }

    fn server_config(
        &self,
        client_auth: ClientAuth,
        http2_only: bool,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| self.config_error(error))?;
        let builder = match client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Required => builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    self.roots.clone(),
                    provider(),
                )
                .build()
                .map_err(|error| self.config_error(error))?,
            ),
        };
        let mut config = builder
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|error| self.config_error(error))?;
        config.alpn_protocols = alpn(http2_only);
        Ok(config)
    }

    fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| self.config_error(error))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|error| self.config_error(error))?;
        config.alpn_protocols = alpn(true);
        Ok(config)
    }
}

impl TlsFiles {
    fn read(&self) -> Result<Material<'_>, TlsError> {
        Ok(Material {
            files: self,
            chain: read_certificates(&self.cert)?,
            key: read_private_key(&self.key)?,
            roots: read_roots(&self.ca)?,
        })
    }

    /// A server configuration: this daemon's certificate, and (with
    /// [`ClientAuth::Required`]) the CA that must have signed the client's.
    pub fn server_config(
        &self,
        client_auth: ClientAuth,
        http2_only: bool,
    ) -> Result<rustls::ServerConfig, TlsError> {
        self.read()?.server_config(client_auth, http2_only)
    }

    /// A client configuration: trusts servers whose certificate the CA
    /// signed, and presents this daemon's certificate when asked.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        self.read()?.client_config()
    }
}

/// Reads `files` once and gives each of `servers` and `clients` a new
/// configuration from them, all or none: on an error, every one keeps the
/// configuration in use (SIGHUP on a daemon).
pub fn reload_together(
    files: &TlsFiles,
    servers: &[&ServerTls],
    clients: &[&ClientTls],
) -> Result<(), TlsError> {
    let material = files.read()?;
    let server_configs = servers
        .iter()
        .map(|server| material.server_config(server.client_auth, server.http2_only))
        .collect::<Result<Vec<_>, _>>()?;
    let client_configs = clients
        .iter()
        .map(|_| material.client_config())
        .collect::<Result<Vec<_>, _>>()?;
    for (server, config) in servers.iter().zip(server_configs) {
        server.current.store(Arc::new(config));
    }
    for (client, config) in clients.iter().zip(client_configs) {
        client.current.store(Arc::new(config));
    }
    Ok(())
}

/// A client configuration that trusts the CA certificates in `ca` and
/// presents no certificate: a client of the public port (`tallyctl`).
pub fn client_config_trusting(ca: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config {
            cert: ca.to_path_buf(),
            message: error.to_string(),
        })?
        .with_root_certificates(read_roots(ca)?)
        .with_no_client_auth();
    config.alpn_protocols = alpn(true);
    Ok(config)
}

/// A server's TLS: its files and the configuration last loaded from them.
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    client_auth: ClientAuth,
    http2_only: bool,
    current: ArcSwap<rustls::ServerConfig>,
}

impl ServerTls {
    /// A daemon's two servers from one read of `files`: its gRPC port's
    /// (HTTP/2 only, asking clients for a certificate per `client_auth`)
    /// and its metrics port's (HTTP/1.1 or HTTP/2, asking for none).
    pub fn grpc_and_metrics(
        files: TlsFiles,
        client_auth: ClientAuth,
    ) -> Result<(Arc<Self>, Arc<Self>), TlsError> {
        let material = files.read()?;
        let server = |client_auth, http2_only| {
            Ok::<_, TlsError>(Arc::new(ServerTls {
                files: files.clone(),
                client_auth,
                http2_only,
                current: ArcSwap::from_pointee(material.server_config(client_auth, http2_only)?),
            }))
        };
        Ok((server(client_auth, true)?, server(ClientAuth::None, false)?))
    }

    /// The files this configuration is loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

/// A client's TLS (a coordinator's, towards shards): its files and the
/// configuration last loaded from them.
#[derive(Debug)]
pub struct ClientTls {
    files: TlsFiles,
    current: ArcSwap<rustls::ClientConfig>,
}

impl ClientTls {
    /// Loads `files`.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let config = files.client_config()?;
        Ok(Arc::new(ClientTls {
            files,
            current: ArcSwap::from_pointee(config),
        }))
    }

    /// The files this configuration is loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// A connector to `address` (`host:port`) that checks the server's
    /// certificate is the CA's, for `host`.
    pub fn connector(self: &Arc<Self>, address: &str) -> Result<Connector, String> {
        Connector::new(ConnectorConfig::Reloadable(self.clone()), address)
    }
}

#[derive(Debug, Clone)]
enum ConnectorConfig {
    Reloadable(Arc<ClientTls>),
    Fixed(Arc<rustls::ClientConfig>),
}

/// Connects tonic channels over TLS (see
/// `tonic::transport::Endpoint::connect_with_connector_lazy`); each new
/// connection uses the configuration current at the time.
#[derive(Debug, Clone)]
pub struct Connector {
    config: ConnectorConfig,
    address: String,
    server_name: ServerName<'static>,
}

impl Connector {
    /// A connector with a fixed configuration (a CLI's).
    pub fn fixed(config: rustls::ClientConfig, address: &str) -> Result<Connector, String> {
        Connector::new(ConnectorConfig::Fixed(Arc::new(config)), address)
    }

    fn new(config: ConnectorConfig, address: &str) -> Result<Connector, String> {
        let (host, _port) = address
            .rsplit_once(':')
            .ok_or_else(|| format!("{address:?} is not a host:port address"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|host| host.strip_suffix(']'))
            .unwrap_or(host);
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|_| format!("{host:?} is not a host name or IP address"))?;
        Ok(Connector {
            config,
            address: address.to_string(),
            server_name,
        })
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<tonic::codegen::http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let config = match &self.config {
            ConnectorConfig::Reloadable(tls) => tls.current.load_full(),
            ConnectorConfig::Fixed(config) => config.clone(),
        };
        let address = self.address.clone();
        let server_name = self.server_name.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// A connection a server accepted: plaintext, or TLS after its handshake.
/// It holds one of the server's connection slots until dropped.
#[derive(Debug)]
pub struct Connection {
    io: Io,
    /// Until the peer's first byte: when it is closed if none comes.
    silence_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connection {
    fn new(io: Io, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        Connection {
            io,
            silence_deadline: Some(Box::pin(tokio::time::sleep(FIRST_BYTES_TIMEOUT))),
            _slot: slot,
        }
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.io, Io::Tls(_))
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match &self.io {
            Io::Plain(stream) => stream.connect_info(),
            Io::Tls(stream) => stream.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let filled = buf.filled().len();
        let read = match &mut this.io {
            Io::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        };
        let Some(deadline) = &mut this.silence_deadline else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > filled => {
                this.silence_deadline = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the peer sent nothing within {FIRST_BYTES_TIMEOUT:?}"),
                )))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(stream) => stream.is_write_vectored(),
            Io::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

type Handshake = Pin<
    Box<
        dyn std::future::Future<
                Output = (
                    SocketAddr,
                    tokio::sync::OwnedSemaphorePermit,
                    io::Result<tokio_rustls::server::TlsStream<TcpStream>>,
                ),
            > + Send,
    >,
>;

type SlotWait = Pin<
    Box<
        dyn std::future::Future<
                Output = Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>,
            > + Send,
    >,
>;

/// The connections a server accepts on a listener (see the module docs).
/// Dropping it closes the listener.
pub struct Incoming {
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    handshakes: FuturesUnordered<Handshake>,
    /// One per connection held (a handshake in progress included).
    slots: Arc<tokio::sync::Semaphore>,
    /// A slot for the next connection, once one is free.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    waiting_for_slot: Option<SlotWait>,
    /// After an accept error: when to accept again.
    paused: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Incoming")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .field("handshakes", &self.handshakes.len())
            .field("free_slots", &self.slots.available_permits())
            .finish()
    }
}

/// The connections accepted on `listener`, at most `max_connections` held
/// at once (the next waits in the listen queue until one closes, as Go's
/// `netutil.LimitListener`), with Nagle's algorithm off (small answers
/// would otherwise wait for the peer's delayed ACK, up to 40 ms each under
/// load), and after a TLS handshake if `tls` is given. A failed or
/// timed-out handshake is logged at debug level and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    max_connections: usize,
) -> Incoming {
    Incoming {
        listener,
        tls,
        handshakes: FuturesUnordered::new(),
        slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        slot: None,
        waiting_for_slot: None,
        paused: None,
    }
}

impl Incoming {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A slot for the next connection: `Pending` while every one is held.
    fn poll_slot(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.slot.is_some() {
            return Poll::Ready(());
        }
        let slots = &self.slots;
        let waiting = self
            .waiting_for_slot
            .get_or_insert_with(|| Box::pin(slots.clone().acquire_owned()));
        let slot = std::task::ready!(waiting.as_mut().poll(cx))
            .expect("a server's connection slots are never closed");
        self.waiting_for_slot = None;
        self.slot = Some(slot);
        Poll::Ready(())
    }
}

/// Whether an accept error is about the one connection being accepted (the
/// peer left first), not about the listener or the process.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            // Finished handshakes first: they are connections waiting. They
            // are driven whether or not a slot is free for the next one.
            while let Poll::Ready(Some((peer, slot, handshake))) =
                this.handshakes.poll_next_unpin(cx)
            {
                match handshake {
                    Ok(stream) => {
                        let connection = Connection::new(Io::Tls(Box::new(stream)), slot);
                        return Poll::Ready(Some(Ok(connection)));
                    }
                    Err(error) => tracing::debug!(%peer, "tls handshake failed: {error}"),
                }
            }
            if let Some(pause) = &mut this.paused {
                std::task::ready!(pause.as_mut().poll(cx));
                this.paused = None;
            }
            std::task::ready!(this.poll_slot(cx));
            let (stream, peer) = match this.listener.poll_accept(cx) {
                Poll::Ready(Ok(accepted)) => accepted,
                Poll::Ready(Err(error)) if is_connection_error(&error) => continue,
                Poll::Ready(Err(error)) => {
                    tracing::warn!("cannot accept a connection: {error}");
                    this.paused = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
                    continue;
                }
                Poll::Pending => return Poll::Pending,
            };
            let slot = this.slot.take().expect("a slot is held before accepting");
            // A connection whose option cannot be set is still served.
            let _ = stream.set_nodelay(true);
            let Some(tls) = &this.tls else {
                return Poll::Ready(Some(Ok(Connection::new(Io::Plain(stream), slot))));
            };
            let acceptor = tls.acceptor();
            this.handshakes.push(Box::pin(async move {
                let handshake =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                let result = handshake.unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("not done within {HANDSHAKE_TIMEOUT:?}"),
                    ))
                });
                (peer, slot, result)
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named() {
        let files = TlsFiles {
            cert: "/nonexistent/node.crt".into(),
            key: "/nonexistent/node.key".into(),
            ca: "/nonexistent/ca.crt".into(),
        };
        let message = files
            .server_config(ClientAuth::Required, true)
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("/nonexistent/node.crt: cannot read"),
            "{message}"
        );
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.crt");
        std::fs::write(&path, "not pem at all\n").unwrap();
        let message = read_certificates(&path).unwrap_err().to_string();
        assert!(message.contains("holds no CERTIFICATE"), "{message}");
    }

    #[test]
    fn server_names_come_from_the_address() {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        for (address, name) in [
            ("127.0.0.1:7701", "127.0.0.1"),
            ("[::1]:7701", "::1"),
            ("shard-1:7701", "shard-1"),
        ] {
            let connector = Connector::fixed(config.clone(), address).unwrap();
            assert_eq!(connector.server_name.to_str(), name, "{address}");
        }
        assert!(Connector::fixed(config, "no-port").is_err());
    }
}
