//! What every Tally binary does the same way at the process edge: logging
//! setup, shutdown signals, and gRPC server reflection.

use std::future::Future;

/// How a daemon writes its log lines (`log_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (colored on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log shippers: `timestamp`, `level`,
    /// `target`, `fields` (with `message`) and the spans it is in.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format: text or json")),
        }
    }
}

/// Sends `tracing` events to stderr as text, filtered by `RUST_LOG`
/// (default `info`). Stdout is left for what a binary prints on purpose
/// (its listen address, command output).
pub fn init_tracing() {
    init_tracing_as(LogFormat::Text);
}

/// [`init_tracing`] in `format`.
pub fn init_tracing_as(format: LogFormat) {
    // Without an exporter there is nothing to flush.
    let _ = init_tracing_with(format, None);
}

/// [`init_tracing_as`], and with `otlp` every span of the Tally crates
/// exported too, whatever `RUST_LOG` says (it filters log lines only), with
/// W3C trace context propagation. Keep the returned guard until the process
/// ends: dropping it exports the spans still buffered.
pub fn init_tracing_with(
    format: LogFormat,
    otlp: Option<crate::traces::Otlp<'_>>,
) -> Result<crate::traces::TracesGuard, String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let lines = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter)
    .boxed();
    let mut layers = vec![lines];
    let exporting = otlp.is_some();
    let guard = match otlp {
        Some(otlp) => {
            let (spans, guard) = crate::traces::exporter(otlp)?;
            layers.push(spans);
            guard
        }
        None => crate::traces::TracesGuard::default(),
    };
    // A second call (tests, the dev cluster) fails and changes nothing:
    // the first subscriber stays, and only an installed exporter turns
    // propagation on.
    if tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok()
        && exporting
    {
        crate::traces::start_propagating();
    }
    Ok(guard)
}

/// A binary's exit: 0 on success; otherwise one line on stderr,
/// `BINARY: error: ...` with the error's causes after it
/// ([`error_line`]), and exit code 1.
pub fn exit_code<E: AsRef<dyn std::error::Error>>(
    binary: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{binary}: error: {}", error_line(error.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `error` and its chain of causes on one line, `error: cause: cause`,
/// each said once: a cause whose text the one before it already holds is
/// left out (many errors print their source as part of their own text, and
/// some wrap an error of the same text: `dns error: dns error: ...`).
pub fn error_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut previous = line.clone();
    let mut cause = error.source();
    while let Some(error) = cause {
        let text = error.to_string();
        if !text.is_empty() {
            if !previous.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            previous = text;
        }
        cause = error.source();
    }
    line
}

/// Ignores SIGXFSZ, so that a write beyond the process's file size limit
/// (`RLIMIT_FSIZE`) fails with `EFBIG`, an error the caller handles, instead
/// of killing the process (the signal's default).
pub fn ignore_file_size_signal() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler
    // code and touches no memory of ours.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Sets glibc's malloc up for a process that holds millions of small
/// records in a few large, growing buffers (a shard's counter tables), with
/// large short-lived buffers beside them (replica copies, recovery): every
/// allocation of 64 KiB or more gets its own mapping (grown without a copy,
/// and returned to the system when freed, so a transient peak does not stay
/// resident), and at most two arenas (per-thread arenas each keep their own
/// free holes). Measured at 1,000,000 counters over 3 shards: 152 bytes of
/// resident memory per counter with glibc's defaults, 87 with these
/// (docs/BENCHMARKS.md). A coordinator holds no records, but its large
/// buffers (a batch's request, a `GetBatch` answer held for a peer that
/// reads it slowly) go back to the system once freed: after peers that held
/// 500 MiB of unread answers closed, a coordinator went back to 30 MiB with
/// these settings, and kept 106 MiB with glibc's (tests/edge.rs). Call
/// first in `main`, before any thread starts. A no-op on other allocators
/// and systems.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's parameters; called before other
    // threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Gives memory the allocator holds free back to the operating system.
