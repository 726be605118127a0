//! The on-disk half of a shard node: a sled database in the node's data
//! directory, guarded by a lock file, watched by a witness file.
//!
//! # Format (version 2)
//!
//! Tree `data` holds counter entries, idempotency records and the flush
//! sequence number ([`crate::keys`] has the layout). A flush writes all of
//! them in one sled batch, atomic, then fsyncs: a counter change and the
//! record of the key that caused it reach disk together or not at all.
//! Tree `meta`: `format_version` (u64 BE) and `node_id`, checked on every
//! start so a data directory cannot be mounted under the wrong node id.
//!
//! File `TALLY`: a marker holding the format version, the node id and a
//! state. sled is only ever opened in a directory that is empty (a new node;
//! `lost+found` aside) or has this marker: a directory with anything else is
//! refused untouched. Set-up is two-phase: the marker is written as
//! `setting_up` before sled creates any file and turned `ready` once the
//! metadata is on disk, so a first start interrupted at any point resumes on
//! the next start, while a `ready` directory whose database has no metadata
//! is damaged, never silently started empty.
//!
//! # Damage detection
//!
//! sled recovers a damaged log by stopping at the first bad record: a
//! truncated or overwritten file opens without error and silently serves
//! older values. So a node keeps a witness outside sled, file `FLUSHED`:
//! after every flush is on disk, the flush's sequence number is written
//! there (in place, no extra fsync). The database must hold at least that
//! sequence; if it holds less, acknowledged writes are gone and the node
//! refuses to start. A stale witness (power loss before the page cache
//! reached disk) only weakens the check, it never raises a false alarm.
//!
//! sled rewrites its files when it opens them, even read-only use, so a
//! directory is only opened in place once it is known to be sound. At a
//! clean stop the node records a hash of sled's files in the witness; if the
//! files still hash the same at the next start, nothing happened to them and
//! they are opened directly. Otherwise (after a crash, or if anything
//! changed) a scratch copy is recovered and checked first, and a damaged
//! directory is refused with its files exactly as they were.
//! [`verify`] runs the same check on demand (`tally-shard verify DIR`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::keys::{self, DataKey};
use crate::replicas::{CopyStamp, Replicas};
use crate::store::{FlushSnapshot, LoadedRecord, Store};

/// Version of the on-disk format this build writes and reads.
pub const FORMAT_VERSION: u64 = 2;
const LOCK_FILE: &str = "LOCK";
const MARKER_FILE: &str = "TALLY";
const WITNESS_FILE: &str = "FLUSHED";
/// Entries of a data directory that do not make it someone else's: our own
/// lock and half-written marker, and the directory a fresh filesystem has.
const IGNORED_ENTRIES: [&str; 3] = [LOCK_FILE, "TALLY.tmp", "lost+found"];
/// Where the start-up check recovers its scratch copy, inside the data
/// directory: on the same filesystem, which the node can always write.
const CHECK_DIR: &str = "check.tmp";
const DATA_TREE: &str = "data";
const META_TREE: &str = "meta";
/// sled's page cache. Our own map holds every value, so sled's cache only
/// serves writes; the default of 1 GiB would double memory for nothing.
const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

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
    /// sled refused to open or read the database, or a key or value does not
    /// decode: the files are damaged or from an incompatible version.
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

/// What a data directory holds, as [`verify`] or a start-up check found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectoryReport {
    /// The node the directory belongs to.
    pub node_id: String,
    /// Non-zero entries of this node.
    pub entries: u64,
    /// Entries whose origin is another node.
    pub foreign_entries: u64,
    /// Idempotency records.
    pub records: u64,
    /// Sequence number of the last flush in the database.
    pub sequence: u64,
    /// Sequence number of the last flush known to have completed (`FLUSHED`).
    pub witnessed: u64,
    /// Whether the files are exactly as the node left them at a clean stop.
    pub clean: bool,
    /// The directory was created empty and its own entries await a
    /// restore from replicas.
    pub awaiting_restore: bool,
    /// Where a drain of this node stands.
    pub drain: DrainState,
    /// Drained nodes this node adopted, or whose copy it dropped.
    pub retired: Vec<String>,
}

/// Why own entries are set outside a flush (see [`Storage::set_own`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnChange {
    /// A node that started empty got its earlier entries back.
    Restored,
    /// This node took a drained node's entries from its copy of them.
    Adopted {
        /// The drained node.
        origin: String,
        /// Its final copy's version.
        version: u64,
    },
}

/// Adds to `batch`: drop the copy of `origin` and mark it retired, with the
/// version it was retired at (0 when only the copy was dropped).
fn retire_copy(
    batch: &mut sled::Batch,
    data: &sled::Tree,
    origin: &str,
    version: u64,
) -> Result<(), sled::Error> {
    for key in data.scan_prefix(keys::entry_prefix(origin)).keys() {
        batch.remove(key?);
    }
    batch.remove(keys::replica_version_key(origin));
    batch.insert(keys::adopted_key(origin), &version.to_be_bytes());
    Ok(())
}

/// Where a drain of this node stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DrainState {
    /// Not being drained.
    #[default]
    Serving,
    /// Refuses writes of its own entries; they are being handed over.
    Draining,
    /// Its entries are in `adopter`'s copy; it answers for none.
    HandedOver {
        /// The node taking them.
        adopter: String,
        /// The version of the final copy.
        version: u64,
    },
    /// `adopter` added them to its own: the node can leave the membership.
    Drained {
        /// The node that took them.
        adopter: String,
        /// The version of the final copy.
        version: u64,
    },
}

impl DrainState {
    /// `""`, `"draining"` or `"drained"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            DrainState::Serving => "",
            DrainState::Draining => "draining",
            DrainState::HandedOver { .. } => "handed-over",
            DrainState::Drained { .. } => "drained",
        }
    }

    /// The adopter and the final copy's version, once handed over.
    pub fn handed_to(&self) -> Option<(&str, u64)> {
        match self {
            DrainState::HandedOver { adopter, version }
            | DrainState::Drained { adopter, version } => Some((adopter, *version)),
            _ => None,
        }
    }

    /// The adopter, once the entries were handed over.
    pub fn adopter(&self) -> Option<&str> {
        self.handed_to().map(|(adopter, _)| adopter)
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            DrainState::Serving => vec![0],
            DrainState::Draining => vec![1],
            DrainState::HandedOver { adopter, version } => {
                let mut value = vec![2];
                value.extend_from_slice(&version.to_be_bytes());
                value.extend_from_slice(adopter.as_bytes());
                value
            }
            DrainState::Drained { adopter, version } => {
                let mut value = vec![3];
                value.extend_from_slice(&version.to_be_bytes());
                value.extend_from_slice(adopter.as_bytes());
                value
            }
        }
    }

    fn decode(value: &[u8]) -> Option<DrainState> {
        match value.split_first()? {
            (0, []) => Some(DrainState::Serving),
            (1, []) => Some(DrainState::Draining),
            (kind @ (2 | 3), rest) => {
                let (version, adopter) = rest.split_first_chunk::<8>()?;
                let adopter = std::str::from_utf8(adopter).ok()?.to_string();
                let version = u64::from_be_bytes(*version);
                Some(if *kind == 2 {
                    DrainState::HandedOver { adopter, version }
                } else {
                    DrainState::Drained { adopter, version }
                })
            }
            _ => None,
        }
    }
}

