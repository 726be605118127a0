//! `tally-coordinator`: the public gRPC endpoint. See the
//! `tally_coordinator` crate docs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tally_coordinator::{Coordinator, CoordinatorConfig, CoordinatorOverrides};

/// The Tally coordinator: routes increments to shard nodes over the ring,
/// sums reads over every node.
///
/// Prints `listening on ADDRESS` on stdout once it accepts requests; logs go
/// to stderr (level from RUST_LOG).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML config file with the membership (e.g. config/coordinator.toml).
    #[arg(long)]
    config: PathBuf,
    /// Address to listen on, ip:port; overrides `listen`.
    #[arg(long)]
    listen: Option<String>,
    /// Longest wait for one internal call to a shard; overrides
    /// `shard_timeout_ms`.
    #[arg(long)]
    shard_timeout_ms: Option<u64>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tally_proto::process::init_tracing();
    tally_proto::process::exit_code("tally-coordinator", run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let overrides = CoordinatorOverrides {
        listen: args.listen,
        shard_timeout_ms: args.shard_timeout_ms,
    };
    let config = CoordinatorConfig::load(&args.config, overrides)?;
    let listen = config.listen;
    let coordinator = Coordinator::new(config)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let shutdown = tally_proto::process::shutdown_signal();
    println!("listening on {}", listener.local_addr()?);
    coordinator.serve(listener, shutdown).await?;
    Ok(())
}
