//! The checkpoint: the node's state as of a log position, in sled, so that
//! the log before that position can be deleted and a start replays only
//! what came after.
//!
//! # Layout
//!
//! One sled tree, `checkpoint`, in the directory `checkpoint/` of the data
//! directory. Counters are stored in buckets, a few thousand values in all
//! whatever the number of counters (sled spends about a kilobyte of memory
//! per key it has written, so a key per counter would cost more than the
//! counters):
//!
//! ```text
//! 'M'                                    -> metadata, JSON: format version,
//!                                           the log position covered, the
//!                                           node's NodeMeta, each copy's stamp
//! 'B' | bucket: u16 BE                   -> own entries and idempotency records
//! 'C' | origin_len: u8 | origin | bucket -> a replica copy's entries and
//!                                           the origin's idempotency records
//! bucket contents = counters: varint | (name: bytes | stripes: varint
//!                   | (stripe: varint | value: zigzag)*)*
//!                   | records: varint | (key: bytes | delta: zigzag
//!                   | applied_unix_ms: varint)*
//! ```
//!
//! # Writing
//!
//! The log thread captures buckets a few segments at a time, each exactly
//! as the log holds it at the frame being written (see [`crate::store`]),
//! and hands them to the checkpoint thread here, which writes them into
//! sled as they come. When a round has covered every segment and copy, the
//! metadata goes in with the round's position: the frame of its first
//! capture. Then sled is flushed and its log file fdatasynced, and only then
//! may the log thread delete the segments the position covers. A crash
//! anywhere in a round leaves sled with the previous position and buckets
//! each at some later frame, all of which the log still holds: replaying
//! from the previous position is exact.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use crate::codec::{Malformed, Reader};
use crate::meta::NodeMeta;
use crate::replicas::{CopyStamp, Replicas};
use crate::store::{decode_counters, CapturedBucket, Store};

/// The checkpoint's directory inside a data directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// Where a fresh checkpoint is written after a failed write abandoned the
/// current one.
const FRESH_DIR: &str = "checkpoint.next";
/// Where the abandoned checkpoint goes while a fresh one takes its place.
const OLD_DIR: &str = "checkpoint.old";
/// The checkpoint thread closes sled after this long without a job.
#[cfg(not(test))]
const CLOSE_AFTER: std::time::Duration = std::time::Duration::from_secs(6);
#[cfg(test)]
const CLOSE_AFTER: std::time::Duration = std::time::Duration::from_millis(100);
const TREE: &str = "checkpoint";
const META_KEY: &[u8] = b"M";
const OWN_PREFIX: u8 = b'B';
const COPY_PREFIX: u8 = b'C';
/// sled's page cache. Nothing is read back while the node runs, so the
/// cache only serves writes.
const CACHE_BYTES: u64 = 8 * 1024 * 1024;
/// How often the idle checkpoint thread returns free memory to the system.
#[cfg(not(test))]
const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
#[cfg(test)]
const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// The checkpoint's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    /// The data format version.
    pub format_version: u64,
    /// The last log frame the checkpoint covers: recovery replays after it.
    pub position: u64,
    /// The node's own state.
    pub node: NodeMeta,
    /// Each replica copy's stamp.
    pub copies: BTreeMap<String, CopyStamp>,
}

/// What a checkpoint held, as loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Its metadata; `None` for a checkpoint never finished (a new node).
    pub meta: Option<CheckpointMeta>,
    /// Non-zero own entries loaded.
    pub entries: u64,
    /// Idempotency records loaded.
    pub records: u64,
    /// Idempotency records of replica copies loaded.
    pub copy_records: u64,
    /// Entries of replica copies loaded.
    pub copy_entries: u64,
}

fn own_key(bucket: u16) -> [u8; 3] {
    let [high, low] = bucket.to_be_bytes();
    [OWN_PREFIX, high, low]
}

fn copy_prefix(origin: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + origin.len() + 2);
    key.push(COPY_PREFIX);
    key.push(origin.len() as u8);
    key.extend_from_slice(origin.as_bytes());
    key
}

fn copy_key(origin: &str, bucket: u16) -> Vec<u8> {
    let mut key = copy_prefix(origin);
    key.extend_from_slice(&bucket.to_be_bytes());
    key
}

