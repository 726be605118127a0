//! Apply calls: increments from many public calls in one internal call,
//! merged where they can be ([`super::coalesce`]), answered to each caller.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::batcher::{answer_jobs, gather_loop, Job};
use super::coalesce::Coalesced;
use super::rpc::{apply_call, Grpc};
use super::BatchSettings;
use crate::error::ShardCallError;
use crate::metrics::NodeMetrics;
use crate::model::{Outcome, StripeIncrement};

/// A group of increments from one public call, answered together.
pub(super) struct ApplyJob {
    pub(super) increments: Vec<StripeIncrement>,
    /// The public call's span (none unless traces are exported): the Apply
    /// call's parent, or a link of it.
    pub(super) span: tracing::Span,
    pub(super) reply: oneshot::Sender<Result<Vec<Outcome>, ShardCallError>>,
    /// Room in the queue, given back when the job is answered or dropped.
    pub(super) queue_room: OwnedSemaphorePermit,
}

impl Job for ApplyJob {
    fn size(&self) -> usize {
        self.increments.len()
    }
    fn is_live(&self) -> bool {
        !self.reply.is_closed()
    }
}

pub(super) async fn batch_loop(
    node_id: Arc<str>,
    grpc: Grpc,
    queue: mpsc::UnboundedReceiver<ApplyJob>,
    settings: BatchSettings,
    metrics: Arc<NodeMetrics>,
) {
    gather_loop(
        queue,
        settings.max_in_flight_batches,
        settings.max_increments_per_batch,
        |jobs, increment_count, slot| {
            tokio::spawn(send_batch(
                node_id.clone(),
                grpc.clone(),
                jobs,
                increment_count,
                settings.shard_timeout,
                (slot, InFlight::new(metrics.clone())),
            ));
        },
    )
    .await;
}

async fn send_batch(
    node_id: Arc<str>,
    mut grpc: Grpc,
    jobs: Vec<ApplyJob>,
    increment_count: usize,
    shard_timeout: Duration,
    (_slot, in_flight): (OwnedSemaphorePermit, InFlight),
) {
    let span = super::call_span("Apply", &node_id, jobs.iter().map(|job| &job.span));
    let mut increments = Vec::with_capacity(increment_count);
    let mut replies = Vec::with_capacity(jobs.len());
    // Held until the call is answered: queue room covers calls in flight.
    let mut queue_room = Vec::with_capacity(jobs.len());
    for job in jobs {
        replies.push((job.increments.len(), job.reply));
        increments.extend(job.increments);
        queue_room.push(job.queue_room);
    }
    let began = std::time::Instant::now();
    let result = tracing::Instrument::instrument(
        apply_coalesced(&node_id, &mut grpc, increments, shard_timeout, &in_flight.0),
        span,
    )
    .await;
    in_flight
        .0
        .apply_seconds
        .record(began.elapsed().as_secs_f64());
    match &result {
        Ok(Applied {
            unknown: Some((error, positions)),
            ..
        }) => {
            tracing::warn!(node_id = &*node_id, %error, increments = positions.len(), "apply of unmerged parts failed");
        }
        Err(error) => {
            tracing::warn!(node_id = &*node_id, %error, increments = increment_count, "apply failed");
        }
        Ok(_) => {}
    }
    answer_jobs(replies, |lengths| {
        result.map(|applied| applied.split(lengths))
    });
}

/// Sends `increments` in one Apply call with un-keyed increments of the same
/// `(counter, stripe)` merged, and answers for each increment as if it had
/// been sent alone.
///
/// Merging is sound because a shard applies one increment atomically: a
/// merged increment that lands in range stands for its parts applied one
/// after another in some order that keeps every step in range (take a
/// negative part while the entry is at or above 0, else a positive one).
/// A merged increment that would overflow says nothing about its parts, so
/// they are sent again, unmerged, in a second call, and each gets its own
/// outcome. Keyed increments are never merged: each is deduplicated by its
/// own key.
async fn apply_coalesced(
    node_id: &str,
    grpc: &mut Grpc,
    increments: Vec<StripeIncrement>,
    shard_timeout: Duration,
    metrics: &NodeMetrics,
) -> Result<Applied, ShardCallError> {
    let plan = Coalesced::plan(increments);
    metrics.apply_increments.record(plan.sent.len() as f64);
    let merged_outcomes = apply_call(node_id, grpc, plan.sent, shard_timeout).await?;
    let (mut outcomes, unmerge) = plan.members.spread(merged_outcomes);
    if unmerge.is_empty() {
        return Ok(Applied {
            outcomes,
            unknown: None,
        });
    }
    let (positions, increments): (Vec<usize>, Vec<StripeIncrement>) = unmerge.into_iter().unzip();
    metrics.apply_increments.record(increments.len() as f64);
    match apply_call(node_id, grpc, increments, shard_timeout).await {
        Ok(separate) => {
            for (&position, outcome) in positions.iter().zip(separate) {
                outcomes[position] = outcome;
            }
            Ok(Applied {
                outcomes,
                unknown: None,
            })
        }
        Err(error) => Ok(Applied {
            outcomes,
            unknown: Some((error, positions)),
        }),
    }
}

/// An Apply call in flight, counted in `tally_shard_calls_in_flight` until
/// dropped.
struct InFlight(Arc<NodeMetrics>);

impl InFlight {
    fn new(metrics: Arc<NodeMetrics>) -> Self {
        metrics.calls_in_flight.increment(1.0);
        InFlight(metrics)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.calls_in_flight.decrement(1.0);
    }
}

/// The answer to one batch: an outcome per increment, except that if the
/// second call of [`apply_coalesced`] failed, the increments it carried
/// (by position) may or may not have been applied.
struct Applied {
    outcomes: Vec<Outcome>,
    unknown: Option<(ShardCallError, Vec<usize>)>,
}

impl Applied {
    /// The answer for each job, given the jobs' lengths in order. Only a
    /// job with a part whose fate is unknown fails: the others were
    /// answered by the first call, and an error would make their callers
    /// retry increments that were applied.
    pub(super) fn split(self, lengths: &[usize]) -> Vec<Result<Vec<Outcome>, ShardCallError>> {
        let mut outcomes = self.outcomes.into_iter();
        let mut start = 0;
        lengths
            .iter()
            .map(|&length| {
                let job = start..start + length;
                start += length;
                let mine: Vec<Outcome> = outcomes.by_ref().take(length).collect();
                match &self.unknown {
                    Some((error, positions)) if positions.iter().any(|p| job.contains(p)) => {
                        Err(error.clone())
                    }
                    _ => Ok(mine),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_second_call_fails_only_the_jobs_it_carried() {
        let applied = Applied {
            outcomes: vec![Outcome::Applied; 5],
            unknown: Some((ShardCallError::Failed("reset".into()), vec![3])),
        };
        let answers = applied.split(&[2, 2, 1]);
        assert_eq!(answers[0], Ok(vec![Outcome::Applied; 2]));
        assert!(answers[1].is_err(), "{:?}", answers[1]);
        assert_eq!(answers[2], Ok(vec![Outcome::Applied]));
    }
}
