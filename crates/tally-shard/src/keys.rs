//! The keys and values of the shard's sled tree `data`.
//!
//! One tree holds everything a flush writes, so that one sled batch (atomic
//! within a tree) carries a counter change together with the idempotency
//! record that says it was applied, and the flush's sequence number. Three
//! kinds of keys, told apart by their first byte:
//!
//! ```text
//! entry    = origin_len: u8 (1..=64) | origin | counter_len: u16 BE | counter | stripe: u32 BE
//!            -> value: i64 BE
//! record   = 0x00 'K' | counter_len: u16 BE | counter | idempotency key
//!            -> delta: i64 BE | applied_unix_ms: u64 BE
//! sequence = 0x00 'S'
//!            -> flush sequence: u64 BE
//! replica  = 0x00 'V' | origin
//!            -> version of this node's copy of the origin's entries: u64 BE
//! restored = 0x00 'R'
//!            -> 0: the directory was created empty and its own entries
//!               await a restore from replicas; 1: restored (absent: 1)
//! drain    = 0x00 'D'
//!            -> 1: draining (no own writes); 2 | adopter id: entries in
//!               the adopter's copy; 3 | adopter id: adopted, the node can
//!               leave (absent: serving)
//! adopted  = 0x00 'A' | origin
//!            -> the drained origin's version this node adopted
//! ```
//!
//! Entries of another origin are a replica copy of that node's entries.
//!
//! An entry's origin is the node that accepted its increments (node ids are
//! 1 to 64 bytes, so an entry never starts with 0x00). Entries sort by origin,
//! counter, stripe; records by counter, key.

/// First bytes of every idempotency record key.
pub const RECORD_PREFIX: [u8; 2] = [0, b'K'];
/// The key holding the sequence number of the last flush written.
pub const SEQUENCE_KEY: [u8; 2] = [0, b'S'];
/// The key holding this node's drain state.
pub const DRAIN_KEY: [u8; 2] = [0, b'D'];
/// First bytes of every adopted-origin marker.
pub const ADOPTED_PREFIX: [u8; 2] = [0, b'A'];

/// The key marking that this node adopted the drained `origin`'s entries.
pub fn adopted_key(origin: &str) -> Vec<u8> {
    let mut key = ADOPTED_PREFIX.to_vec();
    key.extend_from_slice(origin.as_bytes());
    key
}

/// The key saying whether this node's own entries await a restore.
pub const RESTORED_KEY: [u8; 2] = [0, b'R'];
/// First bytes of every replica version key.
pub const REPLICA_PREFIX: [u8; 2] = [0, b'V'];

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

/// A decoded key of the `data` tree.
#[derive(Debug, PartialEq, Eq)]
pub enum DataKey<'a> {
    /// A counter entry.
    Entry(EntryKey<'a>),
    /// An idempotency record.
    Record {
        /// The counter the key was applied to.
        counter: &'a str,
        /// The client's idempotency key.
        key: &'a str,
    },
    /// The flush sequence number.
    Sequence,
    /// Whether the own entries await a restore.
    Restored,
    /// The drain state.
    Drain,
    /// This node adopted a drained origin's entries.
    Adopted {
        /// The drained node.
        origin: &'a str,
    },
    /// The version of the replica copy of `origin`'s entries.
    ReplicaVersion {
        /// The node the copy is of.
        origin: &'a str,
    },
}

/// Encodes an entry key.
///
/// Node ids are 1 to 64 bytes and counter names at most 256 (checked at the
/// edge), so the length prefixes always fit.
pub fn encode_entry_key(origin: &str, counter: &str, stripe: u32) -> Vec<u8> {
    debug_assert!(!origin.is_empty() && origin.len() <= usize::from(u8::MAX));
    debug_assert!(counter.len() <= usize::from(u16::MAX));
    let mut key = Vec::with_capacity(1 + origin.len() + 2 + counter.len() + 4);
    key.push(origin.len() as u8);
    key.extend_from_slice(origin.as_bytes());
    key.extend_from_slice(&(counter.len() as u16).to_be_bytes());
    key.extend_from_slice(counter.as_bytes());
    key.extend_from_slice(&stripe.to_be_bytes());
    key
}

/// The first bytes of every entry key of `origin`: its entries sort together.
pub fn entry_prefix(origin: &str) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(1 + origin.len());
    prefix.push(origin.len() as u8);
    prefix.extend_from_slice(origin.as_bytes());
    prefix
}

/// The first bytes of every entry key of `(origin, counter)`.
pub fn counter_prefix(origin: &str, counter: &str) -> Vec<u8> {
    let mut prefix = entry_prefix(origin);
    prefix.extend_from_slice(&(counter.len() as u16).to_be_bytes());
    prefix.extend_from_slice(counter.as_bytes());
    prefix
}

/// The key of the version of this node's copy of `origin`'s entries.
pub fn replica_version_key(origin: &str) -> Vec<u8> {
    let mut key = REPLICA_PREFIX.to_vec();
    key.extend_from_slice(origin.as_bytes());
    key
}

/// Encodes the record key of `(counter, idempotency key)` into `buffer`,
/// replacing its contents: the hot path reuses one buffer for a whole batch.
pub fn encode_record_key_into(buffer: &mut Vec<u8>, counter: &str, key: &str) {
    debug_assert!(counter.len() <= usize::from(u16::MAX));
    buffer.clear();
    buffer.extend_from_slice(&RECORD_PREFIX);
    buffer.extend_from_slice(&(counter.len() as u16).to_be_bytes());
    buffer.extend_from_slice(counter.as_bytes());
    buffer.extend_from_slice(key.as_bytes());
}