/// An open checkpoint database.
#[derive(Debug)]
pub struct Checkpoint {
    db: sled::Db,
    tree: sled::Tree,
    /// sled's log file: on Linux sled makes a flush durable with
    /// `sync_file_range`, which neither flushes the device's write cache
    /// nor records a grown file's size; an fdatasync after each flush does
    /// both.
    log_file: File,
}

impl Checkpoint {
    /// Opens (or creates) the checkpoint database in `dir`.
    pub fn open(dir: &Path) -> Result<Checkpoint, sled::Error> {
        // A snapshot file sled began and could not finish (an open that
        // failed on a full disk) would be read as the newest snapshot, and
        // every later open would report corrupted data. sled never reads a
        // snapshot it is still generating, so these are safe to remove.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("snap.") && name.ends_with(".generating") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .mode(sled::Mode::LowSpace)
            // The checkpoint thread decides when to flush.
            .flush_every_ms(None);
        // The data directory's own lock keeps other processes out, so sled's
        // lock on its file is held only by the instant of a child's spawn
        // (see `retry_while_held`). sled tells that apart by message alone.
        let db = crate::storage::retry_while_held(
            || config.open(),
            |error| {
                matches!(error, sled::Error::Io(reason)
                    if reason.to_string().starts_with("could not acquire lock"))
            },
        )?;
        let tree = db.open_tree(TREE)?;
        let log_file = File::open(dir.join("db"))?;
        Ok(Checkpoint { db, tree, log_file })
    }

    /// Loads every bucket into `store` and `replicas` (copies of origins
    /// the metadata lists as retired are skipped) and returns what it held.
    pub fn load(&self, store: &Store, replicas: &Replicas) -> Result<Loaded, String> {
        let mut loaded = Loaded::default();
        if let Some(bytes) = self.tree.get(META_KEY).map_err(|error| error.to_string())? {
            let meta: CheckpointMeta = serde_json::from_slice(&bytes)
                .map_err(|error| format!("unreadable checkpoint metadata: {error}"))?;
            loaded.meta = Some(meta);
        }
        let retired = loaded
            .meta
            .as_ref()
            .map(|meta| meta.node.retired.clone())
            .unwrap_or_default();
        for item in self.tree.iter() {
            let (key, value) = item.map_err(|error| error.to_string())?;
            let malformed = |error: Malformed| format!("checkpoint key {key:?}: {error}");
            match key.first() {
                Some(&OWN_PREFIX) if key.len() == 3 => {
                    let mut reader = Reader::new(&value);
                    for logged in decode_counters(&mut reader).map_err(malformed)? {
                        for (stripe, value) in logged.stripes {
                            store.load(logged.counter, u32::from(stripe), value);
                            loaded.entries += 1;
                        }
                    }
                    let records = reader.count("record count").map_err(malformed)?;
                    for _ in 0..records {
                        let (record_key, delta, applied) =
                            crate::store::read_record(&mut reader).map_err(malformed)?;
                        store.load_record(record_key, Some((delta, applied)));
                        loaded.records += 1;
                    }
                    reader.finish("bucket").map_err(malformed)?;
                }
                Some(&COPY_PREFIX) => {
                    let mut reader = Reader::new(&key[1..]);
                    let length = usize::from(reader.byte("origin").map_err(malformed)?);
                    let origin = key
                        .get(2..2 + length)
                        .and_then(|origin| std::str::from_utf8(origin).ok())
                        .filter(|_| key.len() == 2 + length + 2)
                        .ok_or_else(|| malformed(Malformed { what: "copy key" }))?;
                    if retired.contains_key(origin) {
                        continue;
                    }
                    let mut reader = Reader::new(&value);
                    for logged in decode_counters(&mut reader).map_err(malformed)? {
                        for (stripe, value) in logged.stripes {
                            replicas.load(origin, logged.counter, u32::from(stripe), value);
                            loaded.copy_entries += 1;
                        }
                    }
                    let records = reader.count("record count").map_err(malformed)?;
                    for _ in 0..records {
                        let (record_key, delta, applied) =
                            crate::store::read_record(&mut reader).map_err(malformed)?;
                        // Its arrival is not kept: dated now, so it is
                        // remembered a whole window from this start.
                        replicas.load_record(
                            origin,
                            record_key,
                            delta,
                            applied,
                            store.retention_now_ms(),
                        );
                        loaded.copy_records += 1;
                    }
                    reader.finish("bucket").map_err(malformed)?;
                }
                _ if &*key == META_KEY => {}
                _ => return Err(format!("unknown checkpoint key {key:?}")),
            }
        }
        if let Some(meta) = &loaded.meta {
            for (origin, stamp) in &meta.copies {
                if !retired.contains_key(origin) {
                    replicas.load_stamp(origin, *stamp);
                }
            }
        }
        Ok(loaded)
    }

