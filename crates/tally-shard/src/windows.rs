//! Fixed windows on a shard ([`tally_proto::window`]): to a shard a window
//! is a counter like any other, named `"\0{start}+{seconds}\0{name}"`,
//! except that it ends. Once this node's clock is past a window's end plus
//! the grace (`window_grace_ms`), the node
//!
//! - refuses to apply to it (the `expired` outcome of Apply, per item:
//!   [`crate::store::Store::apply`] decides it under the counter's segment
//!   lock, from this clock);
//! - flags it in a read's answer (`ReadResponse.expired`), whatever it still
//!   holds of it: some of its parts may be reclaimed already;
//! - and, [`RECLAIM_MARGIN_MS`] later, reclaims it: its own entries, its
//!   idempotency records and its replica copies' entries and records go (the
//!   log thread's sweep, `crate::journal`).
//!
//! # Why a read never counts a half-reclaimed window
//!
//! Every decision reads one clock, [`WindowClock::now_ms`]: this node's wall
//! clock, made monotonic (it never reads earlier than it read before, on any
//! thread). The sweep reads it once and reclaims a window only if `end +
//! grace + margin <= now`. Two arguments keep a read that is answered "not
//! expired" whole:
//!
//! - the margin: a read that found the window current (`end + grace > now`)
//!   could only meet the sweep if it took longer than the margin (10 s, far
//!   longer than any read: one is a few hash lookups under locks);
//! - the order: a read looks at the clock *after* it collected the entries.
//!   Had the sweep removed any of them first, the read's clock is at least
//!   the sweep's (monotonic, and ordered by the lock both took), so past
//!   `end + grace + margin`: the answer is flagged. This holds even if the
//!   wall clock steps forward by more than the margin mid-read.
//!
//! An Apply decides under the segment lock the sweep zeroes the counter
//! under, by the same clock: one that reaches the counter after the sweep
//! reads a later clock and is refused.
//!
//! # Finding what to reclaim
//!
//! A [`WindowIndex`] per own lock segment (under the segment's lock), and one
//! per replica copy, lists the windowed counters it holds by the end of
//! their window, with the keys of their idempotency records. It is kept
//! where a counter enters a table (an increment of a new counter, recovery,
//! a restore or an adoption, a replication change set) and where a record
//! is added or forgotten; a plain counter costs one byte compare there
//! (`starts_with('\0')`). A sweep with nothing due costs one look at the
//! first end of each index, so it can run every few seconds however many
//! counters a node holds. A scan instead would walk every record of every
//! segment arena under its lock (names are hashed to segments and tables,
//! so windowed names are not together anywhere), and every idempotency
//! record, to find the few due. The index may list a counter no longer held
//! (deleted, or at 0 and dropped): the sweep skips it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tally_proto::window::Window;

/// Default for `window_grace_ms`: one minute.
pub const DEFAULT_WINDOW_GRACE_MS: u64 = 60_000;
/// Largest `window_grace_ms`: one day.
pub const MAX_WINDOW_GRACE_MS: u64 = 86_400_000;
/// How long after a window ended by this node's clock (its grace included)
/// the node reclaims it. It refuses the window from `end + grace` on, and
/// removes its parts only from `end + grace + margin`: longer than any read
/// or apply takes, so one that found the window current just before its
/// grace ended has finished before anything of it goes (see the module
/// docs for the second argument, which holds without it).
pub const RECLAIM_MARGIN_MS: u64 = 10_000;
/// Most windowed counters one sweep reclaims from own entries, and from
/// the copies: a backlog (a node that was down for long) is reclaimed over
/// a few log thread turns, none holding locks for long.
pub const MAX_RECLAIMED_PER_SWEEP: usize = 65_536;

type FastSet<T> = HashSet<T, foldhash::fast::RandomState>;
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The clock windows are judged by, and the grace.
#[derive(Debug)]
pub struct WindowClock {
    grace_ms: AtomicU64,
    /// The latest wall clock reading handed out.
    latest_ms: AtomicU64,
}

impl Default for WindowClock {
    fn default() -> Self {
        WindowClock {
            grace_ms: AtomicU64::new(DEFAULT_WINDOW_GRACE_MS),
            latest_ms: AtomicU64::new(0),
        }
    }
}

impl WindowClock {
    /// This node's wall clock, Unix ms, never earlier than a reading handed
    /// out before (on any thread): a wall clock stepped back holds still
    /// until it catches up.
    pub fn now_ms(&self) -> u64 {
        let wall = crate::journal::unix_ms_now();
        // A load first: the write (a contended cache line) happens once per
        // millisecond, not once per call.
        let latest = self.latest_ms.load(Ordering::SeqCst);
        if wall <= latest {
            return latest;
        }
        self.latest_ms.fetch_max(wall, Ordering::SeqCst).max(wall)
    }

