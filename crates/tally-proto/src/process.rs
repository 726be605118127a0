//! What every Tally binary does the same way at the process edge: logging
//! setup, shutdown signals, and gRPC server reflection.

use std::future::Future;

/// Sends `tracing` events to stderr, filtered by `RUST_LOG` (default
/// `info`). Stdout is left for what a binary prints on purpose (its listen
/// address, command output).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Ignore the error of a second call (tests, the dev cluster): the first
    // subscriber stays.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// A binary's exit: 0 on success; otherwise one line on stderr,
/// `BINARY: error: ...` (the alternate form, so an `anyhow` chain reads
/// `context: cause` on the same line), and exit code 1.
pub fn exit_code<E: std::fmt::Display>(
    binary: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{binary}: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
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
/// (docs/BENCHMARKS.md). Call first in `main`, before any thread starts. A
/// no-op on other allocators and systems.
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

/// A gRPC server with what every Tally daemon serves besides its own
/// services: `grpc.health.v1` (the returned reporter marks services
/// serving) and server reflection, so stock tools work without the protos.
pub fn grpc_server() -> (
    tonic_health::server::HealthReporter,
    tonic::transport::server::Router,
) {
    let (health_reporter, routes) = grpc_routes();
    let router = server_builder().add_routes(routes);
    (health_reporter, router)
}

/// The server builder every daemon starts from, so that a server-wide
/// setting reaches the coordinator's own dispatch as well as the router.
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
}

/// The routes [`grpc_server`] starts from (health checking and reflection),
/// for a server that dispatches some calls itself before the router (the
/// coordinator's hot `Counter` calls) and passes it the others.
pub fn grpc_routes() -> (tonic_health::server::HealthReporter, tonic::service::Routes) {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let (reflection_v1, reflection_v1alpha) = reflection_services();
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    (health_reporter, routes)
}

/// The connections a server accepts on `listener`, with Nagle's algorithm
/// off. The server builder's own `tcp_nodelay` applies only to listeners it
/// binds itself: on ours, small answers waited for the peer's delayed ACK,
/// up to 40 ms each under load.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// gRPC server reflection, both the `v1` and the older `v1alpha` protocol
/// (grpcurl asks for either), over every Tally proto file.
fn reflection_services() -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the descriptor set is generated by build.rs and always valid");
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the descriptor set is generated by build.rs and always valid");
    (v1, v1alpha)
}