/// An open data directory.
#[derive(Debug)]
pub struct Storage {
    dir: PathBuf,
    node_id: String,
    /// One flusher at a time.
    sled: parking_lot::Mutex<Sled>,
    incarnation: u64,
    directory_id: u64,
    witness: File,
    /// Held for the life of the process: the OS drops the lock if we crash.
    _lock: File,
}

/// The database, and where its flushes are.
#[derive(Debug)]
struct Sled {
    /// `None` after a failed write: sled keeps the error of a failed write
    /// and fails every later one, so the next flush reopens the database.
    open: Option<Open>,
    /// Sequence number of the last flush written.
    sequence: u64,
}

/// Entries per chunk of a replica change set (see `write_replica`).
const REPLICA_CHUNK: usize = 4096;

/// An open database.
#[derive(Debug, Clone)]
struct Open {
    db: sled::Db,
    data: sled::Tree,
    /// sled's log file. On Linux sled makes a flush durable with
    /// `sync_file_range`, which neither flushes the device's write cache nor
    /// records a grown file's size; an fdatasync of the file after each
    /// flush does both (the size is metadata a read needs, so fdatasync
    /// writes it; timestamps, which fsync would add, are not needed).
    log: Arc<File>,
}

impl Open {
    fn new(dir: &Path, db: sled::Db, data: sled::Tree) -> std::io::Result<Open> {
        let log = Arc::new(File::open(dir.join("db"))?);
        Ok(Open { db, data, log })
    }

    /// Writes a batch and makes it durable.
    fn write(&self, batch: sled::Batch) -> Result<(), sled::Error> {
        self.data.apply_batch(batch)?;
        self.db.flush()?;
        self.log.sync_data()?;
        Ok(())
    }
}

