//! The client examples in other languages, run for real: examples/python
//! and examples/node, each through its run.sh, against an in-process
//! cluster's coordinator on a loopback port.
//!
//! A language whose tools are not on PATH is skipped with a printed reason.
//! Installing the dependencies (PyPI, npm) is part of the test: a failure
//! there fails it. The venv and node_modules are kept under the target
//! directory (`target/tmp/examples/`), installed again only when
//! requirements.txt or package-lock.json changes.

mod support;

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longest run of an example against the cluster.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest installation of an example's dependencies: a cold one downloads
/// and unpacks packages on a small, busy CI machine.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

/// A limit and a window long enough that the run normally stays in one
/// window (a window that ends during it is handled and checked too).
const ONE_WINDOW: &[&str] = &["--limit", "5", "--window", "60", "--requests", "12"];

/// Short windows and paced requests: 5 requests span 1.2 s, so the run
/// crosses into the next 2-second window more often than not (the example
/// then counts and checks each window on its own), while a window still
/// holds all 5 with 200 ms to spare per call on a slow machine.
const SHORT_WINDOWS: &[&str] = &[
    "--limit",
    "2",
    "--window",
    "2",
    "--requests",
    "5",
    "--interval-ms",
    "300",
];

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where the examples' venv and node_modules are kept between runs.
fn cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("examples")
}

/// Why the example cannot run here (a tool is not on PATH), if so.
fn missing(tools: &[&str]) -> Option<String> {
    tools.iter().find_map(|tool| {
        match Command::new(tool)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(status) if status.success() => None,
            Ok(status) => Some(format!("`{tool} --version` exited with {status}")),
            Err(error) => Some(format!("`{tool}` is not on PATH ({error})")),
        }
    })
}

/// What a run of an example printed (stdout and stderr, interleaved), and
/// how it ended: `None` if it was killed after its timeout.
struct Run {
    status: Option<ExitStatus>,
    output: String,
    elapsed: Duration,
}

impl Run {
    fn describe(&self, what: &str, timeout: Duration) -> String {
        let ending = match self.status {
            Some(status) => format!("exited with {status}"),
            None => format!("killed after {timeout:?}"),
        };
        format!(
            "{what} {ending} in {:.1?}; its output:\n{}",
            self.elapsed, self.output
        )
    }
}

