//! A shard node's data directory: what is in it, how a node opens it
//! (recovery), checks it ([`verify`]) and leaves it ([`Storage::close`]).
//!
//! # Layout (format version 3)
//!
//! ```text
//! DATA_DIR/
//!   LOCK         an OS file lock, held while a node runs (released if it dies)
//!   TALLY        marker: format version, node id, setting_up or ready
//!   LOGGED       witness: the last log frame known durable, and a hash of
//!                the checkpoint's files as its last finished round left them
//!   log/         the log (crate::log): every change, checksummed
//!   checkpoint/  the checkpoint (crate::checkpoint): sled, the state as of a
//!                log position
//! ```
//!
//! A directory is used only if it is empty (a new node; `lost+found` aside)
//! or has the marker: anything else is refused untouched. Set-up is
//! two-phase: the marker is written `setting_up` first, then the log with
//! its first frame (`Created`, with the directory's random id), then the
//! witness, then the marker turns `ready`; an interrupted set-up starts over.
//! A directory of format version 2 (sled alone) is migrated at its first
//! start ([`crate::legacy`]).
//!
//! # Recovery
//!
//! 1. The checkpoint is loaded into memory. If its files hash as the
//!    witness recorded after the last finished round (always so after a
//!    clean stop), they are opened in place; otherwise a scratch copy of
//!    them (`DATA_DIR/check.tmp`) is opened and loaded, and the files
//!    themselves are left for the checkpoint thread: sled rewrites files it
//!    opens, so damaged files must not be opened before they are known to
//!    be sound.
//! 2. The log is read from the checkpoint's position: every frame after it
//!    is applied again (frames carry absolute values). A torn tail is cut;
//!    a bad frame before the tail, a gap after the checkpoint, or a log that
//!    ends before the witness's frame is damage: the node refuses to start
//!    with one line naming the directory, and changes nothing.
//! 3. A `Start` frame numbers this start (the incarnation) before serving.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::change::Change;
use crate::checkpoint::{self, Checkpoint, CHECKPOINT_DIR};
use crate::journal::NodeState;
use crate::log::{self, Frame, FrameKind, LogEnd, LogError, LogWriter, LOG_DIR};
use crate::meta::{DrainState, NodeMeta};
use crate::replicas::Replicas;
use crate::store::{KeyRetention, OwnChanges, Store};

/// Version of the on-disk format this build writes and reads.
pub const FORMAT_VERSION: u64 = 3;
const LOCK_FILE: &str = "LOCK";
const MARKER_FILE: &str = "TALLY";
const WITNESS_FILE: &str = "LOGGED";
/// Entries of a data directory that do not make it someone else's: our own
/// lock and half-written marker, and the directory a fresh filesystem has.
const IGNORED_ENTRIES: [&str; 3] = [LOCK_FILE, "TALLY.tmp", "lost+found"];
/// Where the start-up check recovers its scratch copy of the checkpoint,
/// inside the data directory: on the same filesystem, which the node can
/// always write.
const CHECK_DIR: &str = "check.tmp";

/// Why a data directory cannot be used. Every variant names the directory.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Another live process holds the directory's lock.
    #[error("data directory {dir} is in use by another process (lock file {dir}/LOCK is held)")]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// The directory has files but no Tally marker.
    #[error(
        "data directory {dir} is not empty and has no TALLY marker file, so it is not a tally data \
         directory; refusing to touch it (a new node needs an empty or missing directory)"
    )]
    Foreign {
        /// The directory.
        dir: PathBuf,
    },
    /// The directory belongs to another node.
    #[error("data directory {dir} belongs to node {found:?}, not {expected:?}")]
    WrongNode {
        /// The directory.
        dir: PathBuf,
        /// The node id stored in it.
        found: String,
        /// The node id of this process.
        expected: String,
    },
    /// The directory cannot be read or written.
    #[error("data directory {dir}: {reason}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// Why. Not a `source`: the message already says it, once.
        reason: std::io::Error,
    },
    /// A file does not decode or is of an unknown format.
    #[error("data directory {dir} is unreadable or damaged: {message}")]
    Damaged {
        /// The directory.
        dir: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The check before opening found the directory damaged; its files were
    /// not touched.
    #[error(
        "data directory {dir} is damaged: {problem}; refusing to start and leaving its files as \
         they are (restore it from a backup, or move it aside to start the node empty; \
         `tally-shard verify {dir}` reports what it holds)"
    )]
    Refused {
        /// The directory.
        dir: PathBuf,
        /// What the check found.
        problem: String,
    },
}

/// What a data directory holds, as [`verify`] or a start found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectoryReport {
    /// The node the directory belongs to.
    pub node_id: String,
    /// The directory's format version (an older one is migrated at start).
    pub format_version: u64,
    /// Non-zero entries of this node.
    pub entries: u64,
    /// Entries of replica copies of other nodes.
    pub foreign_entries: u64,
    /// Idempotency records.
    pub records: u64,
    /// The last log frame the checkpoint covers.
    pub checkpoint_position: u64,
    /// The last whole frame of the log.
    pub last_seq: u64,
    /// The last frame known durable (the witness).
    pub witnessed: u64,
    /// Frames read from the log.
    pub log_frames: u64,
    /// Bytes of log.
    pub log_bytes: u64,
    /// Bytes after the last whole frame: a torn write, cut at the next start.
    pub torn_bytes: u64,
    /// Whether the checkpoint's files are as its last finished round (or a
    /// clean stop) left them, so a start opens them without a copy check.
    pub checkpoint_unchanged: bool,
    /// The directory was created empty and its own entries await a
    /// restore from replicas.
    pub awaiting_restore: bool,
    /// Where a drain of this node stands.
    pub drain: DrainState,
    /// Drained nodes this node adopted, or whose copy it dropped.
    pub retired: Vec<String>,
}

impl DirectoryReport {
    /// What a recovery (a start's or `verify`'s) found.
    fn recovered(
        store: &Store,
        replicas: &Replicas,
        meta: &NodeMeta,
        position: u64,
        end: &LogEnd,
        witness: &Witness,
        checkpoint_unchanged: bool,
    ) -> DirectoryReport {
        DirectoryReport {
            node_id: meta.node_id.clone(),
            format_version: FORMAT_VERSION,
            entries: store.entry_count(),
            foreign_entries: replicas.entry_count(),
            records: store.remembered_keys(),
            checkpoint_position: position,
            last_seq: end.last_seq,
            witnessed: witness.logged,
            log_frames: end.frames,
            log_bytes: end.bytes,
            torn_bytes: end.torn_bytes,
            checkpoint_unchanged,
            awaiting_restore: meta.awaiting_restore,
            drain: meta.drain.clone(),
            retired: meta.retired.keys().cloned().collect(),
        }
    }
}

/// The `LOGGED` file: the last log frame known durable, and the hash of the
/// checkpoint's files as the last finished round left them (0: unknown)
/// with that round's position.
/// Fixed width, written in place after every commit, without an fsync of
/// its own: after a power loss it may lag the log, never lead it, which
/// only weakens the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Witness {
    /// The last durable frame.
    pub logged: u64,
    /// The checkpoint files' hash after its last finished round, and that
    /// round's position.
    pub checkpoint: Option<(u64, u64)>,
}