    /// Writes captured buckets of the own entries (`origin` `None`) or of a
    /// copy; not yet durable.
    pub fn write_buckets(
        &self,
        origin: Option<&str>,
        buckets: &[CapturedBucket],
    ) -> Result<(), sled::Error> {
        let mut batch = sled::Batch::default();
        for bucket in buckets {
            let key = match origin {
                None => own_key(bucket.bucket).to_vec(),
                Some(origin) => copy_key(origin, bucket.bucket),
            };
            if bucket.contents.is_empty() {
                batch.remove(key);
            } else {
                batch.insert(key, bucket.contents.as_slice());
            }
        }
        self.tree.apply_batch(batch)
    }

    /// Deletes every bucket of `origin`'s copy; not yet durable.
    pub fn delete_copy(&self, origin: &str) -> Result<(), sled::Error> {
        let mut batch = sled::Batch::default();
        for key in self.tree.scan_prefix(copy_prefix(origin)).keys() {
            batch.remove(key?);
        }
        self.tree.apply_batch(batch)
    }

    /// Writes the metadata of a finished round and makes everything
    /// written so far durable.
    pub fn finish(&self, meta: &CheckpointMeta) -> Result<(), sled::Error> {
        let json = serde_json::to_vec(meta).expect("checkpoint metadata serializes");
        self.tree.insert(META_KEY, json)?;
        self.sync()
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> Result<(), sled::Error> {
        self.db.flush()?;
        self.log_file.sync_data()?;
        Ok(())
    }
}

/// A job for the checkpoint thread.
#[derive(Debug)]
pub enum Job {
    /// Write these buckets (of a copy of `origin`, or own).
    Buckets {
        /// `None`: own entries.
        origin: Option<String>,
        /// The buckets.
        buckets: Vec<CapturedBucket>,
    },
    /// Delete the buckets of a dropped copy.
    DeleteCopy(String),
    /// The round is complete: write the metadata and make it durable.
    Finish {
        /// The metadata, with the round's position (boxed: it is the
        /// largest job by far, and the rarest).
        meta: Box<CheckpointMeta>,
        /// The round captured every bucket (all were marked when it began).
        everything: bool,
    },
    /// The round is abandoned (its log frame failed): write nothing more
    /// of it.
    Abort,
}

/// What became of a round.
#[derive(Debug)]
pub enum RoundOutcome {
    /// Durable: the log up to `position` may be deleted.
    Done {
        /// The round's position.
        position: u64,
        /// sled's files as the round left them (see
        /// [`crate::storage::Witness`]).
        hash: Option<u64>,
    },
    /// A write failed: no bucket of the round can be trusted to be durable,
    /// and the next round must capture everything.
    Failed(String),
    /// Abandoned on request.
    Aborted,
    /// The database was closed between rounds; its files hash to `hash`
    /// (they are as the last finished round left them).
    Closed {
        /// The files' hash.
        hash: u64,
    },
    /// Closing the database between rounds failed and it was abandoned:
    /// the next round must capture everything. Not the answer to a round.
    CloseFailed(String),
}

/// The checkpoint thread's state.
struct Thread {
    /// The data directory.
    data_dir: PathBuf,
    /// The open database, if any: opened at a round's first job, closed
    /// once idle.
    database: Option<Checkpoint>,
    /// A sled write failed: that database is abandoned (never flushed nor
    /// dropped: after an error sled may block forever in either), and the
    /// next round is written whole into a fresh directory that then
    /// replaces `checkpoint/`.
    broken: bool,
    /// The round in progress writes into a fresh directory.
    fresh: bool,
    /// A round is in progress (a job came since the last Finish or Abort).
    in_round: bool,
    /// The first error of the round in progress.
    failed: Option<String>,
    /// sled's files are as a finished round left them.
    settled: bool,
}

/// Runs on the checkpoint thread: takes jobs until the sender is dropped.
/// `opened` is the database a start opened in place, if it did. Returns
/// the hash of sled's files once closed, if the last round was durable and
/// nothing was written after it.
pub fn run(
    data_dir: PathBuf,
    opened: Option<Checkpoint>,
    jobs: mpsc::Receiver<Job>,
    outcomes: mpsc::Sender<RoundOutcome>,
) -> Option<u64> {
    let mut thread = Thread {
        data_dir,
        settled: opened.is_some(),
        database: opened,
        broken: false,
        fresh: false,
        in_round: false,
        failed: None,
    };
    let mut idle = std::time::Duration::ZERO;
    loop {
        let job = match jobs.recv_timeout(TRIM_INTERVAL) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                idle += TRIM_INTERVAL;
                if idle >= CLOSE_AFTER && !thread.in_round && thread.database.is_some() {
                    // sled holds about its files' size in memory while open:
                    // between rounds it is closed.
                    let closed = match thread.close() {
                        Ok(Some(hash)) => Some(RoundOutcome::Closed { hash }),
                        Ok(None) => None,
                        // Abandoned: the next round must hold everything.
                        Err(error) => Some(RoundOutcome::CloseFailed(error)),
                    };
                    if let Some(outcome) = closed {
                        if outcomes.send(outcome).is_err() {
                            break;
                        }
                    }
                }
                // Replication's large transient buffers (a full copy sent
                // or received) are freed by the threads that used them;
                // this thread gives their pages back while it idles.
                tally_runtime::process::release_free_memory();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        idle = std::time::Duration::ZERO;
        if let Some(outcome) = thread.handle(job) {
            // A round's captures were large and are gone now.
            tally_runtime::process::release_free_memory();
            if outcomes.send(outcome).is_err() {
                break;
            }
        }
    }
    if thread.broken {
        return None;
    }
    thread.close().ok().flatten()
}

impl Thread {
    fn current_dir(&self) -> PathBuf {
        self.data_dir.join(CHECKPOINT_DIR)
    }

