//! What each `tallyctl` command does and prints.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use comfy_table::{presets, Table};
use serde::Serialize;
use tally_cli::bench::{BenchOptions, Mode, Stop};
use tally_cli::client::{ignored_by_increment, Access, Client};
use tally_cli::local_cluster::{LocalCluster, LocalClusterOptions};
use tally_cli::window_arg::{describe_window, format_unix_ms};
use tally_coordinator::{locate_response, ring_response, CoordinatorConfig, CoordinatorOverrides};
use tally_proto::domain::CounterName;
use tally_proto::pb;
use tally_proto::pb::admin_client::AdminClient;
use tally_proto::pb::counter_client::CounterClient;

use crate::{Args, CertsCommand, ClientOptions, Command, TokensCommand};

/// The endpoint when neither `--endpoint` nor `$TALLY_ENDPOINT` names one.
const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7700";

/// The deadline of each call when `--timeout-ms` is not given.
const DEFAULT_TIMEOUT_MS: u64 = 5_000;

/// Runs one command. `args.client` are the client options given before
/// the command; `dev` has none (`main` refuses them).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let outer = args.client;
    match args.command {
        Command::Dev {
            data_dir,
            port,
            shards,
            durability,
            secure,
        } => dev(&data_dir, port, shards, &durability, secure).await,
        Command::Certs { command } => certs(command),
        Command::Tokens {
            command:
                TokensCommand::Create {
                    tokens_file,
                    name,
                    role,
                },
        } => {
            let token = tally_cli::certs::create_token(&tokens_file, &name, role)?;
            print_line(&token)?;
            eprintln!(
                "added token {name:?} ({role}) to {}; it is shown once, only its hash is kept. \
                 SIGHUP the coordinator to take it.",
                tokens_file.display()
            );
            Ok(())
        }
        Command::Incr {
            client,
            counter,
            delta,
            key,
            get,
            window,
            limit,
            allow_partial,
        } => {
            let request = pb::IncrementRequest {
                counter,
                delta,
                idempotency_key: key.unwrap_or_default(),
                return_total: get,
                allow_partial,
                window_seconds: window.unwrap_or(0),
                limit,
            };
            Cli::new(client, outer).incr(request).await
        }
        Command::Get {
            client,
            counters,
            allow_partial,
            window,
        } => {
            Cli::new(client, outer)
                .get(counters, allow_partial, window.unwrap_or(0))
                .await
        }
        Command::Delete {
            client,
            counter,
            window,
        } => {
            Cli::new(client, outer)
                .delete(counter, window.unwrap_or(0))
                .await
        }
        Command::Ring { client, config } => Cli::new(client, outer).ring(config.as_deref()).await,
        Command::Locate {
            client,
            counter,
            config,
        } => {
            Cli::new(client, outer)
                .locate(counter, config.as_deref())
                .await
        }
        Command::Status { client } => Cli::new(client, outer).status().await,
        Command::Health { client } => Cli::new(client, outer).health().await,
        Command::Top { client, interval } => {
            let cli = Cli::new(client, outer);
            tally_cli::top::run(tally_cli::top::TopOptions {
                access: cli.access.clone(),
                interval,
                timeout: cli.timeout,
            })
            .await
        }
        Command::Drain { client, node } => Cli::new(client, outer).drain(node).await,
        Command::Bench {
            client,
            clients,
            connections,
            duration,
            requests,
            counters,
            batch,
            reads,
            keyed,
            prefix,
            no_check,
            get,
            window,
            limit,
        } => {
            let cli = Cli::new(client, outer);
            let options = BenchOptions {
                access: cli.access.clone(),
                clients,
                connections: connections.unwrap_or(0),
                stop: requests.map_or(Stop::After(duration), Stop::Calls),
                counters,
                batch,
                read_percent: reads,
                keyed,
                prefix: prefix.unwrap_or_default(),
                timeout: cli.timeout,
                check: !no_check,
                progress: !cli.json,
            };
            let mode = Mode {
                get,
                window_seconds: window.unwrap_or(0),
                limit,
            };
            cli.bench(options, mode).await
        }
    }
}

/// Accepts `host:port` as well as a URL.
fn normalize_endpoint(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

struct Cli {
    access: Access,
    json: bool,
    timeout: Duration,
}

/// Our standard output was closed before everything was written (a reader
/// such as `head` that has what it wanted): not an error to report.
#[derive(Debug, thiserror::Error)]
#[error("standard output closed: {0}")]
pub struct StdoutClosed(std::io::Error);

/// Writes `text` and a newline to standard output.
fn print_line(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(|error| {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                anyhow::Error::new(StdoutClosed(error))
            } else {
                anyhow::Error::new(error).context("cannot write to standard output")
            }
        })
}

