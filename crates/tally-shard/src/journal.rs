//! The log thread: the one writer of the log, and the only place where a
//! change becomes durable.
//!
//! Writers apply increments in memory ([`Store::apply`]), then (sync mode)
//! wake this thread and wait for the epoch they were stamped with. Requests
//! that change other state (a replica copy, a restore, a drain step: a
//! [`Change`]) are queued here with a reply channel. Each turn of the
//! thread:
//!
//! 1. collects every own change of the closed epoch into one frame
//!    ([`Store::begin_flush`]), and each queued request into a frame of its
//!    own;
//! 2. writes them with one `write` and makes them durable with one
//!    `fdatasync` ([`LogWriter::commit`]);
//! 3. then, and only then, publishes the epoch as durable (waking its
//!    writers), applies the requests' changes to memory and answers them.
//!
//! While a turn writes, the next group gathers: one fdatasync serves every
//! increment that arrived during the one before (group commit), and no
//! thread pool is woken. In async mode writers do not wait, and the thread
//! turns every `flush_interval` (at once for a request). A failed write
//! leaves the changes dirty in memory, fails their waiters, and is tried
//! again on the next turn; a full disk heals by itself when space returns.
//!
//! The thread also drives checkpoints: a round captures the checkpoint
//! buckets of a few segments per turn, exactly as the log holds them (see
//! [`crate::store`]), and hands them to the checkpoint thread
//! ([`crate::checkpoint`]); once a round is durable there, the log
//! segments it covers are deleted.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use tokio::sync::{oneshot, watch};

use crate::change::Change;
use crate::checkpoint::{self, CheckpointMeta, Job, RoundOutcome};
use crate::config::Durability;
use crate::log::{FrameKind, LogWriter};
use crate::meta::NodeMeta;
use crate::replicas::Replicas;
use crate::storage::{StorageError, Witness, FORMAT_VERSION};
use crate::store::{CapturedBucket, OwnChanges, Store, SEGMENT_COUNT};

/// Own segments captured per turn of a checkpoint round: a capture walks
/// the segment's records, so a few at a time keep each group commit short.
const OWN_SEGMENTS_PER_TURN: usize = 4;
/// Segments of a replica copy captured per turn.
const COPY_SEGMENTS_PER_TURN: usize = 16;
/// Free space a checkpoint round needs at least.
const MIN_CHECKPOINT_ROOM: u64 = 8 * 1024 * 1024;

/// When checkpoints run and how the log is cut into segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSettings {
    /// When increments are acknowledged.
    pub durability: Durability,
    /// Async mode: most time between an acknowledgement and its write.
    /// Both modes: how soon a failed write is tried again.
    pub flush_interval: Duration,
    /// A new log segment starts once the current one holds this many bytes.
    pub segment_bytes: u64,
    /// A checkpoint starts once the log holds this many bytes after the
    /// last one...
    pub checkpoint_bytes: u64,
    /// ... or this long after the last one began, if anything changed.
    pub checkpoint_interval: Duration,
}

/// A write to the log failed: the changes are in memory, not durable. They
/// stay dirty and the next turn writes them again.
#[derive(Debug, Clone, thiserror::Error)]
#[error("write to the log failed: {0}")]
pub struct FlushFailed(Arc<str>);

/// The result of the latest turns, as waiters see it.
#[derive(Debug, Clone, Default)]
struct DurableState {
    /// Every change stamped with this epoch or an earlier one was collected
    /// by a finished turn (successful or not).
    completed_epoch: u64,
    /// Every change stamped with this epoch or an earlier one is in the log.
    /// A failed turn re-marks its changes dirty before the next turn, so a
    /// later success covers them.
    durable_epoch: u64,
    /// Why the latest write failed, if it did.
    error: Option<Arc<str>>,
}