impl Witness {
    /// A witness with no checkpoint hash.
    pub fn running(logged: u64) -> Self {
        Witness {
            logged,
            checkpoint: None,
        }
    }

    fn encode(self) -> String {
        // 0 is never a hash we record: `hash_sled_files` avoids it.
        let (hash, position) = self.checkpoint.unwrap_or((0, 0));
        format!(
            "logged {:020} checkpoint {hash:016x} position {position:020}\n",
            self.logged
        )
    }

    /// Writes it in place.
    pub fn write(self, file: &File) -> std::io::Result<()> {
        file.write_all_at(self.encode().as_bytes(), 0)
    }

    fn read(dir: &Path) -> Result<Witness, StorageError> {
        let refused = |problem: String| StorageError::Refused {
            dir: dir.to_path_buf(),
            problem,
        };
        let text = match std::fs::read_to_string(dir.join(WITNESS_FILE)) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(refused(format!("{WITNESS_FILE} is missing")))
            }
            Err(reason) => {
                return Err(StorageError::Io {
                    dir: dir.to_path_buf(),
                    reason,
                })
            }
        };
        let parse = || {
            let words: Vec<&str> = text.strip_suffix('\n')?.split(' ').collect();
            let ["logged", logged, "checkpoint", hash, "position", position] = words[..] else {
                return None;
            };
            let hash = u64::from_str_radix(hash, 16).ok()?;
            let position: u64 = position.parse().ok()?;
            Some(Witness {
                logged: logged.parse().ok()?,
                checkpoint: (hash != 0).then_some((hash, position)),
            })
        };
        parse().ok_or_else(|| refused(format!("{WITNESS_FILE} is unreadable: {text:?}")))
    }
}

/// An open data directory: held locked for the life of the node.
#[derive(Debug)]
pub struct Storage {
    dir: PathBuf,
    /// Held for the life of the process: the OS drops the lock if we crash.
    _lock: File,
}

/// A data directory opened and recovered: everything a node needs to serve.
pub struct Recovered {
    /// The directory, locked.
    pub storage: Storage,
    /// The counters, copies and metadata, as the log holds them.
    pub state: NodeState,
    /// The log, open for writing after its last frame.
    pub log: LogWriter,
    /// The witness file.
    pub witness: File,
    /// The checkpoint database, if it was opened in place.
    pub checkpoint: Option<Checkpoint>,
    /// The checkpoint's position.
    pub checkpoint_position: u64,
    /// The checkpoint files' hash after its last finished round and that
    /// round's position, if they are still as it left them.
    pub checkpoint_hash: Option<(u64, u64)>,
    /// This start's frame, if it could not be written yet (a full disk):
    /// the log thread writes it first.
    pub pending_start: Option<Change>,
    /// What the directory held.
    pub report: DirectoryReport,
}

