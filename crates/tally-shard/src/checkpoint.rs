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
//! 'C' | origin_len: u8 | origin | bucket -> a replica copy's entries
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
const TREE: &str = "checkpoint";
const META_KEY: &[u8] = b"M";
const OWN_PREFIX: u8 = b'B';
const COPY_PREFIX: u8 = b'C';
/// sled's page cache. Nothing is read back while the node runs, so the
/// cache only serves writes.
const CACHE_BYTES: u64 = 8 * 1024 * 1024;

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
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .mode(sled::Mode::LowSpace)
            // The checkpoint thread decides when to flush.
            .flush_every_ms(None)
            .open()?;
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
                        let record_key = reader.bytes("record key").map_err(malformed)?;
                        crate::store::decode_record_key(record_key)
                            .ok_or_else(|| malformed(Malformed { what: "record key" }))?;
                        let delta = reader.signed("record delta").map_err(malformed)?;
                        let applied = reader.varint("record time").map_err(malformed)?;
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
                    if reader.count("record count").map_err(malformed)? != 0 {
                        return Err(malformed(Malformed {
                            what: "records in a copy",
                        }));
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

    /// Bytes of sled's files, for status pages.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
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
    Finish(CheckpointMeta),
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
}

/// Runs on the checkpoint thread: takes jobs until the sender is dropped.
/// The database is `opened` at start, or opened at the first job (and again
/// after a failure). Returns the hash of sled's files once it is closed, if
/// the last round was durable and nothing was written after it.
pub fn run(
    dir: PathBuf,
    opened: Option<Checkpoint>,
    jobs: mpsc::Receiver<Job>,
    outcomes: mpsc::Sender<RoundOutcome>,
) -> Option<u64> {
    // Whether sled's files are as a finished round left them.
    let mut settled = opened.is_some();
    let mut database = opened;
    // The first error of the round in progress.
    let mut failed: Option<String> = None;
    for job in jobs {
        if database.is_none() && failed.is_none() {
            match Checkpoint::open(&dir) {
                Ok(opened) => database = Some(opened),
                Err(error) => failed = Some(format!("cannot open the checkpoint: {error}")),
            }
        }
        if matches!(job, Job::Buckets { .. } | Job::DeleteCopy(_)) {
            settled = false;
        }
        let written = match (&job, &database, &failed) {
            (_, _, Some(_)) | (_, None, _) => Ok(()),
            (Job::Buckets { origin, buckets }, Some(db), None) => db
                .write_buckets(origin.as_deref(), buckets)
                .inspect(|()| crate::crash_point::reached("checkpoint-buckets")),
            (Job::DeleteCopy(origin), Some(db), None) => db.delete_copy(origin),
            (Job::Finish(meta), Some(db), None) => db.finish(meta),
            (Job::Abort, _, _) => Ok(()),
        };
        if let Err(error) = written {
            // sled keeps the error of a failed write; the database is
            // opened again for the next round.
            failed = Some(error.to_string());
            database = None;
        }
        let outcome = match job {
            Job::Finish(meta) => Some(match failed.take() {
                None => {
                    crate::crash_point::reached("checkpoint-durable");
                    settled = true;
                    RoundOutcome::Done {
                        position: meta.position,
                        hash: crate::storage::hash_sled_files(&dir).ok(),
                    }
                }
                Some(error) => {
                    settled = false;
                    RoundOutcome::Failed(error)
                }
            }),
            Job::Abort => {
                failed = None;
                Some(RoundOutcome::Aborted)
            }
            _ => None,
        };
        if let Some(outcome) = outcome {
            if outcomes.send(outcome).is_err() {
                break;
            }
        }
    }
    let db = database?;
    if let Err(error) = db.sync() {
        tracing::warn!(%error, "checkpoint: last sync failed");
        return None;
    }
    drop(db);
    // Hashed once sled has closed its files (it writes as it closes).
    settled
        .then(|| crate::storage::hash_sled_files(&dir).ok())
        .flatten()
}
