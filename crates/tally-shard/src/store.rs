//! The in-memory counters: a map from `(counter, stripe)` to i64, split into
//! segments so that concurrent writers rarely share a lock.
//!
//! The store also tracks which counters changed since the last flush, and
//! hands out *flush epochs* for group commit: every change is stamped with the
//! epoch that is open while it is made, and [`Store::begin_flush`] closes that
//! epoch and collects every change stamped with it. Why this is exact: a
//! writer reads the open epoch while it holds its segment's lock, and the
//! flusher closes the epoch *before* it takes any segment lock. So a writer
//! that saw epoch `E` either finished before the flusher visited its segment
//! (its change is collected) or the flusher has not visited it yet (it will
//! wait for the writer's lock and collect the change). A writer that saw
//! `E + 1` may be collected early, which only makes it durable sooner.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Number of lock segments. A power of two well above the core count of the
/// machines we run on, so two writers collide on a lock rarely.
const SEGMENT_COUNT: usize = 64;

/// What happened to one increment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Added to the entry.
    Applied,
    /// The entry would leave the i64 range; nothing changed.
    Overflow,
}

/// One increment of one stripe of a counter.
#[derive(Debug, Clone, Copy)]
pub struct StripeIncrement<'a> {
    /// The counter.
    pub counter: &'a str,
    /// The stripe of the counter.
    pub stripe: u32,
    /// Amount to add.
    pub delta: i64,
}

/// One entry as it must be written by a flush. A value of 0 means "remove".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySnapshot {
    /// The counter.
    pub counter: Box<str>,
    /// The stripe.
    pub stripe: u32,
    /// The value at the time of the snapshot.
    pub value: i64,
}

/// The changes one flush must write.
#[derive(Debug, Default)]
pub struct FlushSnapshot {
    /// The epoch this flush makes durable.
    pub epoch: u64,
    /// Every stripe of every counter changed in or before `epoch`.
    pub entries: Vec<EntrySnapshot>,
}

#[derive(Debug, Default)]
struct CounterEntry {
    /// `(stripe, value)`; a counter has few stripes on one node, so a vector
    /// beats a map.
    stripes: Vec<(u32, i64)>,
    /// Listed in its segment's `dirty` list and not yet collected by a flush.
    dirty: bool,
}

#[derive(Debug, Default)]
struct Segment {
    counters: HashMap<Box<str>, CounterEntry>,
    dirty: Vec<Box<str>>,
}

impl Segment {
    fn mark_dirty(&mut self, counter: &str) {
        if let Some(entry) = self.counters.get_mut(counter) {
            if !entry.dirty {
                entry.dirty = true;
                self.dirty.push(counter.into());
            }
        }
    }
}

/// A node's counters in memory.
#[derive(Debug)]
pub struct Store {
    segments: Box<[Mutex<Segment>]>,
    open_epoch: AtomicU64,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store. Epochs start at 1, so 0 means "nothing to wait for".
    pub fn new() -> Self {
        Store {
            segments: (0..SEGMENT_COUNT).map(|_| Mutex::default()).collect(),
            open_epoch: AtomicU64::new(1),
        }
    }

    fn segment(&self, counter: &str) -> &Mutex<Segment> {
        let hash = xxhash_rust::xxh3::xxh3_64(counter.as_bytes());
        &self.segments[(hash as usize) % SEGMENT_COUNT]
    }

    /// Sets an entry while loading from disk; not marked dirty.
    pub fn load(&self, counter: &str, stripe: u32, value: i64) {
        let mut segment = self.segment(counter).lock();
        let entry = segment.counters.entry(counter.into()).or_default();
        match entry
            .stripes
            .iter_mut()
            .find(|(existing, _)| *existing == stripe)
        {
            Some((_, stored)) => *stored = value,
            None => entry.stripes.push((stripe, value)),
        }
    }

