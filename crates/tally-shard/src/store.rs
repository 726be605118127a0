//! The in-memory counters: a map from `(counter, stripe)` to i64, split into
//! segments so that concurrent writers rarely share a lock, each segment a
//! compact `Table`.
//!
//! The store also tracks which counters changed since the last group commit,
//! and hands out *flush epochs*: every change is stamped with the epoch that
//! is open while it is made, and [`Store::begin_flush`] closes that epoch
//! and collects every change stamped with it into the next log frame. Why
//! this is exact: a writer reads the open epoch while it holds its segment's
//! lock, and the flusher closes the epoch *before* it takes any segment lock.
//! So a writer that saw epoch `E` either finished before the flusher visited
//! its segment (its change is collected) or the flusher has not visited it
//! yet (it will wait for the writer's lock and collect the change). A writer
//! that saw `E + 1` may be collected early, which only makes it durable
//! sooner.
//!
//! # Idempotency records
//!
//! An increment carrying an idempotency key leaves a record `(counter, key)
//! -> delta` in the counter's segment, under the same lock as the change, so
//! a concurrent retry sees either neither or both. Records are dirty-tracked
//! like entries and collected by the same [`Store::begin_flush`] visit of the
//! segment: one log frame holds a counter change and its record, or neither.
//! A record is forgotten once it is older than the retention window, or,
//! oldest first, when the node remembers more than its maximum number of
//! keys ([`KeyRetention`]).
//!
//! # Checkpoint captures
//!
//! The checkpoint (`crate::checkpoint`) stores the counters in buckets:
//! 64 per segment, chosen by a hash of the counter's name (of the record's
//! key for idempotency records). Every change marks its bucket; a capture,
//! taken during a [`Store::begin_flush`] visit of a segment and so under the
//! same lock, encodes the segment's marked buckets. Captured that way, a
//! bucket holds exactly what the log holds up to the frame being collected:
//! never a change the log does not have yet. Replaying the log from an
//! earlier frame over it is then harmless (the frames carry absolute values),
//! which is what makes a checkpoint taken a few segments at a time, while
//! writers run, sound.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::codec::{self, Malformed, Reader};
use crate::replicas::CopyRecord;
use crate::table::{Slot, Table, DIRTY};
use crate::windows::{WindowClock, WindowIndex};

/// Number of lock segments. A power of two well above the core count of the
/// machines we run on, so two writers collide on a lock rarely.
pub const SEGMENT_COUNT: usize = 64;
/// Checkpoint buckets per segment (one bit each in a `u64`).
pub const BUCKETS_PER_SEGMENT: usize = 64;
/// Checkpoint buckets in all: a bucket id fits a `u16`.
pub const BUCKET_COUNT: usize = SEGMENT_COUNT * BUCKETS_PER_SEGMENT;
/// Stripes a shard stores per counter: stripe ids below this. Coordinators
/// use at most 1,024.
pub const MAX_STRIPES: u32 = 4096;

/// Default for how long an idempotency key is remembered.
pub const DEFAULT_KEY_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// Default for how many idempotency keys one node remembers.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// Where a counter (or a record's key) lives: its segment and its bucket
/// within the segment, from an xxh3 of the name. Fixed by the data format:
/// checkpoint buckets are stored under these numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The lock segment (and the high bits of the bucket id).
    pub segment: usize,
    /// The bucket within the segment.
    pub sub: usize,
}

impl Placement {
    /// The placement of a counter (or record key) by its bytes.
    pub fn of(bytes: &[u8]) -> Placement {
        let hash = xxhash_rust::xxh3::xxh3_64(bytes);
        Placement {
            segment: ((hash >> 32) as usize) % SEGMENT_COUNT,
            sub: ((hash >> 40) as usize) % BUCKETS_PER_SEGMENT,
        }
    }

    /// The bucket id, `segment × 64 + sub`.
    pub fn bucket(self) -> u16 {
        (self.segment * BUCKETS_PER_SEGMENT + self.sub) as u16
    }
}

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

/// The clock key retention counts with: the wall clock read once, when the
/// store is made, then advanced by the monotonic clock. A step of the wall
/// clock while the node runs (an operator's `date -s`, a VM resumed, NTP
/// stepping a clock that was far off) neither forgets keys early nor keeps
/// them forever; it is logged, once per step. A restart reads the wall
/// clock again.
#[derive(Debug)]
pub struct RetentionClock {
    start_unix_ms: u64,
    start: std::time::Instant,
    /// The wall clock's offset from this clock last logged, in ms.
    logged_offset_ms: AtomicI64,
}

/// A wall clock this far from the retention clock has stepped (ms).
const CLOCK_STEP_MS: i64 = 1_000;

impl RetentionClock {
    /// Starts counting from `start_unix_ms`.
    pub fn starting_at(start_unix_ms: u64) -> Self {
        RetentionClock {
            start_unix_ms,
            start: std::time::Instant::now(),
            logged_offset_ms: AtomicI64::new(0),
        }
    }

    /// Now, in Unix ms, as retention counts it.
    pub fn now_ms(&self) -> u64 {
        let now = self
            .start_unix_ms
            .saturating_add(self.start.elapsed().as_millis() as u64);
        let wall = crate::journal::unix_ms_now();
        let offset = wall as i64 - now as i64;
        let logged = self.logged_offset_ms.load(Ordering::Relaxed);
        if (offset - logged).abs() >= CLOCK_STEP_MS
            && self
                .logged_offset_ms
                .compare_exchange(logged, offset, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                wall_clock_ahead_ms = offset,
                "the wall clock stepped; idempotency key retention keeps counting from the \
                 monotonic clock, so no key is forgotten early (a restart reads the wall clock \
                 again)"
            );
        }
        now
    }
}

impl Default for RetentionClock {
    fn default() -> Self {
        Self::starting_at(crate::journal::unix_ms_now())
    }
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
    /// Its counter is a window that ended by this node's clock, grace
    /// included ([`crate::windows`]). Nothing changed.
    Expired {
        /// The window's end, Unix ms.
        end_unix_ms: u64,
        /// This node's clock when it decided, Unix ms.
        now_unix_ms: u64,
    },
}

/// One increment of one stripe of a counter.
#[derive(Debug, Clone, Copy)]
pub struct StripeIncrement<'a> {
    /// The counter.
    pub counter: &'a str,
    /// The stripe of the counter, below [`MAX_STRIPES`].
    pub stripe: u32,
    /// Amount to add.
    pub delta: i64,
    /// Applied at most once per key and counter, if present.
    pub idempotency_key: Option<&'a str>,
}

/// The key of an idempotency record: `counter_len: u16 BE | counter | key`,
/// unique per `(counter, idempotency key)`.
pub fn encode_record_key_into(buffer: &mut Vec<u8>, counter: &str, key: &str) {
    debug_assert!(counter.len() <= usize::from(u16::MAX));
    buffer.clear();
    buffer.extend_from_slice(&(counter.len() as u16).to_be_bytes());
    buffer.extend_from_slice(counter.as_bytes());
    buffer.extend_from_slice(key.as_bytes());
}

/// Reads one idempotency record as checkpoint buckets and replica frames
/// hold it: `key: bytes | delta: zigzag | applied_unix_ms: varint`.
pub fn read_record<'a>(reader: &mut Reader<'a>) -> Result<(&'a [u8], i64, u64), Malformed> {
    let key = reader.bytes("record key")?;
    decode_record_key(key).ok_or(Malformed { what: "record key" })?;
    Ok((
        key,
        reader.signed("record delta")?,
        reader.varint("record time")?,
    ))
}

/// A record key for tests: [`encode_record_key_into`], owned.
#[cfg(test)]
pub fn record_key(counter: &str, key: &str) -> Box<[u8]> {
    let mut bytes = Vec::new();
    encode_record_key_into(&mut bytes, counter, key);
    bytes.into()
}

/// The counter of a record key if it is a window's (its name starts with
/// U+0000): one byte compare for any other.
#[inline]
fn window_of_record(key: &[u8]) -> Option<&str> {
    if key.get(2) != Some(&0) {
        return None;
    }
    decode_record_key(key).map(|(counter, _)| counter)
}

/// Splits a record key into its counter and idempotency key.
pub fn decode_record_key(bytes: &[u8]) -> Option<(&str, &str)> {
    let (length, rest) = bytes.split_first_chunk::<2>()?;
    let (counter, key) = rest.split_at_checked(usize::from(u16::from_be_bytes(*length)))?;
    Some((
        std::str::from_utf8(counter).ok()?,
        std::str::from_utf8(key).ok()?,
    ))
}

