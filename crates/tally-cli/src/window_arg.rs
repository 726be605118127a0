//! `--window DURATION`, as `incr`, `get`, `delete` and `bench` take it: the
//! length of a counter's fixed window (see `IncrementRequest.window_seconds`
//! in proto/tally/v1/tally.proto), in whole seconds.

use std::time::Duration;

use tally_proto::window::MAX_WINDOW_SECONDS;

/// Parses a window's length: plain seconds (`90`) or a duration as
/// `humantime` reads it (`60s`, `5m`, `1h`, `1d`, `1h30m`). Refuses 0 (no
/// window: leave the option out), anything that is not whole seconds
/// (`500ms`, `1s500ms`) and anything longer than 366 days, the longest
/// window the API takes. For clap's `value_parser`: the error is the
/// message clap prints after "invalid value ... for '--window'".
pub fn parse_window(text: &str) -> Result<u32, String> {
    let duration = if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
        // Plain seconds; too many digits for a u64 is too long anyway.
        Duration::from_secs(text.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        humantime::parse_duration(text)
            .map_err(|error| format!("{error} (write e.g. 90, 60s, 5m, 1h or 1d)"))?
    };
    if duration.is_zero() {
        return Err("a window of 0 seconds is no window: leave --window out".to_string());
    }
    if duration < Duration::from_secs(1) {
        return Err(format!(
            "{} is less than a second, the shortest window",
            humantime::format_duration(duration)
        ));
    }
    if duration.subsec_nanos() != 0 {
        return Err(format!(
            "{} is not a whole number of seconds",
            humantime::format_duration(duration)
        ));
    }
    if duration.as_secs() > u64::from(MAX_WINDOW_SECONDS) {
        return Err(format!(
            "{text} is longer than 366 days ({MAX_WINDOW_SECONDS} seconds), the longest window"
        ));
    }
    Ok(u32::try_from(duration.as_secs()).expect("at most MAX_WINDOW_SECONDS"))
}

/// A window's length as `--window` takes it, in days, hours, minutes and
/// seconds (never humantime's years and months of fractional days): `60`
/// is `1m`, `5400` is `1h30m`, `31622400` is `366d`.
pub fn describe_window(seconds: u32) -> String {
    if seconds == 0 {
        return "0s".to_string();
    }
    let mut left = seconds;
    let mut text = String::new();
    for (unit, length) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if left >= length {
            text.push_str(&format!("{}{unit}", left / length));
            left %= length;
        }
    }
    text
}

/// Unix time in milliseconds as an RFC 3339 UTC time, to the second
/// (windows end on whole seconds): `2026-12-01T21:14:00Z`.
pub fn format_unix_ms(unix_ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_in_units_and_plain_seconds() {
        for (text, seconds) in [
            ("1", 1),
            ("90", 90),
            ("1s", 1),
            ("60s", 60),
            ("5m", 300),
            ("1h", 3_600),
            ("1h30m", 5_400),
            ("1h 30m", 5_400),
            ("1.5h", 5_400),
            ("1d", 86_400),
            ("7days", 604_800),
            ("366d", 31_622_400),
            ("31622400", 31_622_400),
        ] {
            assert_eq!(parse_window(text), Ok(seconds), "{text}");
        }
    }

    #[test]
    fn sub_second_zero_and_fractional_windows_are_refused() {
        for (text, says) in [
            ("0", "0 seconds is no window"),
            ("0s", "0 seconds is no window"),
            ("500ms", "less than a second"),
            ("999ms", "less than a second"),
            ("1s500ms", "not a whole number of seconds"),
            ("1.5s", "not a whole number of seconds"),
            ("0.5s", "less than a second"),
            ("61000001us", "not a whole number of seconds"),
        ] {
            let error = parse_window(text).unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn windows_over_366_days_are_refused() {
        for text in [
            "367d",
            "366d 1s",
            "31622401",
            "2y",
            "99999999999999999999999",
        ] {
            let error = parse_window(text).unwrap_err();
            assert!(error.contains("longer than 366 days"), "{text}: {error}");
        }
    }

    #[test]
    fn what_is_no_duration_is_refused_with_examples() {
        for text in ["", "-5", "1x", "abc", "m", "5 m s", "1h-"] {
            let error = parse_window(text).unwrap_err();
            assert!(error.contains("e.g. 90, 60s"), "{text:?}: {error}");
        }
    }

    #[test]
    fn windows_read_back_as_people_write_them() {
        for (seconds, text) in [
            (1, "1s"),
            (60, "1m"),
            (90, "1m30s"),
            (5_400, "1h30m"),
            (86_400, "1d"),
            (90_061, "1d1h1m1s"),
            (31_622_400, "366d"),
        ] {
            assert_eq!(describe_window(seconds), text);
            // What it says, --window takes back.
            assert_eq!(parse_window(text), Ok(seconds), "{text}");
        }
        assert_eq!(format_unix_ms(1_764_633_660_000), "2025-12-02T00:01:00Z");
    }
}
