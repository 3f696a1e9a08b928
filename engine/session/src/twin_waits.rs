//! Twin requests a device made that control has not answered yet. A device's twin request is
//! always answered (the Python SDK waits for ever): when control does not answer in time (the
//! link is down, control is restarting), the router answers for it with an error status.
//! Sans-IO: time is passed in.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct TwinWaits {
    timeout: Duration,
    /// (client id, rid) → its deadline.
    pending: HashMap<(String, String), Instant>,
    /// The same, in submission order (= deadline order); entries already answered are skipped.
    order: VecDeque<(Instant, String, String)>,
}

/// Most twin requests waiting for control at once, engine-wide; past it a request is answered
/// at once with 429 (the router must not hold without bound what devices send).
pub const MAX_TWIN_WAITS: usize = 100_000;

impl TwinWaits {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            pending: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records request `rid` of `client_id` made at `now`. `false` when it cannot wait: too
    /// many are waiting already.
    pub fn submit(&mut self, now: Instant, client_id: &str, rid: &str) -> bool {
        if self.pending.len() >= MAX_TWIN_WAITS {
            return false;
        }
        let deadline = now + self.timeout;
        let key = (client_id.to_string(), rid.to_string());
        if self.pending.insert(key, deadline).is_none() {
            self.order
                .push_back((deadline, client_id.to_string(), rid.to_string()));
        }
        true
    }

    /// Control answered `rid` of `client_id`; whether it was still waiting.
    pub fn answered(&mut self, client_id: &str, rid: &str) -> bool {
        let answered = self
            .pending
            .remove(&(client_id.to_string(), rid.to_string()))
            .is_some();
        self.skip_answered();
        answered
    }

    /// The requests whose time is up at `now`: (client id, rid), oldest first.
    pub fn expired(&mut self, now: Instant) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while let Some((deadline, _, _)) = self.order.front() {
            if *deadline > now {
                break;
            }
            let (deadline, client_id, rid) = self.order.pop_front().expect("front exists");
            let key = (client_id, rid);
            if self.pending.get(&key) == Some(&deadline) {
                self.pending.remove(&key);
                out.push(key);
            }
        }
        out
    }

    /// When [`Self::expired`] must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.order.front().map(|(d, _, _)| *d)
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn skip_answered(&mut self) {
        while let Some((deadline, client_id, rid)) = self.order.front() {
            let key = (client_id.clone(), rid.clone());
            if self.pending.get(&key) == Some(deadline) {
                break;
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unanswered_request_expires_once_and_an_answered_one_never() {
        let t0 = Instant::now();
        let mut w = TwinWaits::new(Duration::from_secs(10));
        assert!(w.submit(t0, "d1", "1"));
        assert!(w.submit(t0 + Duration::from_secs(1), "d1", "2"));
        assert!(w.submit(t0 + Duration::from_secs(2), "d2/m", "1"));
        assert!(w.answered("d1", "2"));
        assert!(!w.answered("d1", "2"), "answered once");
        assert_eq!(w.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        assert!(w.expired(t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(
            w.expired(t0 + Duration::from_secs(20)),
            vec![
                ("d1".to_string(), "1".to_string()),
                ("d2/m".to_string(), "1".to_string())
            ]
        );
        assert!(w.is_empty());
        assert_eq!(w.poll_timeout(), None);
        assert!(!w.answered("d1", "1"), "a late answer finds nothing");
    }
}