/// Figures for status pages, updated by the log thread.
#[derive(Debug, Default)]
pub struct LogStats {
    /// The last durable frame.
    pub last_seq: AtomicU64,
    /// Bytes of log on disk.
    pub log_bytes: AtomicU64,
    /// Log segments on disk.
    pub log_segments: AtomicU64,
    /// Group commits written (one write and one fdatasync each).
    pub commits: AtomicU64,
    /// Unix ms of the last commit that wrote own changes.
    pub last_flush_unix_ms: AtomicU64,
    /// The last durable checkpoint's position.
    pub checkpoint_position: AtomicU64,
    /// Unix ms when the last durable checkpoint finished (0: none since start).
    pub last_checkpoint_unix_ms: AtomicU64,
    /// Checkpoints finished since start.
    pub checkpoints: AtomicU64,
    /// Checkpoints failed since start.
    pub checkpoint_failures: AtomicU64,
    /// Windows reclaimed since start: own ones, and each copy's
    /// (`crate::windows`).
    pub windows_reclaimed: AtomicU64,
}

/// A change waiting for the log.
struct Request {
    change: Change,
    reply: oneshot::Sender<Result<(), FlushFailed>>,
}

#[derive(Default)]
struct InboxState {
    wake: bool,
    stop: bool,
    /// Stop as a crash would: no last write, no last checkpoint (tests).
    crash: bool,
    requests: Vec<Request>,
}

#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    ready: Condvar,
    /// Set by a writer that woke the thread, cleared by the thread before it
    /// collects: writers skip the lock while a wake is pending.
    wake_pending: AtomicBool,
}

/// The state the log thread changes, shared with the service for reads.
#[derive(Debug, Clone)]
pub struct NodeState {
    /// Own entries.
    pub store: Arc<Store>,
    /// Replica copies.
    pub replicas: Arc<Replicas>,
    /// Everything else.
    pub meta: Arc<Mutex<NodeMeta>>,
}

/// Handle to the running log thread.
pub struct Journal {
    durability: Durability,
    inbox: Arc<Inbox>,
    state: watch::Receiver<DurableState>,
    stats: Arc<LogStats>,
    thread: Mutex<Option<std::thread::JoinHandle<Result<Stopped, StorageError>>>>,
    dir: PathBuf,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Journal")
            .field("dir", &self.dir)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

/// What the log thread needs to start.
pub struct JournalParts {
    /// The data directory.
    pub dir: PathBuf,
    /// The log, open for writing.
    pub log: LogWriter,
    /// The witness file, written after every commit.
    pub witness: std::fs::File,
    /// The position of the checkpoint on disk.
    pub checkpoint_position: u64,
    /// The checkpoint database, if it was opened at start (else the
    /// checkpoint thread opens it).
    pub checkpoint: Option<checkpoint::Checkpoint>,
    /// The checkpoint files' hash after their last round and its position,
    /// if unchanged.
    pub checkpoint_hash: Option<(u64, u64)>,
    /// This start's frame, if it is not in the log yet: written first.
    pub pending_start: Option<Change>,
    /// Where each group commit is measured.
    pub commit_metrics: CommitMetrics,
}

/// Histograms of group commits, recorded by the log thread.
#[derive(Debug, Clone)]
pub struct CommitMetrics {
    /// Counters written by a group commit that wrote own entries.
    pub counters: metrics::Histogram,
    /// How long a group commit's write and sync took.
    pub seconds: metrics::Histogram,
}

impl Default for CommitMetrics {
    fn default() -> Self {
        CommitMetrics {
            counters: metrics::Histogram::noop(),
            seconds: metrics::Histogram::noop(),
        }
    }
}

/// How the log thread left the log at a stop: what [`crate::storage::Storage::close`]
/// records.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stopped {
    /// The last durable frame.
    pub last_seq: u64,
    /// The checkpoint's files' hash, closed after a durable last round,
    /// and the round's position.
    pub checkpoint_hash: Option<(u64, u64)>,
}