    /// Applies increments, each on its own: one overflow does not stop the
    /// others. Returns the outcomes in order and the flush epoch the caller
    /// must wait for before the changes are durable (0 if nothing changed).
    pub fn apply(&self, increments: &[StripeIncrement<'_>]) -> (Vec<ApplyOutcome>, u64) {
        let mut wait_epoch = 0;
        let outcomes = increments
            .iter()
            .map(|increment| {
                let mut segment = self.segment(increment.counter).lock();
                let outcome = apply_one(&mut segment, increment);
                if outcome == ApplyOutcome::Applied && increment.delta != 0 {
                    wait_epoch = wait_epoch.max(self.open_epoch.load(Ordering::SeqCst));
                }
                outcome
            })
            .collect();
        (outcomes, wait_epoch)
    }

    /// Resets counters to 0. Returns the flush epoch to wait for.
    ///
    /// A counter that is in memory is always waited for, even when its
    /// entries are already 0: those zeros may not be on disk yet (a
    /// decrement to 0 or an earlier delete still in flight), and a delete
    /// must not be acknowledged before disk agrees. Only a counter absent
    /// from memory, and so from disk, needs no flush.
    pub fn erase(&self, counters: &[&str]) -> u64 {
        let mut wait_epoch = 0;
        for counter in counters {
            let mut segment = self.segment(counter).lock();
            let Some(entry) = segment.counters.get_mut(*counter) else {
                continue;
            };
            for (_, value) in &mut entry.stripes {
                *value = 0;
            }
            segment.mark_dirty(counter);
            wait_epoch = wait_epoch.max(self.open_epoch.load(Ordering::SeqCst));
        }
        wait_epoch
    }

    /// This node's non-zero `(stripe, value)` entries of a counter, by stripe.
    pub fn read(&self, counter: &str) -> Vec<(u32, i64)> {
        let segment = self.segment(counter).lock();
        let mut entries: Vec<(u32, i64)> = segment
            .counters
            .get(counter)
            .map(|entry| {
                entry
                    .stripes
                    .iter()
                    .copied()
                    .filter(|(_, value)| *value != 0)
                    .collect()
            })
            .unwrap_or_default();
        entries.sort_unstable();
        entries
    }

    /// Number of non-zero `(counter, stripe)` entries. Walks every segment:
    /// for status pages, not hot paths.
    pub fn entry_count(&self) -> u64 {
        self.segments
            .iter()
            .map(|segment| {
                let segment = segment.lock();
                segment
                    .counters
                    .values()
                    .map(|entry| {
                        entry
                            .stripes
                            .iter()
                            .filter(|(_, value)| *value != 0)
                            .count() as u64
                    })
                    .sum::<u64>()
            })
            .sum()
    }

    /// Closes the open epoch and collects every change made in it (and any
    /// earlier one not yet collected).
    pub fn begin_flush(&self) -> FlushSnapshot {
        let epoch = self.open_epoch.fetch_add(1, Ordering::SeqCst);
        let mut entries = Vec::new();
        for segment in self.segments.iter() {
            let mut segment = segment.lock();
            let dirty = std::mem::take(&mut segment.dirty);
            for counter in dirty {
                let Some(entry) = segment.counters.get_mut(&counter) else {
                    continue;
                };
                entry.dirty = false;
                entries.extend(entry.stripes.iter().map(|&(stripe, value)| EntrySnapshot {
                    counter: counter.clone(),
                    stripe,
                    value,
                }));
            }
        }
        FlushSnapshot { epoch, entries }
    }

    /// After a flush reached disk: drops entries that are 0 on disk and in
    /// memory, so deleted counters do not hold memory.
    pub fn finish_flush(&self, snapshot: &FlushSnapshot) {
        for removed in snapshot.entries.iter().filter(|entry| entry.value == 0) {
            let mut segment = self.segment(&removed.counter).lock();
            let Some(entry) = segment.counters.get_mut(&removed.counter) else {
                continue;
            };
            if entry.dirty {
                // Changed again since the snapshot; the next flush decides.
                continue;
            }
            entry.stripes.retain(|(_, value)| *value != 0);
            if entry.stripes.is_empty() {
                segment.counters.remove(&removed.counter);
            }
        }
    }

    /// After a flush failed: marks its counters dirty again, so the next
    /// flush writes them.
    pub fn abandon_flush(&self, snapshot: &FlushSnapshot) {
        for entry in &snapshot.entries {
            self.segment(&entry.counter)
                .lock()
                .mark_dirty(&entry.counter);
        }
    }
}

fn apply_one(segment: &mut Segment, increment: &StripeIncrement<'_>) -> ApplyOutcome {
    if increment.delta == 0 {
        return ApplyOutcome::Applied;
    }
    // Look up by &str first: only a new counter pays for an owned key.
    if !segment.counters.contains_key(increment.counter) {
        segment
            .counters
            .insert(increment.counter.into(), CounterEntry::default());
    }
    let entry = segment
        .counters
        .get_mut(increment.counter)
        .expect("inserted above");
    let position = entry
        .stripes
        .iter()
        .position(|(stripe, _)| *stripe == increment.stripe);
    let current = position.map_or(0, |index| entry.stripes[index].1);
    let Some(updated) = current.checked_add(increment.delta) else {
        if entry.stripes.is_empty() {
            segment.counters.remove(increment.counter);
        }
        return ApplyOutcome::Overflow;
    };
    match position {
        Some(index) => entry.stripes[index].1 = updated,
        None => entry.stripes.push((increment.stripe, updated)),
    }
    segment.mark_dirty(increment.counter);
    ApplyOutcome::Applied
}

#[cfg(test)]
mod tests {
    use super::*;

    fn increment(counter: &str, stripe: u32, delta: i64) -> StripeIncrement<'_> {
        StripeIncrement {
            counter,
            stripe,
            delta,
        }
    }