/// The changes one group commit writes: the body of an own-entries frame
/// of the log. Buffers are reused from one flush to the next.
///
/// ```text
/// body    = counters: varint | counter* | records: varint | record*
/// counter = name: bytes | stripes: varint | (stripe: varint | value: zigzag)*
///           (every stripe of a changed counter, zeros included)
/// record  = key: bytes (see `encode_record_key_into`)
///           | 1 | delta: zigzag | applied_unix_ms: varint   (remembered)
///           | 0                                              (forgotten)
/// ```
#[derive(Debug, Default)]
pub struct OwnChanges {
    /// The epoch this flush makes durable.
    pub epoch: u64,
    counters: usize,
    entries: Vec<u8>,
    records: usize,
    record_bytes: Vec<u8>,
    /// Some stripe was written as 0: [`Store::finish_flush`] has work.
    zeros: bool,
}

/// One entry of an own-entries frame, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedCounter<'a> {
    /// The counter.
    pub counter: &'a str,
    /// Every stripe it has, `(stripe, value)`.
    pub stripes: Vec<(u16, i64)>,
}

/// One idempotency record change of an own-entries frame, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRecord<'a> {
    /// The record's key ([`encode_record_key_into`]).
    pub key: &'a [u8],
    /// `(delta, applied_unix_ms)`, or `None` if it was forgotten.
    pub record: Option<(i64, u64)>,
}

impl OwnChanges {
    /// Whether the flush has nothing to write.
    pub fn is_empty(&self) -> bool {
        self.counters == 0 && self.records == 0
    }

    /// Counters and records collected.
    pub fn counts(&self) -> (usize, usize) {
        (self.counters, self.records)
    }

    /// Appends the frame body.
    pub fn encode_into(&self, buffer: &mut Vec<u8>) {
        codec::put_varint(buffer, self.counters as u64);
        buffer.extend_from_slice(&self.entries);
        codec::put_varint(buffer, self.records as u64);
        buffer.extend_from_slice(&self.record_bytes);
    }

    fn clear(&mut self) {
        /// A buffer larger than this (a burst) is not kept for the next flush.
        const KEPT: usize = 4 << 20;
        self.epoch = 0;
        self.counters = 0;
        self.entries.clear();
        self.records = 0;
        self.record_bytes.clear();
        self.zeros = false;
        for buffer in [&mut self.entries, &mut self.record_bytes] {
            if buffer.capacity() > KEPT {
                *buffer = Vec::new();
            }
        }
    }

    /// Decodes a frame body written by [`OwnChanges::encode_into`].
    pub fn decode(
        body: &[u8],
    ) -> Result<(Vec<LoggedCounter<'_>>, Vec<LoggedRecord<'_>>), Malformed> {
        let mut reader = Reader::new(body);
        let counters = decode_counters(&mut reader)?;
        let count = reader.count("record count")?;
        let mut records = Vec::with_capacity(count);
        for _ in 0..count {
            let key = reader.bytes("record key")?;
            decode_record_key(key).ok_or(Malformed { what: "record key" })?;
            let record = match reader.byte("record kind")? {
                1 => Some((
                    reader.signed("record delta")?,
                    reader.varint("record time")?,
                )),
                0 => None,
                _ => {
                    return Err(Malformed {
                        what: "record kind",
                    })
                }
            };
            records.push(LoggedRecord { key, record });
        }
        reader.finish("own changes")?;
        Ok((counters, records))
    }
}

/// Appends one counter and its stripes (zeros included) from a table.
/// Returns whether a stripe is 0.
fn encode_counter(buffer: &mut Vec<u8>, table: &Table, slot: Slot) -> bool {
    codec::put_bytes(buffer, table.name(slot).as_bytes());
    codec::put_varint(buffer, table.stripes(slot).count() as u64);
    let mut zero = false;
    for (stripe, value) in table.stripes(slot) {
        zero |= value == 0;
        codec::put_varint(buffer, u64::from(stripe));
        codec::put_signed(buffer, value);
    }
    zero
}

/// Decodes `count: varint | counter*` (see [`OwnChanges`]).
pub fn decode_counters<'a>(reader: &mut Reader<'a>) -> Result<Vec<LoggedCounter<'a>>, Malformed> {
    let count = reader.count("counter count")?;
    let mut counters = Vec::with_capacity(count);
    for _ in 0..count {
        let counter = reader.str("counter name")?;
        if counter.is_empty() || counter.len() > 256 {
            return Err(Malformed {
                what: "counter name",
            });
        }
        let stripe_count = reader.count("stripe count")?;
        let mut stripes = Vec::with_capacity(stripe_count);
        for _ in 0..stripe_count {
            let stripe: u16 = reader.small("stripe")?;
            if u32::from(stripe) >= MAX_STRIPES {
                return Err(Malformed { what: "stripe" });
            }
            stripes.push((stripe, reader.signed("value")?));
        }
        counters.push(LoggedCounter { counter, stripes });
    }
    Ok(counters)
}

/// A checkpoint bucket as captured: its id and its encoded contents (see
/// `crate::checkpoint`); empty contents mean "delete the bucket".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedBucket {
    /// `segment × 64 + sub`.
    pub bucket: u16,
    /// `counters: varint | counter* | records: varint | record*`, as in a
    /// frame but without zero stripes and forgotten records; empty if the
    /// bucket holds nothing.
    pub contents: Vec<u8>,
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
    /// The replication epoch's low bits when it was added (0: loaded or
    /// replayed, seen only by a full scan): [`Store::changes_since`].
    changed: u32,
}

/// A record as it travels (a change set, a takeover's list): its key, delta
/// and when it was applied.
fn travelling((key, record): (&Arc<[u8]>, &KeyRecord)) -> CopyRecord {
    (Box::from(&**key), record.delta, record.applied_unix_ms)
}

/// The records map: foldhash. SipHash (std's default) was 11% of a start
/// loading 950,000 entries, and apply ran 2.2× faster without it. foldhash
/// seeds each map randomly, so colliding names cannot be computed offline;
/// unlike SipHash it does not claim to resist an attacker who probes one
/// process's timing, a trade made for callers that are the operator's own
/// application services.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
struct Segment {
    table: Table,
    /// Offsets of records marked [`DIRTY`], not yet collected (a record may
    /// have moved since: [`Table::resolve`]).
    dirty: Vec<u32>,
    /// Keyed by the record key, which is unique per `(counter, idempotency
    /// key)` and shared with the retention queue.
    records: FastMap<Arc<[u8]>, KeyRecord>,
    /// Records added or forgotten since the last flush; may repeat a key.
    dirty_records: Vec<Arc<[u8]>>,
    /// Buckets changed since their last checkpoint capture, one bit each.
    checkpoint_dirty: u64,
    /// The windowed counters of this segment, and their records' keys: what
    /// [`Store::reclaim_windows`] finds ended windows in.
    windows: WindowIndex,
}

impl Segment {
    fn mark_dirty(&mut self, slot: Slot, sub: usize) {
        if self.table.flags(slot) & DIRTY == 0 {
            self.table.set_flag(slot, DIRTY, true);
            self.dirty.push(slot.offset());
        }
        self.checkpoint_dirty |= 1 << sub;
    }

    /// Takes a record off the segment (forgotten or reclaimed) and marks
    /// it for the next flush (logged as forgotten) and checkpoint. Returns
    /// whether it was there.
    fn drop_record(&mut self, key: &Arc<[u8]>) -> bool {
        if self.records.remove(key).is_none() {
            return false;
        }
        if let Some(counter) = window_of_record(key) {
            self.windows.forget_record(counter, key);
        }
        self.mark_record(key.clone());
        true
    }

    fn mark_record(&mut self, key: Arc<[u8]>) {
        self.checkpoint_dirty |= 1 << Placement::of(&key).sub;
        self.dirty_records.push(key);
    }

    /// Encodes the segment's marked buckets and clears their marks.
    fn capture(&mut self, segment: usize, into: &mut Vec<CapturedBucket>) {
        let marked = std::mem::take(&mut self.checkpoint_dirty);
        let records = self
            .records
            .iter()
            .map(|(key, record)| (&**key, record.delta, record.applied_unix_ms));
        capture_buckets(&self.table, records, segment, marked, into);
    }
}

