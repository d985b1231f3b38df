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