/// Decodes any key of the `data` tree; `None` if no encoder here wrote it.
pub fn decode_key(bytes: &[u8]) -> Option<DataKey<'_>> {
    match bytes.split_first()? {
        (0, _) if bytes == SEQUENCE_KEY => Some(DataKey::Sequence),
        (0, _) if bytes == RESTORED_KEY => Some(DataKey::Restored),
        (0, _) if bytes == DRAIN_KEY => Some(DataKey::Drain),
        (0, _) if bytes.starts_with(&ADOPTED_PREFIX) => Some(DataKey::Adopted {
            origin: std::str::from_utf8(&bytes[ADOPTED_PREFIX.len()..]).ok()?,
        }),
        (0, _) if bytes.starts_with(&REPLICA_PREFIX) => Some(DataKey::ReplicaVersion {
            origin: std::str::from_utf8(&bytes[REPLICA_PREFIX.len()..])
                .ok()
                .filter(|origin| !origin.is_empty())?,
        }),
        (0, _) => {
            let rest = bytes.strip_prefix(&RECORD_PREFIX)?;
            let (counter, key) = split_counter(rest)?;
            Some(DataKey::Record {
                counter,
                key: std::str::from_utf8(key).ok()?,
            })
        }
        (&origin_length, rest) => {
            let (origin, rest) = rest.split_at_checked(usize::from(origin_length))?;
            let (counter, rest) = split_counter(rest)?;
            let stripe: [u8; 4] = rest.try_into().ok()?;
            Some(DataKey::Entry(EntryKey {
                origin: std::str::from_utf8(origin).ok()?,
                counter,
                stripe: u32::from_be_bytes(stripe),
            }))
        }
    }
}

/// Splits `counter_len | counter | rest`.
fn split_counter(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let (length, rest) = bytes.split_first_chunk::<2>()?;
    let (counter, rest) = rest.split_at_checked(usize::from(u16::from_be_bytes(*length)))?;
    Some((std::str::from_utf8(counter).ok()?, rest))
}

/// Encodes an idempotency record's value.
pub fn encode_record_value(delta: i64, applied_unix_ms: u64) -> [u8; 16] {
    let mut value = [0; 16];
    value[..8].copy_from_slice(&delta.to_be_bytes());
    value[8..].copy_from_slice(&applied_unix_ms.to_be_bytes());
    value
}

/// Decodes an idempotency record's value: `(delta, applied_unix_ms)`.
pub fn decode_record_value(bytes: &[u8]) -> Option<(i64, u64)> {
    let (delta, applied) = bytes.split_first_chunk::<8>()?;
    let applied: [u8; 8] = applied.try_into().ok()?;
    Some((i64::from_be_bytes(*delta), u64::from_be_bytes(applied)))
}

/// Decodes an 8-byte big-endian value (an entry's i64, the sequence's u64).
pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn entry_keys_round_trip(origin in "[a-z0-9-]{1,64}", counter in "\\PC{1,64}", stripe: u32) {
            let key = encode_entry_key(&origin, &counter, stripe);
            prop_assert_eq!(
                decode_key(&key),
                Some(DataKey::Entry(EntryKey { origin: &origin, counter: &counter, stripe }))
            );
        }

        #[test]
        fn record_keys_round_trip(counter in "\\PC{1,64}", key in "\\PC{0,128}") {
            let mut buffer = vec![1, 2, 3];
            encode_record_key_into(&mut buffer, &counter, &key);
            prop_assert_eq!(
                decode_key(&buffer),
                Some(DataKey::Record { counter: &counter, key: &key })
            );
        }

        #[test]
        fn record_values_round_trip(delta: i64, applied: u64) {
            prop_assert_eq!(
                decode_record_value(&encode_record_value(delta, applied)),
                Some((delta, applied))
            );
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_key(&bytes);
            let _ = decode_record_value(&bytes);
        }
    }

    #[test]
    fn kinds_never_collide() {
        assert_eq!(decode_key(&SEQUENCE_KEY), Some(DataKey::Sequence));
        assert_eq!(
            decode_key(&replica_version_key("shard-2")),
            Some(DataKey::ReplicaVersion { origin: "shard-2" })
        );
        assert!(encode_entry_key("shard-2", "c", 1).starts_with(&counter_prefix("shard-2", "c")));
        assert!(!encode_entry_key("shard-2", "cc", 1).starts_with(&counter_prefix("shard-2", "c")));
        assert_eq!(decode_key(&[0, b'X', 0, 1, b'a']), None);
        assert_eq!(decode_key(&[]), None);
    }

    #[test]
    fn entries_sort_by_origin_then_counter_then_stripe() {
        let mut keys = [
            encode_entry_key("b", "a", 0),
            encode_entry_key("a", "b", 0),
            encode_entry_key("a", "a", 1),
            encode_entry_key("a", "a", 0),
        ];
        keys.sort();
        let decoded: Vec<_> = keys
            .iter()
            .map(|key| match decode_key(key) {
                Some(DataKey::Entry(entry)) => (entry.origin, entry.counter, entry.stripe),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            decoded,
            vec![("a", "a", 0), ("a", "a", 1), ("a", "b", 0), ("b", "a", 0)]
        );
    }
}
