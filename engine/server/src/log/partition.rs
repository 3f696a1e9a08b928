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

/// Why a record could not be made durable: the store's error. The batch it was in is dropped
/// (none of it was acknowledged), and the partition refuses appends for [`RETRY_AFTER`], then
/// tries again: a full disk stops acknowledgements at once and they resume once it has room.
#[derive(Debug, Clone, thiserror::Error)]
#[error("events log write failed: {0}")]
pub struct LogFailed(#[from] pub LogError);

/// Largest batch buffer kept for reuse.
const MAX_SPARE: usize = 8 << 20;
/// Open-batch size at which a commit starts without waiting out the commit window.
const FULL_BATCH: usize = 64 << 10;
/// Open-batch size past which appenders wait for the committer.
const MAX_OPEN: usize = 16 << 20;
/// How long a partition refuses appends after a failed write before it tries again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Failed batch ranges remembered for the sessions still to learn their batch failed.
const FAILURES_KEPT: usize = 64;

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
    /// Every batch `<= durable_id` is durable, except those in `failed_batches`.
    durable_id: u64,
    /// Ranges `(lo, hi]` of batch ids whose write failed (newest last), with the error.
    failed_batches: Vec<(u64, u64, LogFailed)>,
    /// While set and in the future, appends are refused with the last error.
    unavailable_until: Option<(Instant, LogFailed)>,
    /// After a failed write: the offset from which the store must be cleared before the next
    /// write (the failed one may have left something behind).
    discard_from: Option<u64>,
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
                failed_batches: Vec::new(),
                unavailable_until: None,
                discard_from: None,
                opened_at: None,
                waiters: Vec::new(),
                committer: None,
            }),
            stopping: Cell::new(false),
        }))
    }

    /// Adds a record to the open batch; returns the batch id to wait on with [`Self::durable`].
    // hot path: one memcpy into the open batch, no syscall; the committer does the I/O.
    pub fn append(&self, record: batch::Record<'_>) -> Result<u64, LogFailed> {
        let mut st = self.state.borrow_mut();
        if let Some((until, e)) = &st.unavailable_until {
            if Instant::now() < *until {
                return Err(e.clone());
            }
            st.unavailable_until = None;
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
            if let Some(e) = st.failure_of(id) {
                return Poll::Ready(Err(e));
            }
            if st.durable_id >= id {
                return Poll::Ready(Ok(()));
            }
            st.waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Whether appends are refused now (a write failed less than [`RETRY_AFTER`] ago).
    pub fn is_unavailable(&self) -> bool {
        self.state
            .borrow()
            .unavailable_until
            .as_ref()
            .is_some_and(|(until, _)| Instant::now() < *until)
    }

    /// Resolves once the open batch has room: appends past [`MAX_OPEN`] bytes wait for the
    /// committer, so a flood cannot grow memory without bound.
    pub async fn room(&self) {
        poll_fn(|cx| {
            let mut st = self.state.borrow_mut();
            if st.open.len() < MAX_OPEN || st.unavailable_until.is_some() {
                return Poll::Ready(());
            }
            st.waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Whether batch `id` is already durable (no waiting; a failed batch never is).
    pub fn is_durable(&self, id: u64) -> bool {
        let st = self.state.borrow();
        st.durable_id >= id && st.failure_of(id).is_none()
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
                    return Poll::Ready(Some(true));
                }
                if self.stopping.get() {
                    return Poll::Ready(None);
                }
                if st.discard_from.is_some() {
                    return Poll::Ready(Some(false));
                }
                st.committer = Some(cx.waker().clone());
                Poll::Pending
            })
            .await;
            match ready {
                None => return,
                Some(true) => {}
                Some(false) => {
                    // A failed write and nothing new to write: clearing what it may have left
                    // behind is the probe that tells when the store takes writes again.
                    self.probe(&metrics).await;
                    continue;
                }
            }
            // Group commit: at most one sync per window, so a trickle from many devices shares
            // its fsync; a batch already worth a sync of its own goes at once.
            if let Some(since) = last_start.map(|t| t.elapsed()) {
                if since < self.window && self.state.borrow().open.len() < FULL_BATCH {
                    glommio::timer::Timer::new(self.window - since).await;
                }
            }
            last_start = Some(Instant::now());
            let (records, first, id, count, opened_at, discard) = {
                let mut st = self.state.borrow_mut();
                let discard = st.discard_from.take();
                let spare = std::mem::take(&mut st.spare);
                let records = std::mem::replace(&mut st.open, spare);
                let count = std::mem::take(&mut st.open_len);
                let first = st.next_offset - count as u64;
                let id = st.open_id;
                st.open_id += 1;
                (records, first, id, count, st.opened_at.take(), discard)
            };
            let store = self.store.clone();
            let partition = self.partition;
            let sync = self.durability == Durability::Synced;
            let (result, mut records) = glommio::executor()
                .spawn_blocking(move || {
                    let written = discard
                        .map_or(Ok(()), |from| store.discard_from(partition, from))
                        .and_then(|()| store.write_batch(partition, first, &records, sync))
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
                    if metrics.log_unavailable.get() != 0 {
                        tracing::info!(partition = self.partition, "events log writes work again");
                        metrics.log_unavailable.set(0);
                    }
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
                    tracing::error!(partition = self.partition, error = %e.0, "events log write failed; refusing appends for {RETRY_AFTER:?}, then trying again");
                    metrics.log_write_failures.inc();
                    metrics.log_unavailable.set(1);
                    // Nothing of this batch, nor of what was appended behind it, was
                    // acknowledged: drop both, give their offsets back, and fail their waiters.
                    let open = std::mem::take(&mut st.open_len);
                    st.open.clear();
                    st.next_offset -= (count + open) as u64;
                    let through = st.open_id;
                    st.open_id += 1;
                    st.opened_at = None;
                    st.failed_batches.push((id - 1, through, e.clone()));
                    if st.failed_batches.len() > FAILURES_KEPT {
                        st.failed_batches.remove(0);
                    }
                    st.unavailable_until = Some((Instant::now() + RETRY_AFTER, e));
                    st.discard_from = Some(st.discard_from.map_or(first, |d| d.min(first)));
                }
            }
            for w in st.waiters.drain(..) {
                w.wake();
            }
        }
    }
}

