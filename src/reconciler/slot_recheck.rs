//! Rechecks, after their claim committed, the concurrency slots that claims found full
//! and put tasks aside for (see [`concurrency::recheck`]): beside the claim loop, since
//! a recheck may wait for ends in flight, and one at a time per replica, the slots of
//! claims that arrive meanwhile gathered into the next one.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::Reconciler;
use crate::db::concurrency;

/// The slots waiting for a recheck, and whether a drain (the task that rechecks them)
/// is running.
#[derive(Debug, Default)]
pub struct SlotRechecks {
    pending: Mutex<BTreeSet<String>>,
    running: AtomicBool,
}

impl SlotRechecks {
    /// Slots a committed claim put tasks aside for: rechecked by the running drain, or
    /// by one started for them.
    pub fn recheck(&self, r: &Reconciler, slots: Vec<String>) {
        if self.add(slots) {
            tokio::spawn(drain(r.clone()));
        }
    }

    /// Adds slots to the next recheck; true when no drain runs and the caller must start
    /// one.
    fn add(&self, slots: Vec<String>) -> bool {
        if slots.is_empty() {
            return false;
        }
        self.pending().extend(slots);
        !self.running.swap(true, Ordering::AcqRel)
    }

    /// The slots of the next recheck, or `None` when none are left: the drain then ends,
    /// and the next [`SlotRechecks::add`] asks for a new one.
    fn next_batch(&self) -> Option<Vec<String>> {
        loop {
            let slots = std::mem::take(&mut *self.pending());
            if !slots.is_empty() {
                return Some(slots.into_iter().collect());
            }
            self.running.store(false, Ordering::Release);
            // Slots added between the take and the flag's clearing found it set and were
            // left here: take them over, unless a new drain has started for them.
            if self.pending().is_empty() || self.running.swap(true, Ordering::AcqRel) {
                return None;
            }
        }
    }

    fn pending(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn drain(r: Reconciler) {
    while let Some(slots) = r.slot_rechecks.next_batch() {
        match concurrency::recheck(&r.pool, &slots, concurrency::RECHECK_PATIENCE).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::debug!(tasks = n, "waiting tasks made due after their slot was rechecked");
                r.due_kick.made_due();
            }
            // Left to the due duty's periodic wake.
            Err(e) => tracing::debug!(error = %e, "rechecking concurrency slots failed; the periodic wake catches up"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn slots_added_while_a_drain_runs_join_its_next_batch_once_each() {
        let r = SlotRechecks::default();
        assert!(r.add(slots(&["k:b", "k:a"])), "the first slots start a drain");
        assert!(!r.add(slots(&["k:b", "k:c"])), "one drain at a time");
        assert_eq!(r.next_batch(), Some(slots(&["k:a", "k:b", "k:c"])));
        assert!(!r.add(slots(&["k:d"])), "the drain still runs: it takes them next");
        assert_eq!(r.next_batch(), Some(slots(&["k:d"])));
        assert_eq!(r.next_batch(), None, "nothing left: the drain ends");
        assert!(r.add(slots(&["k:e"])), "a later claim starts a new drain");
        assert_eq!(r.next_batch(), Some(slots(&["k:e"])));
    }

    #[test]
    fn no_slots_start_nothing() {
        let r = SlotRechecks::default();
        assert!(!r.add(Vec::new()));
        assert!(r.add(slots(&["k:a"])));
        assert_eq!(r.next_batch(), Some(slots(&["k:a"])));
        assert_eq!(r.next_batch(), None);
    }
}
