//! Process-level test harness: runs the real `tally-shard`,
//! `tally-coordinator` and `tallyctl` binaries from config files, on
//! loopback port 0.
//!
//! A daemon prints `listening on ADDRESS` on stdout once it serves; the
//! harness reads that line instead of sleeping or guessing a port.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Longest wait for a daemon to print its address, or to exit.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Daemon::spawn`] keeps trying a daemon whose port is taken.
pub const PORT_TAKEN_PATIENCE: Duration = Duration::from_secs(10);

/// Path of a workspace binary, built next to this test's executable.
///
/// `cargo test` builds only the binaries of packages it tests with
/// integration tests, and `cargo test --test processes` none of the other
/// packages' binaries: a test could run a stale one. So the first call in a
/// test process runs `cargo build --workspace --bins` (a no-op of a fraction
/// of a second when they are current).
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let profile_dir = std::env::current_exe()
        .expect("test executable path")
        .parent() // deps/
        .and_then(Path::parent)
        .expect("target/<profile>/deps layout")
        .to_path_buf();
    BUILT.get_or_init(|| {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--workspace", "--bins", "--quiet"]);
        // What cargo set for this test (the package's name, version and
        // manifest dir), not the caller's settings: a build script that
        // watches such a variable (ring's does) would otherwise see it
        // change and rebuild, with everything that depends on it.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            let set_for_this_test = [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|prefix| name.starts_with(prefix))
                || [
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&name.as_ref());
            if set_for_this_test {
                build.env_remove(name.as_ref());
            }
        }
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let output = build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo build");
        assert!(
            output.status.success(),
            "cargo build --workspace --bins failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    });
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} not found after cargo build",
        path.display()
    );
    path
}

/// A running daemon process. Killed (SIGKILL) if dropped while running.
pub struct Daemon {
    pub name: String,
    pub address: SocketAddr,
    /// Where it serves `GET /metrics`, if it does.
    pub metrics: Option<SocketAddr>,
    child: Child,
    stderr_path: PathBuf,
}

impl Daemon {
    /// Starts `binary` with `args`, stderr to `log_dir/<name>.log`, and waits
    /// for its `listening on` line.
    pub fn start(binary_name: &str, name: &str, args: &[&str], log_dir: &Path) -> Daemon {
        let mut command = Command::new(binary(binary_name));
        command.args(args);
        Self::spawn(command, name, log_dir)
    }

