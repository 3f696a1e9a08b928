//! Calls the engine makes of control for AMQP service links (issue 10): a cloud-to-device
//! send, a feedback read, a feedback completion. Control holds the C2D queues and the
//! feedback, so each call is an `EngineFrame::Service` with an id, answered by a
//! `ControlFrame::ServiceReply` with the same id on the link. Any thread may call; the link's
//! reader answers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_model::link::{EngineFrame, ServiceReply, ServiceRequest};
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::router::RouterTx;

/// How long a call waits for control.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CallFailed {
    #[error("the control plane is not reachable")]
    ControlAway,
    #[error("the control plane did not answer in time")]
    TimedOut,
}

pub struct ServiceCalls {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<ServiceReply>>>,
    router: RouterTx,
    metrics: Arc<Metrics>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ServiceCalls {
    pub fn new(router: RouterTx, metrics: Arc<Metrics>) -> Self {
        Self {
            next: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            router,
            metrics,
        }
    }

    /// Sends `request` to control and waits for its answer (at most [`CALL_TIMEOUT`]), on a
    /// tokio runtime.
    pub async fn call(&self, request: ServiceRequest) -> Result<ServiceReply, CallFailed> {
        let (id, rx) = self.start(request)?;
        let answer = tokio::time::timeout(CALL_TIMEOUT, rx).await;
        self.forget(id);
        match answer {
            Ok(Ok(reply)) => Ok(reply),
            _ => Err(CallFailed::TimedOut),
        }
    }

    /// Sends `request` to control; the answer comes on the receiver (any runtime may await it,
    /// racing its own timer, then [`Self::forget`] the call).
    pub fn start(
        &self,
        request: ServiceRequest,
    ) -> Result<(u64, oneshot::Receiver<ServiceReply>), CallFailed> {
        if self.metrics.link_connected.get() == 0 {
            return Err(CallFailed::ControlAway);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        locked(&self.waiting).insert(id, tx);
        self.router.report(EngineFrame::Service { id, request });
        Ok((id, rx))
    }

    /// Stops waiting for call `id`.
    pub fn forget(&self, id: u64) {
        locked(&self.waiting).remove(&id);
    }

    /// The link went down: no call waiting now will be answered, so each ends at once (its
    /// receiver sees the sender dropped) instead of at its timeout.
    pub fn link_lost(&self) {
        locked(&self.waiting).clear();
    }

    /// Control's answer to call `id` (late answers are dropped).
    pub fn answer(&self, id: u64, reply: ServiceReply) {
        if let Some(tx) = locked(&self.waiting).remove(&id) {
            let _ = tx.send(reply);
        }
    }
}
