//! Replica copies: other nodes' entries, kept so that a read can still count
//! a node's part while that node is down.
//!
//! A copy is always a whole origin's entries as of one version of that
//! origin (plus, between two pushes, some later changes: values are
//! absolute, so a copy is never ahead of the origin, only behind). A read
//! merges per origin: the origin's own answer if it answered, else the
//! freshest copy. So no entry is ever counted twice, however many copies
//! exist.
//!
//! A coordinator copies changes from the origin ([`crate::store::Store::changes_since`])
//! to the copies ([`Replicas::accepts`], then [`Replicas::apply`] once the
//! storage holds them). A change set is accepted if the copy is at least at
//! its base and behind its version; a full set if it is newer than the copy.

use std::collections::HashMap;

use parking_lot::RwLock;

/// Where a copy stands: which of the origin's data directories it comes
/// from, its version there, and when the origin scanned that version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStamp {
    /// The origin's version the copy reflects.
    pub version: u64,
    /// When the origin scanned it (the origin's wall clock): the copy has
    /// everything the origin acknowledged before then.
    pub scanned_unix_ms: u64,
    /// The origin's data directory (random id): a replaced directory's
    /// versions start over.
    pub directory_id: u64,
}

impl CopyStamp {
    /// 24 bytes, big-endian: version, scan time, directory id.
    pub fn encode(&self) -> [u8; 24] {
        let mut value = [0; 24];
        value[..8].copy_from_slice(&self.version.to_be_bytes());
        value[8..16].copy_from_slice(&self.scanned_unix_ms.to_be_bytes());
        value[16..].copy_from_slice(&self.directory_id.to_be_bytes());
        value
    }

    /// The inverse of [`CopyStamp::encode`]; also reads the 8-byte
    /// (version) and 16-byte (version, scan time) stamps of earlier builds.
    pub fn decode(value: &[u8]) -> Option<CopyStamp> {
        if !matches!(value.len(), 8 | 16 | 24) {
            return None;
        }
        let word = |at: usize| {
            value
                .get(at..at + 8)
                .map_or(0, |bytes| u64::from_be_bytes(bytes.try_into().unwrap()))
        };
        Some(CopyStamp {
            version: word(0),
            scanned_unix_ms: word(8),
            directory_id: word(16),
        })
    }
}

/// `(counter, stripe, value)`.
pub type EntryValue = (String, u32, i64);

/// One origin's entries as this node holds them.
#[derive(Debug, Default)]
struct Copy {
    stamp: CopyStamp,
    /// counter -> `(stripe, value)`, non-zero values only.
    counters: HashMap<Box<str>, Vec<(u32, i64)>>,
}

/// Every replica copy this node holds, by origin.
#[derive(Debug, Default)]
pub struct Replicas {
    copies: RwLock<HashMap<Box<str>, Copy>>,
}

/// One copy's entries for the counters of a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRead {
    /// The node the copy is of.
    pub origin: String,
    /// The copy's stamp.
    pub stamp: CopyStamp,
    /// Per requested counter, in order: `(stripe, value)`.
    pub counters: Vec<Vec<(u32, i64)>>,
}

/// Whether a change set applies to a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it.
    Apply,
    /// The copy is already at or past it: nothing to do.
    Stale,
    /// The copy is behind the base (or missing): a full set is needed.
    NeedFull,
}

impl Replicas {
    /// The version of the copy of `origin`, 0 if none.
    pub fn version(&self, origin: &str) -> u64 {
        self.copies
            .read()
            .get(origin)
            .map_or(0, |copy| copy.stamp.version)
    }

    /// `(origin, version)` of every copy, by origin.
    pub fn versions(&self) -> Vec<(String, u64)> {
        let mut versions: Vec<(String, u64)> = self
            .copies
            .read()
            .iter()
            .map(|(origin, copy)| (origin.to_string(), copy.stamp.version))
            .collect();
        versions.sort();
        versions
    }

    /// Whether a set of changes from `base` to `stamp` applies. A full set
    /// from another directory of the origin (a replaced disk) always does:
    /// its versions started over.
    pub fn accepts(&self, origin: &str, base: u64, stamp: &CopyStamp, full: bool) -> Verdict {
        let copies = self.copies.read();
        let Some(copy) = copies.get(origin) else {
            return if full {
                Verdict::Apply
            } else {
                Verdict::NeedFull
            };
        };
        if copy.stamp.directory_id != stamp.directory_id {
            return if full {
                Verdict::Apply
            } else {
                Verdict::NeedFull
            };
        }
        let current = copy.stamp.version;
        if stamp.version <= current {
            Verdict::Stale
        } else if full || base <= current {
            Verdict::Apply
        } else {
            Verdict::NeedFull
        }
    }

    /// Applies a change set the storage already holds.
    pub fn apply(&self, origin: &str, stamp: CopyStamp, full: bool, entries: &[(&str, u32, i64)]) {
        let mut copies = self.copies.write();
        let copy = copies.entry(origin.into()).or_default();
        if full {
            copy.counters.clear();
        }
        for &(counter, stripe, value) in entries {
            set(&mut copy.counters, counter, stripe, value);
        }
        copy.stamp = stamp;
    }

    /// The whole copy of `origin`: its version and `(counter, stripe,
    /// value)` entries, if this node holds one.
    pub fn copy_of(&self, origin: &str) -> Option<(CopyStamp, Vec<EntryValue>)> {
        let copies = self.copies.read();
        let copy = copies.get(origin)?;
        let entries = copy
            .counters
            .iter()
            .flat_map(|(counter, stripes)| {
                stripes
                    .iter()
                    .map(move |&(stripe, value)| (counter.to_string(), stripe, value))
            })
            .collect();
        Some((copy.stamp, entries))
    }

