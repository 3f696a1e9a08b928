//! A shard-local wake-up for one connection: asks it to close (with a reason), to check its
//! deadline, or to drain its inbox. Single-threaded by construction (`Cell`, `RefCell`), like
//! everything on a shard.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

use roost_session::DisconnectReason;

/// What woke the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Close now.
    Close(DisconnectReason),
    /// A deadline may have passed: ask the session.
    CheckTimeout,
    /// A command arrived in the session's inbox.
    Inbox,
}

#[derive(Default)]
pub struct Signal {
    close: Cell<Option<DisconnectReason>>,
    check_timeout: Cell<bool>,
    inbox: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Signal {
    pub fn close(&self, reason: DisconnectReason) {
        if self.close.get().is_none() {
            self.close.set(Some(reason));
        }
        self.wake();
    }

    pub fn check_timeout(&self) {
        self.check_timeout.set(true);
        self.wake();
    }

    pub fn inbox(&self) {
        self.inbox.set(true);
        self.wake();
    }

    /// The close request, if any, without waiting: a connection flooded with input checks this
    /// each turn, since its read never pends and so never yields to [`Signal::wait`].
    pub fn pending_close(&self) -> Option<DisconnectReason> {
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
            if self.inbox.replace(false) {
                return Poll::Ready(Wake::Inbox);
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}