    /// [`Daemon::start`] for a command the caller prepared (limits, env).
    ///
    /// A daemon restarted on its old address can find the port taken by
    /// another test's outgoing connection, which the kernel gave that port
    /// as its own (ports bound with port 0 and a client's ports come from
    /// the same range). Such a start is tried again for up to
    /// [`PORT_TAKEN_PATIENCE`]: a refused connect attempt lets its port go
    /// at once.
    pub fn spawn(mut command: Command, name: &str, log_dir: &Path) -> Daemon {
        let deadline = Instant::now() + PORT_TAKEN_PATIENCE;
        loop {
            match Self::try_spawn(&mut command, name, log_dir) {
                Ok(daemon) => return daemon,
                Err(log) if log.contains("Address already in use") && Instant::now() < deadline => {
                    eprintln!("{name}: its port is taken, starting it again");
                    // Backing off while another process holds the port.
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(log) => panic!("{name} did not start; its log:\n{log}"),
            }
        }
    }

    fn try_spawn(command: &mut Command, name: &str, log_dir: &Path) -> Result<Daemon, String> {
        let stderr_path = log_dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|error| panic!("start {name}: {error}"));
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            // Printed before `listening on`, if at all.
            let mut metrics = None;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line
                    .strip_prefix("metrics on http://")
                    .or_else(|| line.strip_prefix("metrics on https://"))
                {
                    metrics = url.trim().trim_end_matches("/metrics").parse().ok();
                }
                if let Some(address) = line.strip_prefix("listening on ") {
                    let _ = sender.send((address.trim().parse::<SocketAddr>(), metrics));
                }
            }
        });
        let (address, metrics) = match receiver.recv_timeout(START_TIMEOUT) {
            Ok((Ok(address), metrics)) => (address, metrics),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "({other:?})\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                ));
            }
        };
        Ok(Daemon {
            name: name.to_string(),
            address,
            metrics,
            child,
            stderr_path,
        })
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn stop_with(mut self, signal: Signal) -> ExitStatus {
        self.signal(signal)
    }

    /// Sends `signal` and waits for the process to exit, keeping the handle
    /// (for its log, or to be replaced).
    pub fn signal(&mut self, signal: Signal) -> ExitStatus {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
        wait_with_timeout(&mut self.child, START_TIMEOUT)
            .unwrap_or_else(|| panic!("{} did not exit after {signal}", self.name))
    }

    /// Sends `signal`, waits for the exit, and returns the address the
    /// daemon listened on (to start a successor there).
    pub fn stop_with_address(self, signal: Signal) -> SocketAddr {
        let address = self.address;
        self.stop_with(signal);
        address
    }

    /// SIGTERM: the graceful stop. Asserts exit code 0.
    pub fn terminate(self) {
        let name = self.name.clone();
        let log = self.stderr_path.clone();
        let status = self.stop_with(Signal::SIGTERM);
        assert!(
            status.success(),
            "{name} exited with {status} after SIGTERM; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// `http://address`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    wait_timeout::ChildExt::wait_timeout(child, timeout).unwrap()
}

/// Runs a binary to completion, killed after [`START_TIMEOUT`] (then its
/// status is not success, and the test fails on what it expected).
pub fn run_to_end(binary_name: &str, args: &[&str]) -> Output {
    assert_cmd::Command::new(binary(binary_name))
        .args(args)
        .timeout(START_TIMEOUT)
        .output()
        .unwrap()
}

/// The daemon's metrics, scraped: `GET /metrics` over HTTP/1.1, as
/// Prometheus does. One entry per series, `name{labels}` to its value.
pub fn scrape(daemon: &Daemon) -> std::collections::BTreeMap<String, f64> {
    use std::io::{Read, Write};
    let address = daemon
        .metrics
        .unwrap_or_else(|| panic!("{} serves no metrics", daemon.name));
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(START_TIMEOUT)).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("series value");
            (series.to_string(), value.parse::<f64>().expect("a number"))
        })
        .collect()
}

/// A shard config file for node `index` (1-based) under `dir`. Its log
/// segments are small and its checkpoints frequent, so that every process
/// test also runs through checkpoints and segment deletions.
pub fn write_shard_config(dir: &Path, index: usize, durability: &str) -> PathBuf {
    let path = dir.join(format!("shard-{index}.toml"));
    let data_dir = dir.join(format!("data/shard-{index}"));
    std::fs::write(
        &path,
        format!(
            "node_id = \"shard-{index}\"\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\n\
             durability = \"{durability}\"\nflush_interval_ms = 20\n\
             log_segment_bytes = 65536\ncheckpoint_interval_ms = 100\n\
             checkpoint_log_bytes = 262144\nmetrics_listen = \"127.0.0.1:0\"\n",
            data_dir.display().to_string()
        ),
    )
    .unwrap();
    path
}

/// Starts `tally-shard` from `config`, with its log in the config's
/// directory; `extra_args` override the file.
pub fn start_shard(name: &str, config: &Path, extra_args: &[&str]) -> Daemon {
    let mut args = vec!["--config", config.to_str().unwrap()];
    args.extend_from_slice(extra_args);
    Daemon::start("tally-shard", name, &args, config.parent().unwrap())
}

/// A coordinator config file naming `shards` as its membership.
pub fn write_coordinator_config(dir: &Path, shards: &[SocketAddr]) -> PathBuf {
    let ids: Vec<String> = (1..=shards.len())
        .map(|index| format!("shard-{index}"))
        .collect();
    let nodes: Vec<(&str, SocketAddr)> = ids
        .iter()
        .map(String::as_str)
        .zip(shards.iter().copied())
        .collect();
    write_coordinator_config_of(dir, &nodes)
}