    /// The grace, ms.
    pub fn grace_ms(&self) -> u64 {
        self.grace_ms.load(Ordering::Relaxed)
    }

    /// Sets the grace (`window_grace_ms`), before the node serves.
    pub fn set_grace_ms(&self, grace_ms: u64) {
        self.grace_ms.store(grace_ms, Ordering::Relaxed);
    }

    /// The end (Unix ms) of `counter`'s window if it is one that has ended
    /// by `now_ms`, grace included; `None` for a current window or a plain
    /// counter (decided by its first byte: `Window::end_of_stored`).
    pub fn ended(&self, counter: &str, now_ms: u64) -> Option<u64> {
        let end = Window::end_of_stored(counter)?;
        (end.saturating_add(self.grace_ms()) <= now_ms).then_some(end)
    }

    /// Windows that ended at or before this are reclaimed at `now_ms`.
    pub fn reclaim_horizon(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.grace_ms().saturating_add(RECLAIM_MARGIN_MS))
    }

    /// How often the log thread sweeps: a quarter of the grace, within
    /// 250 ms and 10 s.
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis((self.grace_ms() / 4).clamp(250, 10_000))
    }

    /// Why an increment of `counter` (whose window ended at `end_ms`) was
    /// refused at `now_ms`: one line.
    pub fn refusal(&self, counter: &str, end_ms: u64, now_ms: u64) -> String {
        format!(
            "{} ended at {} ({end_ms} Unix ms); this node's clock reads {} ({now_ms} Unix ms), \
             past its end plus the grace of {} ms (window_grace_ms): the clocks of the \
             coordinator and this node differ by more than the grace; nothing applied",
            tally_proto::window::describe(counter),
            rfc3339(end_ms),
            rfc3339(now_ms),
            self.grace_ms()
        )
    }
}

/// `unix_ms` as RFC 3339 in UTC, to the millisecond
/// (`2025-12-02T00:01:00.000Z`).
pub fn rfc3339(unix_ms: u64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms),
    )
    .to_string()
}

/// A windowed counter due for reclaim, and its idempotency records' keys.
pub type Ended = (Box<str>, Vec<Arc<[u8]>>);

/// The windowed counters of one table (an own segment, or a replica copy)
/// by their window's end, and the keys of their idempotency records (see
/// the module docs). Plain counters never enter it.
#[derive(Debug, Default)]
pub struct WindowIndex {
    by_end: BTreeMap<u64, FastSet<Box<str>>>,
    /// Each listed counter's record keys (only counters with some).
    records: FastMap<Box<str>, FastSet<Arc<[u8]>>>,
}

impl WindowIndex {
    /// Lists `counter` if it is a window. One byte compare for any other.
    #[inline]
    pub fn note_counter(&mut self, counter: &str) {
        if counter.starts_with('\0') {
            self.note_window(counter);
        }
    }

    fn note_window(&mut self, counter: &str) -> bool {
        let Some(end) = Window::end_of_stored(counter) else {
            return false;
        };
        let counters = self.by_end.entry(end).or_default();
        if !counters.contains(counter) {
            counters.insert(counter.into());
        }
        true
    }

    /// Lists a record of `counter` (a window, else nothing happens).
    #[inline]
    pub fn note_record(&mut self, counter: &str, key: &Arc<[u8]>) {
        if counter.starts_with('\0') && self.note_window(counter) {
            match self.records.get_mut(counter) {
                Some(keys) => {
                    keys.insert(key.clone());
                }
                None => {
                    self.records
                        .insert(counter.into(), FastSet::from_iter([key.clone()]));
                }
            }
        }
    }

    /// Takes a forgotten record of `counter` off the list.
    #[inline]
    pub fn forget_record(&mut self, counter: &str, key: &[u8]) {
        if !counter.starts_with('\0') {
            return;
        }
        if let Some(keys) = self.records.get_mut(counter) {
            keys.remove(key);
            if keys.is_empty() {
                self.records.remove(counter);
            }
        }
    }

    /// Whether a window ended at or before `horizon` is listed.
    pub fn any_ended(&self, horizon: u64) -> bool {
        self.by_end
            .first_key_value()
            .is_some_and(|(&end, _)| end <= horizon)
    }

    /// Takes off the list, and returns, up to `limit` counters whose window
    /// ended at or before `horizon`, each with its record keys.
    pub fn take_ended(&mut self, horizon: u64, limit: usize) -> Vec<Ended> {
        let mut taken = Vec::new();
        while taken.len() < limit {
            let Some(mut first) = self.by_end.first_entry() else {
                break;
            };
            if *first.key() > horizon {
                break;
            }
            let counters = first.get_mut();
            let room = limit - taken.len();
            let chosen: Vec<Box<str>> = if counters.len() <= room {
                first.remove().into_iter().collect()
            } else {
                let chosen: Vec<Box<str>> = counters.iter().take(room).cloned().collect();
                for counter in &chosen {
                    counters.remove(counter);
                }
                chosen
            };
            taken.extend(chosen.into_iter().map(|counter| {
                let keys = self
                    .records
                    .remove(&counter)
                    .map(|keys| keys.into_iter().collect())
                    .unwrap_or_default();
                (counter, keys)
            }));
        }
        taken
    }

