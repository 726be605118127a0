//! The on-disk half of a shard node: a sled database in the node's data
//! directory, guarded by a lock file.
//!
//! # Format (version 1)
//!
//! Tree `entries`, one key per non-zero `(origin node, counter, stripe)`:
//!
//! ```text
//! key   = origin_len: u8 | origin: bytes | counter_len: u16 BE | counter: bytes | stripe: u32 BE
//! value = i64 BE
//! ```
//!
//! The origin is the node that accepted the increments. Today every entry a
//! node stores is its own; the origin is in the key so that replicas of other
//! nodes' entries can be stored beside them later without a format change.
//! Keys sort by origin, then counter, then stripe, so one node's entries, and
//! one counter's stripes, are contiguous.
//!
//! Tree `meta`: `format_version` (u64 BE) and `node_id`, written on first
//! start and checked on every start, so a data directory cannot be mounted
//! under the wrong node id by accident.
//!
//! File `TALLY`: a marker holding the format version, the node id and a
//! state. sled is only ever opened in a directory that is empty (a new node;
//! `lost+found` aside) or has this marker: a directory with anything else is
//! refused untouched. Set-up is two-phase: the marker is written as
//! `setting_up` before sled creates any file and turned `ready` once the
//! metadata is on disk, so a first start interrupted at any point resumes on
//! the next start, while a `ready` directory whose database has no metadata
//! is damaged, never silently started empty.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::store::{EntrySnapshot, Store};

/// Version of the on-disk format this build writes and reads.
pub const FORMAT_VERSION: u64 = 1;
const LOCK_FILE: &str = "LOCK";
const MARKER_FILE: &str = "TALLY";
/// Entries of a data directory that do not make it someone else's: our own
/// lock and half-written marker, and the directory a fresh filesystem has.
const IGNORED_ENTRIES: [&str; 3] = [LOCK_FILE, "TALLY.tmp", "lost+found"];
const ENTRIES_TREE: &str = "entries";
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
}

/// An open data directory.
#[derive(Debug)]
pub struct Storage {
    dir: PathBuf,
    node_id: String,
    db: sled::Db,
    entries: sled::Tree,
    /// Held for the life of the process: the OS drops the lock if we crash.
    _lock: File,
}

