//! A test hook: `TALLY_SHARD_CRASH_AT=POINT` makes the process abort (a
//! crash: no clean-up, no flush, like SIGKILL) the first time it reaches
//! `POINT`, one of [`POINTS`] or [`REALIGN_OPEN`]. The crash tests use it
//! to land a crash at a chosen moment of a checkpoint or of a membership
//! change; unset, it costs one load of a flag.

use std::sync::OnceLock;

/// The points a crash can be asked at.
pub const POINTS: [&str; 4] = [
    // The checkpoint thread wrote a batch of buckets of a round, not yet
    // its metadata.
    "checkpoint-buckets",
    // The checkpoint thread made a round durable; the log thread has not
    // heard of it (no log segment deleted yet).
    "checkpoint-durable",
    // The log thread deleted the first of the segments a checkpoint covers.
    "segment-deleted",
    // The log thread wrote a group and synced it; its writers are not
    // answered yet.
    "log-synced",
];

/// A membership change's open arrived (the node is sealed for it and has
/// handed its records on); nothing of it is applied yet. Not reached under
/// load alone, unlike [`POINTS`]: a test must change the membership.
pub const REALIGN_OPEN: &str = "realign-open";

/// Aborts the process if `TALLY_SHARD_CRASH_AT` names `point`.
pub fn reached(point: &str) {
    static ASKED: OnceLock<Option<String>> = OnceLock::new();
    let asked = ASKED.get_or_init(|| std::env::var("TALLY_SHARD_CRASH_AT").ok());
    if asked.as_deref() == Some(point) {
        eprintln!("tally-shard: crashing at {point} (TALLY_SHARD_CRASH_AT)");
        std::process::abort();
    }
}