impl Storage {
    /// Opens (or creates) the data directory of `node_id`. Blocking.
    pub fn open(dir: &Path, node_id: &str) -> Result<Storage, StorageError> {
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
        write_pid(&lock).map_err(io)?;
        let ready = marker
            .as_ref()
            .is_some_and(|marker| marker.state == MarkerState::Ready);
        if ready {
            check_before_open(dir, node_id)?;
        } else if marker.is_none() {
            // Before sled creates any file, so an interrupted first start
            // leaves a directory the next start recognizes as ours.
            write_marker(dir, node_id, MarkerState::SettingUp)?;
        }

        let (db, meta, data) = open_sled(dir)?;
        if ready {
            check_meta(&meta, dir, node_id)?;
        } else {
            set_up(&db, &meta, &data, dir, node_id)?;
        }
        let incarnation = next_incarnation(&db, &meta).map_err(|error| StorageError::Damaged {
            dir: dir.to_path_buf(),
            message: error.to_string(),
        })?;
        let directory_id = directory_id(&db, &meta).map_err(|error| StorageError::Damaged {
            dir: dir.to_path_buf(),
            message: error.to_string(),
        })?;
        let witness = File::options()
            .read(true)
            .write(true)
            .open(dir.join(WITNESS_FILE))
            .map_err(io)?;
        let open = Open::new(dir, db, data).map_err(io)?;
        Ok(Storage {
            dir: dir.to_path_buf(),
            node_id: node_id.to_string(),
            sled: parking_lot::Mutex::new(Sled {
                open: Some(open),
                sequence: 0,
            }),
            incarnation,
            directory_id,
            witness,
            _lock: lock,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sequence number of the last flush written.
    pub fn sequence(&self) -> u64 {
        self.sled.lock().sequence
    }

    /// Loads every entry and idempotency record of this node into `store`,
    /// and checks the database against the witness.
    pub fn load_into(
        &self,
        store: &Store,
        replicas: &Replicas,
    ) -> Result<DirectoryReport, StorageError> {
        let mut sled = self.sled.lock();
        let data = &sled.open.as_ref().expect("open at start").data;
        let mut records = Vec::new();
        let report = scan(data, &self.node_id, |item| match item {
            Item::Entry {
                counter,
                stripe,
                value,
            } => store.load(counter, stripe, value),
            Item::Record(record) => records.push(record),
            Item::Replica {
                origin,
                counter,
                stripe,
                value,
            } => replicas.load(origin, counter, stripe, value),
            Item::ReplicaVersion { origin, stamp } => replicas.load_stamp(origin, stamp),
        })
        .map_err(|message| self.damaged(message))?;
        store.load_records(records);
        let witnessed = Witness::read(&self.dir)?.flushed;
        if report.sequence < witnessed {
            return Err(StorageError::Refused {
                dir: self.dir.clone(),
                problem: rollback_problem(report.sequence, witnessed),
            });
        }
        sled.sequence = report.sequence;
        Ok(DirectoryReport {
            witnessed,
            ..report
        })
    }

    /// Stores a change set of `origin`'s entries as this node's replica copy,
    /// with its version, durably: in chunks, the version with the last one
    /// (see the comment inside). A full set replaces the copy in one atomic
    /// batch. Blocking.
    pub fn write_replica(
        &self,
        origin: &str,
        full: bool,
        stamp: CopyStamp,
        entries: &[(&str, u32, i64)],
    ) -> Result<(), StorageError> {
        let entry_batch = |entries: &[(&str, u32, i64)], batch: &mut sled::Batch| {
            for &(counter, stripe, value) in entries {
                let key = keys::encode_entry_key(origin, counter, stripe);
                if value == 0 {
                    batch.remove(key);
                } else {
                    batch.insert(key, &value.to_be_bytes());
                }
            }
        };
        // A change set goes in chunks, so that this node's own flushes,
        // which wait for the storage lock, are not held up behind one big
        // batch (a 70,000-entry push stalled writers for a second). Every
        // chunk is durable before the next (a chunk left in sled's buffers
        // could be lost by a reopen after a failed flush, while the version
        // moved on), and only the last moves the copy's version on: after a
        // crash or an error part way, the copy holds some newer values
        // under its older version, and the origin sends the changes since
        // that version again. The values are absolute, so writing them
        // twice is harmless. A full copy replaces the old one and stays one
        // atomic batch.
        let mut rest = entries;
        if !full {
            while rest.len() > REPLICA_CHUNK {
                let (chunk, later) = rest.split_at(REPLICA_CHUNK);
                rest = later;
                self.write_batch(|_| {
                    let mut batch = sled::Batch::default();
                    entry_batch(chunk, &mut batch);
                    Ok(batch)
                })?;
            }
        }
        self.write_batch(|data| {
            let mut batch = sled::Batch::default();
            if full {
                for key in data.scan_prefix(keys::entry_prefix(origin)).keys() {
                    batch.remove(key?);
                }
            }
            entry_batch(rest, &mut batch);
            batch.insert(keys::replica_version_key(origin), &stamp.encode());
            Ok(batch)
        })
    }

    /// Records this node's drain state, durably. Blocking.
    pub fn set_drain(&self, state: &DrainState) -> Result<(), StorageError> {
        self.write_batch(|_| {
            let mut batch = sled::Batch::default();
            batch.insert(&keys::DRAIN_KEY, state.encode());
            Ok(batch)
        })
    }

    /// Sets these own entries (absolute values) together with what made
    /// them (`why`: a restore, an adoption), in one atomic batch, durably:
    /// a crash keeps both or neither, so neither is ever done twice.
    /// Blocking.
    pub fn set_own(
        &self,
        entries: &[(&str, u32, i64)],
        why: &OwnChange,
    ) -> Result<(), StorageError> {
        self.write_batch(|data| {
            let mut batch = sled::Batch::default();
            for &(counter, stripe, value) in entries {
                let key = keys::encode_entry_key(&self.node_id, counter, stripe);
                if value == 0 {
                    batch.remove(key);
                } else {
                    batch.insert(key, &value.to_be_bytes());
                }
            }
            match why {
                OwnChange::Restored => batch.insert(&keys::RESTORED_KEY, &1u64.to_be_bytes()),
                OwnChange::Adopted { origin, version } => {
                    retire_copy(&mut batch, data, origin, *version)?;
                }
            }
            Ok(batch)
        })
    }

    /// Drops the copy of `origin` and marks it retired (no copy of it is
    /// taken again), in one atomic batch, durably. Blocking.
    pub fn drop_copy(&self, origin: &str) -> Result<(), StorageError> {
        self.write_batch(|data| {
            let mut batch = sled::Batch::default();
            retire_copy(&mut batch, data, origin, 0)?;
            Ok(batch)
        })
    }

    /// Removes counters from replica copies: `(origin, counter)` pairs.
    /// Blocking.
    pub fn erase_replicas(&self, targets: &[(String, String)]) -> Result<(), StorageError> {
        self.write_batch_if(|data| {
            let mut batch = sled::Batch::default();
            let mut found = false;
            for (origin, counter) in targets {
                for key in data
                    .scan_prefix(keys::counter_prefix(origin, counter))
                    .keys()
                {
                    let key = key?;
                    // The prefix also matches longer names that extend it.
                    if matches!(
                        keys::decode_key(&key),
                        Some(DataKey::Entry(entry)) if entry.counter == counter
                    ) {
                        batch.remove(key);
                        found = true;
                    }
                }
            }
            // Nothing to remove: no write, no sync.
            Ok(found.then_some(batch))
        })
    }

    /// Writes a batch built from the open database, durably, outside the
    /// flush sequence (replica copies are not this node's own writes).
    fn write_batch(
        &self,
        build: impl FnOnce(&sled::Tree) -> Result<sled::Batch, sled::Error>,
    ) -> Result<(), StorageError> {
        self.write_batch_if(|data| build(data).map(Some))
    }

    /// [`Storage::write_batch`], writing nothing if `build` finds nothing
    /// to write.
    fn write_batch_if(
        &self,
        build: impl FnOnce(&sled::Tree) -> Result<Option<sled::Batch>, sled::Error>,
    ) -> Result<(), StorageError> {
        let mut sled = self.sled.lock();
        let open = match &sled.open {
            Some(open) => open.clone(),
            None => self.reopen(&mut sled)?,
        };
        let written = build(&open.data).and_then(|batch| match batch {
            Some(batch) => open.write(batch),
            None => Ok(()),
        });
        if let Err(error) = written {
            sled.open = None;
            drop(open);
            return Err(self.sled_error(error));
        }
        Ok(())
    }

    /// This data directory's random id (see `directory_id`).
    pub fn directory_id(&self) -> u64 {
        self.directory_id
    }

    /// This start's number (see `next_incarnation`): the high bits of this
    /// node's replication versions.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Writes a flush's entries and records in one atomic batch, waits
    /// until they are on disk (fsync), then moves the witness on. Blocking.
    pub fn write(&self, snapshot: &FlushSnapshot) -> Result<(), StorageError> {
        let mut sled = self.sled.lock();
        let open = match &sled.open {
            Some(open) => open.clone(),
            None => self.reopen(&mut sled)?,
        };
        let next = sled.sequence + 1;
        let mut batch = sled::Batch::default();
        for entry in &snapshot.entries {
            let key = keys::encode_entry_key(&self.node_id, &entry.counter, entry.stripe);
            if entry.value == 0 {
                batch.remove(key);
            } else {
                batch.insert(key, &entry.value.to_be_bytes());
            }
        }
        for record in &snapshot.records {
            match record.record {
                Some((delta, applied_unix_ms)) => batch.insert(
                    &*record.key,
                    &keys::encode_record_value(delta, applied_unix_ms),
                ),
                None => batch.remove(&*record.key),
            }
        }
        batch.insert(&keys::SEQUENCE_KEY, &next.to_be_bytes());
        if let Err(error) = open.write(batch) {
            // The snapshot's changes stay dirty in memory (the flusher
            // re-marks them) and are written again after the reopen.
            sled.open = None;
            drop(open);
            return Err(self.sled_error(error));
        }
        sled.sequence = next;
        // The flush is durable whatever happens here: a stale witness only
        // weakens the next start's check, so a failure is not the writers'.
        if let Err(error) = Witness::running(next).write(&self.witness) {
            tracing::warn!(dir = %self.dir.display(), %error, "cannot update {WITNESS_FILE}");
        }
        Ok(())
    }

    /// Closes the database after the last flush and records, in the
    /// witness, a hash of sled's files as they are left: the next start
    /// opens them directly if they are unchanged. Blocking.
    pub fn close(self) -> Result<(), StorageError> {
        let Storage {
            dir,
            sled,
            witness,
            _lock,
            ..
        } = self;
        let Sled { open, sequence } = sled.into_inner();
        let Some(Open { db, data, log }) = open else {
            // The last write failed: not a clean stop.
            return Ok(());
        };
        drop(data);
        db.flush().map_err(|error| StorageError::Damaged {
            dir: dir.clone(),
            message: error.to_string(),
        })?;
        drop((db, log));
        let io = |reason| StorageError::Io {
            dir: dir.clone(),
            reason,
        };
        let hash = hash_sled_files(&dir).map_err(io)?;
        Witness {
            flushed: sequence,
            clean: Some(hash),
        }
        .write(&witness)
        .and_then(|()| witness.sync_all())
        .map_err(io)?;
        Ok(())
    }

    /// Opens the database again after a failed write, and finds where its
    /// flushes are: the failed one may have reached disk after all.
    fn reopen(&self, sled: &mut Sled) -> Result<Open, StorageError> {
        let (db, _, data) = open_sled(&self.dir)?;
        let on_disk = data
            .get(keys::SEQUENCE_KEY)
            .map_err(|error| self.sled_error(error))?
            .and_then(|value| keys::decode_u64(&value))
            .unwrap_or(0);
        if on_disk < sled.sequence {
            return Err(StorageError::Refused {
                dir: self.dir.clone(),
                problem: rollback_problem(on_disk, sled.sequence),
            });
        }
        tracing::info!(dir = %self.dir.display(), sequence = on_disk, "database reopened after a failed write");
        sled.sequence = on_disk;
        let open = Open::new(&self.dir, db, data).map_err(|reason| StorageError::Io {
            dir: self.dir.clone(),
            reason,
        })?;
        sled.open = Some(open.clone());
        Ok(open)
    }

    fn damaged(&self, message: String) -> StorageError {
        StorageError::Damaged {
            dir: self.dir.clone(),
            message,
        }
    }

    fn sled_error(&self, error: sled::Error) -> StorageError {
        match error {
            sled::Error::Io(reason) => StorageError::Io {
                dir: self.dir.clone(),
                reason,
            },
            other => self.damaged(other.to_string()),
        }
    }
}

/// Checks a data directory without changing it: the marker, the lock (a
/// running node's directory is refused), and a recovered scratch copy of
/// the database against the witness. Blocking.
pub fn verify(dir: &Path) -> Result<DirectoryReport, StorageError> {
    let text =
        std::fs::read_to_string(dir.join(MARKER_FILE)).map_err(|reason| StorageError::Io {
            dir: dir.to_path_buf(),
            reason,
        })?;
    let node_id = parse_marker(dir, &text)?.node_id;
    let _lock = lock(dir)?;
    inspect(dir, &node_id)?;
    let clean = unchanged_since_clean_stop(dir, &Witness::read(dir)?)?;
    // In the system's temporary directory: verify writes nothing in the
    // directory it checks (which may be a read-only backup).
    // Named for this run: two verifies at once must not share a copy.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let scratch = std::env::temp_dir().join(format!("tally-verify-{}-{nanos}", std::process::id()));
    let report = check_copy(dir, &node_id, &scratch)?;
    Ok(DirectoryReport { clean, ..report })
}

/// Opens sled with our settings and both trees.
fn open_sled(dir: &Path) -> Result<(sled::Db, sled::Tree, sled::Tree), StorageError> {
    let damaged = |error: sled::Error| StorageError::Damaged {
        dir: dir.to_path_buf(),
        message: error.to_string(),
    };
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(SLED_CACHE_BYTES)
        .mode(sled::Mode::HighThroughput)
        // We decide when to flush: sync mode after every group of
        // increments, async mode every flush interval.
        .flush_every_ms(None)
        .open()
        .map_err(damaged)?;
    let meta = db.open_tree(META_TREE).map_err(damaged)?;
    let data = db.open_tree(DATA_TREE).map_err(damaged)?;
    Ok((db, meta, data))
}

/// This directory's random id, made (durably) at its first start: copies
/// of this node's entries carry it, so a copy from a lost directory is told
/// from one of its replacement whatever the versions and clocks say.
fn directory_id(db: &sled::Db, meta: &sled::Tree) -> Result<u64, sled::Error> {
    if let Some(id) = meta
        .get("directory_id")?
        .and_then(|bytes| keys::decode_u64(&bytes))
    {
        return Ok(id);
    }
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    let id = hasher.finish().max(1);
    meta.insert("directory_id", &id.to_be_bytes())?;
    db.flush()?;
    Ok(id)
}

/// Numbers this start, durably: greater than every earlier start of this
/// directory, and, being at least the wall clock in seconds, than the
/// starts of a directory this node lost (a replaced disk).
fn next_incarnation(db: &sled::Db, meta: &sled::Tree) -> Result<u64, sled::Error> {
    let previous = meta
        .get("incarnation")?
        .and_then(|bytes| keys::decode_u64(&bytes))
        .unwrap_or(0);
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    // A new directory takes the next second: every start of a directory
    // this node lost was numbered at most the second it happened in.
    let incarnation = if previous == 0 {
        now_secs + 1
    } else {
        (previous + 1).max(now_secs)
    };
    meta.insert("incarnation", &incarnation.to_be_bytes())?;
    db.flush()?;
    Ok(incarnation)
}

/// Takes the directory's lock file, creating it if needed.
fn lock(dir: &Path) -> Result<File, StorageError> {
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
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(StorageError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(reason)) => Err(io(reason)),
    }
}

/// Decides whether a set-up directory may be opened in place: yes at once
/// if its files are exactly as a clean stop left them, otherwise only once a
/// scratch copy has recovered soundly.
fn check_before_open(dir: &Path, node_id: &str) -> Result<(), StorageError> {
    let witness = Witness::read(dir)?;
    if unchanged_since_clean_stop(dir, &witness)? {
        return Ok(());
    }
    if witness.clean.is_some() {
        tracing::warn!(dir = %dir.display(), "files changed since the last clean stop; checking a copy");
    } else {
        tracing::info!(dir = %dir.display(), "the last stop was not clean; checking a copy before opening");
    }
    let report = check_copy(dir, node_id, &dir.join(CHECK_DIR))?;
    tracing::info!(
        entries = report.entries,
        records = report.records,
        sequence = report.sequence,
        "copy recovered soundly"
    );
    Ok(())
}

/// Whether sled's files hash as the witness recorded at a clean stop.
fn unchanged_since_clean_stop(dir: &Path, witness: &Witness) -> Result<bool, StorageError> {
    let Some(clean) = witness.clean else {
        return Ok(false);
    };
    let hash = hash_sled_files(dir).map_err(|reason| StorageError::Io {
        dir: dir.to_path_buf(),
        reason,
    })?;
    Ok(hash == clean)
}

/// Recovers a copy of the directory's sled files in the directory
/// `scratch` (removed first if a killed check left it, and after) and checks
/// it: metadata, every key and value, the flush sequence against the
/// witness. The directory's sled files are only read. The copy needs as
/// much free space as the database.
fn check_copy(dir: &Path, node_id: &str, scratch: &Path) -> Result<DirectoryReport, StorageError> {
    let refused = |problem: String| StorageError::Refused {
        dir: dir.to_path_buf(),
        problem,
    };
    let witness = Witness::read(dir)?;
    let cannot_check = |reason: std::io::Error| StorageError::Io {
        dir: dir.to_path_buf(),
        reason: std::io::Error::new(
            reason.kind(),
            format!(
                "cannot check a copy of the database in {} (needs as much free space as the \
                 database): {reason}",
                scratch.display()
            ),
        ),
    };
    // A copy left by a check that was killed is ours to remove.
    remove_dir_if_present(scratch).map_err(cannot_check)?;
    let _cleanup = RemoveOnDrop(scratch);
    copy_sled_files(dir, scratch).map_err(cannot_check)?;
    let (db, meta, data) = open_sled(scratch).map_err(|error| match error {
        StorageError::Damaged { message, .. } => refused(format!("sled cannot open it: {message}")),
        other => other,
    })?;
    check_meta(&meta, scratch, node_id).map_err(|error| match error {
        StorageError::WrongNode { found, .. } => {
            refused(format!("its database belongs to node {found:?}"))
        }
        StorageError::Damaged { message, .. } => refused(message),
        other => other,
    })?;
    let report = scan(&data, node_id, |_| {}).map_err(refused)?;
    drop((data, meta, db));
    if report.sequence < witness.flushed {
        return Err(refused(rollback_problem(report.sequence, witness.flushed)));
    }
    Ok(DirectoryReport {
        witnessed: witness.flushed,
        ..report
    })
}

fn rollback_problem(sequence: u64, witnessed: u64) -> String {
    format!(
        "its database ends at flush {sequence}, but flush {witnessed} was completed \
         ({WITNESS_FILE}): acknowledged writes are missing"
    )
}

/// One decoded item of the `data` tree.
enum Item<'a> {
    Entry {
        counter: &'a str,
        stripe: u32,
        value: i64,
    },
    Record(LoadedRecord),
    /// An entry of a replica copy.
    Replica {
        origin: &'a str,
        counter: &'a str,
        stripe: u32,
        value: i64,
    },
    ReplicaVersion {
        origin: &'a str,
        stamp: CopyStamp,
    },
}

/// Decodes every key and value of the `data` tree, hands this node's
/// entries and every record to `visit`, and counts them.
fn scan(
    data: &sled::Tree,
    node_id: &str,
    mut visit: impl FnMut(Item<'_>),
) -> Result<DirectoryReport, String> {
    let mut report = DirectoryReport {
        node_id: node_id.to_string(),
        ..DirectoryReport::default()
    };
    for item in data.iter() {
        let (key, value) = item.map_err(|error| error.to_string())?;
        match keys::decode_key(&key).ok_or_else(|| format!("undecodable key {key:?}"))? {
            DataKey::Entry(entry) => {
                let value = keys::decode_u64(&value)
                    .ok_or_else(|| format!("bad value for entry {:?}", entry.counter))?;
                if entry.origin == node_id {
                    report.entries += 1;
                    visit(Item::Entry {
                        counter: entry.counter,
                        stripe: entry.stripe,
                        value: value as i64,
                    });
                } else {
                    report.foreign_entries += 1;
                    visit(Item::Replica {
                        origin: entry.origin,
                        counter: entry.counter,
                        stripe: entry.stripe,
                        value: value as i64,
                    });
                }
            }
            DataKey::ReplicaVersion { origin } => {
                let stamp = CopyStamp::decode(&value)
                    .ok_or_else(|| format!("bad replica version of {origin:?}"))?;
                visit(Item::ReplicaVersion { origin, stamp });
            }
            DataKey::Record { counter, .. } => {
                let (delta, applied_unix_ms) = keys::decode_record_value(&value)
                    .ok_or_else(|| format!("bad value for a record of {counter:?}"))?;
                report.records += 1;
                visit(Item::Record(LoadedRecord {
                    key: key.as_ref().into(),
                    counter: counter.into(),
                    delta,
                    applied_unix_ms,
                }));
            }
            DataKey::Sequence => {
                report.sequence = keys::decode_u64(&value).ok_or("bad flush sequence value")?;
            }
            DataKey::Drain => {
                report.drain = DrainState::decode(&value).ok_or("bad drain state")?;
            }
            DataKey::Adopted { origin } => report.retired.push(origin.to_string()),
            DataKey::Restored => {
                report.awaiting_restore =
                    keys::decode_u64(&value).ok_or("bad restored value")? == 0;
            }
        }
    }
    Ok(report)
}

/// The `FLUSHED` file: the last flush known complete, and the hash of
/// sled's files if the node stopped cleanly after it. Fixed width, written
/// in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Witness {
    flushed: u64,
    clean: Option<u64>,
}

impl Witness {
    fn running(flushed: u64) -> Self {
        Witness {
            flushed,
            clean: None,
        }
    }

