//! Tally's wire protocols and the validated domain types at their edge
//! (what every binary shares at the process edge is in `tally-runtime`).
//!
//! # Layout
//!
//! - [`pb`]: code generated from `proto/tally/v1/*.proto`: the public
//!   `tally.v1.Counter` and `tally.v1.Admin` services and the internal
//!   `tally.v1.Shard` service (coordinator to shard node).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, served by gRPC
//!   server reflection so stock tools (grpcurl, grpc_health_probe) work
//!   without the proto files.
//! - [`shard_error`]: why a shard node refused an internal call, carried
//!   typed in the status's details and read back by coordinators.
//! - [`domain`]: `CounterName`, `IdempotencyKey` and `Increment`, built
//!   from the wire types with `TryFrom`, so that a handler past the edge only
//!   sees valid input; a `ProtocolError` becomes `INVALID_ARGUMENT`.
//! - [`window`]: fixed windows, the counters that expire: how a window's
//!   name is made from a counter's and read back by shards.
//! - [`codec`]: the generated servers' codec, which answers a request that
//!   does not decode `INVALID_ARGUMENT`.
#![deny(missing_docs)]

pub mod codec;
pub mod domain;
pub mod shard_error;
pub mod window;

/// Generated protobuf messages and gRPC clients and servers (package
/// `tally.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("tally.v1");
}

/// The version of the internal `tally.v1.Shard` protocol this build speaks.
/// Coordinators and shard nodes of one release speak the same; a
/// coordinator treats a node of another version as down, and a node refuses
/// an Apply of another version before applying anything. Raise it whenever
/// a change to `shard.proto` would make one side misread the other.
pub const SHARD_PROTOCOL_VERSION: u32 = 6;

/// A request that tells the server how long its caller waits (the
/// `grpc-timeout` header): every Tally client sets one.
pub fn timed<T>(message: T, timeout: std::time::Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// The encoded `FileDescriptorSet` of every Tally proto file, for
/// `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tally_descriptor.bin"));
