//! `tallyctl`: Tally's admin and user CLI. See the `tally_cli` crate docs.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// Inspect and use a Tally cluster, or run one locally for development.
#[derive(Debug, Parser)]
#[command(name = "tallyctl", version)]
struct Args {
    #[command(
        flatten,
        next_help_heading = "Client options (every command but dev; also after the command)"
    )]
    client: ClientOptions,
    #[command(subcommand)]
    command: Command,
}

/// The options of every command that calls a server: given after the
/// command (`tallyctl status --json`) or before it (`tallyctl --json
/// status`); after wins.
#[derive(Debug, Clone, Default, clap::Args)]
struct ClientOptions {
    /// The server's gRPC endpoint, a URL or host:port [env: TALLY_ENDPOINT]
    /// [default: http://127.0.0.1:7700]
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// Print JSON instead of tables, for scripts.
    #[arg(long)]
    json: bool,
    /// Deadline of each call, in milliseconds [default: 5000]
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,
    /// Bearer token sent with every call, for a server with a tokens file
    /// [env: TALLY_TOKEN]
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// CA certificate the server's must be signed by; turns TLS on (as an
    /// https:// endpoint does) [env: TALLY_CA_CERT]
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Certificate to present, for a server that asks for one (a shard's
    /// port: signed by the cluster's CA) [env: TALLY_CLIENT_CERT]
    #[arg(long, value_name = "FILE", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The private key of --client-cert [env: TALLY_CLIENT_KEY]
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    client_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a coordinator and shard nodes in this process, on loopback, until
    /// Ctrl-C.
    Dev {
        /// Directory for the shards' data (one subdirectory per shard).
        #[arg(long, default_value = "tally-dev-data")]
        data_dir: PathBuf,
        /// The coordinator's port; shard N listens on port + N. 0 picks free
        /// ports for every server (they are printed).
        #[arg(long, default_value_t = 7700)]
        port: u16,
        /// Number of shard nodes.
        #[arg(long, default_value_t = 3)]
        shards: usize,
        /// Acknowledge increments once on disk (sync) or in memory (async).
        #[arg(long, default_value = "sync")]
        durability: String,
        /// Run it as production should: TLS on every port, mutual TLS to
        /// the shards, and a bearer token on every call. Makes a CA, a node
        /// certificate and an admin token under DATA_DIR/secure and prints
        /// how to call the cluster.
        #[arg(long)]
        secure: bool,
    },
    /// Make the cluster's certificates (like `cockroach cert`): a CA, then
    /// a certificate per node and per client tool, signed by it.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Make bearer tokens for the public API.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Add DELTA (default 1, may be negative) to a counter. With --limit,
    /// exit status 3 says the limit refused the increment.
    #[command(group(clap::ArgGroup::new("reads_total").args(["get", "limit"]).multiple(true)))]
    Incr {
        #[command(flatten)]
        client: ClientOptions,
        /// The counter's name.
        counter: String,
        /// Amount to add.
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        delta: i64,
        /// Idempotency key: a retry with the same key applies once.
        #[arg(long)]
        key: Option<String>,
        /// Print the counter's total after the increment (one more read of
        /// every shard).
        #[arg(long)]
        get: bool,
        /// Add to the counter's current fixed window of this length (e.g.
        /// 60s, 5m, 1h, 1d, or seconds), aligned to the Unix epoch; prints
        /// when the window ends.
        #[arg(long, value_name = "DURATION", value_parser = tally_cli::window_arg::parse_window)]
        window: Option<u32>,
        /// Apply only if the total after it would be at most N; prints the
        /// total, and exits 3 if the limit refused the increment. Not with
        /// --key or a negative DELTA.
        #[arg(
            long,
            value_name = "N",
            allow_negative_numbers = true,
            conflicts_with = "key"
        )]
        limit: Option<i64>,
        /// With --get or --limit: a total without a down shard's part will
        /// do (marked partial) instead of failing.
        #[arg(long, requires = "reads_total")]
        allow_partial: bool,
    },
    /// Read counters (the sum over every shard). A counter that cannot be
    /// read shows its error instead of a value, and the exit status is 1.
    Get {
        #[command(flatten)]
        client: ClientOptions,
        /// Counter names.
        #[arg(required = true)]
        counters: Vec<String>,
        /// Answer with the parts that can be read when a shard is down,
        /// marked incomplete, instead of failing.
        #[arg(long)]
        allow_partial: bool,
        /// Read the counters' current fixed window of this length (e.g.
        /// 60s, 5m, 1h, 1d, or seconds); prints when it ends.
        #[arg(long, value_name = "DURATION", value_parser = tally_cli::window_arg::parse_window)]
        window: Option<u32>,
    },
    /// Reset a counter to 0 on every shard.
    Delete {
        #[command(flatten)]
        client: ClientOptions,
        /// The counter's name.
        counter: String,
        /// Reset the counter's current fixed window of this length (e.g.
        /// 60s, 5m, 1h, 1d, or seconds) instead.
        #[arg(long, value_name = "DURATION", value_parser = tally_cli::window_arg::parse_window)]
        window: Option<u32>,
    },
    /// Show the ring: nodes, weights, vnodes, owned share and health.
    Ring {
        #[command(flatten)]
        client: ClientOptions,
        /// Compute the ring offline from a coordinator config file instead of
        /// asking the coordinator.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show which node owns each stripe of a counter.
    Locate {
        #[command(flatten)]
        client: ClientOptions,
        /// The counter's name.
        counter: String,
        /// Compute offline from a coordinator config file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show each shard node's health, entries and last flush.
    Status {
        #[command(flatten)]
        client: ClientOptions,
    },
    /// Check the gRPC health of the server at --endpoint (a coordinator or a
    /// shard node): exit 0 if it is serving. For container health checks.
    Health {
        #[command(flatten)]
        client: ClientOptions,
    },
    /// A live view of the cluster, refreshed every second from every
    /// daemon's Prometheus metrics (found through ClusterStatus): per node
    /// increments/s, reads/s, p99 of internal calls, increments per group
    /// commit, health, entries. q quits.
    Top {
        #[command(flatten)]
        client: ClientOptions,
        /// Time between refreshes.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        interval: std::time::Duration,
    },
    /// Load a cluster like redis-benchmark: throughput and latency
    /// percentiles, then a read-back of every counter that fails the run if
    /// any total differs from what was acknowledged.
    Bench {
        #[command(flatten)]
        client: ClientOptions,
        /// Calls in flight at once (one per client task).
        #[arg(long, short = 'c', default_value_t = 64)]
        clients: usize,
        /// HTTP/2 connections the clients share [default: one per client]
        #[arg(long, value_name = "N")]
        connections: Option<usize>,
        /// How long to run (e.g. 10s, 1m).
        #[arg(long, short = 'd', value_parser = humantime::parse_duration, default_value = "10s", conflicts_with = "requests")]
        duration: std::time::Duration,
        /// Stop after this many calls instead of a duration.
        #[arg(long, short = 'n')]
        requests: Option<u64>,
        /// Distinct counters, picked uniformly (1: one hot counter).
        #[arg(long, default_value_t = 1)]
        counters: u64,
        /// Increments per IncrementBatch, counters per GetBatch (1: unary
        /// Increment and Get).
        #[arg(long, short = 'b', default_value_t = 1)]
        batch: usize,
        /// Share of calls that are reads, in percent.
        #[arg(long, default_value_t = 0)]
        reads: u8,
        /// Give every increment its own idempotency key.
        #[arg(long)]
        keyed: bool,
        /// Counter name prefix [default: a new one for each run]
        #[arg(long)]
        prefix: Option<String>,
        /// Skip reading the counters back at the end.
        #[arg(long)]
        no_check: bool,
        /// Increment-and-get: every increment asks for the counter's total
        /// after it (unary only: --batch 1).
        #[arg(long)]
        get: bool,
        /// Increment and read the counters' current fixed window of this
        /// length (e.g. 60s, 5m, 1h, or seconds).
        #[arg(long, value_name = "DURATION", value_parser = tally_cli::window_arg::parse_window)]
        window: Option<u32>,
        /// Every increment applies only if its counter's total stays at
        /// most N; the report counts applied and refused increments (unary
        /// only: --batch 1; not with --keyed).
        #[arg(long, value_name = "N", conflicts_with = "keyed")]
        limit: Option<i64>,
    },
    /// Move a shard's entries to the next node of the ring, exactly once,
    /// so that it can be removed from the coordinators' config (then
    /// SIGHUP them). Safe to repeat: an interrupted drain resumes.
    Drain {
        #[command(flatten)]
        client: ClientOptions,
        /// The node id to drain.
        node: String,
    },
}

/// `tallyctl certs` subcommands, named as `cockroach cert` names them.
#[derive(Debug, Subcommand)]
#[allow(clippy::enum_variant_names)]
enum CertsCommand {
    /// Make the cluster's CA: ca.crt (give it to every daemon and client)
    /// and ca.key (keep it off the nodes; it only signs).
    CreateCa {
        #[command(flatten)]
        files: CertsFiles,
    },
    /// Make NAME.crt and NAME.key for a node (a shard or a coordinator),
    /// signed by the CA, valid as server and client certificate for NAME,
    /// localhost, 127.0.0.1, ::1 and every HOST.
    CreateNode {
        #[command(flatten)]
        files: CertsFiles,
        /// The node's name (a shard's node_id, or e.g. "coordinator").
        name: String,
        /// More names or IP addresses the node is dialled at.
        hosts: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = tally_cli::certs::DEFAULT_DAYS)]
        days: u32,
    },
    /// Make client.NAME.crt and client.NAME.key, a client certificate
    /// signed by the CA, for a tool that calls a shard directly.
    CreateClient {
        #[command(flatten)]
        files: CertsFiles,
        /// Who holds it.
        name: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = tally_cli::certs::DEFAULT_DAYS)]
        days: u32,
    },
}

