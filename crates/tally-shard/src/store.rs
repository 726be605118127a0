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
//!
//! # Idempotency records
//!
//! An increment carrying an idempotency key leaves a record `(counter, key)
//! -> delta` in the counter's segment, under the same lock as the change, so
//! a concurrent retry sees either neither or both. Records are dirty-tracked
//! like entries and collected by the same [`Store::begin_flush`] visit of the
//! segment: a flush writes a counter change and its record in one batch, or
//! neither. A record is forgotten once it is older than the retention
//! window, or, oldest first, when the node remembers more than its maximum
//! number of keys ([`KeyRetention`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::keys;

/// Number of lock segments. A power of two well above the core count of the
/// machines we run on, so two writers collide on a lock rarely.
const SEGMENT_COUNT: usize = 64;

/// Default for how long an idempotency key is remembered.
pub const DEFAULT_KEY_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// Default for how many idempotency keys one node remembers.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// How long idempotency keys are remembered.
///
/// A key is remembered for `window` after it was applied, unless the node
/// holds more than `max_keys` keys: then the oldest are forgotten first,
/// early, and counted ([`Store::keys_forgotten_early`]). A retry of a
/// forgotten key applies again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRetention {
    /// How long a key is remembered after it was applied.
    pub window: Duration,
    /// Most keys remembered at once.
    pub max_keys: usize,
}

impl Default for KeyRetention {
    fn default() -> Self {
        KeyRetention {
            window: DEFAULT_KEY_RETENTION,
            max_keys: DEFAULT_MAX_KEYS,
        }
    }
}

/// What happened to one increment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Added to the entry.
    Applied,
    /// The entry would leave the i64 range; nothing changed.
    Overflow,
    /// Its idempotency key was applied before, with the same delta: a retry.
    /// Nothing changed.
    Duplicate,
    /// Its idempotency key was applied before to this counter with another
    /// delta: two different increments share a key. Nothing changed.
    Conflict {
        /// The delta applied under the key.
        recorded_delta: i64,
    },
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
    /// Applied at most once per key and counter, if present.
    pub idempotency_key: Option<&'a str>,
}

/// One idempotency record as a flush must write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSnapshot {
    /// The record's key in the `data` tree ([`keys::encode_record_key_into`]).
    pub key: Arc<[u8]>,
    /// `(delta, applied_unix_ms)`, or `None` if the record was forgotten.
    pub record: Option<(i64, u64)>,
    /// The segment it lives in, to re-mark it dirty if the flush fails.
    segment: usize,
}

/// An idempotency record read back from disk.
#[derive(Debug, Clone)]
pub struct LoadedRecord {
    /// The record's key in the `data` tree.
    pub key: Arc<[u8]>,
    /// The counter (decoded from the key).
    pub counter: Box<str>,
    /// The delta applied under the key.
    pub delta: i64,
    /// When it was applied.
    pub applied_unix_ms: u64,
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
    /// Every idempotency record added or forgotten in or before `epoch`.
    pub records: Vec<RecordSnapshot>,
}

impl FlushSnapshot {
    /// Whether the flush has nothing to write.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.records.is_empty()
    }
}

#[derive(Debug, Default)]
struct CounterEntry {
    /// `(stripe, value)`; a counter has few stripes on one node, so a vector
    /// beats a map.
    stripes: Vec<(u32, i64)>,
    /// Listed in its segment's `dirty` list and not yet collected by a flush.
    dirty: bool,
    /// The replication version of its last change (see [`Store::changes_since`]).
    changed: u64,
}

/// An idempotency key applied to a counter.
#[derive(Debug, Clone, Copy)]
struct KeyRecord {
    delta: i64,
    applied_unix_ms: u64,
    /// Tells this record from an older one under the same key that was
    /// forgotten: only the queue entry with this number may forget it.
    sequence: u64,
    /// The flush epoch of the change: a retry is answered once it is durable.
    epoch: u64,
}