/// Writes `text` and a newline to standard output, if it can: for `dev`,
/// which goes on serving whoever reads its output.
fn say(text: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

/// `incr --limit`: the limit refused the increment. Not an error to
/// report (the output says so), but the exit status says it:
/// [`REFUSED_EXIT`].
#[derive(Debug, thiserror::Error)]
#[error("refused by the limit")]
pub struct Refused;

/// The exit status of `incr --limit` when the limit refused the increment
/// (1 is an error, 2 a usage error).
pub const REFUSED_EXIT: u8 = 3;

/// A gRPC error as a person reads it: the code, then the server's message.
fn describe(status: tonic::Status) -> anyhow::Error {
    let code = format!("{:?}", status.code());
    anyhow::anyhow!("{}: {}", to_screaming_snake(&code), status.message())
}

fn to_screaming_snake(camel: &str) -> String {
    let mut out = String::new();
    for (index, character) in camel.chars().enumerate() {
        if character.is_uppercase() && index > 0 {
            out.push('_');
        }
        out.push(character.to_ascii_uppercase());
    }
    out
}

impl Cli {
    /// The options given after the command (`inner`) over those given
    /// before it (`outer`), over `$TALLY_ENDPOINT` and the defaults.
    fn new(inner: ClientOptions, outer: ClientOptions) -> Cli {
        let endpoint = inner
            .endpoint
            .or(outer.endpoint)
            .or_else(|| std::env::var("TALLY_ENDPOINT").ok())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let timeout = Duration::from_millis(
            inner
                .timeout_ms
                .or(outer.timeout_ms)
                .unwrap_or(DEFAULT_TIMEOUT_MS),
        );
        Cli {
            access: Access {
                endpoint: normalize_endpoint(&endpoint),
                ca_cert: inner
                    .ca_cert
                    .or(outer.ca_cert)
                    .or_else(|| std::env::var_os("TALLY_CA_CERT").map(Into::into)),
                token: inner
                    .token
                    .or(outer.token)
                    .or_else(|| std::env::var("TALLY_TOKEN").ok()),
                client_identity: inner
                    .client_cert
                    .zip(inner.client_key)
                    .or(outer.client_cert.zip(outer.client_key))
                    .or_else(|| {
                        std::env::var_os("TALLY_CLIENT_CERT")
                            .zip(std::env::var_os("TALLY_CLIENT_KEY"))
                            .map(|(cert, key)| (cert.into(), key.into()))
                    }),
                timeout,
            },
            json: inner.json || outer.json,
            timeout,
        }
    }

    async fn counter_client(&self) -> anyhow::Result<CounterClient<Client>> {
        Ok(CounterClient::new(self.access.connect().await?))
    }

    async fn admin_client(&self) -> anyhow::Result<AdminClient<Client>> {
        Ok(AdminClient::new(self.access.connect().await?))
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        tally_proto::timed(message, self.timeout)
    }

    /// `value` as one line of JSON with `--json`, else `table()`. The JSON
    /// goes through a `serde_json::Value`, whose keys are sorted: the order
    /// scripts see does not follow the order fields are declared in.
    fn print(&self, value: &impl Serialize, table: impl FnOnce() -> String) -> anyhow::Result<()> {
        if self.json {
            let value = serde_json::to_value(value).context("cannot encode the output as JSON")?;
            print_line(&value.to_string())
        } else {
            print_line(&table())
        }
    }

    async fn incr(&self, request: pb::IncrementRequest) -> anyhow::Result<()> {
        let mut client = self.counter_client().await?;
        let answer = client
            .increment(self.request(request.clone()))
            .await
            .map_err(describe)?
            .into_inner();
        if let Some(ignored) = ignored_by_increment(&request, &answer) {
            anyhow::bail!(
                "the coordinator ignored {ignored}: it is older than this tallyctl (upgrade it); \
                 the increment was applied without {ignored}"
            );
        }
        let incremented = Incremented::of(&request, &answer);
        self.print(&incremented, || incremented.human())?;
        if incremented.refused == Some(true) {
            return Err(Refused.into());
        }
        Ok(())
    }

    async fn get(
        &self,
        counters: Vec<String>,
        allow_partial: bool,
        window_seconds: u32,
    ) -> anyhow::Result<()> {
        let mut client = self.counter_client().await?;
        let totals = client
            .get_batch(self.request(pb::GetBatchRequest {
                counters,
                allow_partial,
                window_seconds,
            }))
            .await
            .map_err(describe)?
            .into_inner()
            .counters;
        let windowed = window_seconds != 0;
        anyhow::ensure!(
            !windowed
                || totals
                    .iter()
                    .all(|total| total.error_code != 0 || total.window_end_unix_ms != 0),
            "the coordinator ignored --window: it is older than this tallyctl (upgrade it), \
             and answered the counters without a window"
        );
        let printed: Vec<Total> = totals
            .iter()
            .map(|total| Total::of(total, windowed))
            .collect();
        let failed = totals.iter().filter(|total| total.error_code != 0).count();
        self.print(&printed, || {
            let mut header = vec!["COUNTER", "VALUE", "COMPLETE"];
            if windowed {
                header.push("WINDOW ENDS");
            }
            if failed > 0 {
                header.push("ERROR");
            }
            let mut table = new_table(&header);
            for total in &totals {
                let mut row = vec![total.counter.clone()];
                if total.error_code != 0 {
                    row.extend(["-".to_string(), "-".to_string()]);
                } else {
                    row.push(total.value.to_string());
                    row.push(
                        if total.complete {
                            "yes"
                        } else {
                            "NO (partial)"
                        }
                        .to_string(),
                    );
                }
                if windowed {
                    row.push(if total.window_end_unix_ms > 0 {
                        format_unix_ms(total.window_end_unix_ms)
                    } else {
                        "-".to_string()
                    });
                }
                if failed > 0 {
                    row.push(item_error(total).unwrap_or_default());
                }
                table.add_row(row);
            }
            let text = table.trim_fmt();
            if windowed {
                format!("{text}\nwindows of {}", describe_window(window_seconds))
            } else {
                text
            }
        })?;
        anyhow::ensure!(
            failed == 0,
            "{failed} of {} counters could not be read (their errors are printed)",
            totals.len()
        );
        Ok(())
    }

    async fn delete(&self, counter: String, window_seconds: u32) -> anyhow::Result<()> {
        let mut client = self.counter_client().await?;
        if window_seconds != 0 {
            // A coordinator that predates windows would take this for a
            // delete of the counter without a window, and says nothing
            // back: one read tells it first (its answer names no window).
            let probe = client
                .get(self.request(pb::GetRequest {
                    counter: counter.clone(),
                    allow_partial: true,
                    window_seconds,
                }))
                .await
                .map_err(describe)?
                .into_inner();
            anyhow::ensure!(
                probe.window_end_unix_ms != 0,
                "the coordinator ignores --window: it is older than this tallyctl (upgrade \
                 it); nothing was deleted"
            );
        }
        client
            .delete(self.request(pb::DeleteRequest {
                counter: counter.clone(),
                window_seconds,
            }))
            .await
            .map_err(describe)?;
        let deleted = Deleted {
            counter: &counter,
            deleted: true,
            window_seconds: (window_seconds != 0).then_some(window_seconds),
        };
        self.print(&deleted, || {
            if window_seconds != 0 {
                format!(
                    "OK {counter} deleted (its current window of {})",
                    describe_window(window_seconds)
                )
            } else {
                format!("OK {counter} deleted")
            }
        })?;
        Ok(())
    }

    async fn bench(&self, options: BenchOptions, mode: Mode) -> anyhow::Result<()> {
        let report = tally_cli::bench::run_with(options, mode).await?;
        self.print(&report, || report.human())?;
        anyhow::ensure!(report.passed(), "the self-check failed: {}", report.check);
        Ok(())
    }

    async fn drain(&self, node: String) -> anyhow::Result<()> {
        let drained = self
            .admin_client()
            .await?
            .drain(self.request(pb::DrainRequest {
                node_id: node.clone(),
            }))
            .await
            .map_err(describe)?
            .into_inner();
        self.print(
            &Drained {
                node: &node,
                response: &drained,
            },
            || {
                format!(
                    "OK {node} drained: {} entries moved to {}; remove it from the coordinators' \
                     config and send them SIGHUP",
                    drained.entries, drained.adopter
                )
            },
        )?;
        Ok(())
    }

    async fn ring(&self, config: Option<&Path>) -> anyhow::Result<()> {
        let (ring, health) = match config {
            Some(path) => {
                let config = load_coordinator_config(path)?;
                let ring = config.ring()?;
                (ring_response(&ring, &config), None)
            }
            None => {
                let mut admin = self.admin_client().await?;
                let ring = admin
                    .ring(self.request(pb::RingRequest {}))
                    .await
                    .map_err(describe)?
                    .into_inner();
                let status = admin
                    .cluster_status(self.request(pb::ClusterStatusRequest {}))
                    .await
                    .map_err(describe)?
                    .into_inner();
                (ring, Some(status.nodes))
            }
        };
        let health_of = |id: &str| -> Option<&pb::NodeStatus> {
            health
                .as_ref()
                .and_then(|nodes| nodes.iter().find(|node| node.id == id))
        };
        let printed = RingJson {
            stripes: ring.stripes,
            nodes: ring
                .nodes
                .iter()
                .map(|node| RingNodeJson {
                    node,
                    health: health_of(&node.id).map(NodeHealth::of),
                })
                .collect(),
        };
        self.print(&printed, || {
            let mut table = new_table(&["NODE", "ADDRESS", "WEIGHT", "VNODES", "OWNED", "HEALTH"]);
            for node in &ring.nodes {
                table.add_row(vec![
                    node.id.clone(),
                    node.address.clone(),
                    node.weight.to_string(),
                    node.vnodes.to_string(),
                    format!("{:.1}%", node.owned_fraction * 100.0),
                    match health_of(&node.id) {
                        None => "- (offline)".to_string(),
                        Some(status) => health_label(status),
                    },
                ]);
            }
            format!("{}\n{} stripes per counter", table.trim_fmt(), ring.stripes)
        })?;
        Ok(())
    }

    async fn locate(&self, counter: String, config: Option<&Path>) -> anyhow::Result<()> {
        let located = match config {
            Some(path) => {
                let config = load_coordinator_config(path)?;
                let ring = config.ring()?;
                let counter = CounterName::try_from(counter).map_err(anyhow::Error::msg)?;
                locate_response(&ring, &config, &counter)
            }
            None => self
                .admin_client()
                .await?
                .locate(self.request(pb::LocateRequest { counter }))
                .await
                .map_err(describe)?
                .into_inner(),
        };
        let printed = LocateJson {
            counter: &located.counter,
            stripes: located
                .stripes
                .iter()
                .map(|location| StripeJson {
                    location,
                    hash: format!("{:016x}", location.hash),
                })
                .collect(),
        };
        self.print(&printed, || {
            let mut table = new_table(&["STRIPE", "NODE", "ADDRESS", "HASH"]);
            for stripe in &located.stripes {
                table.add_row(vec![
                    stripe.stripe.to_string(),
                    stripe.node_id.clone(),
                    stripe.address.clone(),
                    format!("{:016x}", stripe.hash),
                ]);
            }
            table.trim_fmt()
        })?;
        Ok(())
    }

    async fn status(&self) -> anyhow::Result<()> {
        let status = self
            .admin_client()
            .await?
            .cluster_status(self.request(pb::ClusterStatusRequest {}))
            .await
            .map_err(describe)?
            .into_inner();
        let nodes = &status.nodes;
        self.print(&status, || {
            let mut table = new_table(&[
                "NODE",
                "ADDRESS",
                "HEALTH",
                "ENTRIES",
                "LAST FLUSH",
                "CHECKPOINT",
                "DURABILITY",
                "KEYS",
            ]);
            for node in nodes {
                table.add_row(vec![
                    node.id.clone(),
                    node.address.clone(),
                    health_label(node),
                    if node.reachable {
                        node.entries.to_string()
                    } else {
                        "-".into()
                    },
                    if node.reachable {
                        flush_age(node.last_flush_unix_ms)
                    } else {
                        "-".into()
                    },
                    if node.reachable {
                        format!(
                            "{} (log {})",
                            flush_age(node.last_checkpoint_unix_ms),
                            humansize(node.log_bytes)
                        )
                    } else {
                        "-".into()
                    },
                    if node.reachable {
                        node.durability.clone()
                    } else {
                        "-".into()
                    },
                    match (node.reachable, node.keys_forgotten_early) {
                        (false, _) => "-".into(),
                        (true, 0) => node.remembered_keys.to_string(),
                        (true, early) => {
                            format!("{} ({early} forgotten early)", node.remembered_keys)
                        }
                    },
                ]);
            }
            let down = nodes.iter().filter(|node| !node.reachable).count();
            let mut text = format!(
                "{}\n{} of {} nodes reachable",
                table.trim_fmt(),
                nodes.len() - down,
                nodes.len()
            );
            for node in nodes.iter().filter(|node| !node.standing_in_for.is_empty()) {
                text.push_str(&format!(
                    "\n{}: stands in for {} (takes its keyed increments until it is back and \
                     reconciled)",
                    node.id,
                    node.standing_in_for.join(", ")
                ));
            }
            for node in nodes
                .iter()
                .filter(|node| node.reachable && node.keyed_membership != "current")
            {
                let state = match node.keyed_membership.as_str() {
                    "moving" => "keyed increments wait: a change of membership is under way",
                    "none" => {
                        "takes no keyed increment yet: new, or its data directory was lost (a \
                         change of membership or its restore opens it)"
                    }
                    _ => {
                        "keyed increments follow another coordinator's membership: give every \
                         coordinator the same config"
                    }
                };
                text.push_str(&format!("\n{}: {state}", node.id));
            }
            for node in nodes.iter().filter(|node| node.replication_failures > 0) {
                text.push_str(&format!(
                    "\n{}: {} copies of its entries to its replicas failed (see the \
                     coordinator's log)",
                    node.id, node.replication_failures
                ));
            }
            text
        })?;
        Ok(())
    }
}

impl Cli {
    async fn health(&self) -> anyhow::Result<()> {
        use tonic_health::pb::health_check_response::ServingStatus;
        let mut client =
            tonic_health::pb::health_client::HealthClient::new(self.access.connect().await?);
        let status = client
            .check(self.request(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            }))
            .await
            .map_err(describe)?
            .into_inner()
            .status();
        self.print(
            &Health {
                endpoint: &self.access.endpoint,
                status: status.as_str_name(),
            },
            || format!("{} {}", self.access.endpoint, status.as_str_name()),
        )?;
        anyhow::ensure!(
            status == ServingStatus::Serving,
            "{} is not serving",
            self.access.endpoint
        );
        Ok(())
    }
}

