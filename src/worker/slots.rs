//! Execution slots of a worker (`max_concurrency`), shared by its pull loops.
//!
//! Pull loops do not hold slots while they wait for messages (an idle long poll on one
//! consumer must not starve the other); they ask for as many messages as slots are free
//! and take a slot per message as it arrives. A message that finds no free slot (both
//! loops received at once) is nak'ed for immediate redelivery.
//!
//! While the worker is drained the slots are paused: none is free to the pull loops, so
//! they stop asking for messages, and the executions under way keep theirs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The slots of one worker.
#[derive(Clone)]
pub struct Slots {
    sem: Arc<Semaphore>,
    freed: Arc<Notify>,
    paused: Arc<AtomicBool>,
    total: usize,
}

/// One taken slot; freeing it wakes the pull loops.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    freed: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Release before notifying, so woken loops see the slot free.
        drop(self.permit.take());
        self.freed.notify_waiters();
    }
}

impl Slots {
    /// `n` slots.
    pub fn new(n: usize) -> Slots {
        Slots { sem: Arc::new(Semaphore::new(n)), freed: Arc::new(Notify::new()), paused: Arc::default(), total: n }
    }

    /// Pauses (the worker is drained) or resumes taking slots; waiting loops re-check.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        self.freed.notify_waiters();
    }

    /// Whether taking slots is paused.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Slots free now (none while paused).
    pub fn free(&self) -> usize {
        if self.paused() {
            return 0;
        }
        self.sem.available_permits()
    }

    /// Slots in use now.
    pub fn used(&self) -> usize {
        self.total - self.sem.available_permits()
    }

    /// Takes a slot if one is free (none while paused).
    pub fn try_take(&self) -> Option<Slot> {
        if self.paused() {
            return None;
        }
        self.sem.clone().try_acquire_owned().ok().map(|p| Slot { permit: Some(p), freed: self.freed.clone() })
    }

    /// Waits until at least one slot is free and returns how many are.
    pub async fn wait_free(&self) -> usize {
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let free = self.free();
            if free > 0 {
                return free;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn paused_slots_are_not_free_until_resumed() {
        let slots = Slots::new(2);
        let running = slots.try_take().unwrap();
        slots.set_paused(true);
        assert_eq!((slots.free(), slots.used()), (0, 1));
        assert!(slots.try_take().is_none());
        let waiter = tokio::spawn({
            let s = slots.clone();
            async move { s.wait_free().await }
        });
        drop(running);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a freed slot stays unavailable while paused");
        slots.set_paused(false);
        assert_eq!(waiter.await.unwrap(), 2);
    }

    #[tokio::test]
    async fn waiting_loops_wake_when_a_slot_is_freed() {
        let slots = Slots::new(1);
        let taken = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        assert_eq!(slots.used(), 1);
        let waiter = tokio::spawn({
            let s = slots.clone();
            async move { s.wait_free().await }
        });
        tokio::task::yield_now().await;
        drop(taken);
        assert_eq!(waiter.await.unwrap(), 1);
    }
}