/// The segments' maps: foldhash. SipHash (std's default) was 11% of a
/// start loading 950,000 entries, and apply ran 2.2× faster without it.
/// foldhash seeds each map randomly, so colliding names cannot be computed
/// offline; unlike SipHash it does not claim to resist an attacker who
/// probes one process's timing, a trade made for callers that are the
/// operator's own application services.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
struct Segment {
    counters: FastMap<Box<str>, CounterEntry>,
    dirty: Vec<Box<str>>,
    /// Keyed by the record's key in the `data` tree, which is unique per
    /// `(counter, idempotency key)` and shared with the retention queue.
    records: FastMap<Arc<[u8]>, KeyRecord>,
    /// Records added or forgotten since the last flush; may repeat a key.
    dirty_records: Vec<Arc<[u8]>>,
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

/// A remembered key in the retention queue.
#[derive(Debug)]
struct RememberedKey {
    applied_unix_ms: u64,
    sequence: u64,
    segment: usize,
    key: Arc<[u8]>,
}

/// Every remembered key, oldest first: the order in which they are forgotten.
#[derive(Debug, Default)]
struct KeyQueue {
    keys: VecDeque<RememberedKey>,
    next_sequence: u64,
    /// The latest time handed out, so the queue stays in time order even if
    /// the wall clock steps back.
    latest_unix_ms: u64,
}

/// Entries removed from memory (0 on disk and in memory), remembered so that
/// [`Store::changes_since`] can tell replicas; the oldest are dropped beyond
/// [`REMOVED_LOG_MAX`], and a replica behind them gets a full copy.
#[derive(Debug, Default)]
struct RemovedLog {
    removed: VecDeque<(u64, Box<str>, u32)>,
    /// Changes before this version may be missing from the log.
    horizon: u64,
}

/// Most removals remembered for replicas.
const REMOVED_LOG_MAX: usize = 1_000_000;
/// Bits of a replication version below the node's incarnation.
const INCARNATION_SHIFT: u32 = 32;

/// What changed in this node's own entries (see [`Store::changes_since`]).
#[derive(Debug, Default)]
pub struct Changes {
    /// The version a copy is at once it has these changes.
    pub version: u64,
    /// `entries` is every entry; a copy drops what is not listed.
    pub full: bool,
    /// `(counter, stripe, value)`; a value of 0 means the entry is gone.
    pub entries: Vec<(Box<str>, u32, i64)>,
}

/// A node's counters in memory.
#[derive(Debug)]
pub struct Store {
    segments: Box<[Mutex<Segment>]>,
    open_epoch: AtomicU64,
    /// Stamped on every change of an own entry, under its segment lock, and
    /// advanced by [`Store::changes_since`] before it looks: the flush
    /// epoch's argument, for replication. The node's incarnation sits in the
    /// high bits, so versions grow across restarts.
    replication_epoch: AtomicU64,
    removed: Mutex<RemovedLog>,
    retention: KeyRetention,
    /// Locked after a segment, never before one.
    key_queue: Mutex<KeyQueue>,
    keys_forgotten_early: AtomicU64,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store with the default key retention. Epochs start at 1, so
    /// 0 means "nothing to wait for".
    pub fn new() -> Self {
        Self::with_retention(KeyRetention::default())
    }

    /// An empty store remembering idempotency keys as `retention` says.
    pub fn with_retention(retention: KeyRetention) -> Self {
        Store {
            segments: (0..SEGMENT_COUNT).map(|_| Mutex::default()).collect(),
            open_epoch: AtomicU64::new(1),
            retention,
            key_queue: Mutex::default(),
            keys_forgotten_early: AtomicU64::new(0),
            replication_epoch: AtomicU64::new(1),
            removed: Mutex::default(),
        }
    }

    /// The flush epoch open now: waiting for it to be flushed waits for
    /// every change made so far.
    pub fn open_epoch(&self) -> u64 {
        self.open_epoch.load(Ordering::SeqCst)
    }

    /// The value of one entry (0 if absent).
    pub fn entry(&self, counter: &str, stripe: u32) -> i64 {
        self.segment(counter)
            .lock()
            .counters
            .get(counter)
            .and_then(|entry| {
                entry
                    .stripes
                    .iter()
                    .find(|(existing, _)| *existing == stripe)
            })
            .map_or(0, |(_, value)| *value)
    }

    /// The replication version now: a copy at this version or later holds
    /// every change made before this call.
    pub fn replication_version(&self) -> u64 {
        self.replication_epoch.load(Ordering::SeqCst)
    }

    /// Sets the node's incarnation (starts so far), before serving: the high
    /// bits of every replication version from now on.
    pub fn set_incarnation(&self, incarnation: u64) {
        self.replication_epoch
            .store((incarnation << INCARNATION_SHIFT) | 1, Ordering::SeqCst);
    }