    fn encode(self) -> String {
        // 0 is never a hash we record: `hash_sled_files` avoids it.
        format!(
            "flushed {:020} clean {:016x}\n",
            self.flushed,
            self.clean.unwrap_or(0)
        )
    }

    fn write(self, file: &File) -> std::io::Result<()> {
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
            let mut words = text.strip_suffix('\n')?.split(' ');
            let (Some("flushed"), Some(flushed), Some("clean"), Some(clean), None) = (
                words.next(),
                words.next(),
                words.next(),
                words.next(),
                words.next(),
            ) else {
                return None;
            };
            let clean = u64::from_str_radix(clean, 16).ok()?;
            Some(Witness {
                flushed: flushed.parse().ok()?,
                clean: (clean != 0).then_some(clean),
            })
        };
        parse().ok_or_else(|| refused(format!("{WITNESS_FILE} is unreadable: {text:?}")))
    }
}

/// Whether a top-level name in a data directory is one of sled's files:
/// `conf`, `db`, `snap.*` and the `blobs` directory. Anything else (ours,
/// `lost+found`, a scratch copy) is neither hashed nor copied.
fn is_sled_file(name: &std::ffi::OsStr) -> bool {
    name == "conf"
        || name == "db"
        || name == "blobs"
        || name.as_encoded_bytes().starts_with(b"snap.")
}

