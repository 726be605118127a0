//! Data directories of format version 2 (sled alone, written on every
//! flush), read once to migrate them to the current format at a node's
//! first start with this build, and by `tally-shard verify`.
//!
//! Format 2 kept one sled database in the data directory itself (`conf`,
//! `db`, `snap.*`, `blobs/`) with two trees: `meta` (`format_version`,
//! `node_id`, `incarnation`, `directory_id`) and `data`:
//!
//! ```text
//! entry    = origin_len u8 (1..=64) | origin | counter_len u16 BE | counter | stripe u32 BE
//!            -> i64 BE
//! record   = 0x00 'K' | counter_len u16 BE | counter | idempotency key
//!            -> delta i64 BE | applied_unix_ms u64 BE
//! sequence = 0x00 'S' -> u64 BE (the last flush)
//! replica  = 0x00 'V' | origin -> version | scan time | directory id (u64 BE each)
//! restored = 0x00 'R' -> 0 while the own entries await a restore
//! drain    = 0x00 'D' -> 0 | 1 | 2 version adopter | 3 version adopter
//! adopted  = 0x00 'A' | origin -> the adopted version
//! ```
//!
//! and a witness file `FLUSHED` (`flushed N clean HASH`): a database that
//! holds fewer flushes than it names lost acknowledged writes. An entry
//! whose counter name is not 1 to 256 bytes, or whose stripe is not below
//! `store::MAX_STRIPES`, cannot be held by the current format and is
//! refused as undecodable.
//!
//! # Migration
//!
//! 1. The old database is checked on a scratch copy (`migrate.tmp`: sled
//!    rewrites files it opens) and read whole into memory.
//! 2. A checkpoint of everything is written (`checkpoint/`, position 0),
//!    then an empty log (`log/`), then the new witness (`LOGGED`).
//! 3. The marker turns to format 3: the commit point. Until then the old
//!    files are untouched and an interrupted migration starts over.
//! 4. The old files are deleted (again at every start, if a crash left
//!    some).

use std::path::Path;

use crate::checkpoint::{Checkpoint, CheckpointMeta, CHECKPOINT_DIR};
use crate::log::{self, LOG_DIR};
use crate::meta::{DrainState, NodeMeta};
use crate::replicas::{CopyStamp, Replicas};
use crate::storage::{
    copy_sled_files, hash_sled_files, remove_dir_if_present, write_marker, write_witness,
    DirectoryReport, MarkerState, RemoveOnDrop, StorageError, Witness,
};
use crate::store::{OwnChanges, Store, MAX_STRIPES, SEGMENT_COUNT};

/// The format version migrated from.
pub const FORMAT_VERSION: u64 = 2;
const OLD_WITNESS: &str = "FLUSHED";
const SCRATCH: &str = "migrate.tmp";

