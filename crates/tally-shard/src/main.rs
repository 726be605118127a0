//! `tally-shard`: one shard node. See the `tally_shard` crate docs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tally_shard::{Durability, ShardConfig, ShardNode, ShardOverrides};

/// A Tally shard node: keeps counters in memory, writes them to sled.
///
/// Prints `listening on ADDRESS` on stdout once it has recovered its data
/// and accepts requests; logs go to stderr (level from RUST_LOG).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML config file (e.g. config/shard-1.toml); flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's id, as the coordinator's membership names it.
    #[arg(long)]
    node_id: Option<String>,
    /// Address to listen on, ip:port.
    #[arg(long)]
    listen: Option<String>,
    /// Data directory (created if missing).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// When increments are acknowledged: sync (on disk) or async (in memory).
    #[arg(long, value_parser = parse_durability)]
    durability: Option<Durability>,
    /// Async mode: most milliseconds between acknowledgement and flush.
    #[arg(long)]
    flush_interval_ms: Option<u64>,
}

fn parse_durability(text: &str) -> Result<Durability, String> {
    text.parse()
}

#[tokio::main]
async fn main() -> ExitCode {
    tally_proto::process::init_tracing();
    tally_proto::process::exit_code("tally-shard", run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let overrides = ShardOverrides {
        node_id: args.node_id,
        listen: args.listen,
        data_dir: args.data_dir,
        durability: args.durability,
        flush_interval_ms: args.flush_interval_ms,
    };
    let config = ShardConfig::load(args.config.as_deref(), overrides)?;
    let listen = config.listen;
    // Before recovery, so that a SIGTERM while loading is a clean stop.
    let shutdown = tally_proto::process::shutdown_signal();
    let node = ShardNode::open(config).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    node.serve(listener, shutdown).await?;
    Ok(())
}