    /// Drops the copy of `origin` (after storage did).
    pub fn remove(&self, origin: &str) {
        self.copies.write().remove(origin);
    }

    /// Loads an entry of a copy at start.
    pub fn load(&self, origin: &str, counter: &str, stripe: u32, value: i64) {
        let mut copies = self.copies.write();
        set(
            &mut copies.entry(origin.into()).or_default().counters,
            counter,
            stripe,
            value,
        );
    }

    /// Sets a copy's stamp at start.
    pub fn load_stamp(&self, origin: &str, stamp: CopyStamp) {
        self.copies.write().entry(origin.into()).or_default().stamp = stamp;
    }

    /// Each copy's entries for `counters`, in order. Copies without any of
    /// them are still listed: "this copy holds nothing" is an answer.
    pub fn read(&self, counters: &[String]) -> Vec<CopyRead> {
        self.copies
            .read()
            .iter()
            .map(|(origin, copy)| CopyRead {
                origin: origin.to_string(),
                stamp: copy.stamp,
                counters: counters
                    .iter()
                    .map(|counter| {
                        let mut entries = copy
                            .counters
                            .get(counter.as_str())
                            .cloned()
                            .unwrap_or_default();
                        entries.sort_unstable();
                        entries
                    })
                    .collect(),
            })
            .collect()
    }

    /// `(origin, counter)` for every copy and every one of `counters`: what
    /// an erase must look for in storage. Every copy, not only those whose
    /// memory holds the counter: a change set that failed part way leaves
    /// its first chunks on disk ahead of memory until the next push.
    pub fn erase_targets(&self, counters: &[&str]) -> Vec<(String, String)> {
        let copies = self.copies.read();
        copies
            .keys()
            .flat_map(|origin| {
                counters
                    .iter()
                    .map(move |counter| (origin.to_string(), counter.to_string()))
            })
            .collect()
    }

    /// Removes `counters` from every copy (after storage did).
    pub fn erase(&self, counters: &[&str]) {
        let mut copies = self.copies.write();
        for copy in copies.values_mut() {
            for counter in counters {
                copy.counters.remove(*counter);
            }
        }
    }
}

fn set(counters: &mut HashMap<Box<str>, Vec<(u32, i64)>>, counter: &str, stripe: u32, value: i64) {
    if value == 0 {
        if let Some(stripes) = counters.get_mut(counter) {
            stripes.retain(|(existing, _)| *existing != stripe);
            if stripes.is_empty() {
                counters.remove(counter);
            }
        }
        return;
    }
    let stripes = counters.entry(counter.into()).or_default();
    match stripes.iter_mut().find(|(existing, _)| *existing == stripe) {
        Some((_, stored)) => *stored = value,
        None => stripes.push((stripe, value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(version: u64) -> CopyStamp {
        CopyStamp {
            version,
            scanned_unix_ms: 0,
            directory_id: 7,
        }
    }

    #[test]
    fn changes_apply_in_order_and_full_sets_replace() {
        let replicas = Replicas::default();
        assert_eq!(replicas.accepts("a", 5, &at(9), false), Verdict::NeedFull);
        assert_eq!(replicas.accepts("a", 0, &at(9), true), Verdict::Apply);
        replicas.apply("a", at(9), true, &[("c", 0, 5), ("c", 1, 2), ("d", 0, 1)]);
        assert_eq!(replicas.accepts("a", 9, &at(12), false), Verdict::Apply);
        assert_eq!(replicas.accepts("a", 4, &at(12), false), Verdict::Apply);
        assert_eq!(replicas.accepts("a", 10, &at(12), false), Verdict::NeedFull);
        assert_eq!(replicas.accepts("a", 0, &at(9), true), Verdict::Stale);
        // A replaced directory starts over: its full set replaces the copy,
        // its changes need one.
        let other = CopyStamp {
            directory_id: 8,
            ..at(2)
        };
        assert_eq!(replicas.accepts("a", 0, &other, true), Verdict::Apply);
        assert_eq!(replicas.accepts("a", 1, &other, false), Verdict::NeedFull);
        replicas.apply("a", at(12), false, &[("c", 1, 0), ("d", 0, 4)]);
        let read = replicas.read(&["c".into(), "d".into(), "e".into()]);
        assert_eq!(
            read,
            vec![CopyRead {
                origin: "a".into(),
                stamp: at(12),
                counters: vec![vec![(0, 5)], vec![(0, 4)], vec![]],
            }]
        );
        replicas.apply("a", at(20), true, &[("e", 3, 7)]);
        let read = replicas.read(&["c".into(), "e".into()]);
        assert_eq!(read[0].counters, vec![vec![], vec![(3, 7)]]);
    }

    #[test]
    fn erase_removes_a_counter_from_every_copy() {
        let replicas = Replicas::default();
        replicas.apply("a", at(1), true, &[("c", 0, 5)]);
        replicas.apply("b", at(1), true, &[("c", 2, 5), ("d", 0, 1)]);
        replicas.apply("z", at(1), true, &[("d", 0, 1)]);
        let mut targets = replicas.erase_targets(&["c"]);
        targets.sort();
        assert_eq!(
            targets,
            vec![
                ("a".into(), "c".into()),
                ("b".into(), "c".into()),
                ("z".into(), "c".into())
            ]
        );
        replicas.erase(&["c"]);
        let read = replicas.read(&["c".into(), "d".into()]);
        assert!(read.iter().all(|copy| copy.counters[0].is_empty()));
        assert!(read.iter().any(|copy| copy.counters[1] == vec![(0, 1)]));
    }
}
