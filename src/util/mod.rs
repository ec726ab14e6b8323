//! Small pure helpers every floor may use: log rate limiting, timestamps, back-off,
//! `/proc` and `/sys` readings, the one place a panic is caught (`panics`). Imports nothing of the crate.

mod backoff;
pub mod panics;
mod proc;

pub use backoff::Backoff;
pub use proc::{cpu_temp_c, peak_rss_mb, rss_mb};

use std::time::SystemTime;

/// Log the 1st, 2nd, 4th, 8th... occurrence: a problem that repeats at frame rate must not
/// flood the journal, and its count is in the stats anyway.
pub fn worth_logging(n: u64) -> bool {
    n.is_power_of_two()
}

/// RFC 3339, UTC, millisecond precision: `2026-11-29T22:48:14.123Z`.
pub fn rfc3339_ms(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt).unwrap_or_default()
}

/// `x` rounded to 3 decimals, for payloads.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_489_601_250);
        assert_eq!(rfc3339_ms(t), "2025-11-30T08:00:01.250Z");
    }

    #[test]
    fn logging_thins_out_by_powers_of_two() {
        let logged: Vec<u64> = (1..=20).filter(|&n| worth_logging(n)).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16]);
    }
}
