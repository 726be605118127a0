//! Refusals on the internal hop, typed both ways. A shard node says why it
//! refused a call in the status's details (a `google.rpc.ErrorInfo`, domain
//! [`DOMAIN`], reason the [`Reason`] value's name); a coordinator reads the
//! reason back with [`reason_of`] and decides on it, never on the message,
//! which is for people.

use tonic_types::{ErrorDetails, StatusExt};

pub use crate::pb::ShardErrorReason as Reason;

/// The `ErrorInfo` domain of a shard's refusals.
pub const DOMAIN: &str = "tally.v1.Shard";

impl Reason {
    /// The gRPC code a refusal for this reason carries: the internal
    /// protocol's one code table.
    pub fn code(self) -> tonic::Code {
        match self {
            Reason::WrongNode
            | Reason::Drained
            | Reason::AwaitsRestore
            | Reason::NotAwaitingRestore
            | Reason::DrainConflict
            | Reason::CopyMissing
            | Reason::StandingIn => tonic::Code::FailedPrecondition,
            Reason::Draining | Reason::Storage | Reason::MembershipChange => {
                tonic::Code::Unavailable
            }
            Reason::Overflow => tonic::Code::OutOfRange,
            Reason::InvalidRequest => tonic::Code::InvalidArgument,
            Reason::Unspecified | Reason::Internal => tonic::Code::Internal,
        }
    }
}

/// A refusal: `reason`'s code, `message` for people, `reason` in the
/// details.
pub fn refusal(reason: Reason, message: impl Into<String>) -> tonic::Status {
    tonic::Status::with_error_details(
        reason.code(),
        message,
        ErrorDetails::with_error_info(reason.as_str_name(), DOMAIN, []),
    )
}

/// The reason a shard node gave for `status`, if it gave one (a transport
/// error, a timeout or a peer of another kind gives none).
pub fn reason_of(status: &tonic::Status) -> Option<Reason> {
    let info = status.get_details_error_info()?;
    if info.domain != DOMAIN {
        return None;
    }
    Reason::from_str_name(&info.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_survives_the_wire() {
        for value in 1.. {
            let Ok(reason) = Reason::try_from(value) else {
                break;
            };
            let status = refusal(reason, "a message that says nothing typed");
            assert_eq!(status.code(), reason.code());
            // Through the bytes a client receives.
            let received = tonic::Status::with_details(
                status.code(),
                status.message(),
                status.details().to_vec().into(),
            );
            assert_eq!(reason_of(&received), Some(reason), "{reason:?}");
        }
    }

    #[test]
    fn a_status_without_a_reason_has_none() {
        assert_eq!(reason_of(&tonic::Status::unavailable("refused")), None);
        let foreign = tonic::Status::with_error_details(
            tonic::Code::FailedPrecondition,
            "",
            ErrorDetails::with_error_info("SHARD_ERROR_REASON_DRAINED", "example.com", []),
        );
        assert_eq!(reason_of(&foreign), None);
    }
}
