//! One shard's partition of the events log and its group-commit loop.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use roost_storage::{batch, LogError, LogStore};

use crate::metrics::ShardMetrics;

/// How durable an acknowledged message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The WAL is fsynced before the PUBACK: survives a power cut.
    Synced,
    /// The WAL is written (to the page cache) before the PUBACK: survives `kill -9`, not a power cut.
    Written,
}

/// Why a record could not be made durable: the store's error, after which the partition
/// refuses further appends.
#[derive(Debug, Clone, thiserror::Error)]
#[error("events log write failed: {0}")]
pub struct LogFailed(#[from] pub LogError);

/// Largest batch buffer kept for reuse.
const MAX_SPARE: usize = 8 << 20;
/// Open-batch size at which a commit starts without waiting out the commit window.
const FULL_BATCH: usize = 64 << 10;
/// Open-batch size past which appenders wait for the committer.
const MAX_OPEN: usize = 16 << 20;

struct State {
    next_offset: u64,
    /// Records of the open batch, back to back (see [`batch`]).
    open: Vec<u8>,
    /// The previous batch's buffer, back from the committer, reused so a busy partition does
    /// not fault in fresh pages for every batch.
    spare: Vec<u8>,
    open_len: usize,
    /// Id of the batch new appends go into; batches `< open_id` are closed.
    open_id: u64,
    /// Every batch `<= durable_id` is durable.
    durable_id: u64,
    failed: Option<LogFailed>,
    opened_at: Option<Instant>,
    waiters: Vec<Waker>,
    committer: Option<Waker>,
}

/// A shard's partition: cheap appends on the shard, durability from [`Partition::run_committer`].
pub struct Partition {
    store: Arc<dyn LogStore>,
    partition: usize,
    durability: Durability,
    /// Shortest time between the starts of two commits (see [`Partition::run_committer`]).
    window: Duration,
    state: RefCell<State>,
    stopping: Cell<bool>,
}

impl Partition {
    /// Opens partition `partition` of `store`, resuming after its last stored offset.
    pub fn open(
        store: Arc<dyn LogStore>,
        partition: usize,
        durability: Durability,
        window: Duration,
    ) -> Result<Rc<Self>, LogFailed> {
        let next_offset = store.next_offset(partition)?;
        Ok(Rc::new(Self {
            store,
            partition,
            durability,
            window,
            state: RefCell::new(State {
                next_offset,
                open: Vec::new(),
                spare: Vec::new(),
                open_len: 0,
                open_id: 1,
                durable_id: 0,
                failed: None,
                opened_at: None,
                waiters: Vec::new(),
                committer: None,
            }),
            stopping: Cell::new(false),
        }))
    }

    /// Adds a record to the open batch; returns the batch id to wait on with [`Self::durable`].
    // hot path: one memcpy into the open batch, no syscall; the committer does the I/O.
    pub fn append(&self, record: &[u8]) -> Result<u64, LogFailed> {
        let mut st = self.state.borrow_mut();
        if let Some(f) = &st.failed {
            return Err(f.clone());
        }
        batch::push(&mut st.open, record);
        st.next_offset += 1;
        st.open_len += 1;
        if st.opened_at.is_none() {
            st.opened_at = Some(Instant::now());
        }
        if let Some(w) = st.committer.take() {
            w.wake();
        }
        Ok(st.open_id)
    }

    /// Resolves once batch `id` is durable, or with the error that stopped the log.
    pub async fn durable(&self, id: u64) -> Result<(), LogFailed> {
        poll_fn(|cx| {
            let mut st = self.state.borrow_mut();
            if st.durable_id >= id {
                return Poll::Ready(Ok(()));
            }
            if let Some(f) = &st.failed {
                return Poll::Ready(Err(f.clone()));
            }
            st.waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Resolves once the open batch has room: appends past [`MAX_OPEN`] bytes wait for the
    /// committer, so a flood cannot grow memory without bound.
    pub async fn room(&self) {
        poll_fn(|cx| {
            let mut st = self.state.borrow_mut();
            if st.open.len() < MAX_OPEN || st.failed.is_some() {
                return Poll::Ready(());
            }
            st.waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Whether batch `id` is already durable (no waiting).
    pub fn is_durable(&self, id: u64) -> bool {
        self.state.borrow().durable_id >= id
    }

    /// Asks the committer to write what is open and then return.
    pub fn stop(&self) {
        self.stopping.set(true);
        if let Some(w) = self.state.borrow_mut().committer.take() {
            w.wake();
        }
    }

    /// The group-commit loop: one per partition, spawned on its shard.
    pub async fn run_committer(self: Rc<Self>, metrics: Rc<ShardMetrics>) {
        let mut last_start: Option<Instant> = None;
        loop {
            let ready = poll_fn(|cx| {
                let mut st = self.state.borrow_mut();
                if st.open_len > 0 {
                    return Poll::Ready(true);
                }
                if self.stopping.get() {
                    return Poll::Ready(false);
                }
                st.committer = Some(cx.waker().clone());
                Poll::Pending
            })
            .await;
            if !ready {
                return;
            }
            // Group commit: at most one sync per window, so a trickle from many devices shares
            // its fsync; a batch already worth a sync of its own goes at once.
            if let Some(since) = last_start.map(|t| t.elapsed()) {
                if since < self.window && self.state.borrow().open.len() < FULL_BATCH {
                    glommio::timer::Timer::new(self.window - since).await;
                }
            }
            last_start = Some(Instant::now());
            let (records, first, id, count, opened_at) = {
                let mut st = self.state.borrow_mut();
                let spare = std::mem::take(&mut st.spare);
                let records = std::mem::replace(&mut st.open, spare);
                let count = std::mem::take(&mut st.open_len);
                let first = st.next_offset - count as u64;
                let id = st.open_id;
                st.open_id += 1;
                (records, first, id, count, st.opened_at.take())
            };
            let store = self.store.clone();
            let partition = self.partition;
            let sync = self.durability == Durability::Synced;
            let (result, mut records) = glommio::executor()
                .spawn_blocking(move || {
                    let written = store
                        .write_batch(partition, first, &records, sync)
                        .map_err(LogFailed::from);
                    (written, records)
                })
                .await;
            let mut st = self.state.borrow_mut();
            // A burst's huge buffer is not kept for good.
            if records.capacity() <= MAX_SPARE {
                records.clear();
                st.spare = records;
            }
            match result {
                Ok(()) => {
                    st.durable_id = id;
                    metrics.log_appends.inc_by(count as u64);
                    metrics.log_commits.inc();
                    if let Some(t) = opened_at {
                        metrics
                            .log_append_latency
                            .observe(t.elapsed().as_secs_f64());
                    }
                }
                Err(e) => {
                    tracing::error!(partition = self.partition, error = %e.0, "events log write failed; refusing further appends");
                    st.failed = Some(e);
                }
            }
            for w in st.waiters.drain(..) {
                w.wake();
            }
            if st.failed.is_some() {
                return;
            }
        }
    }
}
