//! Read calls: counters from many public reads in one internal call, the
//! answer cut back into each caller's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::batcher::{answer_jobs, gather_loop, Job};
use super::rpc::{read_call, Grpc};
use super::BatchSettings;
use crate::error::ShardCallError;
use crate::metrics::NodeMetrics;
use crate::model::NodeRead;

/// Counters from one public read for this node, answered together.
pub(super) struct ReadJob {
    pub(super) counters: Vec<String>,
    /// When the caller stops waiting.
    pub(super) deadline: tokio::time::Instant,
    /// Set once the job's Read call is sent.
    pub(super) sent: Arc<AtomicBool>,
    /// The public call's span (traces on only; see `super::call_span`).
    pub(super) span: tracing::Span,
    pub(super) reply: oneshot::Sender<Result<NodeRead, ShardCallError>>,
}

/// Most counters gathered into one Read call (a larger public read goes
/// alone: GetBatch allows 10,000).
const MAX_COUNTERS_PER_READ: usize = 10_000;

impl Job for ReadJob {
    fn size(&self) -> usize {
        self.counters.len()
    }
    fn is_live(&self) -> bool {
        !self.reply.is_closed()
    }
}

pub(super) async fn read_loop(
    node_id: Arc<str>,
    grpc: Grpc,
    queue: mpsc::UnboundedReceiver<ReadJob>,
    settings: BatchSettings,
    metrics: Arc<NodeMetrics>,
) {
    gather_loop(
        queue,
        settings.max_in_flight_batches,
        MAX_COUNTERS_PER_READ,
        |jobs, counter_count, slot| {
            metrics.read_counters.record(counter_count as f64);
            tokio::spawn(send_reads(
                metrics.read_seconds.clone(),
                node_id.clone(),
                grpc.clone(),
                jobs,
                counter_count,
                slot,
            ));
        },
    )
    .await;
}

/// One Read call for every gathered job, answered to each with its own
/// counters (in order) and its slice of every replica copy. One call is
/// one consistent view of the node, so each slice is too.
async fn send_reads(
    seconds: metrics::Histogram,
    node_id: Arc<str>,
    mut grpc: Grpc,
    jobs: Vec<ReadJob>,
    counter_count: usize,
    _slot: OwnedSemaphorePermit,
) {
    // Until the last caller's deadline; shorter callers stop waiting on
    // their own.
    let deadline = jobs.iter().map(|job| job.deadline).max();
    let budget = deadline.map_or(Duration::ZERO, |deadline| {
        deadline.saturating_duration_since(tokio::time::Instant::now())
    });
    let span = super::call_span("Read", &node_id, jobs.iter().map(|job| &job.span));
    let mut counters = Vec::with_capacity(counter_count);
    let mut replies = Vec::with_capacity(jobs.len());
    for job in jobs {
        job.sent.store(true, Ordering::SeqCst);
        replies.push((job.counters.len(), job.reply));
        counters.extend(job.counters);
    }
    let began = std::time::Instant::now();
    let result = {
        // A call nobody waits for any more gives its slot back at once.
        let abandoned =
            futures::future::join_all(replies.iter_mut().map(|(_, reply)| reply.closed()));
        tokio::select! {
            result = tracing::Instrument::instrument(
                read_call(&node_id, &mut grpc, counters, budget),
                span,
            ) => {
                seconds.record(began.elapsed().as_secs_f64());
                result
            }
            _ = abandoned => {
                // Its time so far: the slowest reads are the ones given up.
                seconds.record(began.elapsed().as_secs_f64());
                return;
            }
        }
    };
    answer_jobs(replies, |lengths| {
        result.map(|read| read.split(lengths).into_iter().map(Ok).collect())
    });
}