    /// This node's own entries changed after version `since` (from an
    /// earlier call), or all of them (`full`) if `since` is 0, from another
    /// incarnation, or older than the removal log reaches.
    pub fn changes_since(&self, since: u64) -> Changes {
        let version = self.replication_epoch.fetch_add(1, Ordering::SeqCst);
        let horizon = self.removed.lock().horizon;
        let full = since == 0
            || since < horizon
            || since >> INCARNATION_SHIFT != version >> INCARNATION_SHIFT;
        let mut entries = Vec::new();
        for segment in self.segments.iter() {
            let segment = segment.lock();
            for (counter, entry) in &segment.counters {
                if full || entry.changed > since {
                    entries.extend(
                        entry
                            .stripes
                            .iter()
                            .filter(|(_, value)| !full || *value != 0)
                            .map(|&(stripe, value)| (counter.clone(), stripe, value)),
                    );
                }
            }
        }
        if !full {
            // Read after the scan: an entry removed before the scan reached
            // its segment was logged before it was removed.
            let seen: std::collections::HashSet<(&str, u32)> = entries
                .iter()
                .map(|(counter, stripe, _)| (&**counter, *stripe))
                .collect();
            let removed: Vec<(Box<str>, u32, i64)> = self
                .removed
                .lock()
                .removed
                .iter()
                .filter(|(changed, counter, stripe)| {
                    *changed > since && !seen.contains(&(&**counter, *stripe))
                })
                .map(|(_, counter, stripe)| (counter.clone(), *stripe, 0))
                .collect();
            entries.extend(removed);
        }
        Changes {
            version,
            full,
            entries,
        }
    }

    fn segment_index(counter: &str) -> usize {
        let hash = xxhash_rust::xxh3::xxh3_64(counter.as_bytes());
        (hash as usize) % SEGMENT_COUNT
    }

    fn segment(&self, counter: &str) -> &Mutex<Segment> {
        &self.segments[Self::segment_index(counter)]
    }