impl Journal {
    /// Starts the log thread and the checkpoint thread.
    pub fn start(
        state: NodeState,
        parts: JournalParts,
        settings: LogSettings,
    ) -> std::io::Result<Journal> {
        let inbox = Arc::new(Inbox::default());
        let (state_sender, state_receiver) = watch::channel(DurableState::default());
        let stats = Arc::new(LogStats::default());
        let (jobs, job_receiver) = mpsc::channel();
        let (outcome_sender, outcomes) = mpsc::channel();
        let data_dir = parts.dir.clone();
        let opened = parts.checkpoint;
        let checkpointer = std::thread::Builder::new()
            .name("tally-checkpoint".into())
            .spawn(move || checkpoint::run(data_dir, opened, job_receiver, outcome_sender))?;
        stats
            .checkpoint_position
            .store(parts.checkpoint_position, Ordering::Relaxed);
        let dir = parts.dir.clone();
        let thread = LogThread {
            state,
            settings,
            inbox: inbox.clone(),
            durable: state_sender,
            stats: stats.clone(),
            commit_metrics: parts.commit_metrics,
            log: parts.log,
            witness: parts.witness,
            checkpoint_hash: parts.checkpoint_hash,
            pending_start: parts.pending_start,
            dir: parts.dir,
            own: OwnChanges::default(),
            captured: Vec::new(),
            round: None,
            checkpoint_position: parts.checkpoint_position,
            last_round_started: Instant::now(),
            copy_records_swept: Instant::now(),
            windows_swept: Instant::now(),
            windows_backlog: false,
            jobs: Some(jobs),
            outcomes,
            checkpointer: Some(checkpointer),
            awaiting_outcome: false,
            next_round_captures_everything: false,
            appended_at_last_round: 0,
            pending_deletes: Vec::new(),
        };
        thread.publish_stats();
        let handle = std::thread::Builder::new()
            .name("tally-log".into())
            .spawn(move || thread.run())?;
        Ok(Journal {
            durability: settings.durability,
            inbox,
            state: state_receiver,
            stats,
            thread: Mutex::new(Some(handle)),
            dir,
        })
    }

    fn wake(&self) {
        if !self.inbox.wake_pending.swap(true, Ordering::SeqCst) {
            self.inbox.state.lock().wake = true;
            self.inbox.ready.notify_one();
        }
    }

    /// Returns when changes stamped with `epoch` are durable by this node's
    /// durability mode: at once in async mode, once logged in sync mode.
    pub async fn wait_durable(&self, epoch: u64) -> Result<(), FlushFailed> {
        if epoch == 0 || self.durability == Durability::Async {
            return Ok(());
        }
        self.wait_flushed(epoch).await
    }

    /// Returns when changes stamped with `epoch` are in the log, whatever
    /// the durability mode.
    pub async fn wait_flushed(&self, epoch: u64) -> Result<(), FlushFailed> {
        if epoch == 0 {
            return Ok(());
        }
        if self.state.borrow().durable_epoch >= epoch {
            return Ok(());
        }
        self.wake();
        let mut state = self.state.clone();
        let state = state
            .wait_for(|state| state.completed_epoch >= epoch)
            .await
            .map_err(|_| FlushFailed("the node is shutting down".into()))?;
        if state.durable_epoch >= epoch {
            return Ok(());
        }
        Err(FlushFailed(
            state.error.clone().unwrap_or_else(|| "write failed".into()),
        ))
    }

    /// Writes `change` to the log, durably, then applies it to memory.
    pub async fn submit(&self, change: Change) -> Result<(), FlushFailed> {
        let (reply, answer) = oneshot::channel();
        {
            let mut inbox = self.inbox.state.lock();
            if inbox.stop {
                return Err(FlushFailed("the node is shutting down".into()));
            }
            inbox.requests.push(Request { change, reply });
        }
        self.inbox.ready.notify_one();
        answer
            .await
            .map_err(|_| FlushFailed("the node is shutting down".into()))?
    }

    /// Figures for status pages.
    pub fn stats(&self) -> &LogStats {
        &self.stats
    }

    /// Stops the thread after a last write and a last checkpoint, and
    /// returns where it left the log, or the last write's error. Waiters
    /// still pending get their answer from that write. A second call
    /// returns nothing.
    pub fn stop(&self) -> Result<Option<Stopped>, StorageError> {
        let Some(handle) = self.thread.lock().take() else {
            return Ok(None);
        };
        self.inbox.state.lock().stop = true;
        self.inbox.ready.notify_one();
        handle
            .join()
            .unwrap_or_else(|_| {
                Err(StorageError::Damaged {
                    dir: self.dir.clone(),
                    message: "the log thread panicked".into(),
                })
            })
            .map(Some)
    }
}