///
/// glibc's malloc keeps freed memory in its arenas for reuse; after a
/// transient peak (a full replica copy decoded, a start's recovery) a
/// process would go on holding the peak's worth of resident memory.
/// `malloc_trim` returns the free pages. It walks the arenas (a few
/// milliseconds): call it after large work, not per request. A no-op on
/// other allocators and systems.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory malloc owns and holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C): the signals on which a daemon
/// stops accepting, finishes in-flight work, flushes and exits 0.
///
/// The handlers are installed when this function is called, not when the
/// future is first polled: call it before announcing readiness, so that a
/// signal sent right after `listening on` is handled, not fatal.
///
/// # Panics
///
/// Outside a tokio runtime, or if the OS refuses signal handlers.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt()).expect("install the SIGINT handler");
        let mut terminate = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
        async move {
            tokio::select! {
                _ = interrupt.recv() => tracing::info!("received SIGINT, shutting down"),
                _ = terminate.recv() => tracing::info!("received SIGTERM, shutting down"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("received Ctrl-C, shutting down");
    }
}

/// What a Tally server serves: the services its reflection lists besides
/// health checking and reflection, and what it answers a call to a method
/// it does not serve.
#[derive(Debug, Clone, Copy)]
pub struct ServedApi {
    /// The names of its own gRPC services (`tally.v1.Counter`, ...).
    pub services: &'static [&'static str],
    /// The `UNIMPLEMENTED` message for any other method: which server this
    /// is and where its API is described. Printable ASCII without `%`, so
    /// that it goes into the `grpc-message` header as it is.
    pub unimplemented: &'static str,
    /// The largest request message it takes, in bytes: one over it is
    /// answered `RESOURCE_EXHAUSTED` at the edge ([`crate::edge`]).
    pub max_message_bytes: usize,
}

/// A coordinator's API: the public services.
pub const COORDINATOR_API: ServedApi = ServedApi {
    services: &[
        tally_proto::pb::counter_server::SERVICE_NAME,
        tally_proto::pb::admin_server::SERVICE_NAME,
    ],
    unimplemented: "tally coordinator: no such method; the API is tally.v1.Counter and \
                    tally.v1.Admin (docs/API.md)",
    max_message_bytes: crate::edge::MAX_PUBLIC_MESSAGE_BYTES,
};

/// A shard node's API: the internal service coordinators call.
pub const SHARD_API: ServedApi = ServedApi {
    services: &[tally_proto::pb::shard_server::SERVICE_NAME],
    unimplemented: "tally shard node: no such method; a shard node serves only the internal \
                    tally.v1.Shard (proto/tally/v1/shard.proto); clients call a coordinator, \
                    whose API is tally.v1.Counter and tally.v1.Admin (docs/API.md)",
    max_message_bytes: crate::edge::MAX_INTERNAL_MESSAGE_BYTES,
};

/// The `UNIMPLEMENTED` message of a server without a [`ServedApi`].
const UNIMPLEMENTED: &str = "no such method; this server lists the services it serves by gRPC \
                             reflection";

/// A gRPC server with what every Tally daemon serves besides its own
/// services: `grpc.health.v1` (the returned reporter marks services
/// serving) and server reflection, which lists exactly the services the
/// server serves, so stock tools work without the protos. A call to any
/// other method is answered `UNIMPLEMENTED`, with a message pointing to
/// reflection; [`api_server`]'s says which Tally server it is and where its
/// API is described.
pub fn grpc_server() -> (tonic_health::server::HealthReporter, GrpcServer) {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let server = GrpcServer {
        routes: tonic::service::Routes::new(health_service),
        services: Vec::new(),
        api: None,
    };
    (health_reporter, server)
}

/// [`grpc_server`] for a server with a known API: its `UNIMPLEMENTED`
/// message is `api`'s, and it serves only `api`'s services.
pub fn api_server(api: &'static ServedApi) -> (tonic_health::server::HealthReporter, GrpcServer) {
    let (health_reporter, mut server) = grpc_server();
    server.api = Some(api);
    (health_reporter, server)
}

/// The server [`grpc_server`] returns: add the daemon's own services, then
/// serve.
#[derive(Debug)]
pub struct GrpcServer {
    /// Health checking, and the services added.
    routes: tonic::service::Routes,
    /// The names of the services added.
    services: Vec<&'static str>,
    api: Option<&'static ServedApi>,
}

impl GrpcServer {
    /// Adds a service (of the server's [`ServedApi`], if it has one).
    pub fn add_service<S, B>(mut self, service: S) -> Self
    where
        S: tonic::codegen::Service<
                tonic::codegen::http::Request<tonic::body::Body>,
                Response = tonic::codegen::http::Response<B>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        B: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
        B::Error: Into<tonic::codegen::StdError>,
    {
        debug_assert!(
            self.api.is_none_or(|api| api.services.contains(&S::NAME)),
            "{} is not in the server's API",
            S::NAME
        );
        self.services.push(S::NAME);
        self.routes = self.routes.add_service(service);
        self
    }

    /// Serves on `incoming` until `shutdown` completes, then stops
    /// accepting and lets in-flight calls finish.
    pub async fn serve_with_incoming_shutdown(
        self,
        incoming: crate::tls::Incoming,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let message = self.api.map_or(UNIMPLEMENTED, |api| api.unimplemented);
        let max_message_bytes = self
            .api
            .map_or(crate::edge::MAX_PUBLIC_MESSAGE_BYTES, |api| {
                api.max_message_bytes
            });
        let (reflection_v1, reflection_v1alpha) = reflection_services(&self.services);
        let routes = self
            .routes
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .prepare();
        server_builder()
            .serve_with_incoming_shutdown(
                crate::edge::Edge::new(routes, message, max_message_bytes),
                incoming,
                shutdown,
            )
            .await
    }
}