// What `--json` prints where it is not a `tally.v1` message as it is (those
// derive `Serialize` in tally-proto's build.rs): what a command did, or a
// message with fields added.

/// `incr`: the increment made (its key is not printed), and whether it was
/// a retry of a key applied before; with `--get` or `--limit` the total
/// after it, with `--limit` whether it was applied, with `--window` the
/// window. Keys of options not given are left out.
#[derive(Serialize)]
struct Incremented<'a> {
    counter: &'a str,
    delta: i64,
    deduplicated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    complete: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<i64>,
    /// The amount applied: `delta`, or 0 when refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    applied: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refused: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_end_unix_ms: Option<i64>,
}

impl<'a> Incremented<'a> {
    fn of(request: &'a pb::IncrementRequest, answer: &pb::IncrementResponse) -> Self {
        let reads_total = request.return_total || request.limit.is_some();
        Incremented {
            counter: &request.counter,
            delta: request.delta,
            deduplicated: answer.deduplicated,
            total: reads_total.then_some(answer.total),
            complete: reads_total.then_some(answer.complete),
            limit: request.limit,
            applied: request.limit.map(|_| answer.applied),
            refused: request
                .limit
                .map(|limit| refused(request.delta, limit, answer)),
            window_seconds: (request.window_seconds != 0).then_some(request.window_seconds),
            window_end_unix_ms: (request.window_seconds != 0).then_some(answer.window_end_unix_ms),
        }
    }