impl Partition {
    /// After [`RETRY_AFTER`], clears the store from the failed offset; once that works the
    /// partition is available again.
    async fn probe(&self, metrics: &ShardMetrics) {
        let wait = self
            .state
            .borrow()
            .unavailable_until
            .as_ref()
            .map(|(until, _)| until.saturating_duration_since(Instant::now()))
            .unwrap_or(RETRY_AFTER);
        // Appends that come meanwhile are written by the loop after the probe.
        glommio::timer::Timer::new(wait.max(Duration::from_millis(10))).await;
        let Some(from) = self.state.borrow_mut().discard_from.take() else {
            return;
        };
        let store = self.store.clone();
        let partition = self.partition;
        let cleared = glommio::executor()
            .spawn_blocking(move || store.discard_from(partition, from))
            .await;
        let mut st = self.state.borrow_mut();
        match cleared {
            Ok(()) => {
                tracing::info!(partition, "events log writes work again");
                metrics.log_unavailable.set(0);
                st.unavailable_until = None;
            }
            Err(e) => {
                tracing::debug!(partition, error = %e, "events log still refuses writes");
                st.discard_from = Some(st.discard_from.map_or(from, |d| d.min(from)));
                st.unavailable_until = Some((Instant::now() + RETRY_AFTER, LogFailed(e)));
            }
        }
    }
}

impl State {
    fn failure_of(&self, id: u64) -> Option<LogFailed> {
        self.failed_batches
            .iter()
            .rev()
            .find(|(lo, hi, _)| *lo < id && id <= *hi)
            .map(|(_, _, e)| e.clone())
    }
}

#[cfg(test)]
mod tests {
    //! Simulated power losses under the real group commit (issue 7 §5): appends stream into a
    //! partition over [`PowerLossStore`], the power goes at a random moment, and after each
    //! "reboot" the log must hold every acknowledged record and be a dense prefix of what was
    //! appended. `Durability::Written` (acknowledged once written, not synced) must be caught
    //! losing acknowledged records, or the test could not fail.

