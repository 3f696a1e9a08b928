//! Commands from control in flight to a shard: routed with the [`Directory`], answered by the
//! shard (delivered into the session's inbox, or not connected after all), or timed out.
//! Sans-IO: time is passed in; the owner arms a timer for [`CommandTracker::poll_timeout`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use roost_model::link::CommandOutcome;

use crate::directory::{Directory, Holder};

/// Where a command goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Send it to this shard, for this connection; its answer comes back by id.
    Shard(Holder),
    /// Answered already.
    Done(CommandOutcome),
}

#[derive(Debug)]
pub struct CommandTracker {
    timeout: Duration,
    pending: HashMap<u64, Instant>,
    /// (deadline, id) in submission order, which is deadline order (one timeout for all).
    order: VecDeque<(Instant, u64)>,
}

impl CommandTracker {
    /// A shard that has not answered within `timeout` is answered for with `TimedOut`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            pending: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Routes command `id` for `client_id`, received at `now`.
    pub fn submit(
        &mut self,
        directory: &Directory,
        now: Instant,
        id: u64,
        client_id: &str,
    ) -> Route {
        let Some(holder) = directory.lookup(client_id) else {
            return Route::Done(CommandOutcome::NotConnected);
        };
        let deadline = now + self.timeout;
        if self.pending.insert(id, deadline).is_none() {
            self.order.push_back((deadline, id));
        }
        Route::Shard(holder)
    }

    /// The shard's answer for `id`; `None` if it came after the timeout (already answered).
    pub fn on_answer(&mut self, id: u64, outcome: CommandOutcome) -> Option<CommandOutcome> {
        let answered = self.pending.remove(&id).map(|_| outcome);
        self.drop_answered();
        answered
    }

    /// Removes answered commands from the front of the deadline queue, so it holds only what
    /// is still pending (plus answered ones behind a pending one, bounded by the timeout).
    fn drop_answered(&mut self) {
        while let Some((deadline, id)) = self.order.front() {
            if self.pending.get(id) == Some(deadline) {
                break;
            }
            self.order.pop_front();
        }
    }

    /// Every command whose deadline has passed at `now`; each is answered `TimedOut`.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<u64> {
        let mut expired = Vec::new();
        while let Some(&(deadline, id)) = self.order.front() {
            if deadline > now {
                break;
            }
            self.order.pop_front();
            // Skip entries already answered (or re-submitted with a later deadline).
            if self.pending.get(&id) == Some(&deadline) {
                self.pending.remove(&id);
                expired.push(id);
            }
        }
        self.drop_answered();
        expired
    }

    /// When [`Self::handle_timeout`] must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        // The front is always pending (see `drop_answered`).
        self.order.front().map(|(d, _)| *d)
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_answered_or_timed_out_each_exactly_once() {
        let t0 = Instant::now();
        let mut dir = Directory::default();
        dir.claim("dev", Holder { shard: 1, conn: 7 }, None);
        let mut t = CommandTracker::new(Duration::from_secs(5));
        assert_eq!(
            t.submit(&dir, t0, 1, "other"),
            Route::Done(CommandOutcome::NotConnected)
        );
        assert_eq!(
            t.submit(&dir, t0, 2, "dev"),
            Route::Shard(Holder { shard: 1, conn: 7 })
        );
        assert_eq!(
            t.submit(&dir, t0 + Duration::from_secs(1), 3, "dev"),
            Route::Shard(Holder { shard: 1, conn: 7 })
        );
        assert_eq!(t.in_flight(), 2);
        assert_eq!(t.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(
            t.on_answer(2, CommandOutcome::Delivered),
            Some(CommandOutcome::Delivered)
        );
        assert_eq!(
            t.on_answer(2, CommandOutcome::Delivered),
            None,
            "answered once"
        );
        assert_eq!(t.poll_timeout(), Some(t0 + Duration::from_secs(6)));
        assert!(t.handle_timeout(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(t.handle_timeout(t0 + Duration::from_secs(6)), vec![3]);
        assert_eq!(t.on_answer(3, CommandOutcome::Delivered), None, "too late");
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.poll_timeout(), None);
        assert!(t.order.is_empty(), "nothing answered is kept");
    }
}