    /// One line: `OK page:views +5`, then what the options asked for.
    fn human(&self) -> String {
        let (counter, delta) = (self.counter, self.delta);
        let mut line = if self.refused == Some(true) {
            format!(
                "REFUSED {counter} {delta:+} (over the limit {}: not applied)",
                self.limit.unwrap_or_default()
            )
        } else {
            format!("OK {counter} {delta:+}")
        };
        if self.deduplicated {
            line.push_str(" (a retry: the key was applied before, not again)");
        }
        if let Some(total) = self.total {
            line.push_str(&format!(", total {total}"));
            if self.refused == Some(false) {
                line.push_str(&format!(
                    " (within the limit {})",
                    self.limit.unwrap_or_default()
                ));
            }
            if self.complete == Some(false) {
                line.push_str(" (partial: a shard's part is missing)");
            }
        }
        if let (Some(seconds), Some(end)) = (self.window_seconds, self.window_end_unix_ms) {
            line.push_str(&format!(
                ", window of {} ends {}",
                describe_window(seconds),
                format_unix_ms(end)
            ));
        }
        line
    }
}

/// Whether the limit refused an increment of `delta`: it applied nothing
/// of a non-zero delta, or (a delta of 0 applies nothing either way) the
/// total is over the limit.
fn refused(delta: i64, limit: i64, answer: &pb::IncrementResponse) -> bool {
    if delta == 0 {
        answer.total > limit
    } else {
        answer.applied != delta
    }
}

