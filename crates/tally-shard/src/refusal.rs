//! Every way a shard node refuses an internal call, in one enum. Each
//! variant has one [`Reason`], and the reason fixes the gRPC code
//! ([`Reason::code`], the internal protocol's one code table); the status
//! carries the reason in its details, so a coordinator decides on it and
//! never on the message.

use tally_proto::domain::ProtocolError;
use tally_proto::shard_error::{self, Reason};

/// Why a shard node refused a call.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The request names another node.
    #[error("this is node {this:?}, not {asked:?}: check the coordinator's membership")]
    WrongNode {
        /// This node.
        this: String,
        /// The node the request names.
        asked: String,
    },
    /// A drain has begun: the node takes no writes of its own entries.
    #[error("node {0} is being drained: it takes no more writes")]
    Draining(String),
    /// The node is drained: its entries are with another node.
    #[error("node {0} is drained: its entries are with another node")]
    Drained(String),
    /// The node started with an empty data directory and awaits a restore.
    #[error(
        "node {0} started with an empty data directory and awaits a restore from its replicas"
    )]
    AwaitsRestore(String),
    /// A restore was asked of a node that does not await one.
    #[error("node {0} is not waiting for a restore")]
    NotAwaitingRestore(String),
    /// A drain step contradicts the node's drain state.
    #[error("{0}")]
    DrainConflict(String),
    /// An adoption found no copy of the origin, or one too old.
    #[error("{0}")]
    CopyMissing(String),
    /// The log could not be written (or this start is not in it yet).
    #[error("node {node}: {message}")]
    Storage {
        /// This node.
        node: String,
        /// What failed.
        message: String,
    },
    /// Adding to an entry would leave the i64 range.
    #[error("adding to {0:?} overflows")]
    Overflow(String),
    /// A copy pushed to a node standing in for its origin.
    #[error(
        "node {node} stands in for {origin}: its copy stays as it is until {origin} has reconciled"
    )]
    StandingIn {
        /// This node.
        node: String,
        /// The copy's origin.
        origin: String,
    },
    /// A change of the membership keyed increments follow is in the way.
    #[error("node {node}: {message}")]
    MembershipChange {
        /// This node.
        node: String,
        /// What is in the way.
        message: String,
    },
    /// A malformed request.
    #[error("{0}")]
    InvalidRequest(String),
    /// A bug: a task panicked or was cancelled.
    #[error("{0}")]
    Internal(String),
}

impl Refusal {
    /// The reason the status carries.
    pub fn reason(&self) -> Reason {
        match self {
            Refusal::WrongNode { .. } => Reason::WrongNode,
            Refusal::Draining(_) => Reason::Draining,
            Refusal::Drained(_) => Reason::Drained,
            Refusal::AwaitsRestore(_) => Reason::AwaitsRestore,
            Refusal::NotAwaitingRestore(_) => Reason::NotAwaitingRestore,
            Refusal::DrainConflict(_) => Reason::DrainConflict,
            Refusal::CopyMissing(_) => Reason::CopyMissing,
            Refusal::Storage { .. } => Reason::Storage,
            Refusal::Overflow(_) => Reason::Overflow,
            Refusal::StandingIn { .. } => Reason::StandingIn,
            Refusal::MembershipChange { .. } => Reason::MembershipChange,
            Refusal::InvalidRequest(_) => Reason::InvalidRequest,
            Refusal::Internal(_) => Reason::Internal,
        }
    }

    /// A failure of this node's log.
    pub fn storage(node: &str, error: impl std::fmt::Display) -> Self {
        Refusal::Storage {
            node: node.to_string(),
            message: error.to_string(),
        }
    }
}

impl From<ProtocolError> for Refusal {
    fn from(error: ProtocolError) -> Self {
        Refusal::InvalidRequest(error.to_string())
    }
}

impl From<tokio::task::JoinError> for Refusal {
    fn from(error: tokio::task::JoinError) -> Self {
        Refusal::Internal(error.to_string())
    }
}

impl From<Refusal> for tonic::Status {
    fn from(error: Refusal) -> Self {
        shard_error::refusal(error.reason(), error.to_string())
    }
}