/// The server builder every daemon starts from, so that a server-wide
/// setting reaches the coordinator's own dispatch as well as the router:
/// the HTTP/2 limits of [`crate::edge`]. Serve on [`crate::tls::incoming`]
/// of the listener, with [`crate::edge::MAX_CONNECTIONS_PER_SERVER`].
pub fn server_builder() -> tonic::transport::Server {
    crate::edge::server_builder()
}

/// Health checking, and reflection listing `api`'s services, for a server
/// that dispatches some calls itself before the router (the coordinator's
/// hot `Counter` calls) and passes it the others. Serve them wrapped in
/// [`explain_unimplemented`].
pub fn grpc_routes(
    api: &ServedApi,
) -> (tonic_health::server::HealthReporter, tonic::service::Routes) {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let (reflection_v1, reflection_v1alpha) = reflection_services(api.services);
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    (health_reporter, routes)
}

/// `service` behind the edge ([`crate::edge::Edge`]) of a server of
/// `api`: its bad inputs answered with the right codes, its request
/// messages held to `api`'s limit, and `api`'s message on every
/// `UNIMPLEMENTED` answer that has none (tonic answers a method no service
/// has, or an unknown method of a known service, with an empty message,
/// which tells a client nothing).
pub fn explain_unimplemented<S>(service: S, api: &'static ServedApi) -> ExplainUnimplemented<S> {
    crate::edge::Edge::new(service, api.unimplemented, api.max_message_bytes)
}

/// See [`explain_unimplemented`].
pub type ExplainUnimplemented<S> = crate::edge::Edge<S>;

/// gRPC server reflection, both the `v1` and the older `v1alpha` protocol
/// (grpcurl asks for either). Each describes every Tally proto file, health
/// checking and reflection, and lists what the server serves: `services`,
/// `grpc.health.v1.Health` and both reflection services.
fn reflection_services(
    services: &[&'static str],
) -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let configure = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tally_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        served_services(services).fold(builder, |builder, name| builder.with_service_name(name))
    };
    let v1 = configure()
        .build_v1()
        .expect("the descriptor sets are generated at build time and always valid");
    let v1alpha = configure()
        .build_v1alpha()
        .expect("the descriptor sets are generated at build time and always valid");
    (v1, v1alpha)
}

/// Every service a server of `services` serves, as its reflection lists
/// them.
fn served_services<'a>(services: &'a [&'static str]) -> impl Iterator<Item = &'static str> + 'a {
    services.iter().copied().chain([
        tonic_health::pb::health_server::SERVICE_NAME,
        tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
        tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error of `text`, caused by `source`.
    #[derive(Debug)]
    struct Chained {
        text: &'static str,
        source: Option<Box<Chained>>,
    }

    impl std::fmt::Display for Chained {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.text)
        }
    }

    impl std::error::Error for Chained {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.source
                .as_deref()
                .map(|source| source as &(dyn std::error::Error + 'static))
        }
    }

    fn chain(texts: &[&'static str]) -> Chained {
        let (first, rest) = texts.split_first().unwrap();
        Chained {
            text: first,
            source: (!rest.is_empty()).then(|| Box::new(chain(rest))),
        }
    }

    #[test]
    fn an_error_line_says_each_cause_once() {
        // tonic's error for a name that does not resolve.
        let error = chain(&[
            "cannot reach http://nowhere.invalid:1",
            "transport error",
            "dns error",
            "dns error",
            "failed to lookup address information: Name or service not known",
        ]);
        assert_eq!(
            error_line(&error),
            "cannot reach http://nowhere.invalid:1: transport error: dns error: failed to \
             lookup address information: Name or service not known"
        );
        // A cause the error already prints; an empty one.
        let error = chain(&["config.toml: bad key `x`", "bad key `x`", "", "x", "deep"]);
        assert_eq!(error_line(&error), "config.toml: bad key `x`: deep");
        assert_eq!(error_line(&chain(&["alone"])), "alone");
    }

    #[test]
    fn unimplemented_messages_go_into_a_header_as_they_are() {
        for message in [
            COORDINATOR_API.unimplemented,
            SHARD_API.unimplemented,
            UNIMPLEMENTED,
        ] {
            assert!(
                message
                    .bytes()
                    .all(|byte| (0x20..=0x7e).contains(&byte) && byte != b'%'),
                "{message}"
            );
        }
        for api in [COORDINATOR_API, SHARD_API] {
            for service in api.services {
                assert!(api.unimplemented.contains(service), "{service}");
            }
        }
    }
}

/// Aborts a spawned task when dropped: a helper task that must not outlive
/// what spawned it.
#[derive(Debug)]
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
