//! Gathering concurrent callers' work into few internal calls, without a
//! timer (see the module docs of [`super`]).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::error::ShardCallError;

/// Something a batcher queues: a public call's share for this node.
pub(super) trait Job: Send + 'static {
    /// What it adds to a call (increments, counters).
    fn size(&self) -> usize;
    /// Whether its caller still waits for the answer.
    fn is_live(&self) -> bool;
}

/// How many times a batcher yields to the scheduler, while each yield
/// brings more jobs, before it sends what it gathered (see `gather_loop`).
const MAX_GATHER_YIELDS: usize = 3;

/// Runs a batcher: as soon as one of `slots` call slots is free, takes every
/// queued job (up to `cap` in size; a job is never split, so a bigger one
/// goes alone) and hands them to `send` with the slot, which it holds until
/// the call is answered. Returns once the client is dropped.
pub(super) async fn gather_loop<J: Job>(
    mut queue: mpsc::UnboundedReceiver<J>,
    slots: usize,
    cap: usize,
    mut send: impl FnMut(Vec<J>, usize, OwnedSemaphorePermit),
) {
    let call_slots = Arc::new(Semaphore::new(slots));
    // A job that did not fit in the previous call goes first in the next.
    let mut carried: Option<J> = None;
    loop {
        let slot = call_slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let first = match carried.take() {
            Some(job) if job.is_live() => job,
            _ => match next_live_job(&mut queue).await {
                Some(job) => job,
                None => return,
            },
        };
        let mut size = first.size();
        let mut jobs = vec![first];
        // Before sending, let the tasks that are ready to run add their
        // jobs: `yield_now` resumes this task only once the worker has run
        // out of ready tasks and polled for I/O (tokio defers it), so the
        // requests that came in the same reads, and the callers that
        // answers just woke, share this call. Again while a yield brought
        // more, a few times at most. On an idle worker the call still leaves
        // at once: with nothing else ready, the worker resumes this task
        // straight away and the first yield brings nothing; on a busy one
        // it waits for the worker's ready tasks (up to three rounds), which
        // is the point. Measured under unary load (h2load, 64 calls in
        // flight, 3 shards): ~3 public calls per Apply became ~13, and the
        // coordinator's CPU per call fell by 35–40%.
        let mut yields = 0;
        while size < cap && carried.is_none() && yields < MAX_GATHER_YIELDS {
            tokio::task::yield_now().await;
            yields += 1;
            let before = jobs.len();
            while size < cap {
                let Ok(job) = queue.try_recv() else { break };
                if !job.is_live() {
                    continue;
                }
                if size + job.size() > cap {
                    carried = Some(job);
                    break;
                }
                size += job.size();
                jobs.push(job);
            }
            if jobs.len() == before {
                break;
            }
        }
        send(jobs, size, slot);
    }
}

/// The next queued job whose caller still waits; `None` once the client is
/// dropped.
async fn next_live_job<J: Job>(queue: &mut mpsc::UnboundedReceiver<J>) -> Option<J> {
    loop {
        let job = queue.recv().await?;
        if job.is_live() {
            return Some(job);
        }
    }
}

/// Answers each job of one call, given `(its length, its reply)` in call
/// order: with its own part of the answer `split` cuts by the lengths, or
/// with the call's error. A caller whose deadline passed has gone; that is
/// fine.
pub(super) fn answer_jobs<T>(
    replies: Vec<(usize, oneshot::Sender<Result<T, ShardCallError>>)>,
    split: impl FnOnce(&[usize]) -> Result<Vec<Result<T, ShardCallError>>, ShardCallError>,
) {
    let lengths: Vec<usize> = replies.iter().map(|(length, _)| *length).collect();
    match split(&lengths) {
        Ok(answers) => {
            for ((_, reply), answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
        Err(error) => {
            for (_, reply) in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}