    fn fresh_dir(&self) -> PathBuf {
        self.data_dir.join(FRESH_DIR)
    }

    /// Syncs and closes the database; returns its files' hash if they are
    /// as a finished round left them. A failed sync abandons the database,
    /// as any sled error does.
    fn close(&mut self) -> Result<Option<u64>, String> {
        let Some(db) = self.database.take() else {
            return Ok(None);
        };
        #[cfg(test)]
        let synced = if tests::fail_here(&self.data_dir) {
            Err(sled::Error::Unsupported(
                "a failure the test asked for".into(),
            ))
        } else {
            db.sync()
        };
        #[cfg(not(test))]
        let synced = db.sync();
        if let Err(error) = synced {
            let error = format!("closing the checkpoint: {error}");
            tracing::warn!(%error, "checkpoint abandoned");
            std::mem::forget(db);
            self.broken = true;
            return Err(error);
        }
        drop(db);
        // Hashed once sled has closed its files (it writes as it closes).
        Ok(if self.settled {
            crate::storage::hash_sled_files(&self.current_dir()).ok()
        } else {
            None
        })
    }

    /// Opens the database a round writes into, at the round's first job.
    fn begin_round(&mut self) -> Result<(), String> {
        self.in_round = true;
        self.settled = false;
        self.fresh = self.broken;
        if self.fresh {
            let fresh = self.fresh_dir();
            crate::storage::remove_dir_if_present(&fresh)
                .map_err(|error| format!("cannot clear {}: {error}", fresh.display()))?;
            self.database = Some(
                Checkpoint::open(&fresh)
                    .map_err(|error| format!("cannot create a fresh checkpoint: {error}"))?,
            );
        } else if self.database.is_none() {
            self.database = Some(
                Checkpoint::open(&self.current_dir())
                    .map_err(|error| format!("cannot open the checkpoint: {error}"))?,
            );
        }
        Ok(())
    }

    /// After a sled error: the database is abandoned, never touched again.
    fn abandon(&mut self, error: String) {
        if let Some(db) = self.database.take() {
            std::mem::forget(db);
        }
        self.broken = true;
        self.failed.get_or_insert(error);
    }

