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
}
