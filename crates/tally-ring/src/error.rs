//! Errors returned when building a [`Ring`](crate::Ring).

use thiserror::Error;

/// Why a membership list cannot be turned into a [`Ring`](crate::Ring).
///
/// Every check runs on the nodes sorted by id, so the error reported for an
/// invalid membership does not depend on the order the nodes were listed in.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RingError {
    /// The membership list was empty.
    #[error("the ring needs at least one node")]
    NoNodes,
    /// Two nodes share the same id; the id is the one that appeared twice.
    #[error("duplicate node id {0:?}")]
    DuplicateNodeId(String),
    /// A node has weight 0 and would own no part of the ring.
    #[error("node {0:?} has weight 0")]
    ZeroWeight(String),
    /// `vnodes_per_weight` was 0, which would give every node zero tokens.
    #[error("vnodes_per_weight must be at least 1")]
    ZeroVnodes,
    /// `vnodes_per_weight * weight` exceeds
    /// [`MAX_VNODES_PER_NODE`](crate::MAX_VNODES_PER_NODE) for some node.
    #[error("node {node_id:?} would have {vnodes} vnodes, more than the limit of {limit}")]
    TooManyVnodes {
        /// Id of the offending node.
        node_id: String,
        /// Number of virtual nodes the node would have had.
        vnodes: u64,
        /// The per-node limit that was exceeded.
        limit: u32,
    },
    /// A node id was the empty string.
    #[error("node id must not be empty")]
    EmptyNodeId,
}