    use std::cell::RefCell;
    use std::rc::Rc;
    use std::sync::Arc;
    use std::time::Duration;

    use glommio::{LocalExecutorBuilder, Placement};
    use roost_storage::fault::PowerLossStore;
    use roost_storage::{batch, LogStore};

    use super::{Durability, Partition};
    use crate::metrics::Metrics;

    const CYCLES: u64 = 60;

    /// xorshift: a repeatable random sequence without a dependency.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// One boot: append until the power goes; returns the offsets acknowledged.
    fn boot(store: Arc<PowerLossStore>, durability: Durability, seed: u64) -> Vec<u64> {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(1 << 20)
            .spawn(move || async move {
                let mut rng = seed | 1;
                let part =
                    Partition::open(store.clone(), 0, durability, Duration::from_micros(200))
                        .expect("open");
                let metrics = Rc::new(Metrics::new().shard(0));
                let committer = glommio::spawn_local(part.clone().run_committer(metrics));
                let acked = Rc::new(RefCell::new(Vec::new()));
                let mut offset = store.next_offset(0).expect("next");
                let appends = 50 + next(&mut rng) % 400;
                for _ in 0..appends {
                    let Ok(id) = part.append(batch::plain(&offset.to_le_bytes())) else {
                        break;
                    };
                    let (part, acked) = (part.clone(), acked.clone());
                    glommio::spawn_local(async move {
                        if part.durable(id).await.is_ok() {
                            acked.borrow_mut().push(offset);
                        }
                    })
                    .detach();
                    offset += 1;
                    if next(&mut rng) % 8 == 0 {
                        glommio::timer::Timer::new(Duration::from_micros(next(&mut rng) % 700))
                            .await;
                    }
                }
                glommio::timer::Timer::new(Duration::from_micros(next(&mut rng) % 2000)).await;
                // The power goes: of what was written and not synced, a random prefix survives.
                let keep = (next(&mut rng) % 3) as usize;
                store.power_loss(keep);
                let acked = acked.borrow().clone();
                // The write in flight fails (no power); the committer then stops.
                part.stop();
                committer.await;
                acked
            })
            .expect("executor")
            .join()
            .expect("boot")
    }

    /// Every record recovered, in offset order: its offset and the offset written into it.
    fn recovered(store: &PowerLossStore) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        store
            .scan(0, 0, &mut |first, value| {
                for (i, r) in batch::records(value).enumerate() {
                    let r = r.expect("record");
                    out.push((
                        first + i as u64,
                        u64::from_le_bytes(r.bytes.try_into().expect("8 bytes")),
                    ));
                }
                true
            })
            .expect("scan");
        out
    }

    /// Runs the cycles; returns how many acknowledged records were lost in all.
    fn cycles(durability: Durability) -> usize {
        let store = Arc::new(PowerLossStore::new(1));
        let mut lost = 0;
        let mut acked_total = 0;
        for cycle in 0..CYCLES {
            let acked = boot(store.clone(), durability, 0x9E37_79B9 ^ (cycle * 7919 + 1));
            store.power_on();
            let log = recovered(&store);
            for (i, (offset, written)) in log.iter().enumerate() {
                assert_eq!(
                    *offset, i as u64,
                    "cycle {cycle}: a hole before offset {offset}"
                );
                assert_eq!(
                    offset, written,
                    "cycle {cycle}: record {offset} holds {written}"
                );
            }
            let have = log.len() as u64;
            lost += acked.iter().filter(|o| **o >= have).count();
            acked_total += acked.len();
        }
        assert!(
            acked_total > 1000,
            "only {acked_total} acknowledgements: the cycles tested little"
        );
        println!("{CYCLES} power losses ({durability:?}): {acked_total} acknowledged, {lost} lost");
        lost
    }

    #[test]
    fn after_power_losses_the_log_is_a_dense_prefix_with_every_synced_acknowledgement() {
        assert_eq!(
            cycles(Durability::Synced),
            0,
            "an acknowledged record was lost"
        );
        assert!(
            cycles(Durability::Written) > 0,
            "acknowledging unsynced writes lost nothing: the power losses are not biting"
        );
    }
}
