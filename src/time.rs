//! Wall-clock time as the seed stores it: milliseconds since the Unix epoch in a `bigint`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        // The clock is before 1970: treat it as the epoch rather than panic.
        .unwrap_or(0)
}

/// Where services read the time: the system clock, or a manual one that tests move, so
/// that what depends on time passing (expiry, staleness) is tested without waiting.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<std::sync::Arc<std::sync::atomic::AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that reads `start_ms` until [`Clock::advance`] moves it.
    pub fn manual(start_ms: i64) -> Clock {
        Clock { manual: Some(std::sync::Arc::new(start_ms.into())) }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.manual {
            Some(t) => t.load(std::sync::atomic::Ordering::SeqCst),
            None => now_ms(),
        }
    }

    /// Moves a manual clock forward (every clone of it).
    ///
    /// # Panics
    /// On the system clock, which only time moves.
    pub fn advance(&self, by: std::time::Duration) {
        let t = self.manual.as_ref().expect("only a manual clock can be moved");
        t.fetch_add(by.as_millis() as i64, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Epoch milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn iso8601(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let (h, min, sec, milli) =
        (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{sec:02}.{milli:03}Z")
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_its_clones_follow() {
        let clock = Clock::manual(1_000);
        let seen_by_service = clock.clone();
        assert_eq!(seen_by_service.now_ms(), 1_000);
        clock.advance(std::time::Duration::from_millis(250));
        assert_eq!(seen_by_service.now_ms(), 1_250);
        let system = Clock::system().now_ms();
        assert!((system - now_ms()).abs() < 1_000);
    }

    #[test]
    fn epoch_milliseconds_read_as_iso_8601_utc() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(iso8601(1_767_225_599_999), "2025-12-31T23:59:59.999Z");
        assert_eq!(iso8601(-1), "1969-12-31T23:59:59.999Z");
    }
}
