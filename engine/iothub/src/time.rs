//! Timestamps as IoT Hub writes them: ISO-8601 UTC with milliseconds and `Z`.

use std::time::{Duration, UNIX_EPOCH};

/// The last millisecond ISO-8601's four-digit years can write: 9999-12-31T23:59:59.999Z.
pub const MAX_ISO_MS: u64 = 253_402_300_799_999;

/// `ms` milliseconds after the Unix epoch, e.g. `2027-01-15T08:00:00.123Z`; `None` past the
/// year 9999 (a corrupt timestamp, never one a clock gave).
pub fn try_iso_ms(ms: u64) -> Option<String> {
    if ms > MAX_ISO_MS {
        return None;
    }
    let t = UNIX_EPOCH.checked_add(Duration::from_millis(ms))?;
    use std::fmt::Write as _;
    let mut out = String::with_capacity(24);
    write!(out, "{}", humantime::format_rfc3339_millis(t)).ok()?;
    Some(out)
}

/// [`try_iso_ms`] for a time a clock gave: one past the year 9999 is written as its last
/// millisecond rather than failing.
pub fn iso_ms(ms: u64) -> String {
    try_iso_ms(ms.min(MAX_ISO_MS)).unwrap_or_else(|| "9999-12-31T23:59:59.999Z".into())
}

/// An ISO-8601 UTC time (`2027-01-15T08:00:00.123Z`, fractions optional) as Unix
/// milliseconds; `None` for anything else or a time before 1970.
pub fn parse_iso_ms(s: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339_weak(s.trim()).ok()?;
    u64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_what_it_writes() {
        for ms in [0, 1_800_000_000_123, super::MAX_ISO_MS] {
            assert_eq!(super::parse_iso_ms(&super::iso_ms(ms)), Some(ms));
        }
        assert_eq!(
            super::parse_iso_ms("2027-01-15T08:00:00Z"),
            Some(1_800_000_000_000)
        );
        assert_eq!(super::parse_iso_ms("tomorrow"), None);
        assert_eq!(super::parse_iso_ms(""), None);
    }

    #[test]
    fn milliseconds_and_zulu() {
        assert_eq!(super::iso_ms(1_800_000_000_123), "2027-01-15T08:00:00.123Z");
        assert_eq!(super::iso_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::iso_ms(super::MAX_ISO_MS), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn past_the_year_9999_is_none_not_a_panic() {
        for ms in [super::MAX_ISO_MS + 1, u64::MAX / 2, u64::MAX] {
            assert_eq!(super::try_iso_ms(ms), None, "{ms}");
            assert_eq!(super::iso_ms(ms), "9999-12-31T23:59:59.999Z");
        }
    }
}