impl Storage {
    /// Opens (or creates) the data directory of `node_id` and recovers its
    /// state. Blocking.
    pub fn open(
        dir: &Path,
        node_id: &str,
        retention: KeyRetention,
        segment_bytes: u64,
    ) -> Result<Recovered, StorageError> {
        let io = |reason| StorageError::Io {
            dir: dir.to_path_buf(),
            reason,
        };
        // Look before touching anything: a directory that is not ours is
        // left exactly as it was, not even a lock file added.
        inspect(dir, node_id)?;
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = lock(dir)?;
        // Look again under the lock: another process may have set the
        // directory up between the first look and the lock.
        let marker = inspect(dir, node_id)?;
        if let Err(error) = write_pid(&lock) {
            // Only a help for operators; a full disk must not stop a start.
            tracing::warn!(dir = %dir.display(), %error, "cannot write the pid into the lock file");
        }
        match marker {
            Some(Marker {
                state: MarkerState::Ready,
                format_version: FORMAT_VERSION,
                ..
            }) => {}
            Some(Marker {
                state: MarkerState::Ready,
                format_version: crate::legacy::FORMAT_VERSION,
                ..
            }) => crate::legacy::migrate(dir, node_id)?,
            _ => set_up(dir, node_id)?,
        }
        // What an interrupted migration, check or checkpoint replacement
        // may have left.
        crate::legacy::remove_leftovers(dir).map_err(io)?;
        remove_dir_if_present(&dir.join(CHECK_DIR)).map_err(io)?;
        checkpoint::settle_directories(dir).map_err(io)?;

        let witness = Witness::read(dir)?;
        let checkpoint_dir = dir.join(CHECKPOINT_DIR);
        let unchanged = checkpoint_unchanged(dir, &witness)?;
        // sled rewrites files it opens: the log is checked through first, so
        // that a directory refused for a damaged log is left untouched. The
        // witness's position is the checkpoint's only if its files are as
        // that round left them.
        let recorded_position = match witness.checkpoint {
            Some((_, position)) if unchanged => position,
            _ => log::UNKNOWN_POSITION,
        };
        check_log(dir, recorded_position, witness.logged)?;
        let open_in_place = || {
            let store = Store::with_retention(retention);
            let replicas = Replicas::default();
            let opened =
                Checkpoint::open(&checkpoint_dir).map_err(|error| StorageError::Damaged {
                    dir: dir.to_path_buf(),
                    message: format!("the checkpoint cannot be opened: {error}"),
                })?;
            let loaded = opened
                .load(&store, &replicas)
                .map_err(|problem| refused(dir, problem))?;
            Ok::<_, StorageError>((store, replicas, Some(opened), loaded))
        };
        let (store, replicas, checkpoint, loaded) = if !checkpoint_dir.exists() {
            (
                Store::with_retention(retention),
                Replicas::default(),
                None,
                checkpoint::Loaded::default(),
            )
        } else if unchanged {
            open_in_place()?
        } else {
            tracing::info!(dir = %dir.display(), "the checkpoint changed since its last round; checking a copy before opening");
            let store = Store::with_retention(retention);
            let replicas = Replicas::default();
            match load_copy(dir, &dir.join(CHECK_DIR), &store, &replicas) {
                Ok(loaded) => (store, replicas, None, loaded),
                Err(StorageError::Io { reason, .. }) if no_space(&reason) => {
                    // A full disk must not keep the node down: its log is
                    // checked, and a checkpoint that does not hold what the
                    // log lacks is still found (the log would start after
                    // its position). Only the promise that damaged
                    // checkpoint files are left untouched is given up.
                    tracing::warn!(dir = %dir.display(), %reason, "no room for a copy of the checkpoint; opening it in place");
                    open_in_place()?
                }
                Err(error) => return Err(error),
            }
        };
        let (position, mut meta) = checkpoint_meta(dir, node_id, loaded.meta)?;
        let end = replay_log(dir, position, witness.logged, &store, &replicas, &mut meta)?;
        store.finish_loading();
        store.date_records_from(meta.last_takeover);

        let mut log = LogWriter::open(&dir.join(LOG_DIR), &end, segment_bytes).map_err(io)?;
        if end.torn_bytes > 0 {
            tracing::warn!(dir = %dir.display(), torn_bytes = end.torn_bytes, last_frame = end.last_seq, "cut a torn write at the end of the log");
        }
        // Number this start, durably, before serving. On a full disk the
        // node still starts (reads work); the log thread records the start
        // before anything else, and until then the node hands out no
        // replication versions (see `Store::set_incarnation`).
        let incarnation = meta.next_incarnation();
        let start = Change::Start { incarnation };
        log.append(start.kind(), |buffer| start.encode(buffer));
        let pending_start = match log.commit() {
            Ok(()) => {
                start.apply(&store, &replicas, &mut meta);
                None
            }
            Err(reason) if no_space(&reason) => {
                tracing::warn!(dir = %dir.display(), %reason, "no room to record this start in the log; serving reads, and recording it once there is room");
                Some(start)
            }
            Err(reason) => return Err(io(reason)),
        };
        store.set_incarnation(incarnation);
        let witness_file = File::options()
            .read(true)
            .write(true)
            .open(dir.join(WITNESS_FILE))
            .map_err(io)?;
        let checkpoint_hash = witness.checkpoint.filter(|_| unchanged);
        Witness {
            logged: log.last_seq(),
            checkpoint: checkpoint_hash,
        }
        .write(&witness_file)
        .map_err(io)?;
        let report = DirectoryReport::recovered(
            &store, &replicas, &meta, position, &end, &witness, unchanged,
        );
        Ok(Recovered {
            storage: Storage {
                dir: dir.to_path_buf(),
                _lock: lock,
            },
            state: NodeState {
                store: Arc::new(store),
                replicas: Arc::new(replicas),
                meta: Arc::new(parking_lot::Mutex::new(meta)),
            },
            log,
            witness: witness_file,
            checkpoint,
            checkpoint_position: position,
            checkpoint_hash,
            pending_start,
            report,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Releases the directory after a stop. With `checkpoint_hash` (the
    /// checkpoint's files after the last round, closed, and its position),
    /// the next start opens them without a copy check. Blocking.
    pub fn close(
        self,
        last_seq: u64,
        checkpoint_hash: Option<(u64, u64)>,
    ) -> Result<(), StorageError> {
        let io = |reason| StorageError::Io {
            dir: self.dir.clone(),
            reason,
        };
        let file = File::options()
            .write(true)
            .open(self.dir.join(WITNESS_FILE))
            .map_err(io)?;
        Witness {
            logged: last_seq,
            checkpoint: checkpoint_hash,
        }
        .write(&file)
        .and_then(|()| file.sync_all())
        .map_err(io)
    }
}

fn refused(dir: &Path, problem: String) -> StorageError {
    StorageError::Refused {
        dir: dir.to_path_buf(),
        problem,
    }
}

/// The checkpoint's position and the node's metadata, checked against
/// this node and this build; a directory never checkpointed starts at 0.
fn checkpoint_meta(
    dir: &Path,
    node_id: &str,
    meta: Option<checkpoint::CheckpointMeta>,
) -> Result<(u64, NodeMeta), StorageError> {
    let Some(meta) = meta else {
        return Ok((
            0,
            NodeMeta {
                node_id: node_id.to_string(),
                ..NodeMeta::default()
            },
        ));
    };
    if meta.format_version != FORMAT_VERSION {
        return Err(refused(
            dir,
            format!(
                "its checkpoint is of format version {}, this build reads version {FORMAT_VERSION}",
                meta.format_version
            ),
        ));
    }
    if meta.node.node_id != node_id {
        return Err(StorageError::WrongNode {
            dir: dir.to_path_buf(),
            found: meta.node.node_id,
            expected: node_id.to_string(),
        });
    }
    Ok((meta.position, meta.node))
}

/// Applies one log frame to memory (recovery).
fn replay(
    frame: Frame<'_>,
    store: &Store,
    replicas: &Replicas,
    meta: &mut NodeMeta,
) -> Result<(), String> {
    match frame.kind {
        FrameKind::Own => {
            let (counters, records) =
                OwnChanges::decode(frame.body).map_err(|error| error.to_string())?;
            for logged in counters {
                for (stripe, value) in logged.stripes {
                    store.replay(logged.counter, u32::from(stripe), value);
                }
            }
            for logged in records {
                store.replay_record(logged.key, logged.record);
            }
        }
        kind => Change::decode(kind, frame.body)
            .map_err(|error| error.to_string())?
            .apply(store, replicas, meta),
    }
    Ok(())
}

/// Whether an I/O error means the disk (or the process's file size limit)
/// has no room.
pub(crate) fn no_space(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::StorageFull
            | std::io::ErrorKind::QuotaExceeded
            | std::io::ErrorKind::FileTooLarge
    )
}

/// Reads the log through, checking every frame, without applying any.
fn check_log(dir: &Path, position: u64, witnessed: u64) -> Result<LogEnd, StorageError> {
    // Frames are decoded (not applied) so that a frame that checks out but
    // does not decode is found too.
    scan_log(dir, position, witnessed, |frame| match frame.kind {
        FrameKind::Own => OwnChanges::decode(frame.body)
            .map(drop)
            .map_err(|error| error.to_string()),
        kind => Change::decode(kind, frame.body)
            .map(drop)
            .map_err(|error| error.to_string()),
    })
}

/// Reads the log after `position` into memory.
fn replay_log(
    dir: &Path,
    position: u64,
    witnessed: u64,
    store: &Store,
    replicas: &Replicas,
    meta: &mut NodeMeta,
) -> Result<LogEnd, StorageError> {
    scan_log(dir, position, witnessed, |frame| {
        replay(frame, store, replicas, meta)
    })
}

/// [`log::scan`] of the directory's log, its errors naming the directory.
fn scan_log(
    dir: &Path,
    position: u64,
    witnessed: u64,
    visit: impl FnMut(Frame<'_>) -> Result<(), String>,
) -> Result<LogEnd, StorageError> {
    let log_dir = dir.join(LOG_DIR);
    if !log_dir.is_dir() {
        return Err(refused(
            dir,
            format!("its log ({}) is missing", log_dir.display()),
        ));
    }
    log::scan(&log_dir, position, witnessed, visit).map_err(|error| match error {
        LogError::Damaged(problem) => refused(dir, problem),
        LogError::Io(reason) => StorageError::Io {
            dir: dir.to_path_buf(),
            reason,
        },
    })
}

/// Copies the checkpoint's files into `scratch` (removed first if a killed
/// check left it, and after), opens the copy and loads it. The real files
/// are only read. The copy needs as much free space as the checkpoint.
fn load_copy(
    dir: &Path,
    scratch: &Path,
    store: &Store,
    replicas: &Replicas,
) -> Result<checkpoint::Loaded, StorageError> {
    let cannot_check = |reason: std::io::Error| StorageError::Io {
        dir: dir.to_path_buf(),
        reason: std::io::Error::new(
            reason.kind(),
            format!(
                "cannot check a copy of the checkpoint in {} (needs as much free space as the \
                 checkpoint): {reason}",
                scratch.display()
            ),
        ),
    };
    remove_dir_if_present(scratch).map_err(cannot_check)?;
    let _cleanup = RemoveOnDrop(scratch);
    copy_sled_files(&dir.join(CHECKPOINT_DIR), scratch).map_err(cannot_check)?;
    let copy = Checkpoint::open(scratch).map_err(|error| match error {
        sled::Error::Io(reason) if no_space(&reason) => cannot_check(reason),
        error => refused(dir, format!("sled cannot open its checkpoint: {error}")),
    })?;
    let loaded = copy
        .load(store, replicas)
        .map_err(|problem| refused(dir, problem))?;
    tracing::info!(
        entries = loaded.entries,
        records = loaded.records,
        copy_entries = loaded.copy_entries,
        "checkpoint copy recovered soundly"
    );
    Ok(loaded)
}

/// Checks a stopped node's data directory without changing it: the marker,
/// the lock (a running node's directory is refused), a copy of the
/// checkpoint (in the system's temporary directory) and the log, read
/// through as a start would. Blocking.
pub fn verify(dir: &Path) -> Result<DirectoryReport, StorageError> {
    let text =
        std::fs::read_to_string(dir.join(MARKER_FILE)).map_err(|reason| StorageError::Io {
            dir: dir.to_path_buf(),
            reason,
        })?;
    let marker = parse_marker(dir, &text)?;
    let node_id = marker.node_id;
    let _lock = lock(dir)?;
    inspect(dir, &node_id)?;
    if marker.format_version == crate::legacy::FORMAT_VERSION {
        return crate::legacy::verify(dir, &node_id);
    }
    let witness = Witness::read(dir)?;
    let unchanged = checkpoint_unchanged(dir, &witness)?;
    let store = Store::new();
    let replicas = Replicas::default();
    let loaded = if dir.join(CHECKPOINT_DIR).exists() {
        load_copy(dir, &verify_scratch(), &store, &replicas)?
    } else {
        checkpoint::Loaded::default()
    };
    let (position, mut meta) = checkpoint_meta(dir, &node_id, loaded.meta)?;
    let end = replay_log(dir, position, witness.logged, &store, &replicas, &mut meta)?;
    store.finish_loading();
    Ok(DirectoryReport::recovered(
        &store, &replicas, &meta, position, &end, &witness, unchanged,
    ))
}

/// Whether the checkpoint's files hash as the witness recorded.
fn checkpoint_unchanged(dir: &Path, witness: &Witness) -> Result<bool, StorageError> {
    let Some((recorded, _)) = witness.checkpoint else {
        return Ok(false);
    };
    let hash = hash_sled_files(&dir.join(CHECKPOINT_DIR)).map_err(|reason| StorageError::Io {
        dir: dir.to_path_buf(),
        reason,
    })?;
    Ok(hash == recorded)
}

/// Takes the directory's lock file, creating it if needed.
pub(crate) fn lock(dir: &Path) -> Result<File, StorageError> {
    let io = |reason| StorageError::Io {
        dir: dir.to_path_buf(),
        reason,
    };
    let lock = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(io)?;
    let locked = retry_while_held(
        || lock.try_lock(),
        |error| matches!(error, std::fs::TryLockError::WouldBlock),
    );
    match locked {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(StorageError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(reason)) => Err(io(reason)),
    }
}

/// How long [`retry_while_held`] waits for a lock to be let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs `attempt` until it succeeds, fails otherwise than `held` says, or
/// [`LOCK_WAIT`] has passed.
///
/// An OS file lock (`flock`) belongs to the open file, and a child that
/// another thread of this process is spawning holds a copy of every file
/// descriptor from its fork until its exec closes them. A lock released
/// by a node stopped in-process (a local cluster, a test) can so stay held
/// for the instant of someone else's spawn, and a restart would be refused
/// a directory nobody uses. A lock another process really holds is still
/// refused, [`LOCK_WAIT`] later.
pub(crate) fn retry_while_held<T, E>(
    mut attempt: impl FnMut() -> Result<T, E>,
    held: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match attempt() {
            Err(error) if held(&error) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            result => return result,
        }
    }
}

fn write_pid(mut lock: &File) -> std::io::Result<()> {
    lock.set_len(0)?;
    writeln!(lock, "{}", std::process::id())
}

/// Whether a top-level name in a sled directory is one of sled's files:
/// `conf`, `db`, `snap.*` and the `blobs` directory.
pub(crate) fn is_sled_file(name: &std::ffi::OsStr) -> bool {
    name == "conf"
        || name == "db"
        || name == "blobs"
        || name.as_encoded_bytes().starts_with(b"snap.")
}

/// sled's files in a directory, as paths relative to it, sorted; none if
/// the directory does not exist.
fn sled_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let entries = match std::fs::read_dir(dir.join(&relative)) {
            Err(error)
                if error.kind() == std::io::ErrorKind::NotFound
                    && relative.as_os_str().is_empty() =>
            {
                return Ok(files)
            }
            entries => entries?,
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if relative.as_os_str().is_empty() && !is_sled_file(&name) {
                continue;
            }
            let path = relative.join(&name);
            if entry.file_type()?.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Bytes of a sled directory's files (0 if it does not exist).
pub(crate) fn sled_files_bytes(dir: &Path) -> std::io::Result<u64> {
    sled_files(dir)?
        .into_iter()
        .map(|relative| std::fs::metadata(dir.join(relative)).map(|metadata| metadata.len()))
        .sum()
}

/// xxh3 over a sled directory's files: names, lengths and contents. Never 0.
pub(crate) fn hash_sled_files(dir: &Path) -> std::io::Result<u64> {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buffer = vec![0; 1 << 20];
    for relative in sled_files(dir)? {
        hasher.update(relative.as_os_str().as_encoded_bytes());
        let mut file = File::open(dir.join(&relative))?;
        hasher.update(&file.metadata()?.len().to_le_bytes());
        loop {
            let read = file.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
        }
    }
    Ok(hasher.digest().max(1))
}

pub(crate) fn copy_sled_files(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for relative in sled_files(from)? {
        let target = to.join(&relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(from.join(&relative), target)?;
    }
    Ok(())
}

pub(crate) fn remove_dir_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Where `verify` copies a checkpoint to read it, in the system's temporary
/// directory: named for this run, so two verifies at once never share it.
pub(crate) fn verify_scratch() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    std::env::temp_dir().join(format!("tally-verify-{}-{nanos}", std::process::id()))
}

/// Removes a scratch directory when the check ends, however it ends.
pub(crate) struct RemoveOnDrop<'a>(pub(crate) &'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(error) = remove_dir_if_present(self.0) {
            tracing::warn!(path = %self.0.display(), %error, "cannot remove a scratch copy");
        }
    }
}

/// What the `TALLY` marker file holds.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Marker {
    pub(crate) format_version: u64,
    pub(crate) node_id: String,
    pub(crate) state: MarkerState,
}

/// How far set-up got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum MarkerState {
    /// Written before anything else; the rest may be missing.
    SettingUp,
    /// Set up: from now on everything must be there.
    Ready,
}