/// [`write_coordinator_config`] with each node's id given.
pub fn write_coordinator_config_of(dir: &Path, nodes: &[(&str, SocketAddr)]) -> PathBuf {
    let path = dir.join("coordinator.toml");
    // Probes every 100 ms, 500 ms to answer: failures are found fast.
    // Replicas refreshed every 100 ms.
    let mut text = String::from(
        "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\nstripes = 8\n\
         shard_timeout_ms = 5000\n\
         health_interval_ms = 100\nhealth_timeout_ms = 500\n\
         replication_factor = 2\nreplication_interval_ms = 100\n",
    );
    for (id, address) in nodes {
        text.push_str(&format!(
            "\n[[nodes]]\nid = \"{id}\"\naddress = \"{address}\"\n"
        ));
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// Three shards and a coordinator, each a real process, from config files
/// in a temporary directory.
pub struct ProcessCluster {
    pub dir: tempfile::TempDir,
    pub shards: Vec<Option<Daemon>>,
    pub shard_configs: Vec<PathBuf>,
    pub coordinator: Daemon,
    pub coordinator_config: PathBuf,
}

impl ProcessCluster {
    pub fn start(durability: &str) -> ProcessCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut shards = Vec::new();
        let mut shard_configs = Vec::new();
        for index in 1..=3 {
            let config = write_shard_config(dir.path(), index, durability);
            let name = format!("shard-{index}");
            shards.push(Some(start_shard(&name, &config, &[])));
            shard_configs.push(config);
        }
        let addresses: Vec<SocketAddr> = shards
            .iter()
            .map(|shard| shard.as_ref().unwrap().address)
            .collect();
        let coordinator_config = write_coordinator_config(dir.path(), &addresses);
        let coordinator = Daemon::start(
            "tally-coordinator",
            "coordinator",
            &["--config", coordinator_config.to_str().unwrap()],
            dir.path(),
        );
        ProcessCluster {
            dir,
            shards,
            shard_configs,
            coordinator,
            coordinator_config,
        }
    }

    /// Starts shard `index` (0-based) again from its config file, on the
    /// address it had (a flag overrides the file's port 0).
    pub fn restart_shard(&mut self, index: usize, address: SocketAddr) {
        self.restart_shard_with(index, address, &[]);
    }

    /// [`ProcessCluster::restart_shard`] with more flags.
    pub fn restart_shard_with(&mut self, index: usize, address: SocketAddr, extra_args: &[&str]) {
        self.restart_shard_with_env(index, address, extra_args, &[]);
    }

    /// [`ProcessCluster::restart_shard`] with more flags and environment
    /// variables.
    pub fn restart_shard_with_env(
        &mut self,
        index: usize,
        address: SocketAddr,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) {
        let config = self.shard_configs[index].clone();
        let listen = address.to_string();
        let mut command = Command::new(binary("tally-shard"));
        command.args(["--config", config.to_str().unwrap(), "--listen", &listen]);
        command.args(extra_args);
        command.envs(env.iter().copied());
        self.shards[index] = Some(Daemon::spawn(
            command,
            &format!("shard-{}", index + 1),
            config.parent().unwrap(),
        ));
    }

    /// Starts shard-`index`, a node the coordinator does not know yet, in
    /// this cluster's directory, as the cluster's next shard; returns the
    /// addresses of every running shard, it last: a membership to reload.
    pub fn start_new_shard(&mut self, index: usize) -> Vec<SocketAddr> {
        let config = write_shard_config(self.dir.path(), index, "sync");
        let added = start_shard(&format!("shard-{index}"), &config, &[]);
        self.shards.push(Some(added));
        self.shard_configs.push(config);
        self.shards
            .iter()
            .flatten()
            .map(|shard| shard.address)
            .collect()
    }

    /// Starts another coordinator (log name `name`) on this cluster's
    /// config file, listening on `listen`.
    pub fn start_coordinator(&self, name: &str, listen: &str) -> Daemon {
        Daemon::start(
            "tally-coordinator",
            name,
            &[
                "--config",
                self.coordinator_config.to_str().unwrap(),
                "--listen",
                listen,
            ],
            self.dir.path(),
        )
    }

    pub fn tallyctl(&self, args: &[&str]) -> Output {
        let endpoint = self.coordinator.endpoint();
        let mut full = vec!["--endpoint", endpoint.as_str()];
        full.extend_from_slice(args);
        run_to_end("tallyctl", &full)
    }
}

/// Every running shard's full status, straight from the shards.
pub async fn process_statuses(
    cluster: &ProcessCluster,
) -> Vec<tally::proto::pb::ShardStatusResponse> {
    let mut statuses = Vec::new();
    for shard in cluster.shards.iter().flatten() {
        let mut client = tally::proto::pb::shard_client::ShardClient::connect(shard.endpoint())
            .await
            .unwrap();
        statuses.push(
            client
                .status(tally::proto::pb::ShardStatusRequest::default())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    statuses
}

/// Waits until every running shard's copy holds its origin's version as of
/// now.
pub async fn wait_for_process_replicas(cluster: &ProcessCluster) {
    let targets = super::replication_targets(&process_statuses(cluster).await);
    super::wait_until("replication to catch up", super::PATIENCE, || async {
        let statuses = process_statuses(cluster).await;
        if super::replicas_caught_up(&targets, &statuses) {
            Ok(())
        } else {
            Err(statuses
                .iter()
                .map(|status| (status.node_id.clone(), status.replicas.clone()))
                .collect::<Vec<_>>())
        }
    })
    .await;
}

/// `tallyctl --json status`, parsed: each node's (health, reachable).
pub fn status(cluster: &ProcessCluster) -> serde_json::Value {
    let output = cluster.tallyctl(&["--json", "--timeout-ms", "2000", "status"]);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "tallyctl status: {error}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// Waits until `tallyctl status` shows `node` with `health`; returns when it
/// did and the table line `tallyctl status` printed then.
pub fn wait_for_shown_health(
    runtime: &tokio::runtime::Runtime,
    cluster: &ProcessCluster,
    node: &str,
    health: &str,
) -> (Instant, String) {
    runtime.block_on(super::wait_until(
        &format!("{node} to become {health}"),
        super::PATIENCE,
        || {
            let nodes = status(cluster);
            let found = nodes["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|status| status["id"] == node && status["health"] == health);
            std::future::ready(if found {
                Ok(())
            } else {
                Err(super::Verbatim(nodes.to_string()))
            })
        },
    ));
    let seen = Instant::now();
    let table = cluster.tallyctl(&["--timeout-ms", "2000", "status"]);
    let line = String::from_utf8_lossy(&table.stdout)
        .lines()
        .find(|line| line.contains(node))
        .unwrap_or_default()
        .to_string();
    (seen, line)
}

/// Waits until no running shard stands in for another (every takeover of a
/// node's keyed increments has been reconciled): what a final comparison
/// waits for, since until then reads count a frozen copy for the node.
pub async fn wait_until_reconciled(cluster: &ProcessCluster) {
    super::wait_until(
        "every takeover to be reconciled",
        super::PATIENCE,
        || async {
            let standing_in: Vec<(String, Vec<String>)> = process_statuses(cluster)
                .await
                .into_iter()
                .filter(|status| !status.standing_in_for.is_empty())
                .map(|status| (status.node_id, status.standing_in_for))
                .collect();
            if standing_in.is_empty() {
                Ok(())
            } else {
                Err(standing_in)
            }
        },
    )
    .await;
}

/// Prints what the daemons logged of failures, takeovers, reconciliations,
/// restores and crashes: the trail of a rare loss, for its investigation.
pub fn print_trail(cluster: &ProcessCluster, others: &[&Daemon]) {
    const WORDS: [&str; 8] = [
        "stand",
        "reconcil",
        "down",
        "up again",
        "restor",
        "taken",
        "crashing",
        "recovered",
    ];
    let daemons = std::iter::once(&cluster.coordinator)
        .chain(others.iter().copied())
        .chain(cluster.shards.iter().flatten());
    for daemon in daemons {
        for line in daemon
            .log()
            .lines()
            .filter(|line| WORDS.iter().any(|word| line.contains(word)))
        {
            eprintln!("{}: {line}", daemon.name);
        }
    }
}

/// libfaketime, if installed (the `faketime` package), to run a shard with
/// its wall clock skewed.
pub fn libfaketime() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|path| path.exists())
}
