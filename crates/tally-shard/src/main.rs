//! `tally-shard`: one shard node. See the `tally_shard` crate docs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tally_shard::{Durability, ShardConfig, ShardNode, ShardOverrides};

/// A Tally shard node: keeps counters in memory, makes every change durable
/// in its log, checkpoints them to sled.
///
/// Without a subcommand it serves: it prints `listening on ADDRESS` on
/// stdout once it has recovered its data and accepts requests (after
/// `metrics on http://ADDRESS/metrics` if `metrics_listen` is set); logs go
/// to stderr (level from RUST_LOG).
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks a stopped node's data directory without changing it: loads a
    /// scratch copy of its checkpoint and reads its log through, checking
    /// every frame, as a start would. Exit 0 if sound, 1 (with the reason)
    /// if not.
    Verify {
        /// The data directory (data_dir in the node's config).
        data_dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML config file (e.g. config/shard-1.toml); flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's id, as the coordinator's membership names it.
    #[arg(long)]
    node_id: Option<String>,
    /// Address to listen on, ip:port.
    #[arg(long)]
    listen: Option<String>,
    #[command(flatten)]
    observability: tally_runtime::config_file::ObservabilityKeys,
    /// Data directory (created if missing).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// When increments are acknowledged: sync (on disk) or async (in memory).
    #[arg(long, value_parser = parse_durability)]
    durability: Option<Durability>,
    /// Async mode: most milliseconds between acknowledgement and flush.
    #[arg(long)]
    flush_interval_ms: Option<u64>,
    /// How long an idempotency key is remembered, in seconds.
    #[arg(long)]
    idempotency_retention_secs: Option<u64>,
    /// Most idempotency keys remembered; beyond it the oldest are forgotten.
    #[arg(long)]
    idempotency_max_keys: Option<usize>,
    /// A new log segment starts once the current one holds this many bytes.
    #[arg(long)]
    log_segment_bytes: Option<u64>,
    /// A checkpoint starts once the log holds this many bytes after the last.
    #[arg(long)]
    checkpoint_log_bytes: Option<u64>,
    /// ... or this many milliseconds after the last one began.
    #[arg(long)]
    checkpoint_interval_ms: Option<u64>,
    /// How many milliseconds after a counter window's end (by this node's
    /// clock) the node still applies to it and reads it; it reclaims the
    /// window 10 s later.
    #[arg(long)]
    window_grace_ms: Option<u64>,
    #[command(flatten)]
    tls: tally_runtime::config_file::TlsKeys,
}

/// Reads the TLS files again on every SIGHUP (renewed certificates); a bad
/// file is logged and changes nothing. Without TLS a SIGHUP is logged and
/// ignored, not fatal: an operator may signal every daemon at once.
fn reload_tls_on_sighup(tls: Option<tally_shard::ShardTls>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed before readiness is announced: a SIGHUP right after
    // `listening on` is a reload, not a kill.
    let mut hangups = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match tls.as_ref().map(tally_shard::ShardTls::reload) {
                Some(Ok(())) => tracing::info!("reloaded tls certificates"),
                Some(Err(error)) => tracing::error!("tls reload refused: {error}"),
                None => tracing::info!("SIGHUP: nothing to reload (no tls)"),
            }
        }
    });
    Ok(())
}

fn parse_durability(text: &str) -> Result<Durability, String> {
    text.parse()
}

fn main() -> ExitCode {
    // Before the runtime's threads exist.
    tally_runtime::process::tune_allocator();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime")
        .block_on(run())
}

async fn run() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Some(Command::Verify { data_dir }) => {
            tally_runtime::process::init_tracing();
            verify(data_dir).await
        }
        None => serve(args.serve).await,
    };
    tally_runtime::process::exit_code("tally-shard", result)
}

async fn verify(data_dir: PathBuf) -> anyhow::Result<()> {
    let report = tokio::task::spawn_blocking(move || tally_shard::verify(&data_dir))
        .await
        .context("verify panicked")??;
    println!("node {}: sound", report.node_id);
    if report.format_version != tally_shard::FORMAT_VERSION {
        println!(
            "format version {} (migrated to {} at the node's next start)",
            report.format_version,
            tally_shard::FORMAT_VERSION
        );
    }
    println!("entries {}", report.entries);
    if report.foreign_entries > 0 {
        println!("entries of other nodes {}", report.foreign_entries);
    }
    println!("idempotency records {}", report.records);
    println!(
        "log: {} frames read, {} bytes, last frame {} (last known durable: {})",
        report.log_frames, report.log_bytes, report.last_seq, report.witnessed
    );
    if report.torn_bytes > 0 {
        println!(
            "log: {} bytes of a torn last write (cut at the next start)",
            report.torn_bytes
        );
    }
    println!(
        "checkpoint covers frames up to {}",
        report.checkpoint_position
    );
    println!(
        "checkpoint files {}",
        if report.checkpoint_unchanged {
            "as its last round left them"
        } else {
            "changed since its last round (a start checks a copy first)"
        }
    );
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = ShardOverrides {
        node_id: args.node_id,
        listen: args.listen,
        observability: args.observability,
        data_dir: args.data_dir,
        durability: args.durability,
        flush_interval_ms: args.flush_interval_ms,
        idempotency_retention_secs: args.idempotency_retention_secs,
        idempotency_max_keys: args.idempotency_max_keys,
        log_segment_bytes: args.log_segment_bytes,
        checkpoint_log_bytes: args.checkpoint_log_bytes,
        checkpoint_interval_ms: args.checkpoint_interval_ms,
        window_grace_ms: args.window_grace_ms,
        tls: args.tls,
    };
    let config = ShardConfig::load(args.config.as_deref(), overrides)?;
    // Once the config says how; an error before it is one line on stderr.
    let _traces = config
        .observability
        .init_tracing("tally-shard", &config.node_id)
        .map_err(anyhow::Error::msg)?;
    // A write past a file size limit (RLIMIT_FSIZE) must fail with EFBIG
    // and be handled like a full disk, not kill the process with SIGXFSZ.
    tally_runtime::process::ignore_file_size_signal();
    let listen = config.listen;
    let metrics_listen = config.observability.metrics_listen;
    // Before recovery, so that a SIGTERM while loading is a clean stop.
    let shutdown = tally_runtime::process::shutdown_signal();
    let tls = config.tls.is_some();
    let mut node = ShardNode::open(config).await?;
    if let Some(address) = metrics_listen {
        node = node.with_metrics(tally_runtime::metrics::bind(address, tls).await?);
    }
    reload_tls_on_sighup(node.tls())?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    node.serve(listener, shutdown).await?;
    Ok(())
}