/// Reads the marker, or decides the directory is new (`None`), or refuses it:
/// without touching anything.
fn inspect(dir: &Path, node_id: &str) -> Result<Option<Marker>, StorageError> {
    let io = |reason| StorageError::Io {
        dir: dir.to_path_buf(),
        reason,
    };
    let text = match std::fs::read_to_string(dir.join(MARKER_FILE)) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            if has_foreign_entries(dir).map_err(io)? {
                return Err(StorageError::Foreign {
                    dir: dir.to_path_buf(),
                });
            }
            return Ok(None);
        }
        Err(error) => return Err(io(error)),
    };
    let marker = parse_marker(dir, &text)?;
    if marker.node_id != node_id {
        return Err(StorageError::WrongNode {
            dir: dir.to_path_buf(),
            found: marker.node_id,
            expected: node_id.to_string(),
        });
    }
    Ok(Some(marker))
}

fn parse_marker(dir: &Path, text: &str) -> Result<Marker, StorageError> {
    let marker: Marker = toml::from_str(text).map_err(|error| StorageError::Damaged {
        dir: dir.to_path_buf(),
        // toml's messages may span lines; a refusal is one line.
        message: format!(
            "unreadable {MARKER_FILE} file: {}",
            error.message().trim().replace('\n', " ")
        ),
    })?;
    let readable = marker.format_version == FORMAT_VERSION
        || (marker.format_version == crate::legacy::FORMAT_VERSION
            && marker.state == MarkerState::Ready);
    if !readable {
        return Err(StorageError::Damaged {
            dir: dir.to_path_buf(),
            message: format!(
                "format version {}, this build reads version {FORMAT_VERSION} (and migrates \
                 version {}) (move the directory aside or delete it to start the node empty)",
                marker.format_version,
                crate::legacy::FORMAT_VERSION
            ),
        });
    }
    Ok(marker)
}