    fn handle(&mut self, job: Job) -> Option<RoundOutcome> {
        if !self.in_round && !matches!(job, Job::Abort) {
            if let Err(error) = self.begin_round() {
                self.abandon(error);
            }
        }
        if self.failed.is_none() {
            if let Some(db) = &self.database {
                #[cfg(test)]
                if tests::fail_here(&self.data_dir) {
                    self.abandon("a failure the test asked for".into());
                    return self.handle(job);
                }
                let written = match &job {
                    Job::Buckets { origin, buckets } => db
                        .write_buckets(origin.as_deref(), buckets)
                        .inspect(|()| crate::crash_point::reached("checkpoint-buckets")),
                    Job::DeleteCopy(origin) => db.delete_copy(origin),
                    Job::Finish { meta, everything } => {
                        if self.fresh && !everything {
                            // A fresh checkpoint replaces the whole one: it
                            // must hold everything, not a round's changes.
                            self.abandon(
                                "a fresh checkpoint needs a round that captured everything".into(),
                            );
                            Ok(())
                        } else {
                            db.finish(meta)
                        }
                    }
                    Job::Abort => Ok(()),
                };
                if let Err(error) = written {
                    self.abandon(error.to_string());
                }
            }
        }
        match job {
            Job::Finish { meta, .. } => {
                self.in_round = false;
                Some(match self.failed.take() {
                    None => {
                        crate::crash_point::reached("checkpoint-durable");
                        if self.fresh {
                            if let Err(error) = self.replace_with_fresh() {
                                self.abandon(error.clone());
                                self.failed = None;
                                return Some(RoundOutcome::Failed(error));
                            }
                        }
                        self.broken = false;
                        self.settled = true;
                        RoundOutcome::Done {
                            position: meta.position,
                            hash: crate::storage::hash_sled_files(&self.current_dir()).ok(),
                        }
                    }
                    Some(error) => RoundOutcome::Failed(error),
                })
            }
            Job::Abort => {
                self.in_round = false;
                self.failed = None;
                Some(RoundOutcome::Aborted)
            }
            _ => None,
        }
    }

    /// Puts a fresh checkpoint, durable, in place of the abandoned one:
    /// `checkpoint/` becomes `checkpoint.old/`, the fresh one becomes
    /// `checkpoint/`, the old one goes. A crash in between is settled at
    /// the next start ([`settle_directories`]).
    fn replace_with_fresh(&mut self) -> Result<(), String> {
        // Closed first: sled opens files by path later.
        let db = self.database.take().expect("a fresh round has a database");
        drop(db);
        let (current, fresh, old) = (
            self.current_dir(),
            self.fresh_dir(),
            self.data_dir.join(OLD_DIR),
        );
        let io =
            |error: std::io::Error| format!("cannot put the fresh checkpoint in place: {error}");
        crate::storage::remove_dir_if_present(&old).map_err(io)?;
        if current.exists() {
            std::fs::rename(&current, &old).map_err(io)?;
        }
        std::fs::rename(&fresh, &current).map_err(io)?;
        File::open(&self.data_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io)?;
        if let Err(error) = crate::storage::remove_dir_if_present(&old) {
            tracing::warn!(%error, "cannot remove the abandoned checkpoint");
        }
        tracing::info!("a fresh checkpoint replaced the one a failed write abandoned");
        Ok(())
    }
}

/// Settles what a crash during [`Thread::replace_with_fresh`] left, before
/// a start opens the checkpoint: a fresh checkpoint is in place only once
/// the old one was moved aside (it was durable before that), so with
/// `checkpoint/` present any `checkpoint.next/` is unfinished.
pub fn settle_directories(data_dir: &Path) -> std::io::Result<()> {
    let (current, fresh, old) = (
        data_dir.join(CHECKPOINT_DIR),
        data_dir.join(FRESH_DIR),
        data_dir.join(OLD_DIR),
    );
    if !current.exists() && old.exists() && fresh.exists() {
        std::fs::rename(&fresh, &current)?;
        File::open(data_dir)?.sync_all()?;
    }
    crate::storage::remove_dir_if_present(&fresh)?;
    crate::storage::remove_dir_if_present(&old)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};

    /// The data directories whose checkpoint thread fails its next write
    /// (tests run at once, each with its own directory).
    static FAIL_NEXT_WRITE: parking_lot::Mutex<Vec<PathBuf>> = parking_lot::Mutex::new(Vec::new());

    /// Makes the next checkpoint write for `data_dir` fail, as a sled
    /// error would.
    pub(crate) fn fail_next_write(data_dir: &Path) {
        FAIL_NEXT_WRITE.lock().push(data_dir.to_path_buf());
    }

    pub(super) fn fail_here(data_dir: &Path) -> bool {
        let mut armed = FAIL_NEXT_WRITE.lock();
        match armed.iter().position(|dir| dir == data_dir) {
            Some(index) => {
                armed.remove(index);
                true
            }
            None => false,
        }
    }
}
