//! Write-behind: the task that moves changed entries from the in-memory
//! [`Store`] to [`Storage`], one sled batch and one fsync per flush.
//!
//! In sync mode a writer wakes the flusher and waits for the flush that
//! contains its change (see the epoch argument in [`crate::store`]). While one
//! flush runs, the next group of writers gathers, so one fsync serves many
//! increments: group commit, without a timer adding latency when idle. In
//! async mode writers return at once and the flusher runs every flush
//! interval. Both modes also flush on the interval so that a failed flush is
//! retried.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;

use crate::config::Durability;
use crate::storage::{Storage, StorageError};
use crate::store::Store;

/// The result of the latest flush, as waiters see it.
#[derive(Debug, Clone, Default)]
struct FlushState {
    /// Every change stamped with this epoch or an earlier one has been
    /// collected by a finished flush (successful or not).
    completed_epoch: u64,
    /// Every change stamped with this epoch or an earlier one is on disk: the
    /// last successful flush's epoch. A failed flush re-marks its changes
    /// dirty before the next flush begins, so a later success covers them.
    durable_epoch: u64,
    /// Why the latest flush failed, if it did.
    error: Option<Arc<str>>,
    /// Unix time in ms of the latest successful flush that wrote something.
    last_flush_unix_ms: i64,
    /// Sequence number of the latest flush on disk.
    flush_sequence: u64,
}

/// A flush failed: the changes are in memory, not on disk. They stay dirty
/// and the next flush writes them again.
#[derive(Debug, Clone, thiserror::Error)]
#[error("flush to disk failed: {0}")]
pub struct FlushFailed(Arc<str>);

/// Handle to the running flusher task.
#[derive(Debug)]
pub struct Flusher {
    durability: Durability,
    data_dir: std::path::PathBuf,
    wake: Arc<Notify>,
    state: watch::Receiver<FlushState>,
    /// Taken by [`Flusher::stop`]; behind a mutex so that stopping needs no
    /// exclusive ownership (a request task may still hold a reference while
    /// the server winds down).
    running: parking_lot::Mutex<Option<Running>>,
}

/// The flusher task and the way to stop it.
#[derive(Debug)]
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), StorageError>>,
}

impl Flusher {
    /// Starts the flusher task on the current tokio runtime.
    pub fn start(
        store: Arc<Store>,
        storage: Arc<Storage>,
        durability: Durability,
        flush_interval: Duration,
    ) -> Self {
        let wake = Arc::new(Notify::new());
        let (state_sender, state) = watch::channel(FlushState::default());
        let (stop, stop_receiver) = oneshot::channel();
        let data_dir = storage.dir().to_path_buf();
        let task = tokio::spawn(flush_loop(
            store,
            storage,
            wake.clone(),
            state_sender,
            stop_receiver,
            flush_interval,
        ));
        Flusher {
            durability,
            data_dir,
            wake,
            state,
            running: parking_lot::Mutex::new(Some(Running { stop, task })),
        }
    }

    /// Returns when changes stamped with `epoch` are durable by this node's
    /// durability mode: at once in async mode, after their flush in sync mode.
    pub async fn wait_durable(&self, epoch: u64) -> Result<(), FlushFailed> {
        if epoch == 0 || self.durability == Durability::Async {
            return Ok(());
        }
        self.wait_flushed(epoch).await
    }

    /// Returns when changes stamped with `epoch` are on disk, whatever the
    /// durability mode.
    pub async fn wait_flushed(&self, epoch: u64) -> Result<(), FlushFailed> {
        if epoch == 0 {
            return Ok(());
        }
        self.wake.notify_one();
        let mut state = self.state.clone();
        let state = state
            .wait_for(|state| state.completed_epoch >= epoch)
            .await
            .map_err(|_| FlushFailed("the node is shutting down".into()))?;
        if state.durable_epoch >= epoch {
            return Ok(());
        }
        Err(FlushFailed(
            state.error.clone().unwrap_or_else(|| "flush failed".into()),
        ))
    }

    /// Unix time in ms of the last flush that wrote something, 0 if none yet.
    pub fn last_flush_unix_ms(&self) -> i64 {
        self.state.borrow().last_flush_unix_ms
    }

    /// Sequence number of the last flush on disk, 0 if none since start.
    pub fn flush_sequence(&self) -> u64 {
        self.state.borrow().flush_sequence
    }

    /// Stops the task after one last flush, and returns that flush's result.
    /// Waiters still pending get their answer from that flush. A second call
    /// returns at once.
    pub async fn stop(&self) -> Result<(), StorageError> {
        let Some(Running { stop, task }) = self.running.lock().take() else {
            return Ok(());
        };
        let _ = stop.send(());
        task.await.unwrap_or_else(|join_error| {
            Err(StorageError::Damaged {
                dir: self.data_dir.clone(),
                message: format!("flusher task failed: {join_error}"),
            })
        })
    }
}

async fn flush_loop(
    store: Arc<Store>,
    storage: Arc<Storage>,
    wake: Arc<Notify>,
    state: watch::Sender<FlushState>,
    mut stop: oneshot::Receiver<()>,
    flush_interval: Duration,
) -> Result<(), StorageError> {
    let mut interval = tokio::time::interval(flush_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            () = wake.notified() => {}
            _ = interval.tick() => {}
        }
        // Errors are reported to waiters and retried; keep serving.
        let _ = flush_once(&store, &storage, &state).await;
    }
    flush_once(&store, &storage, &state).await
}

async fn flush_once(
    store: &Arc<Store>,
    storage: &Arc<Storage>,
    state: &watch::Sender<FlushState>,
) -> Result<(), StorageError> {
    // Forgetting old idempotency keys rides on the flush that removes them
    // from disk.
    let forgotten_early = store.forget_keys(unix_ms_now());
    if forgotten_early > 0 {
        tracing::warn!(
            forgotten_early,
            "idempotency keys forgotten before their retention window ended: the node holds \
             more than idempotency_max_keys; a retry of one of them would apply again"
        );
    }
    let snapshot = store.begin_flush();
    if snapshot.is_empty() {
        state.send_modify(|state| {
            state.completed_epoch = snapshot.epoch;
            state.durable_epoch = snapshot.epoch;
            state.error = None;
        });
        return Ok(());
    }
    // Shared with the blocking task so that it is still here to re-mark
    // dirty even if that task dies.
    let snapshot = Arc::new(snapshot);
    let written = {
        let writer = storage.clone();
        let snapshot = snapshot.clone();
        tokio::task::spawn_blocking(move || writer.write(&snapshot))
            .await
            .unwrap_or_else(|join_error| {
                Err(StorageError::Damaged {
                    dir: storage.dir().to_path_buf(),
                    message: format!("flush task failed: {join_error}"),
                })
            })
    };
    match written {
        Ok(()) => {
            store.finish_flush(&snapshot);
            let now = unix_ms_now() as i64;
            let sequence = storage.sequence();
            state.send_modify(|state| {
                state.completed_epoch = snapshot.epoch;
                state.durable_epoch = snapshot.epoch;
                state.error = None;
                state.last_flush_unix_ms = now;
                state.flush_sequence = sequence;
            });
            Ok(())
        }
        Err(error) => {
            tracing::error!(
                %error,
                entries = snapshot.entries.len(),
                records = snapshot.records.len(),
                "flush failed; will retry"
            );
            store.abandon_flush(&snapshot);
            state.send_modify(|state| {
                state.completed_epoch = snapshot.epoch;
                state.error = Some(error.to_string().into());
            });
            Err(error)
        }
    }
}

/// Wall-clock time in ms since the Unix epoch (0 if the clock is before it).
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}