fn has_foreign_entries(dir: &Path) -> std::io::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let name = entry?.file_name();
                if !IGNORED_ENTRIES.iter().any(|ignored| name == *ignored) {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// Writes the marker atomically: temporary file, fsync, rename, fsync of
/// the directory.
pub(crate) fn write_marker(
    dir: &Path,
    node_id: &str,
    state: MarkerState,
) -> Result<(), StorageError> {
    let io = |reason| StorageError::Io {
        dir: dir.to_path_buf(),
        reason,
    };
    let marker = Marker {
        format_version: FORMAT_VERSION,
        node_id: node_id.to_string(),
        state,
    };
    let text = format!(
        "# A Tally shard data directory. Written by the shard; do not edit.\n{}",
        toml::to_string(&marker).expect("a marker always serializes")
    );
    let temporary = dir.join(format!("{MARKER_FILE}.tmp"));
    let mut file = File::create(&temporary).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, dir.join(MARKER_FILE)).map_err(io)?;
    File::open(dir)
        .and_then(|directory| directory.sync_all())
        .map_err(io)?;
    Ok(())
}

/// Writes the witness file anew, durably.
pub(crate) fn write_witness(dir: &Path, witness: Witness) -> std::io::Result<()> {
    let file = File::create(dir.join(WITNESS_FILE))?;
    witness.write(&file)?;
    file.sync_all()
}

