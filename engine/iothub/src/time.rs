//! Timestamps as IoT Hub writes them: ISO-8601 UTC with milliseconds and `Z`.

use std::time::{Duration, UNIX_EPOCH};

/// `ms` milliseconds after the Unix epoch, e.g. `2027-01-15T08:00:00.123Z`.
pub fn iso_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn milliseconds_and_zulu() {
        assert_eq!(super::iso_ms(1_800_000_000_123), "2027-01-15T08:00:00.123Z");
        assert_eq!(super::iso_ms(0), "1970-01-01T00:00:00.000Z");
    }
}