#[cfg(test)]
impl Journal {
    /// Stops the log thread as a crash would, in a test: at once, without a
    /// last write or checkpoint. The checkpoint thread finishes the job it
    /// has.
    pub fn crash(&self) {
        let Some(handle) = self.thread.lock().take() else {
            return;
        };
        {
            let mut inbox = self.inbox.state.lock();
            inbox.crash = true;
            inbox.stop = true;
        }
        self.inbox.ready.notify_one();
        let _ = handle.join();
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// What a checkpoint round still has to capture.
#[derive(Debug)]
struct Round {
    /// Every bucket was marked when the round began (after a failure): the
    /// round alone holds everything, as a fresh checkpoint must.
    everything: bool,
    /// The round's position: the frame of its first capture (set on the
    /// first turn).
    position: Option<u64>,
    /// The next own segment to capture.
    next_segment: usize,
    /// Copies still to capture: origin and next segment.
    copies: Vec<(String, usize)>,
}

/// How often replica copies' records are swept for retention (their window
/// and maximum).
const COPY_RECORD_SWEEP: std::time::Duration = std::time::Duration::from_secs(1);

struct LogThread {
    state: NodeState,
    settings: LogSettings,
    inbox: Arc<Inbox>,
    durable: watch::Sender<DurableState>,
    stats: Arc<LogStats>,
    commit_metrics: CommitMetrics,
    log: LogWriter,
    witness: std::fs::File,
    /// The checkpoint's files' hash after their last finished round, and
    /// its position.
    checkpoint_hash: Option<(u64, u64)>,
    /// This start's frame, until it is in the log.
    pending_start: Option<Change>,
    dir: PathBuf,
    /// Reused from turn to turn.
    own: OwnChanges,
    captured: Vec<CapturedBucket>,
    round: Option<Round>,
    /// The last durable checkpoint's position.
    checkpoint_position: u64,
    last_round_started: Instant,
    /// When replica copies' records were last swept for retention.
    copy_records_swept: Instant,
    /// When ended windows were last swept for ([`LogThread::sweep_windows`]).
    windows_swept: Instant,
    /// The last sweep stopped at its limit: the next turn sweeps again.
    windows_backlog: bool,
    jobs: Option<mpsc::Sender<Job>>,
    outcomes: mpsc::Receiver<RoundOutcome>,
    checkpointer: Option<std::thread::JoinHandle<Option<u64>>>,
    /// A finished round's outcome is not in yet. No round starts before it
    /// is: a failed round's buckets must be captured again by the next.
    awaiting_outcome: bool,
    /// Every bucket is marked: the next round captures everything.
    next_round_captures_everything: bool,
    /// [`LogWriter::appended_bytes`] when the last round began.
    appended_at_last_round: u64,
    /// Copies dropped whose buckets the next finished round deletes.
    pending_deletes: Vec<String>,
}

/// Wall-clock time in ms since the Unix epoch (0 if the clock is before it).
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

impl LogThread {
    fn run(mut self) -> Result<Stopped, StorageError> {
        let mut next_tick = Instant::now() + self.settings.flush_interval;
        loop {
            let (requests, stopping, crashing) = {
                let mut inbox = self.inbox.state.lock();
                while !(inbox.stop || inbox.wake || !inbox.requests.is_empty()) {
                    if self
                        .inbox
                        .ready
                        .wait_until(&mut inbox, next_tick)
                        .timed_out()
                    {
                        break;
                    }
                }
                inbox.wake = false;
                (std::mem::take(&mut inbox.requests), inbox.stop, inbox.crash)
            };
            if crashing {
                self.close_checkpointer();
                return Ok(Stopped::default());
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + self.settings.flush_interval;
            }
            if stopping {
                return self.finish(requests);
            }
            // Errors are reported to waiters and retried on the next turn.
            let _ = self.turn(requests, false);
        }
    }

    /// One group commit: collect, write, sync, publish, apply; and a step
    /// of the checkpoint round, if one runs.
    fn turn(
        &mut self,
        mut requests: Vec<Request>,
        capture_everything: bool,
    ) -> Result<(), FlushFailed> {
        self.inbox.wake_pending.store(false, Ordering::SeqCst);
        let now_ms = self.state.store.retention_now_ms();
        let forgotten_early = self.state.store.forget_keys(now_ms);
        if forgotten_early > 0 {
            tracing::warn!(
                forgotten_early,
                "idempotency keys forgotten before their retention window ended: the node holds \
                 more than idempotency_max_keys; a retry of one of them would apply again"
            );
        }
        // Replica copies' records, by the same retention as own ones (dated
        // on arrival here). It costs what it forgets, but takes the copies'
        // write lock, which reads share: once a second, not every turn.
        let copies_forgot_early = if self.copy_records_swept.elapsed() >= COPY_RECORD_SWEEP {
            self.copy_records_swept = Instant::now();
            let retention = self.state.store.retention();
            self.state.replicas.forget_records(
                now_ms.saturating_sub(retention.window.as_millis() as u64),
                retention.max_keys,
            )
        } else {
            0
        };
        if copies_forgot_early > 0 {
            tracing::warn!(
                forgotten_early = copies_forgot_early,
                "idempotency keys of a replica copy forgotten before their retention window \
                 ended: the copy holds more than idempotency_max_keys; a retry of one of them \
                 through this node (a restore or a drain of its origin) would apply again"
            );
        }
        // Before the flush: this turn's frame logs what it reclaims.
        let copy_windows = self.sweep_windows(&mut requests);
        self.maybe_start_round();
        let own_capture = match &self.round {
            Some(round) if capture_everything => round.next_segment..SEGMENT_COUNT,
            Some(round) => {
                round.next_segment..(round.next_segment + OWN_SEGMENTS_PER_TURN).min(SEGMENT_COUNT)
            }
            None => 0..0,
        };
        self.captured.clear();
        let store = self.state.store.clone();
        store.begin_flush(&mut self.own, own_capture.clone(), &mut self.captured);
        let last_before = self.log.last_seq();
        if let Some(start) = &self.pending_start {
            self.log.append(start.kind(), |buffer| start.encode(buffer));
        }
        let own_frame = (!self.own.is_empty()).then(|| {
            let own = &self.own;
            self.log
                .append(FrameKind::Own, |buffer| own.encode_into(buffer))
        });
        for request in &requests {
            let change = &request.change;
            self.log
                .append(change.kind(), |buffer| change.encode(buffer));
        }
        let writing = Instant::now();
        let committed = self.log.commit();
        let epoch = self.own.epoch;
        match committed {
            Ok(()) => {
                crate::crash_point::reached("log-synced");
                self.write_witness();
                store.finish_flush(&self.own);
                let now = unix_ms_now();
                if own_frame.is_some() {
                    self.stats.last_flush_unix_ms.store(now, Ordering::Relaxed);
                    // Group commits of increments only (and their own
                    // entries), each once: a failed one is retried.
                    self.commit_metrics
                        .seconds
                        .record(writing.elapsed().as_secs_f64());
                    self.commit_metrics
                        .counters
                        .record(self.own.counts().0 as f64);
                }
                if own_frame.is_some() || !requests.is_empty() {
                    self.stats.commits.fetch_add(1, Ordering::Relaxed);
                }
                self.stats
                    .windows_reclaimed
                    .fetch_add(copy_windows, Ordering::Relaxed);
                self.durable.send_modify(|state| {
                    state.completed_epoch = epoch;
                    state.durable_epoch = epoch;
                    state.error = None;
                });
                {
                    let mut meta = self.state.meta.lock();
                    if let Some(start) = self.pending_start.take() {
                        start.apply(&store, &self.state.replicas, &mut meta);
                        tracing::info!("this start is now recorded in the log");
                    }
                    for request in &requests {
                        request
                            .change
                            .apply(&store, &self.state.replicas, &mut meta);
                    }
                }
                for request in requests {
                    let _ = request.reply.send(Ok(()));
                }
                self.advance_round(
                    own_frame.unwrap_or(last_before),
                    own_capture,
                    capture_everything,
                );
                // After the writers are answered: a durable round's
                // segment deletions are off the acknowledgement path.
                self.take_checkpoint_outcomes(false);
                self.publish_stats();
                Ok(())
            }
            Err(error) => {
                let error = FlushFailed(error.to_string().into());
                tracing::error!(
                    %error,
                    counters = self.own.counts().0,
                    records = self.own.counts().1,
                    requests = requests.len(),
                    "write to the log failed; will retry"
                );
                store.abandon_flush(&self.own);
                self.durable.send_modify(|state| {
                    state.completed_epoch = epoch;
                    state.error = Some(error.0.clone());
                });
                for request in requests {
                    let _ = request.reply.send(Err(error.clone()));
                }
                if self.round.is_some() {
                    // What this turn captured holds changes the log does not:
                    // the round is abandoned, and the next captures all.
                    self.abort_round();
                }
                self.take_checkpoint_outcomes(false);
                self.publish_stats();
                Err(error)
            }
        }
    }

    /// Reclaims the windows that ended by this node's clock, grace and
    /// margin included (`crate::windows`), once per sweep interval (at
    /// once again after a sweep that stopped at its limit):
    ///
    /// - own entries and idempotency records: set to 0 and forgotten in
    ///   memory now, as a delete does ([`Store::reclaim_windows`]), so this
    ///   turn's own frame logs them; replicas get "entry gone" from the next
    ///   change set, and the next checkpoint writes their buckets without
    ///   them (then the log segments holding them go);
    /// - replica copies: their records are forgotten now (as retention
    ///   forgets a copy's records), their entries are erased by an
    ///   `EraseCopies` frame queued with this turn's requests, applied once
    ///   durable as any other.
    ///
    /// Returns the copies' windows, to count once the turn is durable.
    fn sweep_windows(&mut self, requests: &mut Vec<Request>) -> u64 {
        let windows = self.state.store.windows();
        if !self.windows_backlog && self.windows_swept.elapsed() < windows.sweep_interval() {
            return 0;
        }
        self.windows_swept = Instant::now();
        let now_ms = windows.now_ms();
        let horizon = windows.reclaim_horizon(now_ms);
        let limit = crate::windows::MAX_RECLAIMED_PER_SWEEP;
        let own = self.state.store.reclaim_windows(horizon, limit);
        let copies = self.state.replicas.reclaim_windows(horizon, limit);
        self.windows_backlog = own >= limit || copies.windows >= limit;
        self.stats
            .windows_reclaimed
            .fetch_add(own as u64, Ordering::Relaxed);
        if own > 0 || copies.windows > 0 {
            tracing::debug!(
                own_windows = own,
                copy_windows = copies.windows,
                copy_counters = copies.counters.len(),
                copy_records = copies.records,
                ended_by_ms = horizon,
                "reclaimed ended windows"
            );
        }
        if !copies.counters.is_empty() {
            // Nobody waits for it: a failed write leaves the counters in the
            // copies, and still listed, for the next sweep.
            let (reply, _) = oneshot::channel();
            requests.push(Request {
                change: Change::EraseCopies {
                    counters: copies.counters,
                },
                reply,
            });
        }
        copies.windows as u64
    }

    /// Starts a checkpoint round if none runs and the log has grown enough,
    /// or enough time passed with changes.
    fn maybe_start_round(&mut self) {
        if self.round.is_some() || self.awaiting_outcome || self.jobs.is_none() {
            return;
        }
        let logged_since = self.log.last_seq() > self.checkpoint_position;
        // Bytes written since the last round began, not the log's size: the
        // segment being written is never deleted, and may alone be larger
        // than the threshold.
        let written = self.log.appended_bytes() - self.appended_at_last_round;
        let due = logged_since
            && (written >= self.settings.checkpoint_bytes
                || self.last_round_started.elapsed() >= self.settings.checkpoint_interval);
        if !due {
            return;
        }
        // sled must never meet a full disk in the middle of a round (what
        // it leaves then may not open again): a round starts only with
        // room for twice the checkpoint, and the log keeps everything
        // meanwhile.
        match self.room_for_checkpoint() {
            Ok(()) => self.start_round(),
            Err(message) => {
                self.last_round_started = Instant::now();
                tracing::warn!("checkpoint postponed: {message}");
            }
        }
    }

    /// Whether the disk has room for a checkpoint round.
    fn room_for_checkpoint(&self) -> Result<(), String> {
        let checkpoint_bytes =
            crate::storage::sled_files_bytes(&self.dir.join(checkpoint::CHECKPOINT_DIR))
                .map_err(|error| format!("cannot size the checkpoint: {error}"))?;
        let needed = (2 * checkpoint_bytes).max(MIN_CHECKPOINT_ROOM);
        let stat = nix::sys::statvfs::statvfs(&self.dir)
            .map_err(|error| format!("cannot read the free space: {error}"))?;
        let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
        if free < needed {
            return Err(format!(
                "{free} bytes free, {needed} needed (twice the checkpoint's {checkpoint_bytes})"
            ));
        }
        Ok(())
    }

    fn start_round(&mut self) {
        self.last_round_started = Instant::now();
        self.appended_at_last_round = self.log.appended_bytes();
        let everything = std::mem::take(&mut self.next_round_captures_everything);
        tracing::info!(
            log_bytes = self.log.bytes(),
            last_frame = self.log.last_seq(),
            "checkpoint started"
        );
        self.round = Some(Round {
            everything,
            position: None,
            next_segment: 0,
            copies: self
                .state
                .replicas
                .origins()
                .into_iter()
                .map(|origin| (origin, 0))
                .collect(),
        });
    }

    /// After a durable turn: hands this turn's captures to the checkpoint
    /// thread, captures a step of the copies, and finishes the round once
    /// everything is captured. `position` is the frame the own capture
    /// reflects.
    fn advance_round(
        &mut self,
        position: u64,
        own_capture: std::ops::Range<usize>,
        capture_everything: bool,
    ) {
        let Some(round) = &mut self.round else {
            return;
        };
        let Some(jobs) = &self.jobs else {
            return;
        };
        round.position.get_or_insert(position);
        if !own_capture.is_empty() {
            round.next_segment = own_capture.end;
            if !self.captured.is_empty() {
                let buckets = std::mem::take(&mut self.captured);
                let _ = jobs.send(Job::Buckets {
                    origin: None,
                    buckets,
                });
            }
        }
        if round.next_segment < SEGMENT_COUNT {
            return;
        }
        // The copies, after the own segments: they change only in this
        // thread, so a capture between turns is exactly what the log holds.
        let mut steps = 0;
        while let Some((origin, next)) = round.copies.first_mut() {
            if steps > 0 && !capture_everything {
                return;
            }
            steps += 1;
            let end = if capture_everything {
                SEGMENT_COUNT
            } else {
                (*next + COPY_SEGMENTS_PER_TURN).min(SEGMENT_COUNT)
            };
            let mut buckets = Vec::new();
            self.state
                .replicas
                .capture(origin, *next..end, &mut buckets);
            if !buckets.is_empty() {
                let _ = jobs.send(Job::Buckets {
                    origin: Some(origin.clone()),
                    buckets,
                });
            }
            *next = end;
            if end == SEGMENT_COUNT {
                round.copies.remove(0);
            }
        }
        // Everything captured: dropped copies' buckets go, then the
        // metadata with the round's position.
        self.pending_deletes
            .extend(self.state.replicas.take_dropped());
        for origin in &self.pending_deletes {
            let _ = jobs.send(Job::DeleteCopy(origin.clone()));
        }
        let meta = CheckpointMeta {
            format_version: FORMAT_VERSION,
            position: round.position.unwrap_or(position),
            node: self.state.meta.lock().clone(),
            copies: self.state.replicas.stamps().into_iter().collect(),
        };
        let _ = jobs.send(Job::Finish {
            meta: Box::new(meta),
            everything: round.everything,
        });
        self.round = None;
        self.awaiting_outcome = true;
    }

    /// Marks every bucket: the next round captures everything.
    fn mark_everything(&mut self) {
        self.state.store.mark_all_for_checkpoint();
        self.state.replicas.mark_all_for_checkpoint();
        self.next_round_captures_everything = true;
    }

    fn abort_round(&mut self) {
        self.round = None;
        self.mark_everything();
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Job::Abort);
            self.awaiting_outcome = true;
        }
    }