/// `get`: one counter's total, or its error. A key is there only when it
/// says something: `value` and `complete` unless the counter could not be
/// read, `error_code` and `error` only then, `window_end_unix_ms` only with
/// `--window`.
#[derive(Serialize)]
struct Total<'a> {
    counter: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    complete: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_end_unix_ms: Option<i64>,
}

impl<'a> Total<'a> {
    fn of(total: &'a pb::GetResponse, windowed: bool) -> Self {
        let failed = total.error_code != 0;
        Total {
            counter: &total.counter,
            value: (!failed).then_some(total.value),
            complete: (!failed).then_some(total.complete),
            error_code: failed.then_some(total.error_code),
            error: failed.then_some(total.error.as_str()),
            window_end_unix_ms: windowed.then_some(total.window_end_unix_ms),
        }
    }
}

/// A `GetBatch` item's error as `describe` words a call's
/// (`OUT_OF_RANGE: ...`), or `None` if it was read.
fn item_error(total: &pb::GetResponse) -> Option<String> {
    if total.error_code == 0 {
        return None;
    }
    let code = tonic::Code::from(total.error_code as i32);
    Some(format!(
        "{}: {}",
        to_screaming_snake(&format!("{code:?}")),
        total.error
    ))
}

/// `delete`.
#[derive(Serialize)]
struct Deleted<'a> {
    counter: &'a str,
    deleted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_seconds: Option<u32>,
}