/// Where `tallyctl certs` writes.
#[derive(Debug, clap::Args)]
struct CertsFiles {
    /// The directory of the CA and the certificates.
    #[arg(long, default_value = "certs")]
    certs_dir: PathBuf,
    /// Replace files that exist.
    #[arg(long)]
    overwrite: bool,
}

/// `tallyctl tokens` subcommands.
#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Add a new token to the tokens file (made if missing) and print it.
    /// It is shown once: the file keeps only its SHA-256 hash. Send the
    /// coordinator a SIGHUP to take it.
    Create {
        /// The tokens file (the coordinator's tokens_file).
        #[arg(long, default_value = "tokens.toml")]
        tokens_file: PathBuf,
        /// A name for the token (who or what holds it).
        #[arg(long)]
        name: String,
        /// read (Get, GetBatch), write (also Increment, IncrementBatch) or
        /// admin (everything: Delete and the Admin service too).
        #[arg(long)]
        role: tally_runtime::tokens::Role,
    },
}

impl ClientOptions {
    /// Whether any option was given.
    fn any(&self) -> bool {
        self.endpoint.is_some()
            || self.json
            || self.timeout_ms.is_some()
            || self.token.is_some()
            || self.ca_cert.is_some()
            || self.client_cert.is_some()
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // reqwest (`top`'s scrapes) builds a TLS configuration for every
    // client, from the process's default provider: make it ring, the one
    // the rest of Tally names. Fails only if one is set already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let local = matches!(
        args.command,
        Command::Dev { .. } | Command::Certs { .. } | Command::Tokens { .. }
    );
    if local && args.client.any() {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "client options (--endpoint, --json, --timeout-ms, --token, --ca-cert, \
                 --client-cert) do not apply to `dev`, `certs` and `tokens`",
            )
            .exit();
    }
    if let Command::Incr {
        delta,
        limit: Some(_),
        ..
    } = &args.command
    {
        if *delta < 0 {
            let mut command = Args::command();
            command.build();
            command
                .find_subcommand_mut("incr")
                .expect("incr is a command")
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--limit needs a DELTA of 0 or more (a decrement needs no limit)",
                )
                .exit();
        }
    }
    match commands::run(args).await {
        // The reader of our output went away (`tallyctl ... | head`): it
        // has what it wanted.
        Err(error) if error.is::<commands::StdoutClosed>() => ExitCode::SUCCESS,
        // `incr --limit`: the limit refused the increment; what was
        // printed says so.
        Err(error) if error.is::<commands::Refused>() => ExitCode::from(commands::REFUSED_EXIT),
        result => tally_runtime::process::exit_code("tallyctl", result),
    }
}