    /// Takes the checkpoint thread's outcomes (with `wait`, waits for the
    /// one awaited, if any): a durable round lets the log segments it
    /// covers go.
    fn take_checkpoint_outcomes(&mut self, wait: bool) {
        loop {
            let wait = wait && self.awaiting_outcome;
            let outcome = if wait {
                match self.outcomes.recv() {
                    Ok(outcome) => outcome,
                    Err(_) => return,
                }
            } else {
                match self.outcomes.try_recv() {
                    Ok(outcome) => outcome,
                    Err(_) => return,
                }
            };
            // A close between rounds answers no round: one may be on its
            // way to the checkpoint thread already.
            if !matches!(
                outcome,
                RoundOutcome::Closed { .. } | RoundOutcome::CloseFailed(_)
            ) {
                self.awaiting_outcome = false;
            }
            match outcome {
                RoundOutcome::Done { position, hash } => {
                    self.checkpoint_position = position;
                    self.checkpoint_hash = hash.map(|hash| (hash, position));
                    // Recorded before any segment goes: a start after a
                    // crash then opens the checkpoint without a copy.
                    self.write_witness();
                    self.pending_deletes.clear();
                    self.stats
                        .checkpoint_position
                        .store(position, Ordering::Relaxed);
                    self.stats
                        .last_checkpoint_unix_ms
                        .store(unix_ms_now(), Ordering::Relaxed);
                    self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                    match self.log.drop_through(position) {
                        Ok(dropped) => tracing::info!(
                            position,
                            segments_deleted = dropped,
                            "checkpoint finished"
                        ),
                        Err(error) => {
                            tracing::warn!(%error, position, "cannot delete log segments a checkpoint covers")
                        }
                    }
                    self.publish_stats();
                }
                RoundOutcome::Failed(error) | RoundOutcome::CloseFailed(error) => {
                    self.stats
                        .checkpoint_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "checkpoint failed; the log keeps everything and the next checkpoint writes every bucket");
                    self.mark_everything();
                }
                RoundOutcome::Aborted => {}
                RoundOutcome::Closed { hash } => {
                    // Closing rewrote sled's files; a start after a crash
                    // still opens them without a copy.
                    if let Some((_, position)) = self.checkpoint_hash {
                        self.checkpoint_hash = Some((hash, position));
                        self.write_witness();
                    }
                    // Not an answer to a round.
                    continue;
                }
            }
        }
    }

    /// Records the last durable frame and the checkpoint's hash in the
    /// witness file.
    fn write_witness(&self) {
        let witness = Witness {
            logged: self.log.last_seq(),
            checkpoint: self.checkpoint_hash,
        };
        if let Err(error) = witness.write(&self.witness) {
            // The frames are durable whatever happens here: a stale witness
            // only weakens the next start's check.
            tracing::warn!(%error, "cannot update the witness file");
        }
    }

    fn publish_stats(&self) {
        self.stats
            .last_seq
            .store(self.log.last_seq(), Ordering::Relaxed);
        self.stats
            .log_bytes
            .store(self.log.bytes(), Ordering::Relaxed);
        self.stats
            .log_segments
            .store(self.log.segment_count() as u64, Ordering::Relaxed);
    }

    /// The last turns at a stop: what is queued, then a checkpoint of
    /// everything not yet checkpointed, waited for.
    fn finish(mut self, requests: Vec<Request>) -> Result<Stopped, StorageError> {
        let last = self.turn(requests, false);
        // Requests that came while the thread stopped are refused.
        for request in std::mem::take(&mut self.inbox.state.lock().requests) {
            let _ = request
                .reply
                .send(Err(FlushFailed("the node is shutting down".into())));
        }
        if let Err(error) = last {
            self.close_checkpointer();
            return Err(StorageError::Io {
                dir: self.dir.clone(),
                reason: std::io::Error::other(error.to_string()),
            });
        }
        // A round in flight finishes first (it may have begun at an earlier
        // frame); then one more covers the rest, so that a start after this
        // stop replays nothing.
        self.take_checkpoint_outcomes(true);
        for _ in 0..2 {
            if self.log.last_seq() <= self.checkpoint_position || self.jobs.is_none() {
                break;
            }
            if let Err(message) = self.room_for_checkpoint() {
                // The log keeps everything; sled must not meet a full disk.
                tracing::warn!("no last checkpoint: {message}");
                break;
            }
            if self.round.is_none() {
                self.start_round();
            }
            if self.turn(Vec::new(), true).is_err() {
                break;
            }
            self.take_checkpoint_outcomes(true);
        }
        let position = self.checkpoint_position;
        let checkpoint_hash = self.close_checkpointer().map(|hash| (hash, position));
        Ok(Stopped {
            last_seq: self.log.last_seq(),
            checkpoint_hash,
        })
    }

    /// Stops the checkpoint thread; returns its files' hash once closed.
    fn close_checkpointer(&mut self) -> Option<u64> {
        self.jobs = None;
        self.checkpointer
            .take()
            .and_then(|thread| thread.join().ok().flatten())
    }
}
