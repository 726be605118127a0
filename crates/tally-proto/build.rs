//! Compiles `proto/tally/v1/*.proto` with protox, a pure-Rust protobuf
//! compiler, so that a machine with only the Rust toolchain builds Tally (no
//! system `protoc`). Writes to OUT_DIR only: the generated code and a file
//! descriptor set for gRPC server reflection.
//!
//! The public messages `tallyctl --json` prints derive `serde::Serialize`, so
//! the CLI prints them instead of copying their fields by hand: their JSON
//! keys are the proto field names, their numbers JSON numbers (int64 and
//! uint64 too, as tallyctl has always printed them).

use std::path::PathBuf;

use prost::Message;

/// The `tally.v1` messages `tallyctl --json` prints, whole or inside a
/// wrapper of its own (crates/tally-cli/src/commands.rs).
const PRINTED_BY_TALLYCTL: [&str; 6] = [
    "GetResponse",
    "DrainResponse",
    "RingNode",
    "StripeLocation",
    "NodeStatus",
    "ClusterStatusResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let files = [
        proto_root.join("tally/v1/tally.proto"),
        proto_root.join("tally/v1/shard.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let file_descriptors = protox::compile(&files, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tally_descriptor.bin"),
        file_descriptors.encode_to_vec(),
    )?;

    let mut builder = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true);
    for message in PRINTED_BY_TALLYCTL {
        builder = builder.message_attribute(
            format!(".tally.v1.{message}"),
            "#[derive(serde::Serialize)]",
        );
    }
    // tallyctl prints a stripe's position as 16 hex digits (a wrapper of its
    // own adds it), not as a number.
    builder = builder.field_attribute(".tally.v1.StripeLocation.hash", "#[serde(skip)]");
    // An Apply answer has one result per increment; boxing the rare refused
    // ones keeps each result at 16 bytes instead of a whole increment's.
    for refusal in [
        "overflow",
        "conflict",
        "redirect",
        "awaits_restore",
        "owner_back",
        "ring_refused",
    ] {
        builder = builder.boxed(format!(".tally.v1.ApplyResult.outcome.{refusal}"));
    }
    builder.compile_fds(file_descriptors)?;
    Ok(())
}
