//! Fixed windows: counters that expire, all their parts at one instant.
//!
//! A counter written or read with `window_seconds = w` is not one counter
//! whose value is reset: each window `[start, start + w)` (aligned to the
//! Unix epoch: `start` is a multiple of `w`) is a counter of its own, whose
//! name is the client's name tagged with the window:
//!
//! ```text
//! U+0000 start "+" w U+0000 name        e.g. "\0" "1764633600+60" "\0" "api:alice"
//! ```
//!
//! The coordinator that takes a call picks the window its clock is in. So
//! a window ends for every stripe at once: from its end on, a coordinator
//! addresses the next window (another name, 0 until written), whatever the
//! shards still hold of the old one. Shards reclaim an ended window's parts
//! later, once their own clock is past its end plus a grace (shard config
//! `window_grace_ms`), and from then on refuse to apply to it or to answer
//! a read of it, so that a coordinator whose clock lags by more than the
//! grace gets an error, never a window missing some of its parts.
//!
//! Clients' names cannot start with U+0000 (`CounterName::public`), so no
//! client name is a window's.

use crate::domain::ProtocolError;

/// Longest window: 366 days.
pub const MAX_WINDOW_SECONDS: u32 = 366 * 24 * 60 * 60;

/// Longest name of a counter with a window: its tag (at most 23 bytes)
/// must fit in a stored name of at most 256.
pub const MAX_WINDOWED_NAME_BYTES: usize = 232;

/// One window: `[start, start + seconds)`, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// Its start: a multiple of `seconds`.
    pub start_unix_s: u64,
    /// Its length.
    pub seconds: u32,
}

impl Window {
    /// The window of `seconds` that contains `now_unix_ms`.
    pub fn containing(now_unix_ms: u64, seconds: u32) -> Window {
        let now_s = now_unix_ms / 1000;
        let seconds = seconds.max(1);
        Window {
            start_unix_s: now_s - now_s % u64::from(seconds),
            seconds,
        }
    }

    /// The window of `seconds` that contains now, by this host's clock.
    pub fn current(seconds: u32) -> Window {
        Window::containing(now_unix_ms(), seconds)
    }

    /// When it ends (its first instant not in it), Unix ms.
    pub fn end_unix_ms(&self) -> u64 {
        self.start_unix_s
            .saturating_add(u64::from(self.seconds))
            .saturating_mul(1000)
    }

    /// The stored name of `counter`'s window.
    pub fn stored_name(&self, counter: &str) -> String {
        self.tag().name(counter)
    }

    /// What [`Window::stored_name`] puts before a counter's name: made
    /// once for the many counters of a batch.
    pub fn tag(&self) -> Tag {
        Tag(format!("\0{}+{}\0", self.start_unix_s, self.seconds))
    }

    /// The window of a stored name and the client's name in it, or `None`
    /// if `stored` is no window's name. Shards call it per increment of a
    /// window: it allocates nothing.
    pub fn of_stored(stored: &str) -> Option<(Window, &str)> {
        let rest = stored.strip_prefix('\0')?;
        let (tag, counter) = rest.split_once('\0')?;
        let (start, seconds) = tag.split_once('+')?;
        // One spelling per window: decimal digits, no leading zeros.
        let canonical = |text: &str| {
            !text.is_empty()
                && text.bytes().all(|byte| byte.is_ascii_digit())
                && (text == "0" || !text.starts_with('0'))
        };
        if !canonical(start) || !canonical(seconds) || counter.is_empty() {
            return None;
        }
        let window = Window {
            start_unix_s: start.parse().ok()?,
            seconds: seconds.parse().ok()?,
        };
        // Aligned and in range (its end in milliseconds fits a u64): so
        // each window has one name, and an end.
        (window.seconds >= 1
            && window.seconds <= MAX_WINDOW_SECONDS
            && window
                .start_unix_s
                .checked_add(u64::from(window.seconds))
                .and_then(|end| end.checked_mul(1000))
                .is_some()
            && window
                .start_unix_s
                .is_multiple_of(u64::from(window.seconds)))
        .then_some((window, counter))
    }

    /// When a stored name's window ends, Unix ms; `None` for a counter
    /// without a window. For shards, which reclaim ended windows.
    pub fn end_of_stored(stored: &str) -> Option<u64> {
        if !stored.starts_with('\0') {
            return None;
        }
        Window::of_stored(stored).map(|(window, _)| window.end_unix_ms())
    }
}