/// `drain`: the node drained, with the coordinator's answer.
#[derive(Serialize)]
struct Drained<'a> {
    node: &'a str,
    #[serde(flatten)]
    response: &'a pb::DrainResponse,
}

/// `ring`: each node with, from a live coordinator, its health.
#[derive(Serialize)]
struct RingJson<'a> {
    stripes: u32,
    nodes: Vec<RingNodeJson<'a>>,
}

#[derive(Serialize)]
struct RingNodeJson<'a> {
    #[serde(flatten)]
    node: &'a pb::RingNode,
    /// None offline (`--config`): no health keys at all.
    #[serde(flatten)]
    health: Option<NodeHealth<'a>>,
}

/// The part of a node's `NodeStatus` that `ring` shows.
#[derive(Serialize)]
struct NodeHealth<'a> {
    reachable: bool,
    health: &'a str,
    health_since_unix_ms: i64,
}

impl<'a> NodeHealth<'a> {
    fn of(status: &'a pb::NodeStatus) -> NodeHealth<'a> {
        NodeHealth {
            reachable: status.reachable,
            health: &status.health,
            health_since_unix_ms: status.health_since_unix_ms,
        }
    }
}

/// `locate`: each stripe's position as 16 hex digits (the generated
/// `Serialize` skips the number).
#[derive(Serialize)]
struct LocateJson<'a> {
    counter: &'a str,
    stripes: Vec<StripeJson<'a>>,
}

#[derive(Serialize)]
struct StripeJson<'a> {
    #[serde(flatten)]
    location: &'a pb::StripeLocation,
    hash: String,
}

/// `health`: the standard gRPC health check's answer.
#[derive(Serialize)]
struct Health<'a> {
    endpoint: &'a str,
    status: &'static str,
}

fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(header.to_vec());
    table
}

/// A node's health: the coordinator's routing view (from its probes and
/// calls), for how long (since it changed, or since the coordinator
/// started), and this status call's own answer.
fn health_label(status: &pb::NodeStatus) -> String {
    let since = if status.health_since_unix_ms > 0 {
        format!(" for {}", age(status.health_since_unix_ms))
    } else {
        String::new()
    };
    let label = match (status.health.as_str(), status.reachable) {
        ("down", true) => format!("DOWN{since}, answering again"),
        ("down", false) => format!("DOWN{since}: {}", status.error),
        (_, true) => format!("up{since}"),
        (_, false) => format!("DOWN: {}", status.error),
    };
    if status.drain.is_empty() {
        label
    } else {
        format!("{label} ({})", status.drain)
    }
}

fn flush_age(last_flush_unix_ms: i64) -> String {
    if last_flush_unix_ms <= 0 {
        return "never".to_string();
    }
    format!("{} ago", age(last_flush_unix_ms))
}