    #[test]
    fn applies_and_reads_by_stripe() {
        let store = Store::new();
        let (outcomes, epoch) = store.apply(&[
            increment("a", 0, 5),
            increment("a", 3, -2),
            increment("a", 0, 1),
            increment("b", 1, 7),
        ]);
        assert_eq!(outcomes, vec![ApplyOutcome::Applied; 4]);
        assert_eq!(epoch, 1);
        assert_eq!(store.read("a"), vec![(0, 6), (3, -2)]);
        assert_eq!(store.read("b"), vec![(1, 7)]);
        assert_eq!(store.read("missing"), vec![]);
        assert_eq!(store.entry_count(), 3);
    }

    #[test]
    fn overflow_changes_nothing_and_others_still_apply() {
        let store = Store::new();
        store.apply(&[increment("a", 0, i64::MAX)]);
        let (outcomes, _) = store.apply(&[increment("a", 0, 1), increment("b", 0, 1)]);
        assert_eq!(
            outcomes,
            vec![ApplyOutcome::Overflow, ApplyOutcome::Applied]
        );
        assert_eq!(store.read("a"), vec![(0, i64::MAX)]);
        // An overflow on a new entry leaves no empty entry behind.
        store.apply(&[increment("c", 0, i64::MIN)]);
        let (outcomes, _) = store.apply(&[increment("c", 0, -1)]);
        assert_eq!(outcomes, vec![ApplyOutcome::Overflow]);
        // A different stripe of the same counter is a different entry.
        let (outcomes, _) = store.apply(&[increment("a", 1, 1)]);
        assert_eq!(outcomes, vec![ApplyOutcome::Applied]);
    }

    #[test]
    fn zero_delta_needs_no_flush() {
        let store = Store::new();
        let (outcomes, epoch) = store.apply(&[increment("a", 0, 0)]);
        assert_eq!(outcomes, vec![ApplyOutcome::Applied]);
        assert_eq!(epoch, 0);
        assert!(store.begin_flush().entries.is_empty());
    }

    #[test]
    fn flush_collects_each_change_once_and_closes_the_epoch() {
        let store = Store::new();
        store.apply(&[increment("a", 0, 1), increment("a", 1, 1)]);
        store.apply(&[increment("a", 0, 1)]);
        let snapshot = store.begin_flush();
        assert_eq!(snapshot.epoch, 1);
        assert_eq!(snapshot.entries.len(), 2);
        let (_, epoch) = store.apply(&[increment("b", 0, 1)]);
        assert_eq!(
            epoch, 2,
            "changes after the flush began wait for the next one"
        );
        let snapshot = store.begin_flush();
        assert_eq!(snapshot.entries.len(), 1);
        assert!(store.begin_flush().entries.is_empty());
    }

    #[test]
    fn erase_writes_zeroes_then_frees_memory() {
        let store = Store::new();
        store.apply(&[increment("a", 0, 3), increment("a", 2, 4)]);
        store.begin_flush();
        assert!(store.erase(&["a", "never-seen"]) > 0);
        assert_eq!(store.read("a"), vec![]);
        let snapshot = store.begin_flush();
        assert!(snapshot.entries.iter().all(|entry| entry.value == 0));
        assert_eq!(snapshot.entries.len(), 2);
        store.finish_flush(&snapshot);
        assert_eq!(store.entry_count(), 0);
        assert_eq!(store.erase(&["a"]), 0, "nothing left to erase");
    }

    #[test]
    fn erase_of_zeros_not_yet_on_disk_waits_for_their_flush() {
        let store = Store::new();
        store.apply(&[increment("a", 0, 5)]);
        store.begin_flush(); // 5 is on disk
        store.apply(&[increment("a", 0, -5)]); // 0 in memory, not yet on disk
        let epoch = store.erase(&["a"]);
        assert!(epoch > 0, "the delete must wait for the zero to reach disk");
        let snapshot = store.begin_flush();
        assert_eq!(snapshot.epoch, epoch);
        assert_eq!(snapshot.entries.len(), 1);
        assert_eq!(snapshot.entries[0].value, 0);
        // A second delete while the first one's flush is still running waits
        // too, instead of being acknowledged at once.
        assert!(store.erase(&["a"]) > epoch);
    }

    #[test]
    fn abandoned_flush_is_written_again() {
        let store = Store::new();
        store.apply(&[increment("a", 0, 3)]);
        let failed = store.begin_flush();
        store.abandon_flush(&failed);
        let retried = store.begin_flush();
        assert_eq!(retried.entries, failed.entries);
    }

    #[test]
    fn concurrent_writers_sum_exactly() {
        let store = std::sync::Arc::new(Store::new());
        let threads: Vec<_> = (0..4)
            .map(|thread| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for round in 0..5_000i64 {
                        let counter = format!("c{}", round % 7);
                        let delta = if thread % 2 == 0 { 3 } else { -1 };
                        store.apply(&[increment(&counter, (round % 4) as u32, delta)]);
                        if round % 500 == 0 {
                            store.begin_flush();
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let total: i64 = (0..7)
            .flat_map(|counter| store.read(&format!("c{counter}")))
            .map(|(_, value)| value)
            .sum();
        assert_eq!(total, 2 * 5_000 * 3 - 2 * 5_000);
    }
}
