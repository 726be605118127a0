//! Tally, a sharded counter service: the workspace's root package.
//!
//! It holds the integration tests (`tests/`) and benchmarks (`benches/`) that
//! span crates, and re-exports the crates so that a reader starts here.
//!
//! # Layout
//!
//! - [`proto`] (`crates/tally-proto`): generated gRPC code for `proto/`,
//!   validated domain types, typed shard refusals.
//! - [`runtime`] (`crates/tally-runtime`): the config-file and process
//!   helpers every binary shares (tracing, signals, exit codes, the gRPC
//!   server).
//! - [`ring`] (`crates/tally-ring`): the consistent-hash ring and stripe
//!   placement; pure logic.
//! - [`shard`] (`crates/tally-shard`): the shard node and its `tally-shard`
//!   binary.
//! - [`coordinator`] (`crates/tally-coordinator`): the coordinator and its
//!   `tally-coordinator` binary.
//! - [`cli`] (`crates/tally-cli`): `tallyctl` and the in-process
//!   [`LocalCluster`](cli::local_cluster::LocalCluster).
//!
//! `ARCHITECTURE.md` at the repository root tells how a request flows.
#![deny(missing_docs)]

pub use tally_cli as cli;
pub use tally_coordinator as coordinator;
pub use tally_proto as proto;
pub use tally_ring as ring;
pub use tally_runtime as runtime;
pub use tally_shard as shard;