/// Bytes as KiB, MiB or GiB.
fn humansize(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Time since `unix_ms`, in whole seconds ("3s" reads better than
/// "3s 212ms 5us").
fn age(unix_ms: i64) -> String {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64);
    let age = Duration::from_millis(now_ms.saturating_sub(unix_ms).max(0) as u64);
    humantime::format_duration(Duration::from_secs(age.as_secs())).to_string()
}

fn load_coordinator_config(path: &Path) -> anyhow::Result<CoordinatorConfig> {
    Ok(CoordinatorConfig::load(
        path,
        CoordinatorOverrides::default(),
    )?)
}

/// `tallyctl certs ...`: makes the files and says which.
fn certs(command: CertsCommand) -> anyhow::Result<()> {
    use tally_cli::certs;
    let written = match command {
        CertsCommand::CreateCa { files } => certs::create_ca(&files.certs_dir, files.overwrite)?,
        CertsCommand::CreateNode {
            files,
            name,
            hosts,
            days,
        } => certs::create_node(&files.certs_dir, &name, &hosts, days, files.overwrite)?,
        CertsCommand::CreateClient { files, name, days } => {
            certs::create_client(&files.certs_dir, &name, days, files.overwrite)?
        }
    };
    print_line(&format!(
        "wrote {} and {}",
        written.cert.display(),
        written.key.display()
    ))
}

async fn dev(
    data_dir: &Path,
    port: u16,
    shards: usize,
    durability: &str,
    secure: bool,
) -> anyhow::Result<()> {
    tally_runtime::process::init_tracing();
    let durability = durability.parse().map_err(anyhow::Error::msg)?;
    let shard_listens = if port == 0 {
        Vec::new() // LocalCluster's default: a free port each
    } else {
        (1..=shards)
            .map(|index| {
                let port = u16::try_from(usize::from(port) + index)
                    .context("--port is too high for this many shards")?;
                Ok(SocketAddr::from(([127, 0, 0, 1], port)))
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let mut options = LocalClusterOptions::new(data_dir, shards);
    options.coordinator_listen = SocketAddr::from(([127, 0, 0, 1], port));
    options.shard_listens = shard_listens;
    options.durability = durability;
    // Metrics on the ports 2000 above the gRPC ones (9700, 9701, ... by
    // default), as the shipped config files have them.
    options.metrics_port = Some(if port == 0 {
        0
    } else {
        port.checked_add(2000)
            .context("--port is too high for the metrics ports")?
    });
    let admin_token = if secure {
        let (files, tokens_file, token) = tally_cli::certs::dev_security(&data_dir.join("secure"))?;
        options.tls = Some(files);
        options.tokens_file = Some(tokens_file);
        Some(token)
    } else {
        None
    };
    let shutdown = tally_runtime::process::shutdown_signal();
    let cluster = LocalCluster::start(options)
        .await
        .map_err(|error| explain_busy_port(error, port, shards))?;
    cluster.wait_ready(Duration::from_secs(30)).await?;

    say(format!(
        "Tally dev cluster is up ({} shards, durability {}{}).",
        shards,
        durability.as_str(),
        if secure {
            "; TLS on every port, mutual TLS to the shards, tokens required"
        } else {
            ""
        }
    ));
    let scheme = if secure { "https" } else { "http" };
    let metrics = |address: Option<SocketAddr>| {
        address.map_or(String::new(), |address| {
            format!("  metrics {scheme}://{address}/metrics")
        })
    };
    say(format!(
        "  coordinator  {}{}",
        cluster.endpoint(),
        metrics(cluster.coordinator_metrics())
    ));
    for shard in cluster.shard_configs() {
        say(format!(
            "  {:<11}  {}  data {}{}",
            shard.node_id,
            shard.listen,
            shard.data_dir.display(),
            metrics(shard.observability.metrics_listen)
        ));
    }
    say("");
    say("In another terminal:");
    if let (Some(token), Some(tls)) = (&admin_token, cluster.tls_files()) {
        say(format!("  export TALLY_CA_CERT={}", tls.ca.display()));
        say(format!(
            "  export TALLY_TOKEN={token}   # an admin token, made for this run"
        ));
    }
    let tallyctl = if cluster.endpoint() == "http://127.0.0.1:7700" {
        "cargo tallyctl".to_string()
    } else {
        format!("cargo tallyctl --endpoint {}", cluster.endpoint())
    };
    for example in ["incr page:views 5", "get page:views", "ring", "status"] {
        say(format!("  {tallyctl} {example}"));
    }
    say("");
    say("Ctrl-C stops the cluster; every shard flushes first.");

    shutdown.await;
    cluster.shutdown().await?;
    say(format!("stopped; data kept in {}", data_dir.display()));
    Ok(())
}

/// `error`, with a way out if a port `dev` asked for (`port` and the
/// `shards` after it) was taken: most often by another `tallyctl dev`.
fn explain_busy_port(error: anyhow::Error, port: u16, shards: usize) -> anyhow::Error {
    let busy = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|error| error.kind() == std::io::ErrorKind::AddrInUse)
    });
    if !busy || port == 0 {
        return error;
    }
    anyhow::anyhow!(
        "{}; is another `tallyctl dev` running? Choose other ports with --port (this one \
         takes ports {port} to {}), or --port 0 for free ones",
        tally_runtime::process::error_line(error.as_ref()),
        usize::from(port) + shards
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix_ms_now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    fn increment(delta: i64) -> pb::IncrementRequest {
        pb::IncrementRequest {
            counter: "api:alice".into(),
            delta,
            ..Default::default()
        }
    }

    #[test]
    fn a_limit_refused_what_it_did_not_apply() {
        let answer = |applied, total| pb::IncrementResponse {
            applied,
            total,
            complete: true,
            ..Default::default()
        };
        assert!(!refused(3, 10, &answer(3, 10)));
        assert!(refused(3, 10, &answer(0, 9)));
        // A delta of 0 applies nothing either way: the total says.
        assert!(!refused(0, 10, &answer(0, 10)));
        assert!(refused(0, 10, &answer(0, 11)));
    }

    #[test]
    fn an_old_coordinator_s_answer_says_what_it_ignored() {
        // What a coordinator that predates these fields answers.
        let old = pb::IncrementResponse::default();
        let mut request = increment(1);
        assert_eq!(ignored_by_increment(&request, &old), None);
        request.return_total = true;
        assert_eq!(ignored_by_increment(&request, &old), Some("--get"));
        request.limit = Some(5);
        assert_eq!(ignored_by_increment(&request, &old), Some("--limit"));
        request.window_seconds = 60;
        assert_eq!(ignored_by_increment(&request, &old), Some("--window"));
        // With --allow-partial, an incomplete total is an answer.
        request.window_seconds = 0;
        request.allow_partial = true;
        assert_eq!(ignored_by_increment(&request, &old), None);
        // A coordinator that knows them.
        let new = pb::IncrementResponse {
            complete: true,
            window_end_unix_ms: 60_000,
            ..Default::default()
        };
        request.allow_partial = false;
        request.window_seconds = 60;
        assert_eq!(ignored_by_increment(&request, &new), None);
    }

    #[test]
    fn incr_prints_what_was_asked_for() {
        let plain = increment(5);
        let answer = pb::IncrementResponse::default();
        let printed = Incremented::of(&plain, &answer);
        assert_eq!(printed.human(), "OK api:alice +5");
        assert_eq!(
            serde_json::to_value(&printed).unwrap(),
            serde_json::json!({ "counter": "api:alice", "delta": 5, "deduplicated": false })
        );

        let mut get = increment(5);
        get.return_total = true;
        let answer = pb::IncrementResponse {
            total: 12,
            complete: true,
            applied: 5,
            ..Default::default()
        };
        assert_eq!(
            Incremented::of(&get, &answer).human(),
            "OK api:alice +5, total 12"
        );
        let partial = pb::IncrementResponse {
            complete: false,
            ..answer
        };
        assert_eq!(
            Incremented::of(&get, &partial).human(),
            "OK api:alice +5, total 12 (partial: a shard's part is missing)"
        );

        let mut limited = increment(1);
        limited.limit = Some(100);
        limited.window_seconds = 60;
        let applied = pb::IncrementResponse {
            total: 57,
            complete: true,
            applied: 1,
            window_end_unix_ms: 1_764_633_660_000,
            ..Default::default()
        };
        let printed = Incremented::of(&limited, &applied);
        assert_eq!(
            printed.human(),
            "OK api:alice +1, total 57 (within the limit 100), window of 1m ends \
             2025-12-02T00:01:00Z"
        );
        assert_eq!(
            serde_json::to_value(&printed).unwrap(),
            serde_json::json!({
                "counter": "api:alice", "delta": 1, "deduplicated": false,
                "total": 57, "complete": true, "limit": 100, "applied": 1, "refused": false,
                "window_seconds": 60, "window_end_unix_ms": 1_764_633_660_000i64,
            })
        );
        let refused = pb::IncrementResponse {
            total: 100,
            applied: 0,
            ..applied
        };
        let printed = Incremented::of(&limited, &refused);
        assert_eq!(printed.refused, Some(true));
        assert!(
            printed
                .human()
                .starts_with("REFUSED api:alice +1 (over the limit 100: not applied), total 100"),
            "{}",
            printed.human()
        );
    }

    #[test]
    fn get_prints_an_error_instead_of_a_value() {
        let read = pb::GetResponse {
            counter: "a".into(),
            value: 4,
            complete: true,
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(Total::of(&read, false)).unwrap(),
            serde_json::json!({ "counter": "a", "value": 4, "complete": true })
        );
        assert_eq!(item_error(&read), None);
        let failed = pb::GetResponse {
            counter: "b".into(),
            error_code: tonic::Code::OutOfRange as u32,
            error: "total does not fit".into(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(Total::of(&failed, false)).unwrap(),
            serde_json::json!({ "counter": "b", "error_code": 11, "error": "total does not fit" })
        );
        assert_eq!(
            item_error(&failed).as_deref(),
            Some("OUT_OF_RANGE: total does not fit")
        );
        let windowed = pb::GetResponse {
            window_end_unix_ms: 1_764_633_660_000,
            ..read
        };
        assert_eq!(
            serde_json::to_value(Total::of(&windowed, true)).unwrap()["window_end_unix_ms"],
            1_764_633_660_000i64
        );
    }

    #[test]
    fn health_says_for_how_long() {
        let mut node = pb::NodeStatus {
            health: "up".into(),
            reachable: true,
            health_since_unix_ms: unix_ms_now() - 3_500,
            ..Default::default()
        };
        assert_eq!(health_label(&node), "up for 3s");
        node.health = "down".into();
        node.reachable = false;
        node.error = "connection refused".into();
        assert_eq!(health_label(&node), "DOWN for 3s: connection refused");
        // A coordinator too old to say.
        node.health_since_unix_ms = 0;
        assert_eq!(health_label(&node), "DOWN: connection refused");
        node.health = "up".into();
        node.reachable = true;
        assert_eq!(health_label(&node), "up");
    }
}
