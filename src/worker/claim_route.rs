//! Where a worker sends its claims. The first goes to the reconcilers' queue group; the
//! replica that answers names itself, and the worker's next claims go to that replica's
//! own subject. One replica then decides all of a worker's claims, so two replicas'
//! claim transactions do not queue behind each other on the same worker row.
//!
//! The route is given up when the replica does not answer (it stopped: the next claim
//! goes through the group at once) and every [`REPICK_AFTER`], so workers spread again
//! over replicas that started since.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a worker keeps sending its claims to one replica before letting the queue
/// group pick again.
pub const REPICK_AFTER: Duration = Duration::from_secs(60);

/// The replica a worker's claims go to, if any (shared by its pull loops).
#[derive(Debug, Default)]
pub struct ClaimRoute {
    sticky: Mutex<Option<Sticky>>,
}

#[derive(Debug)]
struct Sticky {
    replica: String,
    since: Instant,
}

impl ClaimRoute {
    /// The replica to send the next claim to; `None` for the queue group.
    pub fn target(&self, now: Instant) -> Option<String> {
        let sticky = self.sticky.lock().expect("claim route lock");
        sticky.as_ref().filter(|s| now.saturating_duration_since(s.since) < REPICK_AFTER).map(|s| s.replica.clone())
    }

    /// A claim was decided by `replica` (`None`: a reconciler that does not name
    /// itself, so the group it is).
    pub fn answered_by(&self, replica: Option<&str>, now: Instant) {
        let mut sticky = self.sticky.lock().expect("claim route lock");
        match replica {
            // The same replica again keeps its start, so the route still expires.
            Some(id) if sticky.as_ref().is_some_and(|s| s.replica == id) => {}
            Some(id) => *sticky = Some(Sticky { replica: id.to_owned(), since: now }),
            None => *sticky = None,
        }
    }

    /// A claim sent to `replica` went unanswered: it is no longer the route.
    pub fn failed(&self, replica: &str) {
        let mut sticky = self.sticky.lock().expect("claim route lock");
        if sticky.as_ref().is_some_and(|s| s.replica == replica) {
            *sticky = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_claim_goes_to_the_group_then_to_the_replica_that_answered() {
        let route = ClaimRoute::default();
        let t0 = Instant::now();
        assert_eq!(route.target(t0), None);
        route.answered_by(Some("r1"), t0);
        assert_eq!(route.target(t0 + Duration::from_secs(1)).as_deref(), Some("r1"));
    }

    #[test]
    fn the_group_picks_again_after_the_repick_interval_even_when_the_replica_keeps_answering() {
        let route = ClaimRoute::default();
        let t0 = Instant::now();
        route.answered_by(Some("r1"), t0);
        route.answered_by(Some("r1"), t0 + REPICK_AFTER / 2);
        assert_eq!(route.target(t0 + REPICK_AFTER - Duration::from_millis(1)).as_deref(), Some("r1"));
        assert_eq!(route.target(t0 + REPICK_AFTER), None);
        // The group's answer starts a new period, on whichever replica it picked.
        route.answered_by(Some("r2"), t0 + REPICK_AFTER);
        assert_eq!(route.target(t0 + REPICK_AFTER + Duration::from_secs(1)).as_deref(), Some("r2"));
    }

    #[test]
    fn an_unanswered_replica_is_dropped_but_not_one_that_replaced_it() {
        let route = ClaimRoute::default();
        let t0 = Instant::now();
        route.answered_by(Some("r1"), t0);
        route.failed("r1");
        assert_eq!(route.target(t0), None);
        // A claim of another pull loop was answered by r2 meanwhile: r1's late failure
        // does not drop r2.
        route.answered_by(Some("r2"), t0);
        route.failed("r1");
        assert_eq!(route.target(t0).as_deref(), Some("r2"));
    }

    #[test]
    fn a_reconciler_that_does_not_name_itself_sends_claims_back_to_the_group() {
        let route = ClaimRoute::default();
        let t0 = Instant::now();
        route.answered_by(Some("r1"), t0);
        route.answered_by(None, t0);
        assert_eq!(route.target(t0), None);
    }
}