/// sled's files in a marked directory, as paths relative to it, sorted.
fn sled_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        for entry in std::fs::read_dir(dir.join(&relative))? {
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

/// xxh3 over sled's files: names, lengths and contents. Never 0.
fn hash_sled_files(dir: &Path) -> std::io::Result<u64> {
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

fn remove_dir_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Removes a scratch directory when the check ends, however it ends.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(error) = remove_dir_if_present(self.0) {
            tracing::warn!(path = %self.0.display(), %error, "cannot remove the check's scratch copy");
        }
    }
}

fn copy_sled_files(from: &Path, to: &Path) -> std::io::Result<()> {
    for relative in sled_files(from)? {
        let target = to.join(&relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(from.join(&relative), target)?;
    }
    Ok(())
}

fn write_pid(mut lock: &File) -> std::io::Result<()> {
    lock.set_len(0)?;
    writeln!(lock, "{}", std::process::id())
}

/// What the `TALLY` marker file holds.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct Marker {
    format_version: u64,
    node_id: String,
    state: MarkerState,
}

/// How far set-up got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum MarkerState {
    /// Written before sled created its files; metadata may be missing.
    SettingUp,
    /// Metadata is on disk; from now on it must be there.
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
        message: format!("unreadable {MARKER_FILE} file: {}", error.message()),
    })?;
    if marker.format_version != FORMAT_VERSION {
        return Err(StorageError::Damaged {
            dir: dir.to_path_buf(),
            message: format!(
                "format version {}, this build reads version {FORMAT_VERSION} \
                 (move the directory aside or delete it to start the node empty)",
                marker.format_version
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
fn write_marker(dir: &Path, node_id: &str, state: MarkerState) -> Result<(), StorageError> {
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

/// Finishes setting up a directory: metadata in sled, flushed, then the
/// marker turned `ready`. Safe to repeat: metadata already written by an
/// interrupted set-up is checked, not rewritten.
fn set_up(
    db: &sled::Db,
    meta: &sled::Tree,
    data: &sled::Tree,
    dir: &Path,
    node_id: &str,
) -> Result<(), StorageError> {
    let damaged = |message: String| StorageError::Damaged {
        dir: dir.to_path_buf(),
        message,
    };
    let has_metadata = meta
        .contains_key("node_id")
        .map_err(|error| damaged(error.to_string()))?;
    if has_metadata {
        check_meta(meta, dir, node_id)?;
    } else {
        if !data.is_empty() {
            return Err(damaged("entries without metadata".to_string()));
        }
        // A directory created empty: if this node existed before, its
        // entries are in its replicas, and it must not answer with nothing.
        meta.insert("format_version", &FORMAT_VERSION.to_be_bytes())
            .and_then(|_| meta.insert("node_id", node_id.as_bytes()))
            .and_then(|_| data.insert(keys::RESTORED_KEY, &0u64.to_be_bytes()))
            .and_then(|_| db.flush())
            .map_err(|error| damaged(error.to_string()))?;
    }
    // Nothing flushed yet; fsynced before the marker says `ready`, so a
    // ready directory always has its witness.
    let io = |reason| StorageError::Io {
        dir: dir.to_path_buf(),
        reason,
    };
    let witness = File::create(dir.join(WITNESS_FILE)).map_err(io)?;
    Witness::running(0)
        .write(&witness)
        .and_then(|()| witness.sync_all())
        .map_err(io)?;
    write_marker(dir, node_id, MarkerState::Ready)
}

/// Checks a marked directory's metadata. Missing metadata in a marked
/// directory means the database lost it: damaged, not new.
fn check_meta(meta: &sled::Tree, dir: &Path, node_id: &str) -> Result<(), StorageError> {
    let damaged = |message: String| StorageError::Damaged {
        dir: dir.to_path_buf(),
        message,
    };
    let stored_node = meta
        .get("node_id")
        .map_err(|error| damaged(error.to_string()))?
        .ok_or_else(|| {
            damaged(format!(
                "the database has no metadata although {MARKER_FILE} says it was set up"
            ))
        })?;
    let version = meta
        .get("format_version")
        .map_err(|error| damaged(error.to_string()))?
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_ref()).ok())
        .map(u64::from_be_bytes);
    if version != Some(FORMAT_VERSION) {
        return Err(damaged(format!(
            "format version {version:?}, this build reads version {FORMAT_VERSION}"
        )));
    }
    let stored_node = String::from_utf8_lossy(&stored_node).into_owned();
    if stored_node != node_id {
        return Err(StorageError::WrongNode {
            dir: dir.to_path_buf(),
            found: stored_node,
            expected: node_id.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StripeIncrement;
    use std::collections::BTreeMap;

    fn add(store: &Store, counter: &str, stripe: u32, delta: i64, key: Option<&str>) {
        store.apply(
            &[StripeIncrement {
                counter,
                stripe,
                delta,
                idempotency_key: key,
            }],
            1_000,
        );
    }

    /// A directory with flushed entries and records, left as a crash leaves
    /// it (`clean` false) or as a clean stop does.
    fn written_directory(clean: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), "shard-1").unwrap();
        let store = Store::new();
        for round in 0..200 {
            add(
                &store,
                &format!("c{}", round % 17),
                round % 4,
                1,
                Some(&format!("k{round}")),
            );
            storage.write(&store.begin_flush()).unwrap();
        }
        if clean {
            storage.close().unwrap();
        }
        dir
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

    fn reopen(dir: &Path) -> Result<(Storage, Store, DirectoryReport), StorageError> {
        let storage = Storage::open(dir, "shard-1")?;
        let store = Store::new();
        let report = storage.load_into(&store, &Replicas::default())?;
        Ok((storage, store, report))
    }

    #[test]
    fn entries_and_records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = Storage::open(dir.path(), "shard-1").unwrap();
            let store = Store::new();
            add(&store, "a", 0, 5, Some("key"));
            add(&store, "a", 2, -3, None);
            add(&store, "gone", 0, 1, None);
            storage.write(&store.begin_flush()).unwrap();
            store.erase(&["gone"]);
            storage.write(&store.begin_flush()).unwrap();
        }
        let (_storage, store, report) = reopen(dir.path()).unwrap();
        assert_eq!(report.entries, 2);
        assert_eq!(report.records, 1);
        assert_eq!(report.sequence, 2);
        assert_eq!(report.witnessed, 2);
        assert_eq!(store.read("a"), vec![(0, 5), (2, -3)]);
        assert_eq!(store.read("gone"), vec![]);
        let (outcomes, _) = store.apply(
            &[StripeIncrement {
                counter: "a",
                stripe: 0,
                delta: 5,
                idempotency_key: Some("key"),
            }],
            2_000,
        );
        assert_eq!(outcomes, vec![crate::store::ApplyOutcome::Duplicate]);
    }

    /// Loads a node's directory, for the replica copies it holds.
    fn load_copies(storage: &Storage) -> (DirectoryReport, Replicas) {
        let replicas = Replicas::default();
        let report = storage.load_into(&Store::new(), &replicas).unwrap();
        (report, replicas)
    }

    /// A copy stamp of directory 1 scanned at `version` ms.
    fn stamp(version: u64) -> CopyStamp {
        CopyStamp {
            version,
            scanned_unix_ms: version,
            directory_id: 1,
        }
    }

    #[test]
    fn a_change_set_larger_than_a_chunk_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..REPLICA_CHUNK * 2 + 10)
            .map(|i| format!("c{i}"))
            .collect();
        {
            let storage = Storage::open(dir.path(), "shard-1").unwrap();
            storage
                .write_replica("shard-2", true, stamp(1), &[("c0", 0, 1)])
                .unwrap();
            let entries: Vec<(&str, u32, i64)> =
                names.iter().map(|name| (name.as_str(), 3, 2)).collect();
            storage
                .write_replica("shard-2", false, stamp(2), &entries)
                .unwrap();
        }
        let storage = Storage::open(dir.path(), "shard-1").unwrap();
        let (report, replicas) = load_copies(&storage);
        // c0 stripe 0 from the full copy, and every entry of the change set.
        assert_eq!(report.foreign_entries, names.len() as u64 + 1);
        assert_eq!(replicas.versions(), vec![("shard-2".into(), 2)]);
        let last = names.last().unwrap().clone();
        let read = replicas.read(&["c0".into(), last]);
        assert_eq!(read[0].counters, vec![vec![(0, 1), (3, 2)], vec![(3, 2)]]);
    }

    #[test]
    fn an_erase_reaches_copy_entries_that_memory_does_not_hold_yet() {
        // A change set that failed part way leaves entries on disk that
        // the in-memory copy lacks; an erase must remove them too.
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), "shard-1").unwrap();
        storage
            .write_replica("shard-2", true, stamp(1), &[("d", 0, 1)])
            .unwrap();
        storage
            .write_replica("shard-2", false, stamp(2), &[("c", 0, 5)])
            .unwrap();
        // Memory as it is after the full set only.
        let memory = Replicas::default();
        memory.apply("shard-2", stamp(1), true, &[("d", 0, 1)]);
        storage
            .erase_replicas(&memory.erase_targets(&["c"]))
            .unwrap();
        drop(storage);
        let storage = Storage::open(dir.path(), "shard-1").unwrap();
        let (_, replicas) = load_copies(&storage);
        let read = replicas.read(&["c".into(), "d".into()]);
        assert_eq!(read[0].counters, vec![vec![], vec![(0, 1)]]);
    }

    #[test]
    fn replica_copies_survive_reopen_and_erase() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let storage = Storage::open(dir.path(), "shard-1").unwrap();
            let first = storage.incarnation();
            assert!(first > 1_700_000_000, "wall-clock seconds: {first}");
            storage
                .write_replica(
                    "shard-2",
                    true,
                    CopyStamp {
                        version: 7,
                        scanned_unix_ms: 70,
                        directory_id: 1,
                    },
                    &[("c", 0, 5), ("cc", 1, 3)],
                )
                .unwrap();
            storage
                .write_replica(
                    "shard-2",
                    false,
                    CopyStamp {
                        version: 9,
                        scanned_unix_ms: 90,
                        directory_id: 1,
                    },
                    &[("c", 2, 4), ("cc", 1, 0)],
                )
                .unwrap();
            storage
                .write_replica(
                    "shard-3",
                    true,
                    CopyStamp {
                        version: 4,
                        scanned_unix_ms: 40,
                        directory_id: 1,
                    },
                    &[("c", 0, 1)],
                )
                .unwrap();
            storage
                .erase_replicas(&[("shard-3".into(), "c".into())])
                .unwrap();
            first
        };
        let storage = Storage::open(dir.path(), "shard-1").unwrap();
        assert!(
            storage.incarnation() > first,
            "every start is numbered higher"
        );
        let (report, replicas) = load_copies(&storage);
        assert_eq!(report.entries, 0);
        assert_eq!(report.foreign_entries, 2);
        assert_eq!(
            replicas.versions(),
            vec![("shard-2".into(), 9), ("shard-3".into(), 4)]
        );
        let read = replicas.read(&["c".into(), "cc".into()]);
        let shard_2 = read.iter().find(|copy| copy.origin == "shard-2").unwrap();
        assert_eq!(shard_2.counters, vec![vec![(0, 5), (2, 4)], vec![]]);
        assert_eq!(shard_2.stamp.scanned_unix_ms, 90);
        // A full set replaces the copy.
        storage
            .write_replica(
                "shard-2",
                true,
                CopyStamp {
                    version: 12,
                    scanned_unix_ms: 120,
                    directory_id: 1,
                },
                &[("d", 0, 1)],
            )
            .unwrap();
        drop(storage);
        let storage = Storage::open(dir.path(), "shard-1").unwrap();
        let (_, replicas) = load_copies(&storage);
        let read = replicas.read(&["c".into(), "d".into()]);
        let shard_2 = read.iter().find(|copy| copy.origin == "shard-2").unwrap();
        assert_eq!(shard_2.counters, vec![vec![], vec![(0, 1)]]);
    }

    #[test]
    fn a_clean_stop_is_recognized_and_a_crash_is_checked() {
        let dir = written_directory(true);
        let report = verify(dir.path()).unwrap();
        assert!(report.clean);
        assert_eq!(report.sequence, 200);
        assert_eq!(report.records, 200);
        let (_storage, store, _) = reopen(dir.path()).unwrap();
        assert_eq!(store.read("c0").iter().map(|(_, v)| v).sum::<i64>(), 12);

        let crashed = written_directory(false);
        let report = verify(crashed.path()).unwrap();
        assert!(!report.clean);
        assert_eq!((report.sequence, report.witnessed), (200, 200));
        reopen(crashed.path()).unwrap();
    }

    #[test]
    fn verify_changes_nothing_and_refuses_a_running_nodes_directory() {
        let dir = written_directory(false);
        let before = contents(dir.path());
        verify(dir.path()).unwrap();
        assert_eq!(contents(dir.path()), before);
        let _running = Storage::open(dir.path(), "shard-1").unwrap();
        assert!(matches!(
            verify(dir.path()).unwrap_err(),
            StorageError::Locked { .. }
        ));
    }

    /// Damages a directory, then checks that opening and verifying refuse
    /// it and leave every file as it was.
    fn refused_untouched(clean: bool, damage: impl FnOnce(&Path)) -> String {
        let dir = written_directory(clean);
        damage(dir.path());
        let before = contents(dir.path());
        let error = reopen(dir.path()).expect_err("a damaged directory opened");
        assert!(matches!(error, StorageError::Refused { .. }), "{error}");
        assert_eq!(contents(dir.path()), before, "files changed: {error}");
        let verified = verify(dir.path()).unwrap_err();
        assert_eq!(verified.to_string(), error.to_string());
        assert_eq!(contents(dir.path()), before);
        error.to_string()
    }

    fn rewrite_db(dir: &Path, change: impl FnOnce(&mut Vec<u8>)) {
        let path = dir.join("db");
        let mut bytes = std::fs::read(&path).unwrap();
        change(&mut bytes);
        std::fs::write(&path, bytes).unwrap();
    }

    #[test]
    fn a_truncated_database_is_refused_untouched() {
        for clean in [false, true] {
            let message = refused_untouched(clean, |dir| {
                rewrite_db(dir, |bytes| bytes.truncate(bytes.len() / 2));
            });
            assert!(
                message.contains("acknowledged writes are missing"),
                "{message}"
            );
        }
    }

    #[test]
    fn an_overwritten_tail_is_refused_untouched() {
        let message = refused_untouched(false, |dir| {
            rewrite_db(dir, |bytes| {
                let at = bytes.len() - 4096;
                bytes[at..].fill(0x5a);
            });
        });
        assert!(message.contains("FLUSHED"), "{message}");
    }

    #[test]
    fn a_garbage_database_is_refused_untouched() {
        refused_untouched(true, |dir| {
            rewrite_db(dir, |bytes| {
                for (index, byte) in bytes.iter_mut().enumerate() {
                    *byte = (index * 7 + 13) as u8;
                }
            });
            for entry in std::fs::read_dir(dir).unwrap() {
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

    #[test]
    fn a_missing_or_unreadable_witness_is_refused_untouched() {
        let message = refused_untouched(true, |dir| {
            std::fs::remove_file(dir.join(WITNESS_FILE)).unwrap();
        });
        assert!(message.contains("FLUSHED is missing"), "{message}");
        let message = refused_untouched(false, |dir| {
            std::fs::write(dir.join(WITNESS_FILE), "zzz").unwrap();
        });
        assert!(message.contains("FLUSHED is unreadable"), "{message}");
    }

    #[test]
    fn a_stale_witness_is_no_false_alarm() {
        // Power loss may leave the witness behind the database, never ahead.
        let dir = written_directory(false);
        Witness::running(150)
            .write(
                &File::options()
                    .write(true)
                    .open(dir.path().join(WITNESS_FILE))
                    .unwrap(),
            )
            .unwrap();
        let (_storage, _store, report) = reopen(dir.path()).unwrap();
        assert_eq!((report.sequence, report.witnessed), (200, 150));
    }

    #[test]
    fn a_held_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Storage::open(dir.path(), "shard-1").unwrap();
        let error = Storage::open(dir.path(), "shard-1").unwrap_err();
        assert!(matches!(error, StorageError::Locked { .. }), "{error}");
        assert!(error.to_string().contains("in use by another process"));
    }

    #[test]
    fn another_nodes_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Storage::open(dir.path(), "shard-1").unwrap());
        let error = Storage::open(dir.path(), "shard-2").unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "data directory {} belongs to node \"shard-1\", not \"shard-2\"",
                dir.path().display()
            )
        );
    }

    #[test]
    fn an_older_format_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(MARKER_FILE),
            "format_version = 1\nnode_id = \"shard-1\"\nstate = \"ready\"\n",
        )
        .unwrap();
        let error = Storage::open(dir.path(), "shard-1").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("format version 1, this build reads version 2"),
            "{error}"
        );
    }

    #[test]
    fn a_foreign_directory_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("precious.txt"), "mine").unwrap();
        let error = Storage::open(dir.path(), "shard-1").unwrap_err();
        assert!(matches!(error, StorageError::Foreign { .. }), "{error}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("precious.txt")).unwrap(),
            "mine"
        );
        assert!(!dir.path().join("db").exists());
        assert!(
            !dir.path().join(LOCK_FILE).exists(),
            "not even a lock file is added"
        );
    }

    #[test]
    fn a_file_named_db_does_not_make_a_directory_ours() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), "someone else's database").unwrap();
        let error = Storage::open(dir.path(), "shard-1").unwrap_err();
        assert!(matches!(error, StorageError::Foreign { .. }), "{error}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("db")).unwrap(),
            "someone else's database"
        );
    }

    #[test]
    fn the_marker_names_the_node() {
        let dir = tempfile::tempdir().unwrap();
        drop(Storage::open(dir.path(), "shard-1").unwrap());
        let marker = std::fs::read_to_string(dir.path().join(MARKER_FILE)).unwrap();
        assert!(marker.contains("node_id = \"shard-1\""), "{marker}");
        assert!(marker.contains("format_version = 2"), "{marker}");
        assert!(marker.contains("state = \"ready\""), "{marker}");
        assert!(!dir.path().join(format!("{MARKER_FILE}.tmp")).exists());
    }

    #[test]
    fn a_first_start_interrupted_before_sled_resumes() {
        let dir = tempfile::tempdir().unwrap();
        // What a crash right after the first marker write leaves.
        std::fs::write(dir.path().join(LOCK_FILE), "").unwrap();
        write_marker(dir.path(), "shard-1", MarkerState::SettingUp).unwrap();
        drop(Storage::open(dir.path(), "shard-1").unwrap());
        let marker = std::fs::read_to_string(dir.path().join(MARKER_FILE)).unwrap();
        assert!(marker.contains("state = \"ready\""), "{marker}");
    }

    #[test]
    fn a_first_start_interrupted_after_metadata_resumes_and_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = Storage::open(dir.path(), "shard-1").unwrap();
            let store = Store::new();
            add(&store, "a", 1, 9, None);
            storage.write(&store.begin_flush()).unwrap();
        }
        write_marker(dir.path(), "shard-1", MarkerState::SettingUp).unwrap();
        let (storage, store, report) = reopen(dir.path()).unwrap();
        assert_eq!(report.entries, 1);
        assert_eq!(store.read("a"), vec![(1, 9)]);
        drop(storage);
        // A setting-up marker of another node is still another node's.
        write_marker(dir.path(), "shard-1", MarkerState::SettingUp).unwrap();
        assert!(matches!(
            Storage::open(dir.path(), "shard-2").unwrap_err(),
            StorageError::WrongNode { .. }
        ));
    }

    #[test]
    fn a_fresh_filesystems_lost_and_found_is_not_foreign_nor_sleds() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let lost_and_found = dir.path().join("lost+found");
        std::fs::create_dir(&lost_and_found).unwrap();
        std::fs::write(lost_and_found.join("#1234"), "recovered").unwrap();
        // As a freshly formatted volume has it: root's, unreadable to the
        // node's user.
        std::fs::set_permissions(&lost_and_found, std::fs::Permissions::from_mode(0o000)).unwrap();
        let storage = Storage::open(dir.path(), "shard-1").unwrap();
        storage
            .load_into(&Store::new(), &Replicas::default())
            .unwrap();
        storage.close().unwrap();
        // fsck may add to it while the node is stopped: still a clean stop.
        std::fs::set_permissions(&lost_and_found, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(lost_and_found.join("#5678"), "found later").unwrap();
        std::fs::set_permissions(&lost_and_found, std::fs::Permissions::from_mode(0o000)).unwrap();
        assert!(verify(dir.path()).unwrap().clean);
        let storage = Storage::open(dir.path(), "shard-1").unwrap();
        storage
            .load_into(&Store::new(), &Replicas::default())
            .unwrap();
        drop(storage);
        // Crashed: the copy check must not need it either.
        reopen(dir.path()).unwrap();
        std::fs::set_permissions(&lost_and_found, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!dir.path().join(CHECK_DIR).exists());
    }
}
