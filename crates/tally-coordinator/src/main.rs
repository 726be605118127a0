//! `tally-coordinator`: the public gRPC endpoint. See the
//! `tally_coordinator` crate docs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tally_coordinator::{
    ClusterHandle, Coordinator, CoordinatorConfig, CoordinatorOverrides, Security,
};

/// The Tally coordinator: routes increments to shard nodes over the ring,
/// sums reads over every node.
///
/// Prints `listening on ADDRESS` on stdout once it accepts requests (after
/// `metrics on http://ADDRESS/metrics` if `metrics_listen` is set); logs go
/// to stderr (level from RUST_LOG). On SIGHUP it reads the config file again
/// and applies its membership: nodes may be added (or change address or
/// weight), none removed; and it reads the TLS files and the tokens file
/// again; the outcome is logged.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML config file with the membership (e.g. config/coordinator.toml).
    #[arg(long)]
    config: PathBuf,
    /// Address to listen on, ip:port; overrides `listen`.
    #[arg(long)]
    listen: Option<String>,
    #[command(flatten)]
    observability: tally_runtime::config_file::ObservabilityKeys,
    /// Longest wait for one internal call to a shard; overrides
    /// `shard_timeout_ms`.
    #[arg(long)]
    shard_timeout_ms: Option<u64>,
    #[command(flatten)]
    tls: tally_runtime::config_file::TlsKeys,
    /// The bearer tokens file (`tallyctl tokens create`); overrides
    /// `tokens_file`.
    #[arg(long, value_name = "FILE")]
    tokens_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    // Before the runtime's threads exist.
    tally_runtime::process::tune_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    tally_runtime::process::exit_code("tally-coordinator", runtime.block_on(run(Args::parse())))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let overrides = CoordinatorOverrides {
        listen: args.listen,
        observability: args.observability,
        shard_timeout_ms: args.shard_timeout_ms,
        tls: args.tls,
        tokens_file: args.tokens_file,
    };
    let config = CoordinatorConfig::load(&args.config, overrides.clone())?;
    // Once the config says how; an error before it is one line on stderr.
    let _traces = config
        .observability
        .init_tracing("tally-coordinator", &config.listen.to_string())
        .map_err(anyhow::Error::msg)?;
    let listen = config.listen;
    let tls = config.tls.is_some();
    let coordinator = match config.observability.metrics_listen {
        Some(address) => {
            Coordinator::with_metrics(config, tally_runtime::metrics::bind(address, tls).await?)?
        }
        None => Coordinator::new(config)?,
    };
    reload_on_sighup(
        coordinator.handle(),
        coordinator.security(),
        args.config,
        overrides,
    )?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let shutdown = tally_runtime::process::shutdown_signal();
    println!("listening on {}", listener.local_addr()?);
    coordinator.serve(listener, shutdown).await?;
    Ok(())
}

/// Reloads the membership from `path`, then the TLS and tokens files, on
/// every SIGHUP. A bad file or a refused change is logged and changes
/// nothing (of its part).
fn reload_on_sighup(
    handle: ClusterHandle,
    security: Security,
    path: PathBuf,
    overrides: CoordinatorOverrides,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed now, before readiness is announced: a SIGHUP that comes
    // right after `listening on` is a reload, not a kill.
    let mut hangups = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let reloaded = CoordinatorConfig::load(&path, overrides.clone())
                .map_err(|error| error.to_string())
                .and_then(|config| handle.reload(config).map_err(|error| error.to_string()));
            match reloaded {
                Ok(summary) => tracing::info!(config = %path.display(), "{summary}"),
                Err(error) => {
                    tracing::error!(config = %path.display(), "reload refused: {error}");
                }
            }
            match security.reload(&handle) {
                Ok(summary) => tracing::info!("{summary}"),
                Err(error) => tracing::error!("tls and tokens reload refused: {error}"),
            }
        }
    });
    Ok(())
}
