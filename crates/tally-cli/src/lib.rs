//! `tallyctl`, Tally's admin and user CLI, and the in-process cluster it
//! runs for development.
//!
//! # Layout
//!
//! - [`local_cluster`]: [`LocalCluster`](local_cluster::LocalCluster), shard
//!   nodes and a coordinator in one process on loopback. `tallyctl dev` runs
//!   one; the integration tests run one per test on port 0.
//! - [`bench`]: `tallyctl bench`, the load generator that checks its own
//!   work by reading every counter back.
//! - [`client`]: how `tallyctl` reaches a coordinator (TLS, tokens).
//! - [`certs`]: `tallyctl certs` and `tallyctl tokens`: the cluster's
//!   certificates and the public API's tokens.
//! - [`window_arg`]: `--window DURATION`, a counter's fixed window.
//! - the `tallyctl` binary (`src/main.rs`, `src/commands.rs`): `dev`,
//!   `incr`, `get`, `delete`, `ring`, `locate`, `status`; human tables by
//!   default, `--json` for scripts, non-zero exit on error.
#![deny(missing_docs)]

pub mod bench;
pub mod certs;
pub mod client;
pub mod local_cluster;
pub mod top;
pub mod window_arg;
