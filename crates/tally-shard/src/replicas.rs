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
//! log holds them). A change set is accepted if the copy is at least at
//! its base and behind its version; a full set if it is newer than the copy.

use std::collections::HashMap;

use parking_lot::RwLock;

use crate::store::{capture_buckets, CapturedBucket, Placement, SEGMENT_COUNT};
use crate::table::Table;
use crate::windows::WindowIndex;

/// Where a copy stands: which of the origin's data directories it comes
/// from, its version there, and when the origin scanned that version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
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

/// `(counter, stripe, value)`.
pub type EntryValue = (String, u32, i64);

/// An idempotency record of the origin: `(record key, delta,
/// applied_unix_ms)` (the key as `store::encode_record_key_into` makes it).
pub type CopyRecord = (Box<[u8]>, i64, u64);

/// A copy's record: `(delta, applied_unix_ms by the origin's clock, arrived
/// here by this node's retention clock)`.
type RecordMap = HashMap<std::sync::Arc<[u8]>, (i64, u64, u64), foldhash::fast::RandomState>;

/// One origin's entries as this node holds them: a compact table per
/// segment (the same placement as own entries, so checkpoint buckets line
/// up), and which buckets changed since their last checkpoint capture.
#[derive(Debug)]
struct Copy {
    stamp: CopyStamp,
    segments: Vec<Table>,
    /// The origin's idempotency records, per segment (of their counter),
    /// checkpointed in the same buckets as own records are.
    records: Vec<RecordMap>,
    /// The records in the order they arrived here, `(arrived, key)`: what
    /// retention forgets first. An entry whose record has arrived again
    /// since (a full copy) is skipped when it comes up.
    arrivals: std::collections::VecDeque<(u64, std::sync::Arc<[u8]>)>,
    checkpoint_dirty: Vec<u64>,
    /// The copy's windowed counters and their records' keys
    /// ([`Replicas::reclaim_windows`]).
    windows: WindowIndex,
}

impl Default for Copy {
    fn default() -> Self {
        Copy {
            stamp: CopyStamp::default(),
            segments: vec![Table::default(); SEGMENT_COUNT],
            records: vec![RecordMap::default(); SEGMENT_COUNT],
            arrivals: Default::default(),
            checkpoint_dirty: vec![0; SEGMENT_COUNT],
            windows: WindowIndex::default(),
        }
    }
}

impl Copy {
    /// Adds one of the origin's records. Marked for the next checkpoint
    /// unless loaded from it.
    fn set_record(
        &mut self,
        key: &[u8],
        delta: i64,
        applied_unix_ms: u64,
        arrived: u64,
        mark: bool,
    ) {
        let Some((counter, _)) = crate::store::decode_record_key(key) else {
            return;
        };
        let segment = Placement::of(counter.as_bytes()).segment;
        if mark {
            self.checkpoint_dirty[segment] |= 1 << Placement::of(key).sub;
        }
        let key: std::sync::Arc<[u8]> = key.into();
        self.windows.note_record(counter, &key);
        self.records[segment].insert(key.clone(), (delta, applied_unix_ms, arrived));
        self.arrivals.push_back((arrived, key));
    }

    /// Forgets the records that arrived before `before`, then the oldest
    /// beyond `max_keys`. Costs what it forgets. Returns how many were
    /// forgotten before their window ended (beyond the maximum).
    fn forget_records(&mut self, before: u64, max_keys: usize) -> u64 {
        let mut early = 0;
        let mut held: usize = self.records.iter().map(|records| records.len()).sum();
        while let Some(&(arrived, _)) = self.arrivals.front() {
            if arrived >= before && held <= max_keys {
                break;
            }
            let (arrived, key) = self.arrivals.pop_front().expect("looked at above");
            let Some((counter, _)) = crate::store::decode_record_key(&key) else {
                continue;
            };
            let segment = Placement::of(counter.as_bytes()).segment;
            let records = &mut self.records[segment];
            // Only the entry of the record's last arrival forgets it.
            if records
                .get(&key)
                .is_some_and(|&(_, _, last)| last == arrived)
            {
                records.remove(&key);
                self.windows.forget_record(counter, &key);
                held -= 1;
                if arrived >= before {
                    early += 1;
                }
                self.checkpoint_dirty[segment] |= 1 << Placement::of(&key).sub;
            }
        }
        early
    }

