//! The executions a worker runs, by lease, so that a cancel notice
//! (`<ns>.ctl.cancel`, published by the API when a leased task is cancelled) stops the
//! one it names: its executor's process group is killed and its message terminated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::domain::LeaseId;
use crate::protocol::CancelNotice;

/// Cancellation tokens of the running executions.
#[derive(Clone, Default)]
pub struct Running(Arc<Mutex<HashMap<LeaseId, CancellationToken>>>);

/// One registered execution; unregistered when dropped.
pub struct Registration {
    pub token: CancellationToken,
    lease: LeaseId,
    running: Running,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.running.0.lock().expect("running map").remove(&self.lease);
    }
}

impl Running {
    /// Registers the execution of `lease`.
    pub fn register(&self, lease: &LeaseId) -> Registration {
        let token = CancellationToken::new();
        self.0.lock().expect("running map").insert(lease.clone(), token.clone());
        Registration { token, lease: lease.clone(), running: self.clone() }
    }

    /// Cancels the execution of `lease` if this worker runs it; whether it did.
    pub fn cancel(&self, lease: &LeaseId) -> bool {
        match self.0.lock().expect("running map").get(lease) {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    /// Applies the cancel notices of `sub` until it ends.
    pub async fn serve(self, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            match serde_json::from_slice::<CancelNotice>(&msg.payload) {
                Ok(n) => {
                    if self.cancel(&n.lease_id) {
                        tracing::info!(task.id = %n.task_id, lease.id = %n.lease_id, "cancel notice: stopping the execution");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "malformed cancel notice ignored"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_cancels_only_the_registered_execution_of_its_lease() {
        let running = Running::default();
        let a = running.register(&LeaseId::from("a"));
        let b = running.register(&LeaseId::from("b"));
        assert!(running.cancel(&LeaseId::from("a")));
        assert!(a.token.is_cancelled() && !b.token.is_cancelled());
        drop(b);
        assert!(!running.cancel(&LeaseId::from("b")), "unregistered when the execution ended");
    }
}