/// Everything a format 2 directory held.
struct Old {
    store: Store,
    replicas: Replicas,
    meta: NodeMeta,
    sequence: u64,
    witnessed: u64,
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn split_counter(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let (length, rest) = bytes.split_first_chunk::<2>()?;
    let (counter, rest) = rest.split_at_checked(usize::from(u16::from_be_bytes(*length)))?;
    Some((std::str::from_utf8(counter).ok()?, rest))
}

fn decode_drain(value: &[u8]) -> Option<DrainState> {
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

fn decode_stamp(value: &[u8]) -> Option<CopyStamp> {
    if !matches!(value.len(), 8 | 16 | 24) {
        return None;
    }
    let word = |at: usize| value.get(at..at + 8).and_then(decode_u64).unwrap_or(0);
    Some(CopyStamp {
        version: word(0),
        scanned_unix_ms: word(8),
        directory_id: word(16),
    })
}

/// The old witness: the last flush known complete.
fn old_witness(dir: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(dir.join(OLD_WITNESS))
        .map_err(|error| format!("{OLD_WITNESS}: {error}"))?;
    let mut words = text.trim_end().split(' ');
    match (words.next(), words.next()) {
        (Some("flushed"), Some(flushed)) => flushed
            .parse()
            .map_err(|_| format!("{OLD_WITNESS} is unreadable: {text:?}")),
        _ => Err(format!("{OLD_WITNESS} is unreadable: {text:?}")),
    }
}

/// Reads a format 2 directory through a scratch copy of its sled files in
/// `scratch`. The directory is only read.
fn read(dir: &Path, node_id: &str, scratch: &Path) -> Result<Old, StorageError> {
    let refused = |problem: String| StorageError::Refused {
        dir: dir.to_path_buf(),
        problem,
    };
    let witnessed = old_witness(dir).map_err(refused)?;
    remove_dir_if_present(scratch).map_err(|reason| StorageError::Io {
        dir: dir.to_path_buf(),
        reason,
    })?;
    let _cleanup = RemoveOnDrop(scratch);
    copy_sled_files(dir, scratch).map_err(|reason| StorageError::Io {
        dir: dir.to_path_buf(),
        reason: std::io::Error::new(
            reason.kind(),
            format!(
                "cannot copy the format 2 database to {} to migrate it (needs as much free space \
                 as the database): {reason}",
                scratch.display()
            ),
        ),
    })?;
    let db = sled::Config::new()
        .path(scratch)
        .open()
        .map_err(|error| refused(format!("sled cannot open its format 2 database: {error}")))?;
    let sled_error = |error: sled::Error| refused(error.to_string());
    let meta_tree = db.open_tree("meta").map_err(sled_error)?;
    let data = db.open_tree("data").map_err(sled_error)?;
    let word = |key: &str| -> Result<Option<u64>, StorageError> {
        Ok(meta_tree
            .get(key)
            .map_err(sled_error)?
            .and_then(|bytes| decode_u64(&bytes)))
    };
    if word("format_version")? != Some(FORMAT_VERSION) {
        return Err(refused(
            "its format 2 database has no format version".into(),
        ));
    }
    let stored_node = meta_tree
        .get("node_id")
        .map_err(sled_error)?
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    if stored_node.as_deref() != Some(node_id) {
        return Err(StorageError::WrongNode {
            dir: dir.to_path_buf(),
            found: stored_node.unwrap_or_default(),
            expected: node_id.to_string(),
        });
    }
    let mut old = Old {
        store: Store::new(),
        replicas: Replicas::default(),
        meta: NodeMeta {
            node_id: node_id.to_string(),
            directory_id: word("directory_id")?.unwrap_or_else(crate::meta::new_directory_id),
            incarnation: word("incarnation")?.unwrap_or(0),
            ..NodeMeta::default()
        },
        sequence: 0,
        witnessed,
    };
    for item in data.iter() {
        let (key, value) = item.map_err(sled_error)?;
        let bad = || {
            refused(format!(
                "undecodable key or value {key:?} in its format 2 database"
            ))
        };
        match key.split_first().ok_or_else(bad)? {
            (0, rest) => match rest.split_first().ok_or_else(bad)? {
                (b'K', record_key) => {
                    split_counter(record_key).ok_or_else(bad)?;
                    let delta = value.get(..8).and_then(decode_u64).ok_or_else(bad)?;
                    let applied = value.get(8..).and_then(decode_u64).ok_or_else(bad)?;
                    old.store
                        .load_record(record_key, Some((delta as i64, applied)));
                }
                (b'S', []) => old.sequence = decode_u64(&value).ok_or_else(bad)?,
                (b'R', []) => {
                    old.meta.awaiting_restore = decode_u64(&value).ok_or_else(bad)? == 0;
                }
                (b'D', []) => old.meta.drain = decode_drain(&value).ok_or_else(bad)?,
                (b'A', origin) => {
                    let origin = std::str::from_utf8(origin).map_err(|_| bad())?;
                    let version = decode_u64(&value).ok_or_else(bad)?;
                    old.meta.retired.insert(origin.to_string(), version);
                }
                (b'V', origin) => {
                    let origin = std::str::from_utf8(origin).map_err(|_| bad())?;
                    let stamp = decode_stamp(&value).ok_or_else(bad)?;
                    old.replicas.load_stamp(origin, stamp);
                }
                _ => return Err(bad()),
            },
            (&origin_length, rest) => {
                let (origin, rest) = rest
                    .split_at_checked(usize::from(origin_length))
                    .ok_or_else(bad)?;
                let origin = std::str::from_utf8(origin).map_err(|_| bad())?;
                let (counter, stripe) = split_counter(rest).ok_or_else(bad)?;
                let stripe = u32::from_be_bytes(stripe.try_into().map_err(|_| bad())?);
                // What the current format can hold (its decoders refuse the
                // rest, and memory's tables assume it): migrated, such an
                // entry would leave a directory no start can read.
                // By length only: a name the rule of its day allowed (one
                // starting with U+0000, say) is migrated as it is.
                if counter.is_empty()
                    || counter.len() > tally_proto::domain::MAX_COUNTER_NAME_BYTES
                    || stripe >= MAX_STRIPES
                {
                    return Err(bad());
                }
                let value = decode_u64(&value).ok_or_else(bad)? as i64;
                if origin == node_id {
                    old.store.load(counter, stripe, value);
                } else {
                    old.replicas.load(origin, counter, stripe, value);
                }
            }
        }
    }
    old.store.finish_loading();
    if old.sequence < old.witnessed {
        return Err(refused(format!(
            "its format 2 database ends at flush {}, but flush {} was completed ({OLD_WITNESS}): \
             acknowledged writes are missing",
            old.sequence, old.witnessed
        )));
    }
    Ok(old)
}

/// Migrates a format 2 directory (locked by the caller) to the current
/// format. See the module docs.
pub fn migrate(dir: &Path, node_id: &str) -> Result<(), StorageError> {
    let io = |reason| StorageError::Io {
        dir: dir.to_path_buf(),
        reason,
    };
    tracing::info!(dir = %dir.display(), "migrating a format 2 data directory");
    let old = read(dir, node_id, &dir.join(SCRATCH))?;
    let checkpoint_dir = dir.join(CHECKPOINT_DIR);
    remove_dir_if_present(&dir.join(LOG_DIR)).map_err(io)?;
    remove_dir_if_present(&checkpoint_dir).map_err(io)?;
    let damaged = |error: sled::Error| StorageError::Damaged {
        dir: dir.to_path_buf(),
        message: format!("writing the migrated checkpoint: {error}"),
    };
    {
        let checkpoint = Checkpoint::open(&checkpoint_dir).map_err(damaged)?;
        old.store.mark_all_for_checkpoint();
        let mut buckets = Vec::new();
        old.store
            .begin_flush(&mut OwnChanges::default(), 0..SEGMENT_COUNT, &mut buckets);
        checkpoint.write_buckets(None, &buckets).map_err(damaged)?;
        old.replicas.mark_all_for_checkpoint();
        for origin in old.replicas.origins() {
            let mut buckets = Vec::new();
            old.replicas
                .capture(&origin, 0..SEGMENT_COUNT, &mut buckets);
            checkpoint
                .write_buckets(Some(&origin), &buckets)
                .map_err(damaged)?;
        }
        checkpoint
            .finish(&CheckpointMeta {
                format_version: crate::storage::FORMAT_VERSION,
                position: 0,
                node: old.meta.clone(),
                copies: old.replicas.stamps().into_iter().collect(),
            })
            .map_err(damaged)?;
    }
    log::create(&dir.join(LOG_DIR)).map_err(io)?;
    let hash = hash_sled_files(&checkpoint_dir).map_err(io)?;
    write_witness(
        dir,
        Witness {
            logged: 0,
            checkpoint: Some((hash, 0)),
        },
    )
    .map_err(io)?;
    write_marker(dir, node_id, MarkerState::Ready)?;
    remove_leftovers(dir).map_err(io)?;
    tracing::info!(
        dir = %dir.display(),
        entries = old.store.entry_count(),
        idempotency_keys = old.store.remembered_keys(),
        replica_entries = old.replicas.entry_count(),
        "migrated to format {}",
        crate::storage::FORMAT_VERSION
    );
    Ok(())
}

/// Deletes what format 2 kept in the data directory itself, and a
/// migration's scratch copy. Called on directories of the current format
/// only: none of these names is used by it.
pub fn remove_leftovers(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if crate::storage::is_sled_file(&name) || name == OLD_WITNESS || name == SCRATCH {
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
    }
    Ok(())
}

/// `tally-shard verify` of a format 2 directory: read through a copy in
/// the system's temporary directory.
pub fn verify(dir: &Path, node_id: &str) -> Result<DirectoryReport, StorageError> {
    let old = read(dir, node_id, &crate::storage::verify_scratch())?;
    Ok(DirectoryReport {
        node_id: node_id.to_string(),
        entries: old.store.entry_count(),
        foreign_entries: old.replicas.entry_count(),
        records: old.store.remembered_keys(),
        last_seq: old.sequence,
        witnessed: old.witnessed,
        awaiting_restore: old.meta.awaiting_restore,
        drain: old.meta.drain,
        retired: old.meta.retired.into_keys().collect(),
        format_version: FORMAT_VERSION,
        ..DirectoryReport::default()
    })
}