    /// Sets one entry; 0 removes it, and a counter with no stripe left.
    /// Marked for the next checkpoint unless loaded from it.
    fn set(&mut self, counter: &str, stripe: u32, value: i64, mark: bool) {
        let Ok(stripe) = u16::try_from(stripe) else {
            return;
        };
        let placement = Placement::of(counter.as_bytes());
        let table = &mut self.segments[placement.segment];
        match table.find(counter) {
            Some(slot) if value == 0 => {
                if table.get(slot, stripe).is_none() {
                    return;
                }
                let slot = table.set(slot, stripe, 0);
                if table.stripes(slot).all(|(_, value)| value == 0) {
                    table.remove(slot);
                }
            }
            Some(slot) => {
                table.set(slot, stripe, value);
            }
            None if value == 0 => return,
            None => {
                self.windows.note_counter(counter);
                table.insert(counter, stripe, value, 0);
            }
        }
        if mark {
            self.checkpoint_dirty[placement.segment] |= 1 << placement.sub;
        }
    }

    /// Whether the copy holds an entry of `counter`.
    fn holds(&self, counter: &str) -> bool {
        self.segments[Placement::of(counter.as_bytes()).segment]
            .find(counter)
            .is_some()
    }

    /// Reclaims the dead bytes of removed and moved records (no offsets
    /// into a copy's tables are held between calls).
    fn compact_wasteful(&mut self) {
        for table in &mut self.segments {
            if table.is_wasteful() {
                table.compact();
            }
        }
    }

    fn clear(&mut self) {
        for table in &mut self.segments {
            table.clear();
        }
        for records in &mut self.records {
            records.clear();
        }
        self.arrivals.clear();
        self.checkpoint_dirty.fill(u64::MAX);
        self.windows.clear();
    }

    fn all_records(&self) -> impl Iterator<Item = CopyRecord> + '_ {
        self.records.iter().flat_map(|records| {
            records
                .iter()
                .map(|(key, &(delta, applied, _))| (Box::<[u8]>::from(&**key), delta, applied))
        })
    }

    fn read(&self, counter: &str) -> Vec<(u32, i64)> {
        self.segments[Placement::of(counter.as_bytes()).segment].read(counter)
    }

    fn entries(&self) -> impl Iterator<Item = EntryValue> + '_ {
        self.segments.iter().flat_map(|table| {
            table.slots().flat_map(move |slot| {
                let counter = table.name(slot);
                table
                    .stripes(slot)
                    .filter(|(_, value)| *value != 0)
                    .map(move |(stripe, value)| (counter.to_string(), u32::from(stripe), value))
            })
        })
    }
}

/// Every replica copy this node holds, by origin.
///
/// Only the log thread changes copies, after the change is in the log
/// (see [`crate::journal`]); requests read them. The one change not in the
/// log is forgetting records past their retention: a restart may bring some
/// back from the log, to be forgotten again.
#[derive(Debug, Default)]
pub struct Replicas {
    copies: RwLock<HashMap<Box<str>, Copy>>,
    /// Origins whose copy was dropped since the last checkpoint capture: the
    /// checkpoint deletes their buckets.
    dropped: parking_lot::Mutex<Vec<String>>,
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

/// What [`Replicas::reclaim_windows`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReclaimedWindows {
    /// The counters some copy holds entries of: to erase from every copy.
    pub counters: Vec<String>,
    /// Windows that held entries or records, counted once per copy.
    pub windows: usize,
    /// Records forgotten.
    pub records: usize,
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