/// Runs one language's run.sh with `args`, its environment pointing the
/// installation at the cache, killed (with everything it started) after
/// `timeout`.
fn run_script(run_sh: &Path, env: &[(&str, PathBuf)], args: &[&str], timeout: Duration) -> Run {
    let log_dir = tempfile::tempdir().unwrap();
    let log_path = log_dir.path().join("output");
    let log = File::create(&log_path).unwrap();
    let mut command = Command::new(run_sh);
    command
        .args(args)
        .env_remove("TALLY_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        // Its own process group: a timeout kills pip or npm too.
        .process_group(0);
    for (name, value) in env {
        command.env(name, value);
    }
    let started = Instant::now();
    let mut child = command
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {}: {error}", run_sh.display()));
    let status = wait_timeout::ChildExt::wait_timeout(&mut child, timeout).unwrap();
    if status.is_none() {
        let group = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    }
    Run {
        status,
        output: std::fs::read_to_string(&log_path).unwrap_or_default(),
        elapsed: started.elapsed(),
    }
}

/// One language's examples: its run.sh and where it installs.
struct Language {
    name: &'static str,
    run_sh: PathBuf,
    env: Vec<(&'static str, PathBuf)>,
}

impl Language {
    fn python() -> Language {
        Language {
            name: "python",
            run_sh: repository().join("examples/python/run.sh"),
            env: vec![
                ("TALLY_PYTHON_VENV", cache().join("python-venv")),
                ("TALLY_PYTHON_GENERATED", cache().join("python-generated")),
            ],
        }
    }

    fn node() -> Language {
        Language {
            name: "node",
            run_sh: repository().join("examples/node/run.sh"),
            env: vec![("TALLY_NODE_PREFIX", cache().join("node"))],
        }
    }

    /// Installs the dependencies (a no-op when the cache is current);
    /// panics if that fails.
    fn install(&self) {
        let run = run_script(
            &self.run_sh,
            &self.env,
            &["--install-only"],
            INSTALL_TIMEOUT,
        );
        support::report(&format!(
            "{} examples: install step {:.1?}",
            self.name, run.elapsed
        ));
        assert!(
            run.status.is_some_and(|status| status.success()),
            "installing the {} examples' dependencies failed: {}",
            self.name,
            run.describe(&self.run_sh.display().to_string(), INSTALL_TIMEOUT)
        );
    }

    /// Runs `script` against the coordinator at `coordinator`.
    fn run(&self, coordinator: SocketAddr, script: &str, args: &[&str]) -> Run {
        let endpoint = coordinator.to_string();
        let mut all = vec![script, "--endpoint", &endpoint];
        all.extend_from_slice(args);
        let run = run_script(&self.run_sh, &self.env, &all, RUN_TIMEOUT);
        // The rate limiter prints a line per window it sent requests to.
        let windows = run
            .output
            .lines()
            .filter(|line| line.starts_with("  window ending"))
            .count();
        support::report(&format!(
            "{} {script} {}: {:.1?}{}",
            self.name,
            args.join(" "),
            run.elapsed,
            if windows > 1 {
                format!(", crossed into another window ({windows} windows)")
            } else {
                String::new()
            }
        ));
        run
    }

    /// Runs `script` and panics, with its output, unless it exits 0.
    fn passes(&self, coordinator: SocketAddr, script: &str, args: &[&str]) {
        let run = self.run(coordinator, script, args);
        assert!(
            run.status.is_some_and(|status| status.success()),
            "{}",
            run.describe(
                &format!("{} {script} {}", self.name, args.join(" ")),
                RUN_TIMEOUT
            )
        );
    }

    /// The rate limiter: in one window, across short windows, and once
    /// expecting one more allowed request than the limit, which its check
    /// must catch (exit 1, a MISMATCH line).
    fn rate_limiter(&self, coordinator: SocketAddr, script: &str) {
        self.passes(coordinator, script, ONE_WINDOW);
        self.passes(coordinator, script, SHORT_WINDOWS);

        let wrong = [ONE_WINDOW, &["--expect-allowed", "6"]].concat();
        let run = self.run(coordinator, script, &wrong);
        assert!(
            run.status.and_then(|status| status.code()) == Some(1)
                && run.output.contains("MISMATCH"),
            "expected the check to fail: {}",
            run.describe(
                &format!("{} {script} {}", self.name, wrong.join(" ")),
                RUN_TIMEOUT
            )
        );
    }
}

/// Runs `examples` against a fresh in-process cluster's coordinator, then
/// shuts the cluster down.
fn with_cluster(examples: impl FnOnce(SocketAddr)) {
    let runtime = support::runtime();
    let cluster = runtime.block_on(support::cluster::start());
    examples(cluster.cluster.coordinator_config().listen);
    runtime.block_on(cluster.cluster.shutdown()).unwrap();
}

#[test]
fn python_examples() {
    if let Some(reason) = missing(&["python3"]) {
        support::report(&format!("SKIPPED the Python examples: {reason}"));
        return;
    }
    let python = Language::python();
    python.install();
    with_cluster(|coordinator| {
        python.rate_limiter(coordinator, "rate_limiter.py");
        // The other Python example, smaller than its defaults.
        python.passes(
            coordinator,
            "concurrent_writers.py",
            &["--writers", "8", "--increments", "50"],
        );
    });
}

#[test]
fn node_examples() {
    if let Some(reason) = missing(&["node", "npm"]) {
        support::report(&format!("SKIPPED the Node.js examples: {reason}"));
        return;
    }
    let node = Language::node();
    node.install();
    with_cluster(|coordinator| node.rate_limiter(coordinator, "rate_limiter.js"));
}