    /// Empties the list (a table cleared).
    pub fn clear(&mut self) {
        self.by_end.clear();
        self.records.clear();
    }

    /// Counters listed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_end.values().map(FastSet::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start: u64, seconds: u32, name: &str) -> String {
        Window {
            start_unix_s: start,
            seconds,
        }
        .stored_name(name)
    }

    #[test]
    fn rfc3339_is_utc_to_the_millisecond() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_764_633_660_000), "2025-12-02T00:01:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn a_window_ends_for_the_node_after_its_grace() {
        let clock = WindowClock::default();
        clock.set_grace_ms(1_000);
        let name = window(60, 60, "api:alice"); // ends at 120,000
        assert_eq!(clock.ended(&name, 120_999), None);
        assert_eq!(clock.ended(&name, 121_000), Some(120_000));
        assert_eq!(clock.ended("api:alice", u64::MAX), None, "a plain counter");
        assert_eq!(clock.ended("\0not a window", u64::MAX), None);
        assert_eq!(clock.reclaim_horizon(131_000), 120_000);
        assert_eq!(clock.reclaim_horizon(5), 0);
        let reason = clock.refusal(&name, 120_000, 121_000);
        assert!(
            reason.starts_with(
                "api:alice (window 60+60) ended at 1970-01-01T00:02:00.000Z (120000 Unix ms); \
                 this node's clock reads 1970-01-01T00:02:01.000Z (121000 Unix ms)"
            ),
            "{reason}"
        );
        assert!(reason.contains("grace of 1000 ms"), "{reason}");
        assert!(!reason.contains('\n') && !reason.contains('\0'), "{reason}");
    }

    #[test]
    fn the_sweep_interval_is_a_quarter_of_the_grace_within_bounds() {
        let clock = WindowClock::default();
        assert_eq!(clock.sweep_interval(), Duration::from_secs(10));
        clock.set_grace_ms(8_000);
        assert_eq!(clock.sweep_interval(), Duration::from_secs(2));
        clock.set_grace_ms(1);
        assert_eq!(clock.sweep_interval(), Duration::from_millis(250));
    }

    #[test]
    fn the_clock_never_goes_back() {
        let clock = WindowClock::default();
        clock.latest_ms.store(u64::MAX - 1, Ordering::SeqCst);
        assert_eq!(
            clock.now_ms(),
            u64::MAX - 1,
            "a wall clock behind holds still"
        );
        let fresh = WindowClock::default();
        let first = fresh.now_ms();
        assert!(first > 1_700_000_000_000);
        assert!(fresh.now_ms() >= first);
    }

    #[test]
    fn the_index_hands_out_ended_windows_with_their_records_once() {
        let mut index = WindowIndex::default();
        let early = window(60, 60, "a"); // ends 120,000
        let late = window(3600, 3600, "b"); // ends 7,200,000
        index.note_counter("plain");
        index.note_counter(&early);
        index.note_counter(&early);
        index.note_counter(&late);
        let key: Arc<[u8]> = crate::store::record_key(&early, "k1").into();
        let gone: Arc<[u8]> = crate::store::record_key(&early, "k2").into();
        index.note_record(&early, &key);
        index.note_record(&early, &gone);
        index.forget_record(&early, &gone);
        index.note_record("plain", &key);
        assert_eq!(index.len(), 2);
        assert!(!index.any_ended(119_999));
        assert!(index.any_ended(120_000));
        assert!(index.take_ended(119_999, 10).is_empty());
        let taken = index.take_ended(120_000, 10);
        assert_eq!(taken, vec![(early.as_str().into(), vec![key])]);
        assert!(index.take_ended(120_000, 10).is_empty(), "once");
        assert_eq!(index.len(), 1);
        // A record alone lists its counter too.
        let other = window(60, 60, "c");
        let record: Arc<[u8]> = crate::store::record_key(&other, "k").into();
        index.note_record(&other, &record);
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn the_index_hands_out_at_most_the_limit_per_call() {
        let mut index = WindowIndex::default();
        for name in 0..5 {
            index.note_counter(&window(60, 60, &format!("a{name}")));
            index.note_counter(&window(120, 60, &format!("b{name}")));
        }
        assert_eq!(index.take_ended(u64::MAX, 3).len(), 3);
        assert_eq!(index.take_ended(u64::MAX, 6).len(), 6);
        assert_eq!(index.take_ended(u64::MAX, 6).len(), 1);
        assert_eq!(index.len(), 0);
    }
}