    /// Sets an entry that is already on disk (a restore, an adoption): not
    /// marked dirty, but stamped as changed, so replicas get it.
    pub fn set_flushed(&self, counter: &str, stripe: u32, value: i64) {
        let mut segment = self.segment(counter).lock();
        let changed = self.replication_epoch.load(Ordering::SeqCst);
        let entry = segment.counters.entry(counter.into()).or_default();
        entry.changed = changed;
        match entry
            .stripes
            .iter_mut()
            .find(|(existing, _)| *existing == stripe)
        {
            Some((_, stored)) => *stored = value,
            None => entry.stripes.push((stripe, value)),
        }
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

    /// Loads idempotency records read from disk, before serving. Records
    /// older than the window stay until the first flush forgets them.
    pub fn load_records(&self, mut records: Vec<LoadedRecord>) {
        records.sort_by_key(|record| record.applied_unix_ms);
        for record in records {
            let segment_index = Self::segment_index(&record.counter);
            // Segment, then queue: the documented lock order.
            let mut segment = self.segments[segment_index].lock();
            let mut queue = self.key_queue.lock();
            let sequence = queue.next_sequence;
            queue.next_sequence += 1;
            queue.latest_unix_ms = queue.latest_unix_ms.max(record.applied_unix_ms);
            queue.keys.push_back(RememberedKey {
                applied_unix_ms: record.applied_unix_ms,
                sequence,
                segment: segment_index,
                key: record.key.clone(),
            });
            drop(queue);
            segment.records.insert(
                record.key,
                KeyRecord {
                    delta: record.delta,
                    applied_unix_ms: record.applied_unix_ms,
                    sequence,
                    epoch: 0,
                },
            );
        }
    }

    /// Applies increments, each on its own: one overflow does not stop the
    /// others. An increment whose idempotency key this node remembers for
    /// its counter is not applied again. Returns the outcomes in order and
    /// the flush epoch the caller must wait for before the changes (and, for
    /// a retry, the original) are durable; 0 if there is nothing to wait for.
    pub fn apply(
        &self,
        increments: &[StripeIncrement<'_>],
        now_unix_ms: u64,
    ) -> (Vec<ApplyOutcome>, u64) {
        let mut wait_epoch = 0;
        let mut record_key = Vec::new();
        let outcomes = increments
            .iter()
            .map(|increment| {
                let segment_index = Self::segment_index(increment.counter);
                let mut segment = self.segments[segment_index].lock();
                // Read under the segment lock: see the module docs.
                let epoch = self.open_epoch.load(Ordering::SeqCst);
                let key = increment.idempotency_key.filter(|_| increment.delta != 0);
                if let Some(key) = key {
                    keys::encode_record_key_into(&mut record_key, increment.counter, key);
                    if let Some(record) = segment.records.get(record_key.as_slice()) {
                        // A retry may come while the original still waits
                        // for its flush: it is answered no sooner.
                        wait_epoch = wait_epoch.max(record.epoch);
                        return if record.delta == increment.delta {
                            ApplyOutcome::Duplicate
                        } else {
                            ApplyOutcome::Conflict {
                                recorded_delta: record.delta,
                            }
                        };
                    }
                }
                let changed = self.replication_epoch.load(Ordering::SeqCst);
                let outcome = apply_one(&mut segment, increment, changed);
                if outcome == ApplyOutcome::Applied && increment.delta != 0 {
                    wait_epoch = wait_epoch.max(epoch);
                    if key.is_some() {
                        self.remember(
                            &mut segment,
                            segment_index,
                            &record_key,
                            increment.delta,
                            epoch,
                            now_unix_ms,
                        );
                    }
                }
                outcome
            })
            .collect();
        (outcomes, wait_epoch)
    }

    /// Records an applied key, in its segment (held by the caller) and at the
    /// back of the retention queue.
    fn remember(
        &self,
        segment: &mut Segment,
        segment_index: usize,
        record_key: &[u8],
        delta: i64,
        epoch: u64,
        now_unix_ms: u64,
    ) {
        let key: Arc<[u8]> = record_key.into();
        let mut queue = self.key_queue.lock();
        let applied_unix_ms = queue.latest_unix_ms.max(now_unix_ms);
        queue.latest_unix_ms = applied_unix_ms;
        let sequence = queue.next_sequence;
        queue.next_sequence += 1;
        queue.keys.push_back(RememberedKey {
            applied_unix_ms,
            sequence,
            segment: segment_index,
            key: key.clone(),
        });
        drop(queue);
        segment.records.insert(
            key.clone(),
            KeyRecord {
                delta,
                applied_unix_ms,
                sequence,
                epoch,
            },
        );
        segment.dirty_records.push(key);
    }

    /// Forgets keys older than the retention window, and the oldest keys
    /// beyond the maximum. Returns how many were forgotten early (before
    /// their window ended). The next flush removes them from disk.
    pub fn forget_keys(&self, now_unix_ms: u64) -> u64 {
        let window_ms = u64::try_from(self.retention.window.as_millis()).unwrap_or(u64::MAX);
        let mut early = 0;
        loop {
            let victim = {
                let mut queue = self.key_queue.lock();
                let Some(oldest) = queue.keys.front() else {
                    break;
                };
                let expired = oldest.applied_unix_ms.saturating_add(window_ms) <= now_unix_ms;
                if !expired && queue.keys.len() <= self.retention.max_keys {
                    break;
                }
                if !expired {
                    early += 1;
                }
                queue.keys.pop_front().expect("looked at above")
            };
            // The queue lock is released: segments are never locked after it.
            let mut segment = self.segments[victim.segment].lock();
            let current = segment
                .records
                .get(&victim.key)
                .is_some_and(|record| record.sequence == victim.sequence);
            if current {
                segment.records.remove(&victim.key);
                segment.dirty_records.push(victim.key);
            }
        }
        if early > 0 {
            self.keys_forgotten_early
                .fetch_add(early, Ordering::Relaxed);
        }
        early
    }

    /// Idempotency keys remembered now.
    pub fn remembered_keys(&self) -> u64 {
        self.key_queue.lock().keys.len() as u64
    }

    /// Keys forgotten before their retention window ended, since start,
    /// because the node held more than its maximum.
    pub fn keys_forgotten_early(&self) -> u64 {
        self.keys_forgotten_early.load(Ordering::Relaxed)
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
            entry.changed = self.replication_epoch.load(Ordering::SeqCst);
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
        let mut records = Vec::new();
        for (segment_index, segment) in self.segments.iter().enumerate() {
            let mut segment = segment.lock();
            for key in std::mem::take(&mut segment.dirty_records) {
                let record = segment
                    .records
                    .get(&key)
                    .map(|record| (record.delta, record.applied_unix_ms));
                records.push(RecordSnapshot {
                    key,
                    record,
                    segment: segment_index,
                });
            }
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
        FlushSnapshot {
            epoch,
            entries,
            records,
        }
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
            let changed = entry.changed;
            let gone: Vec<u32> = entry
                .stripes
                .iter()
                .filter(|(_, value)| *value == 0)
                .map(|(stripe, _)| *stripe)
                .collect();
            // Logged before the entry leaves memory: see `changes_since`.
            let mut log = self.removed.lock();
            for stripe in gone {
                log.removed
                    .push_back((changed, removed.counter.clone(), stripe));
            }
            while log.removed.len() > REMOVED_LOG_MAX {
                if let Some((dropped, _, _)) = log.removed.pop_front() {
                    log.horizon = log.horizon.max(dropped);
                }
            }
            drop(log);
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
        for record in &snapshot.records {
            self.segments[record.segment]
                .lock()
                .dirty_records
                .push(record.key.clone());
        }
    }
}

fn apply_one(segment: &mut Segment, increment: &StripeIncrement<'_>, changed: u64) -> ApplyOutcome {
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
    entry.changed = changed;
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
            idempotency_key: None,
        }
    }

    #[test]
    fn applies_and_reads_by_stripe() {
        let store = Store::new();
        let (outcomes, epoch) = store.apply(
            &[
                increment("a", 0, 5),
                increment("a", 3, -2),
                increment("a", 0, 1),
                increment("b", 1, 7),
            ],
            0,
        );
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
        store.apply(&[increment("a", 0, i64::MAX)], 0);
        let (outcomes, _) = store.apply(&[increment("a", 0, 1), increment("b", 0, 1)], 0);
        assert_eq!(
            outcomes,
            vec![ApplyOutcome::Overflow, ApplyOutcome::Applied]
        );
        assert_eq!(store.read("a"), vec![(0, i64::MAX)]);
        // An overflow on a new entry leaves no empty entry behind.
        store.apply(&[increment("c", 0, i64::MIN)], 0);
        let (outcomes, _) = store.apply(&[increment("c", 0, -1)], 0);
        assert_eq!(outcomes, vec![ApplyOutcome::Overflow]);
        // A different stripe of the same counter is a different entry.
        let (outcomes, _) = store.apply(&[increment("a", 1, 1)], 0);
        assert_eq!(outcomes, vec![ApplyOutcome::Applied]);
    }

    #[test]
    fn zero_delta_needs_no_flush() {
        let store = Store::new();
        let (outcomes, epoch) = store.apply(&[increment("a", 0, 0)], 0);
        assert_eq!(outcomes, vec![ApplyOutcome::Applied]);
        assert_eq!(epoch, 0);
        assert!(store.begin_flush().entries.is_empty());
    }

    #[test]
    fn flush_collects_each_change_once_and_closes_the_epoch() {
        let store = Store::new();
        store.apply(&[increment("a", 0, 1), increment("a", 1, 1)], 0);
        store.apply(&[increment("a", 0, 1)], 0);
        let snapshot = store.begin_flush();
        assert_eq!(snapshot.epoch, 1);
        assert_eq!(snapshot.entries.len(), 2);
        let (_, epoch) = store.apply(&[increment("b", 0, 1)], 0);
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
        store.apply(&[increment("a", 0, 3), increment("a", 2, 4)], 0);
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
        store.apply(&[increment("a", 0, 5)], 0);
        store.begin_flush(); // 5 is on disk
        store.apply(&[increment("a", 0, -5)], 0); // 0 in memory, not yet on disk
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
        store.apply(&[increment("a", 0, 3)], 0);
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
                        store.apply(&[increment(&counter, (round % 4) as u32, delta)], 0);
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

    fn keyed<'a>(counter: &'a str, delta: i64, key: &'a str) -> StripeIncrement<'a> {
        StripeIncrement {
            counter,
            stripe: 0,
            delta,
            idempotency_key: Some(key),
        }
    }

    fn total(store: &Store, counter: &str) -> i64 {
        store.read(counter).iter().map(|(_, value)| value).sum()
    }

    #[test]
    fn a_key_is_applied_once_per_counter() {
        let store = Store::new();
        let (outcomes, _) = store.apply(
            &[
                keyed("a", 5, "k1"),
                keyed("a", 5, "k1"), // a retry inside the same batch
                keyed("b", 5, "k1"), // the same key on another counter
                keyed("a", 5, "k2"),
            ],
            1_000,
        );
        assert_eq!(
            outcomes,
            vec![
                ApplyOutcome::Applied,
                ApplyOutcome::Duplicate,
                ApplyOutcome::Applied,
                ApplyOutcome::Applied
            ]
        );
        let (outcomes, _) = store.apply(&[keyed("a", 5, "k1")], 2_000);
        assert_eq!(outcomes, vec![ApplyOutcome::Duplicate]);
        assert_eq!(total(&store, "a"), 10);
        assert_eq!(total(&store, "b"), 5);
        assert_eq!(store.remembered_keys(), 3);
    }

    #[test]
    fn a_key_reused_with_another_delta_is_a_conflict() {
        let store = Store::new();
        store.apply(&[keyed("a", 5, "k")], 0);
        let (outcomes, _) = store.apply(&[keyed("a", 6, "k")], 0);
        assert_eq!(outcomes, vec![ApplyOutcome::Conflict { recorded_delta: 5 }]);
        assert_eq!(total(&store, "a"), 5);
    }

    #[test]
    fn nothing_applied_leaves_no_record() {
        let store = Store::new();
        store.apply(&[increment("a", 0, i64::MAX)], 0);
        let (outcomes, epoch) = store.apply(&[keyed("a", 1, "k"), keyed("a", 0, "z")], 0);
        assert_eq!(
            outcomes,
            vec![ApplyOutcome::Overflow, ApplyOutcome::Applied]
        );
        assert_eq!(epoch, 0);
        assert_eq!(store.remembered_keys(), 0, "an overflow may be retried");
    }

    #[test]
    fn a_retry_waits_for_the_original_to_be_durable() {
        let store = Store::new();
        let (_, original) = store.apply(&[keyed("a", 1, "k")], 0);
        let (outcomes, retry) = store.apply(&[keyed("a", 1, "k")], 0);
        assert_eq!(outcomes, vec![ApplyOutcome::Duplicate]);
        assert_eq!(retry, original);
        store.begin_flush();
        let (_, later) = store.apply(&[keyed("a", 1, "k")], 0);
        assert_eq!(later, original, "an epoch already flushed returns at once");
    }

    #[test]
    fn a_change_and_its_record_are_flushed_together() {
        let store = Store::new();
        store.apply(&[keyed("a", 3, "k")], 42);
        let snapshot = store.begin_flush();
        assert_eq!(snapshot.entries.len(), 1);
        assert_eq!(snapshot.records.len(), 1);
        assert_eq!(snapshot.records[0].record, Some((3, 42)));
        let mut expected = Vec::new();
        keys::encode_record_key_into(&mut expected, "a", "k");
        assert_eq!(&*snapshot.records[0].key, expected.as_slice());
        store.abandon_flush(&snapshot);
        let retried = store.begin_flush();
        assert_eq!(retried.entries, snapshot.entries);
        assert_eq!(retried.records, snapshot.records);
        assert!(store.begin_flush().is_empty());
    }

    #[test]
    fn keys_are_forgotten_after_the_window() {
        let store = Store::with_retention(KeyRetention {
            window: Duration::from_secs(10),
            max_keys: 100,
        });
        store.apply(&[keyed("a", 1, "old")], 1_000);
        store.apply(&[keyed("a", 1, "new")], 5_000);
        store.begin_flush();
        assert_eq!(store.forget_keys(10_999), 0);
        assert_eq!(store.remembered_keys(), 2);
        assert_eq!(store.forget_keys(11_000), 0, "expired, not early");
        assert_eq!(store.remembered_keys(), 1);
        let snapshot = store.begin_flush();
        assert_eq!(snapshot.records.len(), 1);
        assert_eq!(snapshot.records[0].record, None, "removed from disk");
        // Forgotten: a retry applies again.
        let (outcomes, _) = store.apply(&[keyed("a", 1, "old")], 12_000);
        assert_eq!(outcomes, vec![ApplyOutcome::Applied]);
        let (outcomes, _) = store.apply(&[keyed("a", 1, "new")], 12_000);
        assert_eq!(outcomes, vec![ApplyOutcome::Duplicate]);
    }

    #[test]
    fn beyond_the_maximum_the_oldest_keys_go_first_and_are_counted() {
        let store = Store::with_retention(KeyRetention {
            window: Duration::from_secs(3600),
            max_keys: 2,
        });
        for (time, key) in [(1, "k1"), (2, "k2"), (3, "k3"), (4, "k4")] {
            store.apply(&[keyed("a", 1, key)], time);
        }
        assert_eq!(store.forget_keys(5), 2);
        assert_eq!(store.keys_forgotten_early(), 2);
        assert_eq!(store.remembered_keys(), 2);
        let (outcomes, _) = store.apply(
            &[
                keyed("a", 1, "k1"),
                keyed("a", 1, "k3"),
                keyed("a", 1, "k4"),
            ],
            6,
        );
        assert_eq!(
            outcomes,
            vec![
                ApplyOutcome::Applied,
                ApplyOutcome::Duplicate,
                ApplyOutcome::Duplicate
            ]
        );
    }

    #[test]
    fn a_forgotten_then_reapplied_key_is_not_forgotten_by_its_old_queue_entry() {
        let store = Store::with_retention(KeyRetention {
            window: Duration::from_millis(10),
            max_keys: 100,
        });
        store.apply(&[keyed("a", 1, "k")], 0);
        store.forget_keys(10);
        store.apply(&[keyed("a", 1, "k")], 15);
        assert_eq!(store.forget_keys(20), 0);
        assert_eq!(store.remembered_keys(), 1);
        let (outcomes, _) = store.apply(&[keyed("a", 1, "k")], 21);
        assert_eq!(outcomes, vec![ApplyOutcome::Duplicate]);
    }

    #[test]
    fn loaded_records_are_remembered_and_age_from_their_time() {
        let store = Store::with_retention(KeyRetention {
            window: Duration::from_millis(100),
            max_keys: 100,
        });
        let record = |key: &str, applied_unix_ms| {
            let mut bytes = Vec::new();
            keys::encode_record_key_into(&mut bytes, "a", key);
            LoadedRecord {
                key: bytes.into(),
                counter: "a".into(),
                delta: 1,
                applied_unix_ms,
            }
        };
        store.load_records(vec![record("late", 500), record("early", 100)]);
        assert_eq!(store.remembered_keys(), 2);
        store.forget_keys(250);
        let (outcomes, _) = store.apply(&[keyed("a", 1, "early"), keyed("a", 1, "late")], 250);
        assert_eq!(
            outcomes,
            vec![ApplyOutcome::Applied, ApplyOutcome::Duplicate]
        );
    }

    #[test]
    fn concurrent_retries_apply_once() {
        let store = std::sync::Arc::new(Store::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for round in 0..2_000 {
                        let key = format!("key-{round}");
                        store.apply(&[keyed("hot", 1, &key)], round);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(total(&store, "hot"), 2_000);
    }

    fn sorted(mut entries: Vec<(Box<str>, u32, i64)>) -> Vec<(String, u32, i64)> {
        entries.sort();
        entries
            .into_iter()
            .map(|(counter, stripe, value)| (counter.into_string(), stripe, value))
            .collect()
    }

    #[test]
    fn changes_since_lists_what_changed_and_what_was_removed() {
        let store = Store::new();
        store.set_incarnation(3);
        store.apply(&[increment("a", 0, 5), increment("b", 1, 2)], 0);
        let first = store.changes_since(0);
        assert!(first.full);
        assert_eq!(first.version >> INCARNATION_SHIFT, 3);
        assert_eq!(
            sorted(first.entries),
            vec![("a".into(), 0, 5), ("b".into(), 1, 2)]
        );
        let nothing = store.changes_since(first.version);
        assert!(!nothing.full);
        assert!(nothing.entries.is_empty());

        // A change, and a counter deleted and dropped from memory.
        store.apply(&[increment("a", 0, 1)], 0);
        store.erase(&["b"]);
        let snapshot = store.begin_flush();
        store.finish_flush(&snapshot);
        let changes = store.changes_since(nothing.version);
        assert!(!changes.full);
        assert_eq!(
            sorted(changes.entries),
            vec![("a".into(), 0, 6), ("b".into(), 1, 0)]
        );
        // From another incarnation: everything.
        assert!(store.changes_since(5 << INCARNATION_SHIFT).full);
    }
}
