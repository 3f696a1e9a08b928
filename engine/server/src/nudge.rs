//! A periodic wake-up of every shard from outside, so a shard can never sleep for good.
//!
//! Why: glommio 0.9 can park an executor in `io_uring_enter` while it still has runnable
//! tasks — when its preemption check fires before any task queue ran, `run_task_queues`
//! reports "nothing ran" and the executor parks; if no timer or I/O is pending (the tasks are
//! already runnable), nothing wakes it again. Seen here as a shard that stopped reading a full
//! socket with its tick stopped and its threads asleep (the upstream fix is "do not park the
//! executor while a task queue is still runnable"). A foreign wake writes the executor's
//! eventfd, which ends such a sleep, so with this a stuck shard resumes within one period.
//!
//! What it is not: a timer service. The wake carries nothing; the shard's own tick does the
//! periodic work.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often every shard is woken from outside.
pub const PERIOD: Duration = Duration::from_millis(100);

/// One shard's wake-up handle: the waker of its listening task.
#[derive(Clone, Default)]
pub struct Nudge(Arc<Mutex<Option<Waker>>>);

impl Nudge {
    /// Runs on the shard for its lifetime: every wake re-arms the waker.
    pub async fn listen(self) {
        loop {
            let mut armed = false;
            poll_fn(|cx| {
                if armed {
                    return Poll::Ready(());
                }
                armed = true;
                if let Ok(mut slot) = self.0.lock() {
                    *slot = Some(cx.waker().clone());
                }
                Poll::Pending
            })
            .await;
        }
    }

    /// Wakes the shard's listening task (from any thread).
    pub fn nudge(&self) {
        if let Ok(slot) = self.0.lock() {
            if let Some(w) = slot.as_ref() {
                w.wake_by_ref();
            }
        }
    }
}

/// A thread that nudges every shard each [`PERIOD`] until dropped.
pub struct Nudger {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Nudger {
    pub fn start(nudges: Vec<Nudge>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("shard-nudge".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(PERIOD);
                    for n in &nudges {
                        n.nudge();
                    }
                }
            })?;
        Ok(Nudger {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Nudger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