/// Encodes the buckets of one segment marked in `marked` (a bit per
/// bucket), from its table and its idempotency records `(key, delta,
/// applied_unix_ms)`: zero stripes and all-zero counters left out, an empty
/// bucket as empty contents (a delete). Shared by own entries and replica
/// copies (with their origins' records).
pub(crate) fn capture_buckets<'a>(
    table: &Table,
    records: impl Iterator<Item = (&'a [u8], i64, u64)>,
    segment: usize,
    marked: u64,
    into: &mut Vec<CapturedBucket>,
) {
    if marked == 0 {
        return;
    }
    let mut counters: Vec<(usize, Vec<u8>)> = vec![(0, Vec::new()); BUCKETS_PER_SEGMENT];
    for slot in table.slots() {
        let name = table.name(slot);
        let sub = Placement::of(name.as_bytes()).sub;
        let live = || table.stripes(slot).filter(|(_, value)| *value != 0);
        if marked & (1 << sub) == 0 || live().next().is_none() {
            continue;
        }
        let (count, bytes) = &mut counters[sub];
        *count += 1;
        codec::put_bytes(bytes, name.as_bytes());
        codec::put_varint(bytes, live().count() as u64);
        for (stripe, value) in live() {
            codec::put_varint(bytes, u64::from(stripe));
            codec::put_signed(bytes, value);
        }
    }
    let mut keyed: Vec<(usize, Vec<u8>)> = vec![(0, Vec::new()); BUCKETS_PER_SEGMENT];
    for (key, delta, applied_unix_ms) in records {
        let sub = Placement::of(key).sub;
        if marked & (1 << sub) == 0 {
            continue;
        }
        let (count, bytes) = &mut keyed[sub];
        *count += 1;
        codec::put_bytes(bytes, key);
        codec::put_signed(bytes, delta);
        codec::put_varint(bytes, applied_unix_ms);
    }
    for sub in (0..BUCKETS_PER_SEGMENT).filter(|sub| marked & (1 << sub) != 0) {
        let (counter_count, counter_bytes) = &counters[sub];
        let (record_count, record_bytes) = &keyed[sub];
        let mut contents = Vec::new();
        if *counter_count + *record_count > 0 {
            contents.reserve(counter_bytes.len() + record_bytes.len() + 10);
            codec::put_varint(&mut contents, *counter_count as u64);
            contents.extend_from_slice(counter_bytes);
            codec::put_varint(&mut contents, *record_count as u64);
            contents.extend_from_slice(record_bytes);
        }
        into.push(CapturedBucket {
            bucket: Placement { segment, sub }.bucket(),
            contents,
        });
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
    /// Entries of `keys` whose record went with its window
    /// ([`Store::reclaim_windows`]), not yet popped: not remembered keys.
    reclaimed: usize,
}

impl KeyQueue {
    /// Keys remembered: the queue less the entries of reclaimed records.
    fn remembered(&self) -> usize {
        self.keys.len().saturating_sub(self.reclaimed)
    }
}

/// Entries removed from memory (0 in the log and in memory), remembered so
/// that [`Store::changes_since`] can tell replicas; the oldest are dropped
/// beyond [`REMOVED_LOG_MAX`], and a replica behind them gets a full copy.
#[derive(Debug, Default)]
struct RemovedLog {
    removed: VecDeque<(u64, Box<str>, u16)>,
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
    /// Idempotency records added since (or, `full`, every one remembered),
    /// as `(record key, delta, applied_unix_ms)`. Forgotten ones are not
    /// listed: a copy forgets by the same retention, window and maximum,
    /// counted from their arrival there (`Replicas::forget_records`).
    pub records: Vec<CopyRecord>,
}

/// A node's counters in memory.
#[derive(Debug)]
pub struct Store {
    segments: Box<[Mutex<Segment>]>,
    open_epoch: AtomicU64,
    /// Stamped on every change of an own entry, under its segment lock, and
    /// advanced by [`Store::changes_since`] before it looks: the flush
    /// epoch's argument, for replication. The node's incarnation sits in the
    /// high bits, so versions grow across restarts; records keep the low
    /// bits.
    replication_epoch: AtomicU64,
    removed: Mutex<RemovedLog>,
    retention: KeyRetention,
    /// Locked after a segment, never before one.
    key_queue: Mutex<KeyQueue>,
    keys_forgotten_early: AtomicU64,
    retention_clock: RetentionClock,
    /// The clock and grace windows end by.
    window_clock: WindowClock,
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
            retention_clock: RetentionClock::default(),
            window_clock: WindowClock::default(),
            replication_epoch: AtomicU64::new(1),
            removed: Mutex::default(),
        }
    }

    /// The flush epoch open now: waiting for it to be flushed waits for
    /// every change made so far.
    pub fn open_epoch(&self) -> u64 {
        self.open_epoch.load(Ordering::SeqCst)
    }

    fn segment_of(&self, counter: &str) -> (&Mutex<Segment>, Placement) {
        let placement = Placement::of(counter.as_bytes());
        (&self.segments[placement.segment], placement)
    }

    /// The value of one entry (0 if absent).
    pub fn entry(&self, counter: &str, stripe: u32) -> i64 {
        let (segment, _) = self.segment_of(counter);
        let segment = segment.lock();
        let Ok(stripe) = u16::try_from(stripe) else {
            return 0;
        };
        segment
            .table
            .find(counter)
            .and_then(|slot| segment.table.get(slot, stripe))
            .unwrap_or(0)
    }

    /// The replication version now: a copy at this version or later holds
    /// every change made before this call.
    pub fn replication_version(&self) -> u64 {
        self.replication_epoch.load(Ordering::SeqCst)
    }

    /// Advances the replication version, as a scan would, and returns the
    /// new one: every version read before this call is below it.
    pub fn advance_replication_version(&self) -> u64 {
        self.replication_epoch.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Sets the node's incarnation (starts so far), before serving: the high
    /// bits of every replication version from now on.
    pub fn set_incarnation(&self, incarnation: u64) {
        self.replication_epoch
            .store((incarnation << INCARNATION_SHIFT) | 1, Ordering::SeqCst);
    }

    /// The incarnation set by [`Store::set_incarnation`].
    pub fn incarnation(&self) -> u64 {
        self.replication_epoch.load(Ordering::SeqCst) >> INCARNATION_SHIFT
    }

    fn changed_stamp(&self) -> u32 {
        self.replication_epoch.load(Ordering::SeqCst) as u32
    }

    /// This node's own entries changed after version `since` (from an
    /// earlier call), and the idempotency records added since, or all of
    /// them (`full`) if `since` is 0, from another incarnation, or older
    /// than the removal log reaches. A walk over every entry and record.
    pub fn changes_since(&self, since: u64) -> Changes {
        let version = self.replication_epoch.fetch_add(1, Ordering::SeqCst);
        let horizon = self.removed.lock().horizon;
        let full = since == 0
            || since < horizon
            || since >> INCARNATION_SHIFT != version >> INCARNATION_SHIFT;
        let since_low = since as u32;
        let mut entries = Vec::new();
        let mut records = Vec::new();
        for segment in self.segments.iter() {
            let segment = segment.lock();
            // Under the same lock as the entries: a record and the change
            // it records travel together.
            records.extend(
                segment
                    .records
                    .iter()
                    .filter(|(_, record)| full || record.changed > since_low)
                    .map(travelling),
            );
            let table = &segment.table;
            for slot in table.slots() {
                if full || table.changed(slot) > since_low {
                    let counter: Box<str> = table.name(slot).into();
                    entries.extend(
                        table
                            .stripes(slot)
                            .filter(|(_, value)| !full || *value != 0)
                            .map(|(stripe, value)| (counter.clone(), u32::from(stripe), value)),
                    );
                }
            }
        }
        if !full {
            // Read after the scan: an entry removed before the scan reached
            // its segment was logged before it was removed.
            let removed: Vec<(Box<str>, u16)> = self
                .removed
                .lock()
                .removed
                .iter()
                .filter(|(changed, _, _)| *changed > since)
                .map(|(_, counter, stripe)| (counter.clone(), *stripe))
                .collect();
            if !removed.is_empty() {
                let seen: std::collections::HashSet<(&str, u32)> = entries
                    .iter()
                    .map(|(counter, stripe, _)| (&**counter, *stripe))
                    .collect();
                let removed: Vec<(Box<str>, u32, i64)> = removed
                    .into_iter()
                    .filter(|(counter, stripe)| !seen.contains(&(&**counter, u32::from(*stripe))))
                    .map(|(counter, stripe)| (counter, u32::from(stripe), 0))
                    .collect();
                entries.extend(removed);
            }
        }
        Changes {
            version,
            full,
            entries,
            records,
        }
    }

    /// Sets an entry to a value already in the log (a restore, an adoption
    /// written by the log thread): not dirty, but stamped as changed, so
    /// replicas get it, and marked for the next checkpoint.
    pub fn set_logged(&self, counter: &str, stripe: u32, value: i64) {
        let changed = self.changed_stamp();
        self.set_entry(counter, stripe, value, Some(changed), true);
    }

    /// Sets an entry from the checkpoint while recovering: not dirty, not
    /// stamped, not marked (the checkpoint holds it). A value of 0 removes
    /// the stripe, and a counter whose stripes are all 0 leaves memory.
    pub fn load(&self, counter: &str, stripe: u32, value: i64) {
        self.set_entry(counter, stripe, value, None, false);
    }

    /// Sets an entry from a log frame while recovering: as [`Store::load`],
    /// but marked for the next checkpoint, which must hold it before the
    /// log that has it goes.
    pub fn replay(&self, counter: &str, stripe: u32, value: i64) {
        self.set_entry(counter, stripe, value, None, true);
    }

    fn set_entry(&self, counter: &str, stripe: u32, value: i64, changed: Option<u32>, mark: bool) {
        let Ok(stripe) = u16::try_from(stripe) else {
            return;
        };
        let (segment, placement) = self.segment_of(counter);
        let mut segment = segment.lock();
        if mark {
            segment.checkpoint_dirty |= 1 << placement.sub;
        }
        if value != 0 {
            // Not only when the counter enters the table: a restore or an
            // adoption may set a window the sweep has just zeroed (still in
            // the table until its zeros are logged), and took off its list.
            segment.windows.note_counter(counter);
        }
        let table = &mut segment.table;
        let slot = match table.find(counter) {
            // Setting an absent stripe to 0 changes nothing.
            Some(slot) if value == 0 && table.get(slot, stripe).is_none() => return,
            Some(slot) => table.set(slot, stripe, value),
            None if value == 0 => return,
            None => table.insert(counter, stripe, value, changed.unwrap_or(0)),
        };
        match changed {
            Some(changed) => table.set_changed(slot, changed),
            None => {
                // Loading: a counter at 0 everywhere is not kept.
                if table.flags(slot) & DIRTY == 0 && table.stripes(slot).all(|(_, v)| v == 0) {
                    table.remove(slot);
                }
            }
        }
    }

    /// Sets (or, with `None`, forgets) an idempotency record from the
    /// checkpoint while recovering. Records are aged from their time by
    /// [`Store::forget_keys`].
    pub fn load_record(&self, key: &[u8], record: Option<(i64, u64)>) {
        self.set_record(key, record, false);
    }

    /// [`Store::load_record`] from a log frame: marked for the next
    /// checkpoint.
    pub fn replay_record(&self, key: &[u8], record: Option<(i64, u64)>) {
        self.set_record(key, record, true);
    }

    /// Adds a record the log already holds (a restore, an adoption): not
    /// dirty, but stamped as changed, so replicas get it, and marked for the
    /// next checkpoint. A record this node has for the same key wins. Dated
    /// now by this node's retention clock (not when another node applied
    /// it, by that node's clock): remembered a whole window from here, and
    /// the retention queue stays in time order.
    pub fn add_logged_record(&self, key: &[u8], delta: i64) {
        let changed = self.changed_stamp();
        let now = self.retention_now_ms();
        self.put_record(key, Some((delta, now)), true, changed, false);
    }

    fn set_record(&self, key: &[u8], record: Option<(i64, u64)>, mark: bool) {
        self.put_record(key, record, mark, 0, true);
    }

    fn put_record(
        &self,
        key: &[u8],
        record: Option<(i64, u64)>,
        mark: bool,
        changed: u32,
        replace: bool,
    ) {
        let Some((counter, _)) = decode_record_key(key) else {
            return;
        };
        let (segment, placement) = self.segment_of(counter);
        let mut segment = segment.lock();
        if !replace && segment.records.contains_key(key) {
            return;
        }
        if mark {
            segment.checkpoint_dirty |= 1 << Placement::of(key).sub;
        }
        match record {
            Some((delta, applied_unix_ms)) => {
                let key: Arc<[u8]> = key.into();
                // Segment, then queue: the documented lock order.
                let mut queue = self.key_queue.lock();
                let sequence = queue.next_sequence;
                queue.next_sequence += 1;
                queue.latest_unix_ms = queue.latest_unix_ms.max(applied_unix_ms);
                queue.keys.push_back(RememberedKey {
                    applied_unix_ms,
                    sequence,
                    segment: placement.segment,
                    key: key.clone(),
                });
                drop(queue);
                segment.windows.note_record(counter, &key);
                segment.records.insert(
                    key,
                    KeyRecord {
                        delta,
                        applied_unix_ms,
                        sequence,
                        epoch: 0,
                        changed,
                    },
                );
            }
            None => {
                segment.records.remove(key);
                segment.windows.forget_record(counter, key);
            }
        }
    }

    /// After recovery: puts the retention queue in time order (records came
    /// from the checkpoint and the log in no particular order), and drops
    /// queue entries of records that the log forgot.
    pub fn finish_loading(&self) {
        let mut queue = self.key_queue.lock();
        let mut keys: Vec<RememberedKey> = queue.keys.drain(..).collect();
        drop(queue);
        keys.retain(|remembered| {
            self.segments[remembered.segment]
                .lock()
                .records
                .get(&remembered.key)
                .is_some_and(|record| record.sequence == remembered.sequence)
        });
        keys.sort_by_key(|remembered| (remembered.applied_unix_ms, remembered.sequence));
        let mut queue = self.key_queue.lock();
        queue.keys = keys.into();
        queue.reclaimed = 0;
    }

    /// Applies increments, each on its own: one overflow does not stop the
    /// others. An increment whose idempotency key this node remembers for
    /// its counter is not applied again. Returns the outcomes in order and
    /// the flush epoch the caller must wait for before the changes (and, for
    /// a retry, the original) are durable; 0 if there is nothing to wait for.
    ///
    /// Stripes must be below [`MAX_STRIPES`] (the service checks).
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
                let (segment, placement) = self.segment_of(increment.counter);
                let mut segment = segment.lock();
                if increment.counter.starts_with('\0') {
                    // The clock read under the lock the sweep zeroes the
                    // window under: past the sweep, refused (see
                    // `crate::windows`). A plain counter pays the compare.
                    let now_unix_ms = self.window_clock.now_ms();
                    if let Some(end_unix_ms) =
                        self.window_clock.ended(increment.counter, now_unix_ms)
                    {
                        return ApplyOutcome::Expired {
                            end_unix_ms,
                            now_unix_ms,
                        };
                    }
                }
                // Read under the segment lock: see the module docs.
                let epoch = self.open_epoch.load(Ordering::SeqCst);
                let key = increment.idempotency_key.filter(|_| increment.delta != 0);
                if let Some(key) = key {
                    encode_record_key_into(&mut record_key, increment.counter, key);
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
                let changed = self.changed_stamp();
                let outcome = apply_one(&mut segment, placement, increment, changed);
                if outcome == ApplyOutcome::Applied && increment.delta != 0 {
                    wait_epoch = wait_epoch.max(epoch);
                    if key.is_some() {
                        self.remember(
                            &mut segment,
                            placement.segment,
                            &record_key,
                            increment.delta,
                            (epoch, changed),
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
        (epoch, changed): (u64, u32),
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
        if let Some(counter) = window_of_record(&key) {
            segment.windows.note_record(counter, &key);
        }
        segment.records.insert(
            key.clone(),
            KeyRecord {
                delta,
                applied_unix_ms,
                sequence,
                epoch,
                changed,
            },
        );
        segment.mark_record(key);
    }

    /// Forgets keys older than the retention window, and the oldest keys
    /// beyond the maximum. Returns how many were forgotten early (before
    /// their window ended). The next flush logs their removal.
    pub fn forget_keys(&self, now_unix_ms: u64) -> u64 {
        let window_ms = u64::try_from(self.retention.window.as_millis()).unwrap_or(u64::MAX);
        let mut early = 0;
        loop {
            let (victim, expired) = {
                let mut queue = self.key_queue.lock();
                let Some(oldest) = queue.keys.front() else {
                    break;
                };
                let expired = oldest.applied_unix_ms.saturating_add(window_ms) <= now_unix_ms;
                if !expired && queue.remembered() <= self.retention.max_keys {
                    break;
                }
                (queue.keys.pop_front().expect("looked at above"), expired)
            };
            // The queue lock is released: segments are never locked after it.
            let mut segment = self.segments[victim.segment].lock();
            let current = segment
                .records
                .get(&victim.key)
                .is_some_and(|record| record.sequence == victim.sequence);
            if current {
                segment.drop_record(&victim.key);
                if !expired {
                    early += 1;
                }
            } else if window_of_record(&victim.key).is_some() {
                // Its record went with its window: it was counted as
                // reclaimed, not remembered. (A record replaced by a
                // restore or an adoption was never counted so.) Segment,
                // then queue.
                let mut queue = self.key_queue.lock();
                queue.reclaimed = queue.reclaimed.saturating_sub(1);
            }
        }
        if early > 0 {
            self.keys_forgotten_early
                .fetch_add(early, Ordering::Relaxed);
        }
        early
    }

    /// Now, as key retention counts it ([`RetentionClock`]): what keyed
    /// applies stamp their records with and what [`Store::forget_keys`] is
    /// given.
    pub fn retention_now_ms(&self) -> u64 {
        self.retention_clock.now_ms()
    }

    /// A moment by the retention clock at or after `at_least` and after
    /// every record applied so far; every record applied from now on is
    /// dated at or after it (a takeover's start: what the takeover lists is
    /// what was applied since, even if the wall clock stepped back across a
    /// restart).
    pub fn mark_after_records(&self, at_least: u64) -> u64 {
        let mut queue = self.key_queue.lock();
        let mark = self
            .retention_now_ms()
            .max(queue.latest_unix_ms + 1)
            .max(at_least);
        queue.latest_unix_ms = mark;
        mark
    }

    /// Every record applied from now on is dated at or after `at` (a
    /// recovered node's last takeover start; see
    /// [`Store::mark_after_records`]).
    pub fn date_records_from(&self, at: u64) {
        let mut queue = self.key_queue.lock();
        queue.latest_unix_ms = queue.latest_unix_ms.max(at);
    }

    /// The delta this node applied under `record_key`, if it remembers it.
    pub fn record(&self, record_key: &[u8]) -> Option<i64> {
        let (counter, _) = decode_record_key(record_key)?;
        let (segment, _) = self.segment_of(counter);
        segment
            .lock()
            .records
            .get(record_key)
            .map(|record| record.delta)
    }

    /// Every record this node remembers that it applied at or after
    /// `since_ms` (its retention clock), as `(record key, delta, applied)`:
    /// what a stand-in applied during a takeover. A walk over every record.
    pub fn records_applied_since(&self, since_ms: u64) -> Vec<CopyRecord> {
        self.records_kept(|_, record| record.applied_unix_ms >= since_ms)
    }

    /// Every record this node remembers of a `(counter, key)` for which
    /// `wanted` says yes, as `(record key, delta, applied)`: the records a
    /// membership change hands on. A walk over every record.
    pub fn records_where(&self, mut wanted: impl FnMut(&str, &str) -> bool) -> Vec<CopyRecord> {
        self.records_kept(|key, _| {
            decode_record_key(key).is_some_and(|(counter, key)| wanted(counter, key))
        })
    }

    /// The records `keep` says yes to, as they travel.
    fn records_kept(&self, mut keep: impl FnMut(&[u8], &KeyRecord) -> bool) -> Vec<CopyRecord> {
        let mut records = Vec::new();
        for segment in self.segments.iter() {
            let segment = segment.lock();
            records.extend(
                segment
                    .records
                    .iter()
                    .filter(|(key, record)| keep(key, record))
                    .map(travelling),
            );
        }
        records
    }

    /// How long and how many keys are remembered.
    pub fn retention(&self) -> KeyRetention {
        self.retention
    }

    /// Idempotency keys remembered now.
    pub fn remembered_keys(&self) -> u64 {
        self.key_queue.lock().remembered() as u64
    }

    /// The clock and grace windows end by ([`crate::windows`]).
    pub fn windows(&self) -> &WindowClock {
        &self.window_clock
    }

    /// Reclaims up to `limit` windowed counters whose window ended at or
    /// before `horizon` (Unix ms; [`WindowClock::reclaim_horizon`]): their
    /// entries are set to 0 as [`Store::erase`] sets them (stamped for
    /// replicas, which get "entry gone"; written by the next flush, after
    /// which [`Store::finish_flush`] drops them from memory; their buckets
    /// marked for the next checkpoint), and their idempotency records are
    /// forgotten (logged as forgotten by the next flush). Found through each
    /// segment's [`WindowIndex`]: a segment with nothing due costs one look.
    /// Returns how many windows held an entry or a record here.
    pub fn reclaim_windows(&self, horizon: u64, limit: usize) -> usize {
        let mut reclaimed = 0;
        for segment in self.segments.iter() {
            if reclaimed >= limit {
                break;
            }
            let mut segment = segment.lock();
            if !segment.windows.any_ended(horizon) {
                continue;
            }
            let changed = self.changed_stamp();
            let mut records = 0;
            for (counter, keys) in segment.windows.take_ended(horizon, limit - reclaimed) {
                let mut held = false;
                if let Some(mut slot) = segment.table.find(&counter) {
                    let stripes: Vec<(u16, i64)> = segment.table.stripes(slot).collect();
                    if stripes.iter().any(|&(_, value)| value != 0) {
                        held = true;
                        for (stripe, _) in stripes {
                            slot = segment.table.set(slot, stripe, 0);
                        }
                        segment.table.set_changed(slot, changed);
                        segment.mark_dirty(slot, Placement::of(counter.as_bytes()).sub);
                    }
                }
                for key in &keys {
                    if segment.drop_record(key) {
                        held = true;
                        records += 1;
                    }
                }
                reclaimed += usize::from(held);
            }
            if records > 0 {
                // Segment, then queue: the documented lock order.
                self.key_queue.lock().reclaimed += records;
            }
        }
        reclaimed
    }

    /// Keys forgotten before their retention window ended, since start,
    /// because the node held more than its maximum.
    pub fn keys_forgotten_early(&self) -> u64 {
        self.keys_forgotten_early.load(Ordering::Relaxed)
    }

    /// Resets counters to 0. Returns the flush epoch to wait for.
    ///
    /// A counter that is in memory is always waited for, even when its
    /// entries are already 0: those zeros may not be logged yet (a
    /// decrement to 0 or an earlier delete still in flight), and a delete
    /// must not be acknowledged before the log agrees. Only a counter absent
    /// from memory, and so from the log's state, needs no flush.
    pub fn erase(&self, counters: &[&str]) -> u64 {
        let mut wait_epoch = 0;
        let changed = self.changed_stamp();
        for counter in counters {
            let (segment, placement) = self.segment_of(counter);
            let mut segment = segment.lock();
            let Some(mut slot) = segment.table.find(counter) else {
                continue;
            };
            let stripes: Vec<u16> = segment.table.stripes(slot).map(|(s, _)| s).collect();
            for stripe in stripes {
                slot = segment.table.set(slot, stripe, 0);
            }
            segment.table.set_changed(slot, changed);
            segment.mark_dirty(slot, placement.sub);
            wait_epoch = wait_epoch.max(self.open_epoch.load(Ordering::SeqCst));
        }
        wait_epoch
    }

    /// This node's non-zero `(stripe, value)` entries of a counter, by stripe.
    pub fn read(&self, counter: &str) -> Vec<(u32, i64)> {
        let (segment, _) = self.segment_of(counter);
        segment.lock().table.read(counter)
    }

    /// Number of non-zero `(counter, stripe)` entries. Walks every segment:
    /// for status pages, not hot paths.
    pub fn entry_count(&self) -> u64 {
        self.segments
            .iter()
            .map(|segment| {
                let segment = segment.lock();
                segment
                    .table
                    .slots()
                    .map(|slot| {
                        segment
                            .table
                            .stripes(slot)
                            .filter(|(_, value)| *value != 0)
                            .count() as u64
                    })
                    .sum::<u64>()
            })
            .sum()
    }

    /// Bytes the counters' tables hold (arenas and indexes), for status
    /// pages and memory measurements.
    pub fn table_bytes(&self) -> u64 {
        self.segments
            .iter()
            .map(|segment| segment.lock().table.memory_bytes() as u64)
            .sum()
    }

    /// Marks every bucket for the next checkpoint (after one failed, or for
    /// a first checkpoint of everything).
    pub fn mark_all_for_checkpoint(&self) {
        for segment in self.segments.iter() {
            segment.lock().checkpoint_dirty = u64::MAX;
        }
    }

    /// Closes the open epoch and collects every change made in it (and any
    /// earlier one not yet collected) into `into`; while visiting the
    /// segments in `capture`, also encodes their marked checkpoint buckets
    /// into `captured` (see the module docs).
    pub fn begin_flush(
        &self,
        into: &mut OwnChanges,
        capture: std::ops::Range<usize>,
        captured: &mut Vec<CapturedBucket>,
    ) {
        into.clear();
        into.epoch = self.open_epoch.fetch_add(1, Ordering::SeqCst);
        for (index, segment) in self.segments.iter().enumerate() {
            let mut segment = segment.lock();
            let segment = &mut *segment;
            for key in std::mem::take(&mut segment.dirty_records) {
                into.records += 1;
                codec::put_bytes(&mut into.record_bytes, &key);
                match segment.records.get(&key) {
                    Some(record) => {
                        into.record_bytes.push(1);
                        codec::put_signed(&mut into.record_bytes, record.delta);
                        codec::put_varint(&mut into.record_bytes, record.applied_unix_ms);
                    }
                    None => into.record_bytes.push(0),
                }
            }
            for offset in std::mem::take(&mut segment.dirty) {
                let slot = segment.table.resolve(Slot::from_offset(offset));
                if segment.table.flags(slot) & DIRTY == 0 {
                    continue;
                }
                segment.table.set_flag(slot, DIRTY, false);
                into.counters += 1;
                into.zeros |= encode_counter(&mut into.entries, &segment.table, slot);
            }
            if capture.contains(&index) {
                segment.capture(index, captured);
            }
            // No offsets are held now: a good moment to reclaim dead bytes.
            if segment.table.is_wasteful() {
                segment.table.compact();
            }
        }
    }

    /// After a flush reached the log: drops entries that are 0 in the log
    /// and in memory, so deleted counters do not hold memory.
    pub fn finish_flush(&self, flushed: &OwnChanges) {
        if !flushed.zeros {
            return;
        }
        let mut body = Vec::new();
        flushed.encode_into(&mut body);
        let Ok((counters, _)) = OwnChanges::decode(&body) else {
            debug_assert!(false, "our own encoding decodes");
            return;
        };
        for logged in counters
            .iter()
            .filter(|c| c.stripes.iter().any(|(_, v)| *v == 0))
        {
            let (segment, _) = self.segment_of(logged.counter);
            let mut segment = segment.lock();
            let Some(slot) = segment.table.find(logged.counter) else {
                continue;
            };
            if segment.table.flags(slot) & DIRTY != 0 {
                // Changed again since the snapshot; the next flush decides.
                continue;
            }
            if segment.table.stripes(slot).any(|(_, value)| value != 0) {
                // Zero stripes stay until the whole counter is 0.
                continue;
            }
            let changed = u64::from(segment.table.changed(slot))
                | (self.replication_epoch.load(Ordering::SeqCst) >> INCARNATION_SHIFT
                    << INCARNATION_SHIFT);
            // Logged before the entry leaves memory: see `changes_since`.
            let mut log = self.removed.lock();
            for (stripe, _) in segment.table.stripes(slot) {
                log.removed
                    .push_back((changed, logged.counter.into(), stripe));
            }
            while log.removed.len() > REMOVED_LOG_MAX {
                if let Some((dropped, _, _)) = log.removed.pop_front() {
                    log.horizon = log.horizon.max(dropped);
                }
            }
            drop(log);
            segment.table.remove(slot);
        }
    }

    /// After a flush failed: marks its counters and records dirty again, so
    /// the next flush writes them, and their buckets for the checkpoint.
    pub fn abandon_flush(&self, failed: &OwnChanges) {
        let mut body = Vec::new();
        failed.encode_into(&mut body);
        let Ok((counters, records)) = OwnChanges::decode(&body) else {
            debug_assert!(false, "our own encoding decodes");
            return;
        };
        for logged in counters {
            let (segment, placement) = self.segment_of(logged.counter);
            let mut segment = segment.lock();
            if let Some(slot) = segment.table.find(logged.counter) {
                segment.mark_dirty(slot, placement.sub);
            }
        }
        for logged in records {
            let Some((counter, _)) = decode_record_key(logged.key) else {
                continue;
            };
            let (segment, _) = self.segment_of(counter);
            let mut segment = segment.lock();
            let key = segment
                .records
                .get_key_value(logged.key)
                .map_or_else(|| Arc::from(logged.key), |(key, _)| key.clone());
            segment.mark_record(key);
        }
    }
}

fn apply_one(
    segment: &mut Segment,
    placement: Placement,
    increment: &StripeIncrement<'_>,
    changed: u32,
) -> ApplyOutcome {
    if increment.delta == 0 {
        return ApplyOutcome::Applied;
    }
    let stripe = u16::try_from(increment.stripe).expect("stripes are checked by the service");
    let slot = match segment.table.find(increment.counter) {
        Some(slot) => {
            let current = segment.table.get(slot, stripe).unwrap_or(0);
            let Some(updated) = current.checked_add(increment.delta) else {
                return ApplyOutcome::Overflow;
            };
            segment.table.set(slot, stripe, updated)
        }
        None => {
            segment.windows.note_counter(increment.counter);
            segment
                .table
                .insert(increment.counter, stripe, increment.delta, changed)
        }
    };
    segment.table.set_changed(slot, changed);
    segment.mark_dirty(slot, placement.sub);
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

    /// Collects a flush, capturing nothing.
    fn flush(store: &Store) -> OwnChanges {
        let mut changes = OwnChanges::default();
        store.begin_flush(&mut changes, 0..0, &mut Vec::new());
        changes
    }

    fn entries(changes: &OwnChanges) -> Vec<(String, u16, i64)> {
        let mut body = Vec::new();
        changes.encode_into(&mut body);
        let (counters, _) = OwnChanges::decode(&body).unwrap();
        let mut entries: Vec<_> = counters
            .into_iter()
            .flat_map(|logged| {
                let counter = logged.counter.to_string();
                logged
                    .stripes
                    .into_iter()
                    .map(move |(stripe, value)| (counter.clone(), stripe, value))
            })
            .collect();
        entries.sort();
        entries
    }

    /// `(record key, (delta, applied) or forgotten)`.
    type Records = Vec<(Vec<u8>, Option<(i64, u64)>)>;

    fn records(changes: &OwnChanges) -> Records {
        let mut body = Vec::new();
        changes.encode_into(&mut body);
        let (_, records) = OwnChanges::decode(&body).unwrap();
        records
            .into_iter()
            .map(|logged| (logged.key.to_vec(), logged.record))
            .collect()
    }

    #[test]
    fn retention_counts_on_the_monotonic_clock_not_the_wall_clock() {
        // A clock started at 1 s after the epoch, while the wall clock reads
        // decades later: as if the wall clock had stepped forward by that
        // much. Retention still counts from its start, at the monotonic
        // clock's pace, so no key is forgotten early.
        let clock = RetentionClock::starting_at(1_000);
        let now = clock.now_ms();
        assert!((1_000..61_000).contains(&now), "{now}");
        // The store's own clock starts at the wall clock and counts on.
        let store = Store::new();
        let wall = crate::journal::unix_ms_now();
        let counted = store.retention_now_ms();
        assert!(counted.abs_diff(wall) < 60_000, "{counted} vs {wall}");
        assert!(
            clock.logged_offset_ms.load(Ordering::Relaxed) > 1_000_000,
            "the step was logged"
        );
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
        assert!(flush(&store).is_empty());
    }

    #[test]
    fn flush_collects_each_change_once_and_closes_the_epoch() {
        let store = Store::new();
        store.apply(&[increment("a", 0, 1), increment("a", 1, 1)], 0);
        store.apply(&[increment("a", 0, 1)], 0);
        let changes = flush(&store);
        assert_eq!(changes.epoch, 1);
        assert_eq!(
            entries(&changes),
            vec![("a".into(), 0, 2), ("a".into(), 1, 1)]
        );
        let (_, epoch) = store.apply(&[increment("b", 0, 1)], 0);
        assert_eq!(
            epoch, 2,
            "changes after the flush began wait for the next one"
        );
        assert_eq!(entries(&flush(&store)), vec![("b".into(), 0, 1)]);
        assert!(flush(&store).is_empty());
    }

    #[test]
    fn erase_writes_zeroes_then_frees_memory() {
        let store = Store::new();
        store.apply(&[increment("a", 0, 3), increment("a", 2, 4)], 0);
        flush(&store);
        assert!(store.erase(&["a", "never-seen"]) > 0);
        assert_eq!(store.read("a"), vec![]);
        let changes = flush(&store);
        assert_eq!(
            entries(&changes),
            vec![("a".into(), 0, 0), ("a".into(), 2, 0)]
        );
        store.finish_flush(&changes);
        assert_eq!(store.entry_count(), 0);
        assert_eq!(store.erase(&["a"]), 0, "nothing left to erase");
    }

    #[test]
    fn erase_of_zeros_not_yet_logged_waits_for_their_flush() {
        let store = Store::new();
        store.apply(&[increment("a", 0, 5)], 0);
        flush(&store); // 5 is in the log
        store.apply(&[increment("a", 0, -5)], 0); // 0 in memory, not yet logged
        let epoch = store.erase(&["a"]);
        assert!(epoch > 0, "the delete must wait for the zero to be logged");
        let changes = flush(&store);
        assert_eq!(changes.epoch, epoch);
        assert_eq!(entries(&changes), vec![("a".into(), 0, 0)]);
        // A second delete while the first one's flush is still running waits
        // too, instead of being acknowledged at once.
        assert!(store.erase(&["a"]) > epoch);
    }

    #[test]
    fn abandoned_flush_is_written_again() {
        let store = Store::new();
        store.apply(&[increment("a", 0, 3)], 0);
        let failed = flush(&store);
        store.abandon_flush(&failed);
        let retried = flush(&store);
        assert_eq!(entries(&retried), entries(&failed));
    }

    #[test]
    fn a_counter_that_gains_stripes_while_dirty_is_collected_once() {
        let store = Store::new();
        for stripe in 0..10 {
            store.apply(&[increment("grows", stripe, 1)], 0);
        }
        let changes = flush(&store);
        assert_eq!(changes.counts(), (1, 0));
        assert_eq!(entries(&changes).len(), 10);
        assert!(flush(&store).is_empty());
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
                            flush(&store);
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
        flush(&store);
        let (_, later) = store.apply(&[keyed("a", 1, "k")], 0);
        assert_eq!(later, original, "an epoch already flushed returns at once");
    }

    #[test]
    fn a_change_and_its_record_are_flushed_together() {
        let store = Store::new();
        store.apply(&[keyed("a", 3, "k")], 42);
        let changes = flush(&store);
        assert_eq!(entries(&changes), vec![("a".into(), 0, 3)]);
        let mut expected = Vec::new();
        encode_record_key_into(&mut expected, "a", "k");
        assert_eq!(records(&changes), vec![(expected, Some((3, 42)))]);
        store.abandon_flush(&changes);
        let retried = flush(&store);
        assert_eq!(entries(&retried), entries(&changes));
        assert_eq!(records(&retried), records(&changes));
        assert!(flush(&store).is_empty());
    }

    #[test]
    fn keys_are_forgotten_after_the_window() {
        let store = Store::with_retention(KeyRetention {
            window: Duration::from_secs(10),
            max_keys: 100,
        });
        store.apply(&[keyed("a", 1, "old")], 1_000);
        store.apply(&[keyed("a", 1, "new")], 5_000);
        flush(&store);
        assert_eq!(store.forget_keys(10_999), 0);
        assert_eq!(store.remembered_keys(), 2);
        assert_eq!(store.forget_keys(11_000), 0, "expired, not early");
        assert_eq!(store.remembered_keys(), 1);
        let changes = flush(&store);
        let logged = records(&changes);
        assert_eq!(logged.len(), 1);
        assert_eq!(logged[0].1, None, "logged as forgotten");
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
        let key = |key: &str| {
            let mut bytes = Vec::new();
            encode_record_key_into(&mut bytes, "a", key);
            bytes
        };
        store.load_record(&key("late"), Some((1, 500)));
        store.load_record(&key("early"), Some((1, 100)));
        store.load_record(&key("gone"), Some((1, 100)));
        store.load_record(&key("gone"), None);
        store.finish_loading();
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
        let changes = flush(&store);
        store.finish_flush(&changes);
        let changes = store.changes_since(nothing.version);
        assert!(!changes.full);
        assert_eq!(
            sorted(changes.entries),
            vec![("a".into(), 0, 6), ("b".into(), 1, 0)]
        );
        // From another incarnation: everything.
        assert!(store.changes_since(5 << INCARNATION_SHIFT).full);
    }

    #[test]
    fn changes_since_carries_the_idempotency_records_added() {
        let store = Store::new();
        store.set_incarnation(3);
        store.apply(&[keyed("a", 5, "k1")], 100);
        let first = store.changes_since(0);
        let keys = |changes: &Changes| -> Vec<(Vec<u8>, i64)> {
            let mut keys: Vec<(Vec<u8>, i64)> = changes
                .records
                .iter()
                .map(|(key, delta, _)| (key.to_vec(), *delta))
                .collect();
            keys.sort();
            keys
        };
        let mut k1 = Vec::new();
        encode_record_key_into(&mut k1, "a", "k1");
        assert_eq!(keys(&first), vec![(k1.clone(), 5)]);
        assert_eq!(first.records[0].2, 100, "with the time it was applied");
        let nothing = store.changes_since(first.version);
        assert!(nothing.records.is_empty());
        store.apply(&[keyed("a", 7, "k2"), keyed("a", 5, "k1")], 200);
        let mut k2 = Vec::new();
        encode_record_key_into(&mut k2, "a", "k2");
        assert_eq!(
            keys(&store.changes_since(nothing.version)),
            vec![(k2.clone(), 7)]
        );
        // Restored or adopted records travel on too; a record of this node
        // wins over one that comes with a restore.
        store.add_logged_record(&k1, 99);
        let mut k3 = Vec::new();
        encode_record_key_into(&mut k3, "b", "k3");
        store.add_logged_record(&k3, 4);
        let all = store.changes_since(0);
        assert_eq!(keys(&all), vec![(k1, 5), (k2, 7), (k3, 4)]);
    }

    /// Decodes captured buckets into `(counter, stripe, value)` entries and
    /// record keys.
    /// `(counter, stripe, value)` entries and record keys.
    type Captured = (Vec<(String, u16, i64)>, Vec<Vec<u8>>);

    fn decode_captures(captured: &[CapturedBucket]) -> Captured {
        let mut entries = Vec::new();
        let mut keys = Vec::new();
        for bucket in captured {
            if bucket.contents.is_empty() {
                continue;
            }
            let mut reader = Reader::new(&bucket.contents);
            for logged in decode_counters(&mut reader).unwrap() {
                assert_eq!(
                    Placement::of(logged.counter.as_bytes()).bucket(),
                    bucket.bucket
                );
                for (stripe, value) in logged.stripes {
                    entries.push((logged.counter.to_string(), stripe, value));
                }
            }
            for _ in 0..reader.count("n").unwrap() {
                let key = reader.bytes("key").unwrap().to_vec();
                reader.signed("delta").unwrap();
                reader.varint("time").unwrap();
                let (counter, _) = decode_record_key(&key).unwrap();
                let segment = Placement::of(counter.as_bytes()).segment;
                let sub = Placement::of(&key).sub;
                assert_eq!(Placement { segment, sub }.bucket(), bucket.bucket);
                keys.push(key);
            }
            reader.finish("bucket").unwrap();
        }
        entries.sort();
        keys.sort();
        (entries, keys)
    }

    #[test]
    fn a_capture_holds_what_its_flush_logs_and_clears_its_marks() {
        let store = Store::new();
        for index in 0..200 {
            store.apply(&[keyed(&format!("c{index}"), 2, &format!("k{index}"))], 1);
        }
        store.apply(&[increment("z", 1, 5)], 1);
        store.apply(&[increment("z", 1, -5)], 1); // zero: not in a bucket
        let mut changes = OwnChanges::default();
        let mut captured = Vec::new();
        store.begin_flush(&mut changes, 0..SEGMENT_COUNT, &mut captured);
        let (entries, keys) = decode_captures(&captured);
        assert_eq!(entries.len(), 200);
        assert!(entries
            .iter()
            .all(|(_, stripe, value)| (*stripe, *value) == (0, 2)));
        assert_eq!(keys.len(), 200);
        // Marks are cleared: a second capture finds nothing.
        let mut again = Vec::new();
        store.begin_flush(&mut changes, 0..SEGMENT_COUNT, &mut again);
        assert!(again.is_empty());
        // A capture of part of the segments takes only those.
        store.mark_all_for_checkpoint();
        let mut part = Vec::new();
        store.begin_flush(&mut changes, 0..1, &mut part);
        assert_eq!(part.len(), BUCKETS_PER_SEGMENT);
        assert!(part
            .iter()
            .all(|bucket| usize::from(bucket.bucket) < BUCKETS_PER_SEGMENT));
    }

    /// A window of `seconds` whose end is `ended_ago_ms` before now (by
    /// the wall clock), stored name of `name`.
    fn window_ended_ago(name: &str, seconds: u32, ended_ago_ms: u64) -> String {
        let end_by = crate::journal::unix_ms_now() - ended_ago_ms;
        tally_proto::window::Window::containing(end_by - u64::from(seconds) * 1000, seconds)
            .stored_name(name)
    }

    #[test]
    fn an_ended_window_is_refused_and_the_other_items_still_apply() {
        let store = Store::new();
        store.windows().set_grace_ms(60_000);
        // Ended more than the grace ago; ended within the grace; current.
        let ended = window_ended_ago("api:alice", 60, 61_000);
        let in_grace = window_ended_ago("api:alice", 1, 1_000);
        let current = tally_proto::window::Window::current(3600).stored_name("api:alice");
        let (outcomes, _) = store.apply(
            &[
                increment(&ended, 0, 1),
                increment("plain", 0, 1),
                keyed(&ended, 1, "k"),
                increment(&in_grace, 0, 2),
                increment(&current, 0, 3),
            ],
            0,
        );
        let end = tally_proto::window::Window::end_of_stored(&ended).unwrap();
        let ApplyOutcome::Expired {
            end_unix_ms,
            now_unix_ms,
        } = outcomes[0]
        else {
            panic!("{outcomes:?}");
        };
        assert_eq!(end_unix_ms, end);
        assert!(now_unix_ms >= end + 60_000, "{now_unix_ms} {end}");
        assert!(matches!(outcomes[2], ApplyOutcome::Expired { .. }));
        assert_eq!(
            outcomes[1..],
            [
                ApplyOutcome::Applied,
                outcomes[2],
                ApplyOutcome::Applied,
                ApplyOutcome::Applied
            ]
        );
        assert_eq!(store.read(&ended), vec![], "nothing applied");
        assert_eq!(store.remembered_keys(), 0, "no record left");
        assert_eq!(store.read(&in_grace), vec![(0, 2)]);
        assert_eq!(store.read(&current), vec![(0, 3)]);
        // A longer grace takes it again: decided by the clock, not stored.
        store.windows().set_grace_ms(3_600_000);
        let (outcomes, _) = store.apply(&[increment(&ended, 0, 1)], 0);
        assert_eq!(outcomes, vec![ApplyOutcome::Applied]);
    }

    #[test]
    fn reclaiming_a_window_logs_its_zeros_and_forgotten_records_and_frees_it() {
        let store = Store::with_retention(KeyRetention {
            window: Duration::from_secs(3600),
            max_keys: 3,
        });
        store.set_incarnation(1);
        let window = tally_proto::window::Window::current(3600);
        let end = window.end_unix_ms();
        let name = window.stored_name("api:alice");
        let other =
            tally_proto::window::Window::containing(end + 3_600_000, 60).stored_name("api:bob");
        store.apply(
            &[
                keyed(&name, 2, "k1"),
                increment(&name, 1, 5),
                keyed("plain", 1, "k2"),
                increment(&other, 0, 1),
            ],
            100,
        );
        let before = store.changes_since(0).version;
        let first = flush(&store);
        store.finish_flush(&first);
        assert_eq!(store.remembered_keys(), 2);
        store.mark_all_for_checkpoint();

        assert_eq!(store.reclaim_windows(end - 1, 100), 0, "not ended yet");
        assert_eq!(store.read(&name), vec![(0, 2), (1, 5)]);
        assert_eq!(store.reclaim_windows(end, 100), 1);
        assert_eq!(store.read(&name), vec![]);
        assert_eq!(store.remembered_keys(), 1);
        assert_eq!(store.reclaim_windows(end, 100), 0, "once");

        // The next flush logs the zeros and the record as forgotten, and
        // the capture taken with it holds neither.
        let mut changes = OwnChanges::default();
        let mut captured = Vec::new();
        store.begin_flush(&mut changes, 0..SEGMENT_COUNT, &mut captured);
        assert_eq!(
            entries(&changes),
            vec![(name.clone(), 0, 0), (name.clone(), 1, 0)]
        );
        assert_eq!(
            records(&changes),
            vec![(record_key(&name, "k1").to_vec(), None)]
        );
        let (captured_entries, captured_keys) = decode_captures(&captured);
        assert!(
            captured_entries
                .iter()
                .all(|(counter, _, _)| *counter != name),
            "{captured_entries:?}"
        );
        assert_eq!(captured_keys, vec![record_key("plain", "k2").to_vec()]);
        store.finish_flush(&changes);
        assert_eq!(store.entry_count(), 2, "plain and the current window");
        // Replicas hear "entry gone".
        let changes = store.changes_since(before);
        assert!(!changes.full);
        assert_eq!(
            sorted(changes.entries),
            vec![(name.clone(), 0, 0), (name.clone(), 1, 0)]
        );
        assert!(store
            .changes_since(0)
            .records
            .iter()
            .all(|(key, _, _)| **key == *record_key("plain", "k2")));

        // The reclaimed record's place in the retention queue is not a
        // remembered key: two more keys fit in the maximum of three, and
        // none is forgotten early for it.
        store.apply(&[keyed("plain", 1, "k3"), keyed("plain", 1, "k4")], 200);
        assert_eq!(store.remembered_keys(), 3);
        assert_eq!(store.forget_keys(300), 0);
        assert_eq!(store.keys_forgotten_early(), 0);
        assert_eq!(store.remembered_keys(), 3);
        let (outcomes, _) = store.apply(
            &[
                keyed("plain", 1, "k2"),
                keyed("plain", 1, "k3"),
                keyed("plain", 1, "k4"),
            ],
            400,
        );
        assert_eq!(outcomes, vec![ApplyOutcome::Duplicate; 3]);
        // Once popped, the queue entry is no longer counted either way.
        assert_eq!(store.forget_keys(u64::MAX), 0);
        assert_eq!(store.remembered_keys(), 0);
    }

    #[test]
    fn windows_loaded_replayed_or_set_again_are_found_too() {
        let store = Store::new();
        let window = tally_proto::window::Window::current(60);
        let end = window.end_unix_ms();
        let loaded = window.stored_name("loaded");
        let replayed = window.stored_name("replayed");
        let restored = window.stored_name("restored");
        store.load(&loaded, 0, 1);
        store.replay(&replayed, 3, 1);
        store.load_record(&record_key(&loaded, "k"), Some((1, 5)));
        store.finish_loading();
        store.apply(&[increment(&restored, 0, 1)], 0);
        assert_eq!(store.reclaim_windows(end, 100), 3);
        assert_eq!(store.remembered_keys(), 0);
        // A restore sets a window the sweep has just zeroed (still in
        // memory until its zeros are logged): it is found again.
        store.set_logged(&restored, 0, 7);
        assert_eq!(store.reclaim_windows(end, 100), 1);
        assert_eq!(store.read(&restored), vec![]);
    }

    #[test]
    fn a_sweep_reclaims_at_most_its_limit() {
        let store = Store::new();
        let window = tally_proto::window::Window::current(60);
        for index in 0..10 {
            store.apply(
                &[increment(&window.stored_name(&format!("c{index}")), 0, 1)],
                0,
            );
        }
        assert_eq!(store.reclaim_windows(window.end_unix_ms(), 4), 4);
        assert_eq!(store.reclaim_windows(window.end_unix_ms(), 4), 4);
        assert_eq!(store.reclaim_windows(window.end_unix_ms(), 4), 2);
        assert_eq!(store.entry_count(), 0);
    }
}
