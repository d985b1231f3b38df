//! Lease expiry waits for the heartbeat path. A lease is renewed only when a worker's
//! heartbeat crosses NATS, reaches a reconciler and is written to Postgres; while any of
//! those is broken, live workers cannot renew, and expiring their leases then would run
//! their tasks a second time (a paid LLM call) for nothing. So a replica that sees the
//! path broken (its NATS connection down, a Postgres statement of the sweep, a heartbeat
//! batch or a results batch failing; a heartbeat or beat batch, or a sweep's expiry,
//! taking longer than a second) does not expire leases, nor mark silent workers offline,
//! until the path has been whole for a quiet window: long enough for every live worker
//! to renew (a worker retries a failed heartbeat within 200 ms), but at most 10 s plus
//! the expiry grace, so that a worker that really died during the outage is still
//! replaced soon after.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// When this replica last saw the heartbeat path broken (ms).
#[derive(Debug)]
pub struct ExpiryPause {
    broken_at: AtomicI64,
}

impl Default for ExpiryPause {
    fn default() -> Self {
        ExpiryPause { broken_at: AtomicI64::new(i64::MIN) }
    }
}

/// The longest quiet window, whatever the lease TTL.
const MAX_QUIET: Duration = Duration::from_secs(10);

/// A write of the heartbeat path slower than this broke the path while it waited: a
/// Postgres that stalls (a failover, a saturated disk, a lock) and then answers fails no
/// statement, but the beats and heartbeats queued behind the write were not recorded
/// in time either, and the workers that sent them look silent once it is back.
pub const SLOW_WRITE: Duration = Duration::from_secs(1);

impl ExpiryPause {
    /// Records that the heartbeat path was broken at `now` (ms).
    pub fn broken(&self, now: i64) {
        self.broken_at.fetch_max(now, Ordering::Relaxed);
    }

    /// Records a write of the heartbeat path (a batch of heartbeats or beats, a sweep)
    /// that took `took` (real time, whatever the clock) and finished at `finished` (ms):
    /// one slower than [`SLOW_WRITE`] broke the path until it finished.
    pub fn wrote(&self, took: Duration, finished: i64) {
        if took > SLOW_WRITE {
            self.broken(finished);
        }
    }

    /// The quiet window for leases of `lease_ttl`, expired `grace` after they end.
    pub fn quiet_window(lease_ttl: Duration, grace: Duration) -> Duration {
        lease_ttl.min(MAX_QUIET) + grace
    }

    /// Whether leases may be expired at `now`: the path has been whole for `quiet`.
    pub fn allows_expiry(&self, now: i64, quiet: Duration) -> bool {
        now.saturating_sub(self.broken_at.load(Ordering::Relaxed)) >= quiet.as_millis() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_resumes_a_quiet_window_after_the_path_was_last_seen_broken() {
        let pause = ExpiryPause::default();
        let quiet = ExpiryPause::quiet_window(Duration::from_secs(2), Duration::from_millis(500));
        assert_eq!(quiet, Duration::from_millis(2_500));
        assert!(pause.allows_expiry(0, quiet), "never broken");
        pause.broken(10_000);
        pause.broken(9_000);
        assert!(!pause.allows_expiry(12_499, quiet));
        assert!(pause.allows_expiry(12_500, quiet));
        let long = ExpiryPause::quiet_window(Duration::from_secs(300), Duration::from_secs(2));
        assert_eq!(long, Duration::from_secs(12), "capped for long leases");
    }

    #[test]
    fn a_slow_write_breaks_the_path_until_it_finished() {
        let pause = ExpiryPause::default();
        let quiet = Duration::from_secs(3);
        pause.wrote(SLOW_WRITE, 11_000);
        assert!(pause.allows_expiry(11_000, quiet), "a second is not slow");
        pause.wrote(SLOW_WRITE + Duration::from_millis(1), 11_000);
        assert!(!pause.allows_expiry(13_999, quiet));
        assert!(pause.allows_expiry(14_000, quiet));
    }
}
