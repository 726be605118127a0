//! The coordinator's errors, and the one table that maps them to gRPC codes
//! at the service boundary.

use tally_proto::domain::ProtocolError;
use tally_proto::shard_error::Reason;
use tonic::{Code, Status};

/// Why a call to one shard node failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardCallError {
    /// The node did not answer within the shard timeout.
    #[error("timed out after {0:?}")]
    TimedOut(std::time::Duration),
    /// The node refused the call, and said why.
    #[error("{message}")]
    Refused {
        /// Why: what the coordinator decides on.
        reason: Reason,
        /// The node's words, for people.
        message: String,
    },
    /// The node could not be reached, answered without a reason, or gave
    /// an answer this coordinator cannot use.
    #[error("{0}")]
    Failed(String),
    /// The caller's budget ran out while its request still waited in this
    /// coordinator for a call slot: nothing was sent, so it says nothing
    /// about the node's health.
    #[error("not sent: waited {0:?} for a call slot behind earlier calls")]
    NotSent(std::time::Duration),
    /// Not sent: the node is shown down (its last error given), and the
    /// call could not go elsewhere.
    #[error("not sent: the node is down ({0})")]
    Down(String),
    /// Sent, but the node was found hung while the call waited for its
    /// answer (its last error given): not waited for any longer. In doubt:
    /// the node may still apply it.
    #[error("in doubt: the node was found hung while the call was in flight ({0})")]
    Abandoned(String),
}

impl ShardCallError {
    /// The node's reason, if it refused the call.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            ShardCallError::Refused { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// Shorthand for the coordinator's results.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

/// Everything a public call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The request breaks the contract.
    #[error(transparent)]
    InvalidArgument(#[from] ProtocolError),
    /// An increment would take a stored entry out of the i64 range.
    #[error("increment of {counter:?} by {delta} would overflow a stored i64; nothing applied")]
    IncrementOverflow {
        /// The counter.
        counter: String,
        /// The increment.
        delta: i64,
    },
    /// An idempotency key was applied to the counter before with another
    /// delta: two different increments share a key.
    #[error(
        "idempotency key {key:?} was already applied to {counter:?} with delta \
         {recorded_delta}, not {delta}; nothing applied (use a new key for a new increment)"
    )]
    KeyConflict {
        /// The counter.
        counter: String,
        /// The key.
        key: String,
        /// This increment's delta.
        delta: i64,
        /// The delta applied under the key before.
        recorded_delta: i64,
    },
    /// A counter's total does not fit in an i64.
    #[error("total of {counter:?} does not fit in an i64")]
    TotalOutOfRange {
        /// The counter.
        counter: String,
    },
    /// A counter's window has ended by a shard's clock although this
    /// coordinator's clock is still in it: their clocks differ by more than
    /// the shard's grace. Nothing applied, no total given.
    #[error("{0}")]
    WindowEnded(String),
    /// Some shards could not be reached or failed.
    #[error("{}", describe_unavailable(.0))]
    Unavailable(Vec<(String, ShardCallError)>),
    /// The client's deadline passed.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// An admin request names a node the membership does not have.
    #[error("no node {0:?} in the membership")]
    UnknownNode(String),
    /// An admin request cannot be done in the cluster's state.
    #[error("{0}")]
    Precondition(String),
}

fn describe_unavailable(failures: &[(String, ShardCallError)]) -> String {
    let parts: Vec<String> = failures
        .iter()
        .map(|(node_id, error)| format!("{node_id} ({error})"))
        .collect();
    format!("shards unavailable: {}", parts.join(", "))
}

impl CoordinatorError {
    /// The gRPC code of this error: the public error table (docs/API.md), in
    /// one place.
    pub fn code(&self) -> Code {
        match self {
            CoordinatorError::InvalidArgument(_) => Code::InvalidArgument,
            CoordinatorError::IncrementOverflow { .. }
            | CoordinatorError::TotalOutOfRange { .. } => Code::OutOfRange,
            CoordinatorError::KeyConflict { .. } => Code::AlreadyExists,
            CoordinatorError::Unavailable(_) => Code::Unavailable,
            CoordinatorError::DeadlineExceeded => Code::DeadlineExceeded,
            CoordinatorError::UnknownNode(_) => Code::NotFound,
            CoordinatorError::Precondition(_) | CoordinatorError::WindowEnded(_) => {
                Code::FailedPrecondition
            }
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(error: CoordinatorError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_names_every_shard() {
        let error = CoordinatorError::Unavailable(vec![
            (
                "shard-1".into(),
                ShardCallError::Failed("connection refused".into()),
            ),
            (
                "shard-3".into(),
                ShardCallError::TimedOut(std::time::Duration::from_secs(5)),
            ),
        ]);
        let status = Status::from(error);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "shards unavailable: shard-1 (connection refused), shard-3 (timed out after 5s)"
        );
    }
}
