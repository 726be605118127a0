//! What every Tally binary does the same way at its process edge, kept out
//! of `tally-proto` so that the protocol crate holds only the protocol.
//!
//! # Layout
//!
//! - [`config_file`]: strict TOML loading shared by every binary: an error
//!   is one line naming the file (or the command line) and the key.
//! - [`process`]: tracing setup, shutdown signals, exit codes, allocator
//!   tuning, and the gRPC server with health checking and reflection that
//!   lists exactly what a server serves.
//! - [`edge`]: what every server does before its services: the HTTP/2 and
//!   connection limits (named constants with their defaults), and the
//!   right gRPC code for every bad input (timeouts, message sizes).
//! - [`metrics`]: each daemon's Prometheus metrics and their endpoint.
//! - [`traces`]: spans exported over OTLP, trace context across the hop.
//! - [`tls`]: TLS on every port, mutual TLS on the internal one, reloadable.
//! - [`tokens`]: bearer tokens with roles, stored hashed.
#![deny(missing_docs)]

pub mod config_file;
pub mod edge;
pub mod metrics;
pub mod process;
pub mod tls;
pub mod tokens;
pub mod traces;