impl Storage {
    /// Opens (or creates) the data directory of `node_id`. Blocking.
    pub fn open(dir: &Path, node_id: &str) -> Result<Storage, StorageError> {
        let io = |reason| StorageError::Io {
            dir: dir.to_path_buf(),
            reason,
        };
        let damaged = |message: String| StorageError::Damaged {
            dir: dir.to_path_buf(),
            message,
        };

        // Look before touching anything: a directory that is not ours is
        // left exactly as it was, not even a lock file added.
        inspect(dir, node_id)?;

        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StorageError::Locked {
                    dir: dir.to_path_buf(),
                })
            }
            Err(std::fs::TryLockError::Error(reason)) => return Err(io(reason)),
        }
        // Look again under the lock: another process may have set the
        // directory up between the first look and the lock.
        let marker = inspect(dir, node_id)?;
        write_pid(&lock).map_err(io)?;
        if marker.is_none() {
            // Before sled creates any file, so an interrupted first start
            // leaves a directory the next start recognizes as ours.
            write_marker(dir, node_id, MarkerState::SettingUp)?;
        }

        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(SLED_CACHE_BYTES)
            .mode(sled::Mode::HighThroughput)
            // We decide when to flush: sync mode after every group of
            // increments, async mode every flush interval.
            .flush_every_ms(None)
            .open()
            .map_err(|error| damaged(error.to_string()))?;
        let meta = db
            .open_tree(META_TREE)
            .map_err(|error| damaged(error.to_string()))?;
        let entries = db
            .open_tree(ENTRIES_TREE)
            .map_err(|error| damaged(error.to_string()))?;
        match marker.map(|marker| marker.state) {
            None | Some(MarkerState::SettingUp) => set_up(&db, &meta, &entries, dir, node_id)?,
            Some(MarkerState::Ready) => check_meta(&meta, dir, node_id)?,
        }

        Ok(Storage {
            dir: dir.to_path_buf(),
            node_id: node_id.to_string(),
            db,
            entries,
            _lock: lock,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads every entry of this node into `store`. Returns how many.
    pub fn load_into(&self, store: &Store) -> Result<u64, StorageError> {
        let mut loaded = 0;
        for item in self.entries.iter() {
            let (key, value) = item.map_err(|error| self.damaged(error.to_string()))?;
            let key =
                decode_key(&key).ok_or_else(|| self.damaged(format!("bad entry key {key:?}")))?;
            let value: [u8; 8] = value
                .as_ref()
                .try_into()
                .map_err(|_| self.damaged(format!("bad entry value for {:?}", key.counter)))?;
            if key.origin != self.node_id {
                // Another node's entry: only replicas will write these.
                tracing::warn!(
                    origin = key.origin,
                    counter = key.counter,
                    "ignoring entry of another node"
                );
                continue;
            }
            store.load(key.counter, key.stripe, i64::from_be_bytes(value));
            loaded += 1;
        }
        Ok(loaded)
    }

    /// Writes entries in one atomic batch and waits until they are on disk
    /// (fsync). Blocking.
    pub fn write(&self, entries: &[EntrySnapshot]) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let key = encode_key(&self.node_id, &entry.counter, entry.stripe);
            if entry.value == 0 {
                batch.remove(key);
            } else {
                batch.insert(key, &entry.value.to_be_bytes());
            }
        }
        self.entries
            .apply_batch(batch)
            .map_err(|error| self.sled_error(error))?;
        self.db.flush().map_err(|error| self.sled_error(error))?;
        Ok(())
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
    let marker: Marker = toml::from_str(&text).map_err(|error| StorageError::Damaged {
        dir: dir.to_path_buf(),
        message: format!("unreadable {MARKER_FILE} file: {}", error.message()),
    })?;
    if marker.format_version != FORMAT_VERSION {
        return Err(StorageError::Damaged {
            dir: dir.to_path_buf(),
            message: format!(
                "format version {}, this build reads version {FORMAT_VERSION}",
                marker.format_version
            ),
        });
    }
    if marker.node_id != node_id {
        return Err(StorageError::WrongNode {
            dir: dir.to_path_buf(),
            found: marker.node_id,
            expected: node_id.to_string(),
        });
    }
    Ok(Some(marker))
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
    entries: &sled::Tree,
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
        if !entries.is_empty() {
            return Err(damaged("entries without metadata".to_string()));
        }
        meta.insert("format_version", &FORMAT_VERSION.to_be_bytes())
            .and_then(|_| meta.insert("node_id", node_id.as_bytes()))
            .and_then(|_| db.flush())
            .map_err(|error| damaged(error.to_string()))?;
    }
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

/// A decoded entry key.
#[derive(Debug, PartialEq, Eq)]
pub struct EntryKey<'a> {
    /// The node that accepted the increments.
    pub origin: &'a str,
    /// The counter.
    pub counter: &'a str,
    /// The stripe.
    pub stripe: u32,
}

/// Encodes an entry key (see the module docs for the layout).
///
/// Node ids are at most 64 bytes and counter names at most 256 (checked at
/// the edge), so the length prefixes always fit.
pub fn encode_key(origin: &str, counter: &str, stripe: u32) -> Vec<u8> {
    debug_assert!(origin.len() <= usize::from(u8::MAX));
    debug_assert!(counter.len() <= usize::from(u16::MAX));
    let mut key = Vec::with_capacity(1 + origin.len() + 2 + counter.len() + 4);
    key.push(origin.len() as u8);
    key.extend_from_slice(origin.as_bytes());
    key.extend_from_slice(&(counter.len() as u16).to_be_bytes());
    key.extend_from_slice(counter.as_bytes());
    key.extend_from_slice(&stripe.to_be_bytes());
    key
}

