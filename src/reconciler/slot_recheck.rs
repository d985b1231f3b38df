//! Rechecks, after their claim committed, the concurrency slots that claims found full
//! and put tasks aside for (see [`concurrency::recheck`]): beside the claim loop, since
//! a recheck may wait for ends in flight, and one at a time per replica, the slots of
//! claims that arrive meanwhile gathered into the next one.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::Reconciler;
use crate::db::concurrency;

/// The slots waiting for a recheck, and whether one is running.
#[derive(Debug, Default)]
pub struct SlotRechecks {
    pending: Mutex<BTreeSet<String>>,
    running: AtomicBool,
}

impl SlotRechecks {
    /// Slots a committed claim put tasks aside for: rechecked now, or right after the
    /// recheck in progress.
    pub fn add(&self, r: &Reconciler, slots: Vec<String>) {
        if slots.is_empty() {
            return;
        }
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).extend(slots);
        if !self.running.swap(true, Ordering::AcqRel) {
            tokio::spawn(drain(r.clone()));
        }
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner())).into_iter().collect()
    }
}

async fn drain(r: Reconciler) {
    let rechecks = r.slot_rechecks.clone();
    loop {
        let slots = rechecks.take();
        if slots.is_empty() {
            rechecks.running.store(false, Ordering::Release);
            // Slots added after the take but before the flag was cleared found it set and
            // left them here: take them over unless another drain has started since.
            if rechecks.pending.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
                || rechecks.running.swap(true, Ordering::AcqRel)
            {
                return;
            }
            continue;
        }
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