/// A window's tag: what its counters' stored names start with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag(String);

impl Tag {
    /// The stored name of `counter` in this window: one allocation.
    pub fn name(&self, counter: &str) -> String {
        let mut name = String::with_capacity(self.0.len() + counter.len());
        name.push_str(&self.0);
        name.push_str(counter);
        name
    }
}

/// A stored name as people read it: the client's name, and its window if
/// it has one (`api:alice (window 1764633600+60)`).
pub fn describe(stored: &str) -> String {
    match Window::of_stored(stored) {
        Some((window, counter)) => {
            format!(
                "{counter} (window {}+{})",
                window.start_unix_s, window.seconds
            )
        }
        None => stored.to_string(),
    }
}

/// The `window_seconds` field of a request: 0 is none; more than
/// [`MAX_WINDOW_SECONDS`] is refused.
pub fn seconds_from_wire(seconds: u32) -> Result<Option<u32>, ProtocolError> {
    match seconds {
        0 => Ok(None),
        seconds if seconds <= MAX_WINDOW_SECONDS => Ok(Some(seconds)),
        seconds => Err(ProtocolError::Field {
            field: "window_seconds",
            problem: format!("{seconds} is more than the limit of {MAX_WINDOW_SECONDS} (366 days)"),
        }),
    }
}

/// This host's clock, Unix ms.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_aligned_to_the_epoch_and_ends_once() {
        let window = Window::containing(1_764_633_659_999, 60);
        assert_eq!(window.start_unix_s, 1_764_633_600);
        assert_eq!(window.end_unix_ms(), 1_764_633_660_000);
        assert_eq!(
            Window::containing(1_764_633_660_000, 60).start_unix_s,
            1_764_633_660
        );
    }

    #[test]
    fn a_stored_name_reads_back_and_nothing_else_does() {
        let window = Window::containing(1_764_633_600_000, 3600);
        let stored = window.stored_name("api:alice");
        assert_eq!(stored, "\u{0}1764633600+3600\u{0}api:alice");
        assert_eq!(Window::of_stored(&stored), Some((window, "api:alice")));
        assert_eq!(Window::end_of_stored(&stored), Some(1_764_637_200_000));
        // The client's name may itself hold U+0000 after its start.
        let odd = window.stored_name("a\0b");
        assert_eq!(Window::of_stored(&odd), Some((window, "a\0b")));
        for bad in [
            "api:alice",
            "\u{0}",
            "\u{0}1764633600+3600\0",
            "\u{0}1764633600+3600",
            "\u{0}01764633600+3600\0x",
            "\u{0}1764633601+3600\0x",
            "\u{0}1764633600+0\0x",
            "\u{0}0+31622401\0x",
            "\u{0}+60\0x",
            "\u{0}-60+60\0x",
            "\u{0}99999999999999999999999+60\0x",
            // Aligned, but its end in milliseconds is past a u64.
            "\u{0}18446744073709551615+1\0x",
            "\u{0}18446744073709551000+1\0x",
        ] {
            assert_eq!(Window::of_stored(bad), None, "{bad:?}");
        }
        assert_eq!(Window::end_of_stored("api:alice"), None);
    }

    #[test]
    fn the_longest_windowed_name_fits_a_stored_name() {
        let window = Window {
            start_unix_s: 9_999_999_999 / u64::from(MAX_WINDOW_SECONDS)
                * u64::from(MAX_WINDOW_SECONDS),
            seconds: MAX_WINDOW_SECONDS,
        };
        let longest = window.stored_name(&"x".repeat(MAX_WINDOWED_NAME_BYTES));
        assert!(
            longest.len() <= crate::domain::MAX_COUNTER_NAME_BYTES,
            "{}",
            longest.len()
        );
        assert!(crate::domain::CounterName::validate(&longest).is_ok());
    }

    #[test]
    fn window_seconds_rules() {
        assert_eq!(seconds_from_wire(0), Ok(None));
        assert_eq!(seconds_from_wire(1), Ok(Some(1)));
        assert_eq!(
            seconds_from_wire(MAX_WINDOW_SECONDS),
            Ok(Some(MAX_WINDOW_SECONDS))
        );
        let error = seconds_from_wire(MAX_WINDOW_SECONDS + 1).unwrap_err();
        assert!(error.to_string().starts_with("window_seconds: "), "{error}");
    }
}