    /// `(origin, stamp)` of every copy, by origin: what a checkpoint's
    /// metadata records.
    pub fn stamps(&self) -> Vec<(String, CopyStamp)> {
        let mut stamps: Vec<(String, CopyStamp)> = self
            .copies
            .read()
            .iter()
            .map(|(origin, copy)| (origin.to_string(), copy.stamp))
            .collect();
        stamps.sort_by(|a, b| a.0.cmp(&b.0));
        stamps
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

    /// Applies a change set the log already holds.
    pub fn apply(
        &self,
        origin: &str,
        stamp: CopyStamp,
        full: bool,
        entries: &[(&str, u32, i64)],
        records: &[CopyRecord],
        arrived: u64,
    ) {
        let mut copies = self.copies.write();
        let copy = copies.entry(origin.into()).or_default();
        if full {
            copy.clear();
        }
        for &(counter, stripe, value) in entries {
            copy.set(counter, stripe, value, true);
        }
        for (key, delta, applied) in records {
            copy.set_record(key, *delta, *applied, arrived, true);
        }
        copy.stamp = stamp;
        copy.compact_wasteful();
    }

    /// The whole copy of `origin`: its stamp, its `(counter, stripe,
    /// value)` entries and its records, if this node holds one.
    pub fn copy_of(&self, origin: &str) -> Option<(CopyStamp, Vec<EntryValue>, Vec<CopyRecord>)> {
        let copies = self.copies.read();
        let copy = copies.get(origin)?;
        Some((
            copy.stamp,
            copy.entries().collect(),
            copy.all_records().collect(),
        ))
    }

    /// Whether this node holds a copy of `origin`.
    pub fn has_copy(&self, origin: &str) -> bool {
        self.copies.read().contains_key(origin)
    }

    /// The delta `origin` applied under `key` to `counter`, if the copy
    /// holds its record.
    pub fn record(&self, origin: &str, counter: &str, key: &str) -> Option<i64> {
        let mut record_key = Vec::new();
        crate::store::encode_record_key_into(&mut record_key, counter, key);
        let segment = Placement::of(counter.as_bytes()).segment;
        let copies = self.copies.read();
        copies.get(origin)?.records[segment]
            .get(record_key.as_slice())
            .map(|&(delta, _, _)| delta)
    }

    /// Forgets, in every copy, the records that arrived before `before`
    /// (this node's retention clock: no clock of another node is read),
    /// then the oldest beyond `max_keys` per copy, as the origin itself
    /// would. Returns how many. Costs what it forgets.
    pub fn forget_records(&self, before: u64, max_keys: usize) -> u64 {
        self.copies
            .write()
            .values_mut()
            .map(|copy| copy.forget_records(before, max_keys))
            .sum()
    }

    /// Drops the copy of `origin` (after the log recorded it).
    pub fn remove(&self, origin: &str) {
        if self.copies.write().remove(origin).is_some() {
            self.dropped.lock().push(origin.to_string());
        }
    }

    /// Sets an entry of a copy from the checkpoint while recovering (not
    /// marked for the next checkpoint: it holds it).
    pub fn load(&self, origin: &str, counter: &str, stripe: u32, value: i64) {
        self.copies
            .write()
            .entry(origin.into())
            .or_default()
            .set(counter, stripe, value, false);
    }

    /// Adds a record to a copy from the checkpoint while recovering (not
    /// marked for the next checkpoint: it holds it).
    pub fn load_record(
        &self,
        origin: &str,
        key: &[u8],
        delta: i64,
        applied_unix_ms: u64,
        arrived: u64,
    ) {
        self.copies
            .write()
            .entry(origin.into())
            .or_default()
            .set_record(key, delta, applied_unix_ms, arrived, false);
    }

    /// Sets a copy's stamp while recovering.
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
                counters: counters.iter().map(|counter| copy.read(counter)).collect(),
            })
            .collect()
    }

    /// Removes `counters` from every copy (after the log recorded it).
    /// Returns whether any copy held one.
    pub fn erase(&self, counters: &[&str]) -> bool {
        let mut copies = self.copies.write();
        let mut found = false;
        for copy in copies.values_mut() {
            for counter in counters {
                let placement = Placement::of(counter.as_bytes());
                let table = &mut copy.segments[placement.segment];
                if let Some(slot) = table.find(counter) {
                    table.remove(slot);
                    copy.checkpoint_dirty[placement.segment] |= 1 << placement.sub;
                    found = true;
                }
            }
            copy.compact_wasteful();
        }
        found
    }

    /// Finds, in every copy, up to `limit` windowed counters whose window
    /// ended at or before `horizon` (Unix ms), through each copy's
    /// [`WindowIndex`] (a copy with nothing due costs one look). Their
    /// idempotency records are forgotten at once, without a log frame, as
    /// retention forgets a copy's records (a restart may bring some back
    /// from the log, to be reclaimed again); the counters held are
    /// returned, for the caller to erase through the log (an `EraseCopies`
    /// frame). They stay listed until then: a sweep that finds one no
    /// longer held takes it off.
    pub fn reclaim_windows(&self, horizon: u64, limit: usize) -> ReclaimedWindows {
        let mut reclaimed = ReclaimedWindows::default();
        let mut counters = std::collections::BTreeSet::new();
        let mut copies = self.copies.write();
        for copy in copies.values_mut() {
            if reclaimed.windows >= limit {
                break;
            }
            if !copy.windows.any_ended(horizon) {
                continue;
            }
            for (counter, keys) in copy.windows.take_ended(horizon, limit - reclaimed.windows) {
                let mut held = false;
                for key in keys {
                    let Some((of, _)) = crate::store::decode_record_key(&key) else {
                        continue;
                    };
                    let segment = Placement::of(of.as_bytes()).segment;
                    if copy.records[segment].remove(&key).is_some() {
                        copy.checkpoint_dirty[segment] |= 1 << Placement::of(&key).sub;
                        reclaimed.records += 1;
                        held = true;
                    }
                }
                if copy.holds(&counter) {
                    copy.windows.note_counter(&counter);
                    counters.insert(counter);
                    held = true;
                }
                reclaimed.windows += usize::from(held);
            }
        }
        reclaimed.counters = counters.into_iter().map(String::from).collect();
        reclaimed
    }

    /// Whether any copy holds one of `counters`.
    pub fn holds_any(&self, counters: &[&str]) -> bool {
        let copies = self.copies.read();
        copies.values().any(|copy| {
            counters.iter().any(|counter| {
                copy.segments[Placement::of(counter.as_bytes()).segment]
                    .find(counter)
                    .is_some()
            })
        })
    }

    /// Entries held in all copies (non-zero stripes), for status pages.
    pub fn entry_count(&self) -> u64 {
        let copies = self.copies.read();
        copies
            .values()
            .flat_map(|copy| copy.segments.iter())
            .map(|table| {
                table
                    .slots()
                    .map(|slot| table.stripes(slot).filter(|(_, v)| *v != 0).count() as u64)
                    .sum::<u64>()
            })
            .sum()
    }

    /// Bytes the copies' tables hold, for memory measurements.
    pub fn table_bytes(&self) -> u64 {
        let copies = self.copies.read();
        copies
            .values()
            .flat_map(|copy| copy.segments.iter())
            .map(|table| table.memory_bytes() as u64)
            .sum()
    }

    /// Marks every bucket of every copy for the next checkpoint.
    pub fn mark_all_for_checkpoint(&self) {
        for copy in self.copies.write().values_mut() {
            copy.checkpoint_dirty.fill(u64::MAX);
        }
    }

    /// The origins of the copies held, by name.
    pub fn origins(&self) -> Vec<String> {
        let mut origins: Vec<String> = self
            .copies
            .read()
            .keys()
            .map(|origin| origin.to_string())
            .collect();
        origins.sort();
        origins
    }

    /// Encodes the marked buckets of `origin`'s copy in `segments`, and
    /// clears their marks.
    pub fn capture(
        &self,
        origin: &str,
        segments: std::ops::Range<usize>,
        into: &mut Vec<CapturedBucket>,
    ) {
        let mut copies = self.copies.write();
        let Some(copy) = copies.get_mut(origin) else {
            return;
        };
        for segment in segments {
            let marked = std::mem::take(&mut copy.checkpoint_dirty[segment]);
            let records = copy.records[segment]
                .iter()
                .map(|(key, &(delta, applied, _))| (&**key, delta, applied));
            capture_buckets(&copy.segments[segment], records, segment, marked, into);
        }
    }

    /// Origins dropped since the last call: their buckets are to be deleted.
    pub fn take_dropped(&self) -> Vec<String> {
        std::mem::take(&mut self.dropped.lock())
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
        replicas.apply(
            "a",
            at(9),
            true,
            &[("c", 0, 5), ("c", 1, 2), ("d", 0, 1)],
            &[],
            0,
        );
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
        replicas.apply("a", at(12), false, &[("c", 1, 0), ("d", 0, 4)], &[], 0);
        let read = replicas.read(&["c".into(), "d".into(), "e".into()]);
        assert_eq!(
            read,
            vec![CopyRead {
                origin: "a".into(),
                stamp: at(12),
                counters: vec![vec![(0, 5)], vec![(0, 4)], vec![]],
            }]
        );
        replicas.apply("a", at(20), true, &[("e", 3, 7)], &[], 0);
        let read = replicas.read(&["c".into(), "e".into()]);
        assert_eq!(read[0].counters, vec![vec![], vec![(3, 7)]]);
    }

    use crate::store::record_key as key;

    #[test]
    fn a_copy_keeps_its_origins_records_for_the_window_and_the_maximum() {
        let replicas = Replicas::default();
        // Dated on arrival (100, 200), whatever the origin's clock said (the
        // third field).
        replicas.apply(
            "a",
            at(1),
            true,
            &[("c", 0, 5)],
            &[(key("c", "k1"), 5, 9_999)],
            100,
        );
        replicas.apply(
            "a",
            at(2),
            false,
            &[("c", 0, 7)],
            &[(key("c", "k2"), 2, 1)],
            200,
        );
        assert_eq!(replicas.record("a", "c", "k1"), Some(5));
        assert_eq!(replicas.record("a", "c", "k2"), Some(2));
        assert_eq!(replicas.record("b", "c", "k1"), None, "per origin");
        // Erasing a counter keeps its keys: a delete resets the value, not
        // the memory of what was applied.
        replicas.erase(&["c"]);
        assert_eq!(replicas.record("a", "c", "k1"), Some(5));
        // Checkpointed with the copy's buckets.
        let bucket = Placement::of(b"c").segment * crate::store::BUCKETS_PER_SEGMENT
            + Placement::of(&key("c", "k1")).sub;
        let captured_bucket = |replicas: &Replicas| {
            let mut captured = Vec::new();
            replicas.capture("a", 0..SEGMENT_COUNT, &mut captured);
            captured
                .into_iter()
                .find(|captured| usize::from(captured.bucket) == bucket)
        };
        assert!(captured_bucket(&replicas).is_some_and(|bucket| !bucket.contents.is_empty()));
        // By arrival, then beyond the maximum, oldest first; the forgetting
        // reaches the checkpoint.
        assert_eq!(replicas.forget_records(150, 10), 0, "by time: none early");
        assert_eq!(replicas.record("a", "c", "k1"), None);
        assert_eq!(replicas.record("a", "c", "k2"), Some(2));
        assert!(
            captured_bucket(&replicas).is_some(),
            "the bucket is marked again"
        );
        replicas.apply("a", at(3), false, &[], &[(key("d", "k3"), 3, 1)], 300);
        assert_eq!(
            replicas.forget_records(0, 1),
            1,
            "one over the maximum: early"
        );
        assert_eq!(replicas.record("a", "c", "k2"), None);
        assert_eq!(replicas.record("a", "d", "k3"), Some(3));
        // A full set replaces the records too.
        replicas.apply("a", at(4), true, &[], &[(key("d", "k9"), 1, 300)], 400);
        assert_eq!(replicas.record("a", "d", "k3"), None);
        assert_eq!(replicas.record("a", "d", "k9"), Some(1));
        let (_, _, records) = replicas.copy_of("a").unwrap();
        assert_eq!(records, vec![(key("d", "k9"), 1, 300)]);
        assert_eq!(
            replicas.forget_records(0, 10),
            0,
            "stale arrivals forget nothing"
        );
    }

    #[test]
    fn erase_removes_a_counter_from_every_copy() {
        let replicas = Replicas::default();
        replicas.apply("a", at(1), true, &[("c", 0, 5)], &[], 0);
        replicas.apply("b", at(1), true, &[("c", 2, 5), ("d", 0, 1)], &[], 0);
        replicas.apply("z", at(1), true, &[("d", 0, 1)], &[], 0);
        assert!(replicas.holds_any(&["c"]));
        assert!(replicas.erase(&["c"]));
        assert!(!replicas.holds_any(&["c"]));
        assert!(!replicas.erase(&["c"]), "nothing left to erase");
        let read = replicas.read(&["c".into(), "d".into()]);
        assert!(read.iter().all(|copy| copy.counters[0].is_empty()));
        assert!(read.iter().any(|copy| copy.counters[1] == vec![(0, 1)]));
        assert_eq!(replicas.entry_count(), 2);
    }

    #[test]
    fn captures_cover_changes_and_deletions() {
        let replicas = Replicas::default();
        replicas.apply("a", at(1), true, &[("c", 0, 5), ("d", 1, 2)], &[], 0);
        let mut captured = Vec::new();
        replicas.capture("a", 0..SEGMENT_COUNT, &mut captured);
        // A full set marks every bucket: the empty ones are deletions.
        assert_eq!(captured.len(), crate::store::BUCKET_COUNT);
        assert_eq!(
            captured
                .iter()
                .filter(|bucket| !bucket.contents.is_empty())
                .count(),
            if Placement::of(b"c").bucket() == Placement::of(b"d").bucket() {
                1
            } else {
                2
            }
        );
        captured.clear();
        replicas.capture("a", 0..SEGMENT_COUNT, &mut captured);
        assert!(captured.is_empty(), "marks are cleared");
        replicas.apply("a", at(2), false, &[("c", 0, 0)], &[], 0);
        replicas.capture("a", 0..SEGMENT_COUNT, &mut captured);
        assert_eq!(captured.len(), 1);
        assert_eq!(captured[0].bucket, Placement::of(b"c").bucket());
        replicas.remove("a");
        assert_eq!(replicas.take_dropped(), vec!["a".to_string()]);
    }

    #[test]
    fn ended_windows_are_found_in_every_copy_with_their_records() {
        let replicas = Replicas::default();
        let window = tally_proto::window::Window::current(60);
        let end = window.end_unix_ms();
        let name = window.stored_name("api:alice");
        let later = tally_proto::window::Window::current(3600).stored_name("api:alice");
        replicas.apply(
            "a",
            at(1),
            true,
            &[
                (name.as_str(), 0, 5),
                (name.as_str(), 1, 2),
                ("plain", 0, 1),
                (later.as_str(), 0, 1),
            ],
            &[
                (key(name.as_str(), "k1"), 5, 1),
                (key("plain", "k2"), 1, 1),
                (key(later.as_str(), "k3"), 1, 1),
            ],
            0,
        );
        replicas.apply("b", at(1), true, &[(name.as_str(), 3, 1)], &[], 0);
        // A copy loaded at a start is found the same way.
        replicas.load("c", &name, 2, 4);
        replicas.load_record("c", &key(name.as_str(), "k4"), 4, 1, 0);

        assert_eq!(
            replicas.reclaim_windows(end - 1, 100),
            ReclaimedWindows::default()
        );
        let reclaimed = replicas.reclaim_windows(end, 100);
        assert_eq!(
            reclaimed,
            ReclaimedWindows {
                counters: vec![name.clone()],
                windows: 3,
                records: 2,
            }
        );
        // Records go at once; entries once erased through the log.
        assert_eq!(replicas.record("a", &name, "k1"), None);
        assert_eq!(replicas.record("c", &name, "k4"), None);
        assert_eq!(replicas.record("a", "plain", "k2"), Some(1));
        assert_eq!(replicas.record("a", &later, "k3"), Some(1));
        let read = replicas.read(std::slice::from_ref(&name));
        assert!(read.iter().all(|copy| !copy.counters[0].is_empty()));
        // Until then a sweep finds them again (a failed write of the erase).
        assert_eq!(
            replicas.reclaim_windows(end, 100).counters,
            vec![name.clone()]
        );
        assert!(replicas.erase(&[name.as_str()]));
        let read = replicas.read(std::slice::from_ref(&name));
        assert!(read.iter().all(|copy| copy.counters[0].is_empty()));
        assert_eq!(
            replicas.reclaim_windows(end, 100),
            ReclaimedWindows::default(),
            "erased: off the list"
        );
        assert_eq!(replicas.entry_count(), 2, "plain and the later window");
        // The checkpoint hears of the forgotten records.
        let mut captured = Vec::new();
        replicas.capture("a", 0..SEGMENT_COUNT, &mut captured);
        let bucket = Placement {
            segment: Placement::of(name.as_bytes()).segment,
            sub: Placement::of(&key(name.as_str(), "k1")).sub,
        }
        .bucket();
        assert!(captured.iter().any(|captured| captured.bucket == bucket));
    }

    #[test]
    fn a_full_copy_lists_its_windows_afresh() {
        let replicas = Replicas::default();
        let window = tally_proto::window::Window::current(60);
        let end = window.end_unix_ms();
        let gone = window.stored_name("gone");
        let kept = window.stored_name("kept");
        replicas.apply("a", at(1), true, &[(gone.as_str(), 0, 1)], &[], 0);
        replicas.apply("a", at(2), true, &[(kept.as_str(), 0, 1)], &[], 0);
        assert_eq!(replicas.reclaim_windows(end, 100).counters, vec![kept]);
    }
}