/// Sets a new directory up (or one whose set-up was interrupted: nothing in
/// it was ever acknowledged, so it starts over): marker `setting_up`, a
/// log whose first frame records the directory's creation, the witness,
/// marker `ready`.
fn set_up(dir: &Path, node_id: &str) -> Result<(), StorageError> {
    let io = |reason| StorageError::Io {
        dir: dir.to_path_buf(),
        reason,
    };
    write_marker(dir, node_id, MarkerState::SettingUp)?;
    remove_dir_if_present(&dir.join(LOG_DIR)).map_err(io)?;
    remove_dir_if_present(&dir.join(CHECKPOINT_DIR)).map_err(io)?;
    let log_dir = dir.join(LOG_DIR);
    log::create(&log_dir).map_err(io)?;
    let end = log::scan(&log_dir, 0, 0, |_| Ok(())).map_err(|error| StorageError::Damaged {
        dir: dir.to_path_buf(),
        message: error.to_string(),
    })?;
    let mut log = LogWriter::open(&log_dir, &end, u64::MAX).map_err(io)?;
    let created = Change::Created {
        directory_id: crate::meta::new_directory_id(),
    };
    log.append(created.kind(), |buffer| created.encode(buffer));
    log.commit().map_err(io)?;
    write_witness(dir, Witness::running(log.last_seq())).map_err(io)?;
    write_marker(dir, node_id, MarkerState::Ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;
    use crate::journal::{Journal, JournalParts, LogSettings};
    use crate::replicas::CopyStamp;
    use crate::store::StripeIncrement;
    use std::collections::BTreeMap;
    use std::time::Duration;

    use crate::store::record_key;

    fn open(dir: &Path) -> Result<Recovered, StorageError> {
        Storage::open(dir, "shard-1", KeyRetention::default(), 4096)
    }

    /// A node's storage with its log thread running, as a started node has.
    struct Running {
        storage: Storage,
        state: NodeState,
        journal: Journal,
        runtime: tokio::runtime::Runtime,
    }

    fn start(dir: &Path, checkpoint_interval: Duration) -> Running {
        let recovered = open(dir).unwrap();
        let journal = Journal::start(
            recovered.state.clone(),
            JournalParts {
                dir: dir.to_path_buf(),
                log: recovered.log,
                witness: recovered.witness,
                checkpoint_position: recovered.checkpoint_position,
                checkpoint: recovered.checkpoint,
                checkpoint_hash: recovered.checkpoint_hash,
                pending_start: recovered.pending_start,
                commit_metrics: Default::default(),
            },
            LogSettings {
                durability: Durability::Sync,
                flush_interval: Duration::from_millis(5),
                segment_bytes: 4096,
                checkpoint_bytes: 1 << 40,
                checkpoint_interval,
            },
        )
        .unwrap();
        Running {
            storage: recovered.storage,
            state: recovered.state,
            journal,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    impl Running {
        fn add(&self, counter: &str, stripe: u32, delta: i64, key: Option<&str>) {
            let (_, epoch) = self.state.store.apply(
                &[StripeIncrement {
                    counter,
                    stripe,
                    delta,
                    idempotency_key: key,
                }],
                crate::journal::unix_ms_now(),
            );
            self.runtime
                .block_on(self.journal.wait_durable(epoch))
                .unwrap();
        }

        fn submit(&self, change: Change) {
            self.runtime.block_on(self.journal.submit(change)).unwrap();
        }

        /// A clean stop: a last checkpoint, the witness records it.
        fn stop(self) {
            let stopped = self.journal.stop().unwrap().unwrap();
            self.storage
                .close(stopped.last_seq, stopped.checkpoint_hash)
                .unwrap();
        }

        /// A crash: the log thread stops without a last checkpoint and the
        /// witness is not closed.
        fn crash(self) {
            self.journal.crash();
        }
    }

    fn total(state: &NodeState, counter: &str) -> i64 {
        state
            .store
            .read(counter)
            .iter()
            .map(|(_, value)| value)
            .sum()
    }

    /// A directory with entries, records, a replica copy and a drain step,
    /// checkpointed part way, left by a clean stop or a crash.
    fn written_directory(clean: bool) -> tempfile::TempDir {
        written_directory_with(clean, Duration::from_millis(20))
    }

    /// [`written_directory`], with checkpoints every `checkpoint_interval`
    /// (each deletes the segments it covers).
    fn written_directory_with(clean: bool, checkpoint_interval: Duration) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), checkpoint_interval);
        for round in 0..200 {
            node.add(
                &format!("c{}", round % 17),
                round % 4,
                1,
                Some(&format!("k{round}")),
            );
        }
        node.submit(Change::Replica {
            origin: "shard-2".into(),
            stamp: CopyStamp {
                version: 9,
                scanned_unix_ms: 90,
                directory_id: 5,
            },
            full: true,
            entries: vec![("c0".into(), 1, 40), ("d".into(), 0, 2)],
            records: vec![(record_key("c0", "copied"), 40, 77)],
        });
        node.submit(Change::Drain(DrainState::Draining));
        node.add("c0", 0, 100, None);
        if clean {
            node.stop();
        } else {
            node.crash();
        }
        dir
    }

    fn check_written(recovered: &Recovered) {
        let state = &recovered.state;
        assert_eq!(total(state, "c0"), 12 + 100);
        assert_eq!(state.store.remembered_keys(), 200);
        assert_eq!(
            state.replicas.read(&["c0".into(), "d".into()])[0].counters,
            vec![vec![(1, 40)], vec![(0, 2)]]
        );
        assert_eq!(state.replicas.versions(), vec![("shard-2".into(), 9)]);
        assert_eq!(
            state.replicas.record("shard-2", "c0", "copied"),
            Some(40),
            "the copy's idempotency record survives"
        );
        assert_eq!(state.meta.lock().drain, DrainState::Draining);
        // A retry of a key applied before is not applied again.
        let (outcomes, _) = state.store.apply(
            &[StripeIncrement {
                counter: "c3",
                stripe: 3,
                delta: 1,
                idempotency_key: Some("k3"),
            }],
            2_000,
        );
        assert_eq!(outcomes, vec![crate::store::ApplyOutcome::Duplicate]);
    }

    #[test]
    fn everything_survives_a_clean_stop_and_a_crash() {
        let clean = written_directory(true);
        let report = verify(clean.path()).unwrap();
        assert!(report.checkpoint_unchanged);
        assert_eq!(report.checkpoint_position, report.last_seq, "{report:?}");
        let recovered = open(clean.path()).unwrap();
        assert!(recovered.report.checkpoint_unchanged);
        check_written(&recovered);
        drop(recovered);

        let crashed = written_directory(false);
        let report = verify(crashed.path()).unwrap();
        assert!(!report.checkpoint_unchanged || report.checkpoint_position < report.last_seq);
        let recovered = open(crashed.path()).unwrap();
        check_written(&recovered);
        assert!(!crashed.path().join(CHECK_DIR).exists());
    }

    /// Waits until `done` holds of the log thread's figures.
    fn wait_for(node: &Running, what: &str, done: impl Fn(&crate::journal::LogStats) -> bool) {
        let started = std::time::Instant::now();
        while !done(node.journal.stats()) {
            assert!(started.elapsed() < Duration::from_secs(30), "never: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Polls `done` until it holds (30 s at most).
    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let started = std::time::Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(30), "never: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn ended_windows_are_reclaimed_through_the_log_and_stay_gone() {
        use std::sync::atomic::Ordering::Relaxed;
        use tally_proto::window::Window;
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), Duration::from_secs(3600));
        // A grace of a day takes a window that ended an hour ago ...
        node.state.store.windows().set_grace_ms(86_400_000);
        let now = crate::journal::unix_ms_now();
        let ended = Window::containing(now - 3_600_000, 60).stored_name("api:alice");
        let current = Window::current(3600).stored_name("api:alice");
        node.add(&ended, 0, 5, Some("k1"));
        node.add(&ended, 1, 2, None);
        node.add("plain", 0, 1, Some("k2"));
        node.add(&current, 0, 1, Some("k3"));
        node.submit(Change::Replica {
            origin: "shard-2".into(),
            stamp: CopyStamp {
                version: 1,
                scanned_unix_ms: 0,
                directory_id: 7,
            },
            full: true,
            entries: vec![(ended.clone(), 0, 3), ("other".into(), 0, 1)],
            records: vec![(record_key(&ended, "k9"), 3, 1)],
        });
        let copy_of = |state: &NodeState| {
            state.replicas.read(std::slice::from_ref(&ended))[0].counters[0].clone()
        };
        assert_eq!(copy_of(&node.state), vec![(0, 3)]);
        assert_eq!(node.state.store.remembered_keys(), 3);
        // ... and a grace of 1 ms makes it due: the log thread reclaims it.
        node.state.store.windows().set_grace_ms(1);
        wait_until("the window to be reclaimed", || {
            node.state.store.read(&ended).is_empty()
                && copy_of(&node.state).is_empty()
                && node.journal.stats().windows_reclaimed.load(Relaxed) == 2
        });
        assert_eq!(node.state.store.remembered_keys(), 2);
        assert_eq!(node.state.replicas.record("shard-2", &ended, "k9"), None);
        assert_eq!(node.state.store.read(&current), vec![(0, 1)]);
        // Durable once a later increment is: its group commit comes after
        // the one that logged the reclaim.
        node.add("plain", 0, 1, None);
        node.crash();

        // From the log alone (no checkpoint since): still gone, but the
        // copy's record, forgotten without a frame (as retention forgets
        // one), comes back to be reclaimed again.
        let recovered = open(dir.path()).unwrap();
        assert_eq!(recovered.state.store.read(&ended), vec![]);
        assert_eq!(copy_of(&recovered.state), vec![]);
        assert_eq!(recovered.report.entries, 2, "plain and the current window");
        assert_eq!(recovered.report.records, 2);
        assert_eq!(recovered.report.foreign_entries, 1);
        assert_eq!(
            recovered.state.replicas.record("shard-2", &ended, "k9"),
            Some(3)
        );
        drop(recovered);
        let node = start(dir.path(), Duration::from_secs(3600));
        node.state.store.windows().set_grace_ms(1);
        wait_until("the copy's record to be reclaimed again", || {
            node.state
                .replicas
                .record("shard-2", &ended, "k9")
                .is_none()
        });
        node.stop();

        // A clean stop checkpoints everything: the checkpoint alone (no
        // frame after it) holds none of the window.
        let report = verify(dir.path()).unwrap();
        assert_eq!(report.checkpoint_position, report.last_seq);
        assert_eq!((report.entries, report.records), (2, 2));
        assert_eq!(report.foreign_entries, 1);
        let recovered = open(dir.path()).unwrap();
        assert_eq!(recovered.state.store.read(&ended), vec![]);
        assert_eq!(copy_of(&recovered.state), vec![]);
        assert_eq!(
            recovered.state.replicas.record("shard-2", &ended, "k9"),
            None
        );
        assert_eq!(recovered.state.store.read(&current), vec![(0, 1)]);
    }

    #[test]
    fn a_failed_checkpoint_write_is_healed_by_a_fresh_checkpoint() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), Duration::from_millis(10));
        node.add("a", 0, 1, Some("k1"));
        wait_for(&node, "a first checkpoint", |stats| {
            stats.checkpoints.load(Relaxed) > 0
        });
        // The next round's write fails: sled's database is abandoned, and
        // a fresh one replaces it whole.
        crate::checkpoint::tests::fail_next_write(dir.path());
        for round in 0..50 {
            node.add("a", 0, 1, Some(&format!("k{round}/2")));
        }
        wait_for(&node, "the failure", |stats| {
            stats.checkpoint_failures.load(Relaxed) > 0
        });
        let failed_at = node.journal.stats().checkpoints.load(Relaxed);
        node.add("b", 1, 5, None);
        wait_for(&node, "a checkpoint after the failure", |stats| {
            stats.checkpoints.load(Relaxed) > failed_at
        });
        assert!(!dir.path().join("checkpoint.next").exists());
        assert!(!dir.path().join("checkpoint.old").exists());
        node.crash();
        let recovered = open(dir.path()).unwrap();
        assert_eq!(total(&recovered.state, "a"), 51);
        assert_eq!(total(&recovered.state, "b"), 5);
        assert_eq!(recovered.state.store.remembered_keys(), 51);
        drop(recovered);
        let report = verify(dir.path()).unwrap();
        assert!(report.checkpoint_position > 0, "{report:?}");
    }

    #[test]
    fn what_a_start_replays_is_in_the_next_checkpoint() {
        use std::sync::atomic::Ordering::Relaxed;
        // Written, no checkpoint, crash: the next start replays it all.
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), Duration::from_secs(3600));
        for round in 0..300 {
            node.add(
                &format!("c{}", round % 30),
                0,
                1,
                Some(&format!("k{round}")),
            );
        }
        node.submit(Change::Replica {
            origin: "shard-2".into(),
            stamp: CopyStamp {
                version: 9,
                scanned_unix_ms: 90,
                directory_id: 5,
            },
            full: true,
            entries: vec![("d".into(), 0, 2)],
            records: Vec::new(),
        });
        node.crash();
        // Started again, a checkpoint covers the replayed frames and the
        // log before it goes; then another crash.
        let node = start(dir.path(), Duration::from_millis(10));
        node.add("other", 0, 1, None);
        wait_for(&node, "a checkpoint", |stats| {
            stats.checkpoints.load(Relaxed) > 0
        });
        let position = node.journal.stats().checkpoint_position.load(Relaxed);
        assert!(
            position > 300,
            "the checkpoint covers the replayed frames: {position}"
        );
        node.crash();
        let first = log::list_segments(&dir.path().join(LOG_DIR)).unwrap()[0].0;
        assert!(first > 1, "the replayed frames' segments were deleted");
        let recovered = open(dir.path()).unwrap();
        assert_eq!(total(&recovered.state, "c7"), 10);
        assert_eq!(recovered.state.store.remembered_keys(), 300);
        assert_eq!(
            recovered.state.replicas.read(&["d".into()])[0].counters,
            vec![vec![(0, 2)]]
        );
    }

    #[test]
    fn a_failed_close_between_rounds_is_healed_by_a_fresh_checkpoint() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), Duration::from_millis(10));
        for round in 0..50 {
            node.add("a", 0, 1, Some(&format!("k{round}")));
        }
        wait_for(&node, "a first checkpoint", |stats| {
            stats.checkpoints.load(Relaxed) > 0
        });
        // The idle checkpoint thread closes sled; that sync fails.
        crate::checkpoint::tests::fail_next_write(dir.path());
        wait_for(&node, "the failed close", |stats| {
            stats.checkpoint_failures.load(Relaxed) > 0
        });
        let before = node.journal.stats().checkpoints.load(Relaxed);
        node.add("b", 0, 1, None);
        wait_for(&node, "a fresh checkpoint", |stats| {
            stats.checkpoints.load(Relaxed) > before
        });
        // Covered by the fresh checkpoint, the log before it went: what
        // the old checkpoint held must be in the fresh one.
        node.crash();
        let recovered = open(dir.path()).unwrap();
        assert_eq!(total(&recovered.state, "a"), 50);
        assert_eq!(total(&recovered.state, "b"), 1);
        assert_eq!(recovered.state.store.remembered_keys(), 50);
    }

    #[test]
    fn a_crash_while_a_fresh_checkpoint_replaces_the_old_one_is_settled() {
        let dir = written_directory(true);
        let data = dir.path();
        // As a crash between the two renames leaves it: the fresh (durable)
        // checkpoint beside the old one, moved aside.
        crate::storage::copy_sled_files(&data.join(CHECKPOINT_DIR), &data.join("checkpoint.next"))
            .unwrap();
        std::fs::rename(data.join(CHECKPOINT_DIR), data.join("checkpoint.old")).unwrap();
        check_written(&open(data).unwrap());
        assert!(!data.join("checkpoint.next").exists());
        assert!(!data.join("checkpoint.old").exists());
    }

    #[test]
    fn every_start_is_numbered_higher() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path()).unwrap();
        let incarnation = first.state.meta.lock().incarnation;
        assert!(
            incarnation > 1_700_000_000,
            "wall-clock seconds: {incarnation}"
        );
        assert!(
            first.state.meta.lock().awaiting_restore,
            "a new directory awaits a restore"
        );
        drop(first);
        let second = open(dir.path()).unwrap();
        assert!(second.state.meta.lock().incarnation > incarnation);
        assert_eq!(
            second.state.store.incarnation(),
            second.state.meta.lock().incarnation
        );
    }

    /// Every file of a directory (but the lock) with its contents.
    fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut files = BTreeMap::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(path) = pending.pop() {
            for entry in std::fs::read_dir(&path).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                } else if !path.ends_with(LOCK_FILE) {
                    files.insert(path.clone(), std::fs::read(&path).unwrap());
                }
            }
        }
        files
    }

    /// Damages a directory, then checks that opening and verifying refuse
    /// it and leave every file as it was.
    fn refused_untouched(clean: bool, damage: impl FnOnce(&Path)) -> String {
        refused_untouched_in(written_directory(clean), damage)
    }

    /// [`refused_untouched`] of a directory the caller wrote.
    fn refused_untouched_in(dir: tempfile::TempDir, damage: impl FnOnce(&Path)) -> String {
        damage(dir.path());
        let before = contents(dir.path());
        let error = open(dir.path()).err().expect("a damaged directory opened");
        assert!(matches!(error, StorageError::Refused { .. }), "{error}");
        assert!(contents(dir.path()) == before, "files changed: {error}");
        let verified = verify(dir.path()).unwrap_err();
        assert_eq!(verified.to_string(), error.to_string());
        assert!(contents(dir.path()) == before, "verify changed files");
        error.to_string()
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        log::list_segments(&dir.join(LOG_DIR))
            .unwrap()
            .into_iter()
            .map(|(_, path)| path)
            .collect()
    }

    #[test]
    fn a_log_cut_short_is_refused_untouched() {
        for clean in [false, true] {
            let message = refused_untouched(clean, |dir| {
                let last = segments(dir).pop().unwrap();
                let bytes = std::fs::read(&last).unwrap();
                std::fs::write(&last, &bytes[..bytes.len() - 5]).unwrap();
            });
            assert!(
                message.contains("acknowledged writes are missing"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_damaged_frame_before_the_last_segment_is_refused_untouched() {
        // No checkpoint to delete the segments before the last.
        let written = written_directory_with(false, Duration::from_secs(3600));
        let message = refused_untouched_in(written, |dir| {
            let all = segments(dir);
            assert!(all.len() > 1, "the test needs several segments");
            let first = &all[0];
            let mut bytes = std::fs::read(first).unwrap();
            let at = bytes.len() - 3;
            bytes[at] ^= 1;
            std::fs::write(first, bytes).unwrap();
        });
        assert!(message.contains("bad frame"), "{message}");
    }

    #[test]
    fn missing_log_segments_are_refused_untouched() {
        // No checkpoint: the whole log is needed, over several segments.
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path(), Duration::from_secs(3600));
        for round in 0..1000 {
            node.add(&format!("c{}", round % 17), 0, 1, None);
        }
        node.crash();
        let message = refused_untouched_in(dir, |dir| {
            let all = segments(dir);
            assert!(all.len() > 2, "the test needs three segments");
            std::fs::remove_file(&all[1]).unwrap();
        });
        assert!(message.contains("does not continue"), "{message}");
    }

    #[test]
    fn a_garbage_checkpoint_is_refused_untouched() {
        // After a clean stop the log holds only what came after the last
        // checkpoint: without the checkpoint, frames are missing. (A log
        // that still holds every frame would rebuild the state by itself.)
        {
            refused_untouched(true, |dir| {
                let db = dir.join(CHECKPOINT_DIR).join("db");
                let mut bytes = std::fs::read(&db).unwrap();
                for (index, byte) in bytes.iter_mut().enumerate() {
                    *byte = (index * 7 + 13) as u8;
                }
                std::fs::write(&db, bytes).unwrap();
                for entry in std::fs::read_dir(dir.join(CHECKPOINT_DIR)).unwrap() {
                    let path = entry.unwrap().path();
                    if path
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with("snap.")
                    {
                        std::fs::remove_file(path).unwrap();
                    }
                }
            });
        }
    }

    #[test]
    fn a_missing_or_unreadable_witness_is_refused_untouched() {
        let message = refused_untouched(true, |dir| {
            std::fs::remove_file(dir.join(WITNESS_FILE)).unwrap();
        });
        assert!(message.contains("LOGGED is missing"), "{message}");
        let message = refused_untouched(false, |dir| {
            std::fs::write(dir.join(WITNESS_FILE), "zzz").unwrap();
        });
        assert!(message.contains("LOGGED is unreadable"), "{message}");
    }

    #[test]
    fn a_stale_witness_is_no_false_alarm() {
        // Power loss may leave the witness behind the log, never ahead.
        let dir = written_directory(false);
        let file = File::options()
            .write(true)
            .open(dir.path().join(WITNESS_FILE))
            .unwrap();
        Witness::running(3).write(&file).unwrap();
        check_written(&open(dir.path()).unwrap());
    }

    #[test]
    fn a_lock_let_go_is_taken_again_while_other_threads_spawn_children() {
        // Each child holds a copy of the lock file's descriptor from its fork
        // to its exec; without waiting that instant out, about one attempt
        // in fifteen here was refused.
        let dir = tempfile::tempdir().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spawner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = std::process::Command::new("true").status();
                }
            })
        };
        let started = std::time::Instant::now();
        let mut taken = 0;
        while started.elapsed() < std::time::Duration::from_millis(500) || taken < 200 {
            drop(lock(dir.path()).unwrap());
            taken += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spawner.join().unwrap();
    }

    #[test]
    fn a_held_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path()).unwrap();
        let error = open(dir.path()).err().unwrap();
        assert!(matches!(error, StorageError::Locked { .. }), "{error}");
        assert!(error.to_string().contains("in use by another process"));
        assert!(matches!(
            verify(dir.path()).unwrap_err(),
            StorageError::Locked { .. }
        ));
    }

    #[test]
    fn another_nodes_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()).unwrap());
        let error = Storage::open(dir.path(), "shard-2", KeyRetention::default(), 4096)
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            format!(
                "data directory {} belongs to node \"shard-1\", not \"shard-2\"",
                dir.path().display()
            )
        );
    }

    #[test]
    fn an_unknown_format_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(MARKER_FILE),
            "format_version = 1\nnode_id = \"shard-1\"\nstate = \"ready\"\n",
        )
        .unwrap();
        let error = open(dir.path()).err().unwrap();
        assert!(
            error
                .to_string()
                .contains("format version 1, this build reads version 3"),
            "{error}"
        );
    }

    #[test]
    fn a_foreign_directory_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("precious.txt"), "mine").unwrap();
        let error = open(dir.path()).err().unwrap();
        assert!(matches!(error, StorageError::Foreign { .. }), "{error}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("precious.txt")).unwrap(),
            "mine"
        );
        assert!(!dir.path().join(LOG_DIR).exists());
        assert!(
            !dir.path().join(LOCK_FILE).exists(),
            "not even a lock file is added"
        );
    }

    #[test]
    fn an_interrupted_set_up_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        // What a crash right after the first marker write leaves.
        std::fs::write(dir.path().join(LOCK_FILE), "").unwrap();
        write_marker(dir.path(), "shard-1", MarkerState::SettingUp).unwrap();
        drop(open(dir.path()).unwrap());
        let marker = std::fs::read_to_string(dir.path().join(MARKER_FILE)).unwrap();
        assert!(marker.contains("state = \"ready\""), "{marker}");
        assert!(marker.contains("format_version = 3"), "{marker}");
        // A setting-up marker of another node is still another node's.
        write_marker(dir.path(), "shard-1", MarkerState::SettingUp).unwrap();
        assert!(matches!(
            Storage::open(dir.path(), "shard-2", KeyRetention::default(), 4096)
                .err()
                .unwrap(),
            StorageError::WrongNode { .. }
        ));
    }

    #[test]
    fn a_fresh_filesystems_lost_and_found_is_not_foreign() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let lost_and_found = dir.path().join("lost+found");
        std::fs::create_dir(&lost_and_found).unwrap();
        std::fs::write(lost_and_found.join("#1234"), "recovered").unwrap();
        // As a freshly formatted volume has it: root's, unreadable to the
        // node's user.
        std::fs::set_permissions(&lost_and_found, std::fs::Permissions::from_mode(0o000)).unwrap();
        drop(open(dir.path()).unwrap());
        open(dir.path()).unwrap();
        std::fs::set_permissions(&lost_and_found, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
}