/// Decodes an entry key; `None` if it is not one [`encode_key`] wrote.
pub fn decode_key(key: &[u8]) -> Option<EntryKey<'_>> {
    let (&origin_length, rest) = key.split_first()?;
    let (origin, rest) = rest.split_at_checked(usize::from(origin_length))?;
    let (counter_length, rest) = rest.split_first_chunk::<2>()?;
    let (counter, rest) =
        rest.split_at_checked(usize::from(u16::from_be_bytes(*counter_length)))?;
    let stripe: [u8; 4] = rest.try_into().ok()?;
    Some(EntryKey {
        origin: std::str::from_utf8(origin).ok()?,
        counter: std::str::from_utf8(counter).ok()?,
        stripe: u32::from_be_bytes(stripe),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StripeIncrement;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn keys_round_trip(origin in "[a-z0-9-]{1,64}", counter in "\\PC{1,64}", stripe: u32) {
            let key = encode_key(&origin, &counter, stripe);
            let decoded = decode_key(&key).unwrap();
            prop_assert_eq!(decoded, EntryKey { origin: &origin, counter: &counter, stripe });
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_key(&bytes);
        }
    }

    #[test]
    fn keys_sort_by_origin_then_counter_then_stripe() {
        let mut keys = [
            encode_key("b", "a", 0),
            encode_key("a", "b", 0),
            encode_key("a", "a", 1),
            encode_key("a", "a", 0),
        ];
        keys.sort();
        let decoded: Vec<_> = keys.iter().map(|key| decode_key(key).unwrap()).collect();
        assert_eq!(
            decoded
                .iter()
                .map(|key| (key.origin, key.counter, key.stripe))
                .collect::<Vec<_>>(),
            vec![("a", "a", 0), ("a", "a", 1), ("a", "b", 0), ("b", "a", 0)]
        );
    }

    #[test]
    fn entries_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = Storage::open(dir.path(), "shard-1").unwrap();
            let store = Store::new();
            store.apply(&[
                StripeIncrement {
                    counter: "a",
                    stripe: 0,
                    delta: 5,
                },
                StripeIncrement {
                    counter: "a",
                    stripe: 2,
                    delta: -3,
                },
                StripeIncrement {
                    counter: "gone",
                    stripe: 0,
                    delta: 1,
                },
            ]);
            storage.write(&store.begin_flush().entries).unwrap();
            store.erase(&["gone"]);
            storage.write(&store.begin_flush().entries).unwrap();
        }
        let storage = Storage::open(dir.path(), "shard-1").unwrap();
        let store = Store::new();
        assert_eq!(storage.load_into(&store).unwrap(), 2);
        assert_eq!(store.read("a"), vec![(0, 5), (2, -3)]);
        assert_eq!(store.read("gone"), vec![]);
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
    fn a_database_that_lost_its_data_is_damaged_not_new() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = Storage::open(dir.path(), "shard-1").unwrap();
            let store = Store::new();
            store.apply(&[StripeIncrement {
                counter: "a",
                stripe: 0,
                delta: 5,
            }]);
            storage.write(&store.begin_flush().entries).unwrap();
        }
        // Replace the database with garbage, as a torn disk might.
        let database = dir.path().join("db");
        let length = std::fs::metadata(&database).unwrap().len() as usize;
        let garbage: Vec<u8> = (0..length.max(4096))
            .map(|index| (index * 7 + 13) as u8)
            .collect();
        std::fs::write(&database, garbage).unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
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
        let error = Storage::open(dir.path(), "shard-1").unwrap_err();
        assert!(matches!(error, StorageError::Damaged { .. }), "{error}");
    }

    #[test]
    fn the_marker_names_the_node() {
        let dir = tempfile::tempdir().unwrap();
        drop(Storage::open(dir.path(), "shard-1").unwrap());
        let marker = std::fs::read_to_string(dir.path().join(MARKER_FILE)).unwrap();
        assert!(marker.contains("node_id = \"shard-1\""), "{marker}");
        assert!(marker.contains("format_version = 1"), "{marker}");
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
            store.apply(&[StripeIncrement {
                counter: "a",
                stripe: 1,
                delta: 9,
            }]);
            storage.write(&store.begin_flush().entries).unwrap();
        }
        write_marker(dir.path(), "shard-1", MarkerState::SettingUp).unwrap();
        let storage = Storage::open(dir.path(), "shard-1").unwrap();
        let store = Store::new();
        assert_eq!(storage.load_into(&store).unwrap(), 1);
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
    fn a_fresh_filesystems_lost_and_found_is_not_foreign() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("lost+found")).unwrap();
        drop(Storage::open(dir.path(), "shard-1").unwrap());
    }
}
