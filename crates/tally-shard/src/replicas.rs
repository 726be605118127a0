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

/// One origin's entries as this node holds them.
#[derive(Debug, Default)]
struct Copy {
    version: u64,
    /// When the origin scanned the changes that brought the copy to
    /// `version` (its wall clock): the copy has everything the origin
    /// acknowledged before then.
    scanned_unix_ms: u64,
    /// counter -> `(stripe, value)`, non-zero values only.
    counters: HashMap<Box<str>, Vec<(u32, i64)>>,
}

/// Every replica copy this node holds, by origin.
#[derive(Debug, Default)]
pub struct Replicas {
    copies: RwLock<HashMap<Box<str>, Copy>>,
}

/// A whole copy: its version, the origin's scan time, and its
/// `(counter, stripe, value)` entries.
pub type WholeCopy = (u64, u64, Vec<(String, u32, i64)>);

/// One copy's entries for the counters of a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRead {
    /// The node the copy is of.
    pub origin: String,
    /// The copy's version.
    pub version: u64,
    /// The origin's scan time of that version.
    pub scanned_unix_ms: u64,
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
            .map_or(0, |copy| copy.version)
    }

    /// `(origin, version)` of every copy, by origin.
    pub fn versions(&self) -> Vec<(String, u64)> {
        let mut versions: Vec<(String, u64)> = self
            .copies
            .read()
            .iter()
            .map(|(origin, copy)| (origin.to_string(), copy.version))
            .collect();
        versions.sort();
        versions
    }

    /// Whether a set of changes from `base` to `version` applies.
    pub fn accepts(&self, origin: &str, base: u64, version: u64, full: bool) -> Verdict {
        let current = self.version(origin);
        if version <= current {
            Verdict::Stale
        } else if full || (current > 0 && base <= current) {
            Verdict::Apply
        } else {
            Verdict::NeedFull
        }
    }

    /// Applies a change set the storage already holds.
    pub fn apply(
        &self,
        origin: &str,
        version: u64,
        scanned_unix_ms: u64,
        full: bool,
        entries: &[(&str, u32, i64)],
    ) {
        let mut copies = self.copies.write();
        let copy = copies.entry(origin.into()).or_default();
        if full {
            copy.counters.clear();
        }
        for &(counter, stripe, value) in entries {
            set(&mut copy.counters, counter, stripe, value);
        }
        copy.version = version;
        copy.scanned_unix_ms = scanned_unix_ms;
    }

    /// The whole copy of `origin`: its version and `(counter, stripe,
    /// value)` entries, if this node holds one.
    pub fn copy_of(&self, origin: &str) -> Option<WholeCopy> {
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
        Some((copy.version, copy.scanned_unix_ms, entries))
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

    /// Sets a copy's version and scan time at start.
    pub fn load_version(&self, origin: &str, version: u64, scanned_unix_ms: u64) {
        let mut copies = self.copies.write();
        let copy = copies.entry(origin.into()).or_default();
        copy.version = version;
        copy.scanned_unix_ms = scanned_unix_ms;
    }

    /// Each copy's entries for `counters`, in order. Copies without any of
    /// them are still listed: "this copy holds nothing" is an answer.
    pub fn read(&self, counters: &[String]) -> Vec<CopyRead> {
        self.copies
            .read()
            .iter()
            .map(|(origin, copy)| CopyRead {
                origin: origin.to_string(),
                version: copy.version,
                scanned_unix_ms: copy.scanned_unix_ms,
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

    /// Origins whose copy holds any of `counters`, with those counters'
    /// stripes: what an erase must remove from storage.
    pub fn held(&self, counters: &[&str]) -> Vec<(String, String, Vec<u32>)> {
        let copies = self.copies.read();
        let mut held = Vec::new();
        for (origin, copy) in copies.iter() {
            for counter in counters {
                if let Some(stripes) = copy.counters.get(*counter) {
                    held.push((
                        origin.to_string(),
                        counter.to_string(),
                        stripes.iter().map(|(stripe, _)| *stripe).collect(),
                    ));
                }
            }
        }
        held
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

    #[test]
    fn changes_apply_in_order_and_full_sets_replace() {
        let replicas = Replicas::default();
        assert_eq!(replicas.accepts("a", 5, 9, false), Verdict::NeedFull);
        assert_eq!(replicas.accepts("a", 0, 9, true), Verdict::Apply);
        replicas.apply("a", 9, 0, true, &[("c", 0, 5), ("c", 1, 2), ("d", 0, 1)]);
        assert_eq!(replicas.accepts("a", 9, 12, false), Verdict::Apply);
        assert_eq!(replicas.accepts("a", 4, 12, false), Verdict::Apply);
        assert_eq!(replicas.accepts("a", 10, 12, false), Verdict::NeedFull);
        assert_eq!(replicas.accepts("a", 0, 9, true), Verdict::Stale);
        replicas.apply("a", 12, 0, false, &[("c", 1, 0), ("d", 0, 4)]);
        let read = replicas.read(&["c".into(), "d".into(), "e".into()]);
        assert_eq!(
            read,
            vec![CopyRead {
                origin: "a".into(),
                version: 12,
                scanned_unix_ms: 0,
                counters: vec![vec![(0, 5)], vec![(0, 4)], vec![]],
            }]
        );
        replicas.apply("a", 20, 0, true, &[("e", 3, 7)]);
        let read = replicas.read(&["c".into(), "e".into()]);
        assert_eq!(read[0].counters, vec![vec![], vec![(3, 7)]]);
    }

    #[test]
    fn erase_removes_a_counter_from_every_copy() {
        let replicas = Replicas::default();
        replicas.apply("a", 1, 0, true, &[("c", 0, 5)]);
        replicas.apply("b", 1, 0, true, &[("c", 2, 5), ("d", 0, 1)]);
        let mut held = replicas.held(&["c"]);
        held.sort();
        assert_eq!(
            held,
            vec![
                ("a".into(), "c".into(), vec![0]),
                ("b".into(), "c".into(), vec![2])
            ]
        );
        replicas.erase(&["c"]);
        assert!(replicas.held(&["c"]).is_empty());
        assert_eq!(replicas.held(&["d"]).len(), 1);
    }
}
