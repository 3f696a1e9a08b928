//! A shard-local wake-up for one connection: asks it to close (with a reason) or to check its
//! timers. Single-threaded by construction (`Cell`, `RefCell`), like everything on a shard.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// What woke the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Close now; the reason is a metric label.
    Close(&'static str),
    /// A deadline may have passed: ask the session.
    CheckTimeout,
}

#[derive(Default)]
pub struct Signal {
    close: Cell<Option<&'static str>>,
    check_timeout: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Signal {
    pub fn close(&self, reason: &'static str) {
        if self.close.get().is_none() {
            self.close.set(Some(reason));
        }
        self.wake();
    }

    pub fn check_timeout(&self) {
        self.check_timeout.set(true);
        self.wake();
    }

    /// The close request, if any, without waiting: a connection flooded with input checks this
    /// each turn, since its read never pends and so never yields to [`Signal::wait`].
    pub fn pending_close(&self) -> Option<&'static str> {
        self.close.get()
    }

    fn wake(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub async fn wait(&self) -> Wake {
        poll_fn(|cx| {
            if let Some(reason) = self.close.get() {
                return Poll::Ready(Wake::Close(reason));
            }
            if self.check_timeout.replace(false) {
                return Poll::Ready(Wake::CheckTimeout);
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}
