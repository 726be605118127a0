//! The wire edge of every internal call: one call under a budget, a
//! refusal decoded into a typed error, and Apply's increments and results
//! turned into wire messages and back.

use std::time::Duration;

use tally_proto::{pb, timed};
use tonic::transport::Channel;

use crate::error::ShardCallError;
use crate::model::{NodeRead, Outcome, StripeIncrement};

/// The generated client of one node's `tally.v1.Shard` service.
pub(super) type Grpc = pb::shard_client::ShardClient<Channel>;

/// Runs one internal call under `budget`.
pub(super) async fn call<T>(
    budget: Duration,
    future: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ShardCallError> {
    match tokio::time::timeout(budget, future).await {
        Err(_) => Err(ShardCallError::TimedOut(budget)),
        Ok(Err(status)) if is_timeout(&status) => Err(ShardCallError::TimedOut(budget)),
        Ok(Err(status)) => Err(describe_status(&status)),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

/// Whether `status` is the end of the call's `grpc-timeout`: tonic's own,
/// from the channel's timeout layer (which reads the header `timed` sets,
/// and may fire a moment before our own timer), or the node's edge, which
/// answers `DEADLINE_EXCEEDED` when the timeout passes. Either is a
/// timeout, not an error the node answered: a busy node must not be taken
/// for a failed one (`health`).
fn is_timeout(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::DeadlineExceeded
        || (status.code() == tonic::Code::Cancelled
            && status.message() == tonic::TimeoutExpired(()).to_string())
}

fn describe_status(status: &tonic::Status) -> ShardCallError {
    // Transport errors wrap the reason several layers deep ("tcp connect
    // error" / "transport error" / "Connection refused"): the root is what
    // an operator needs.
    let mut root_cause = None;
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        root_cause = Some(error.to_string());
        source = error.source();
    }
    let message = match (status.message(), root_cause) {
        ("", None) => format!("{:?}", status.code()),
        ("", Some(root)) => root,
        (message, None) => message.to_string(),
        (message, Some(root)) if root == message => root,
        (message, Some(root)) => format!("{message}: {root}"),
    };
    match tally_proto::shard_error::reason_of(status) {
        Some(reason) => ShardCallError::Refused { reason, message },
        None => ShardCallError::Failed(message),
    }
}

/// One Apply call: an outcome per increment, in order.
pub(super) async fn apply_call(
    node_id: &str,
    grpc: &mut Grpc,
    increments: Vec<StripeIncrement>,
    shard_timeout: Duration,
) -> Result<Vec<Outcome>, ShardCallError> {
    let expected = increments.len();
    let request = pb::ApplyRequest {
        node_id: node_id.to_string(),
        protocol_version: tally_proto::SHARD_PROTOCOL_VERSION,
        increments: increments
            .into_iter()
            .map(pb::ShardIncrement::from)
            .collect(),
    };
    let mut request = timed(request, shard_timeout);
    // The Apply span's context, for the shard's span (traces on only).
    tally_runtime::traces::inject(request.metadata_mut());
    let response = call(shard_timeout, grpc.apply(request)).await?;
    let malformed =
        |what: String| ShardCallError::Failed(format!("malformed apply answer: {what}"));
    if response.results.len() != expected {
        return Err(malformed(format!(
            "{} results for {expected} increments",
            response.results.len()
        )));
    }
    response
        .results
        .into_iter()
        .map(|result| Outcome::try_from(result).map_err(malformed))
        .collect()
}

/// One Read call: this node's part of each of `counters` (in order) and of
/// every copy it holds.
pub(super) async fn read_call(
    node_id: &str,
    grpc: &mut Grpc,
    counters: Vec<String>,
    budget: Duration,
) -> Result<NodeRead, ShardCallError> {
    let expected = counters.len();
    let request = pb::ReadRequest {
        node_id: node_id.to_string(),
        counters,
    };
    let mut request = timed(request, budget);
    tally_runtime::traces::inject(request.metadata_mut());
    let response = call(budget, grpc.read(request)).await?;
    NodeRead::from_wire(response, expected)
        .map_err(|error| ShardCallError::Failed(format!("malformed read answer: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_timeout_tonics_or_the_nodes_is_a_timeout_not_an_error() {
        let budget = Duration::from_millis(700);
        let expired = call::<()>(budget, async {
            Err(tonic::Status::from_error(Box::new(tonic::TimeoutExpired(
                (),
            ))))
        })
        .await;
        assert_eq!(expired, Err(ShardCallError::TimedOut(budget)));
        // The node's edge, when the call's grpc-timeout passes there first.
        let passed = call::<()>(budget, async {
            Err(tonic::Status::deadline_exceeded(
                "the call's deadline (grpc-timeout) passed before it was answered",
            ))
        })
        .await;
        assert_eq!(passed, Err(ShardCallError::TimedOut(budget)));
        let refused = call::<()>(budget, async {
            Err(tonic::Status::unavailable("tcp connect error"))
        })
        .await;
        assert_eq!(
            refused,
            Err(ShardCallError::Failed("tcp connect error".into()))
        );
    }
}
