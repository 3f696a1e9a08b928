//! One endpoint's dispatcher: tails every partition of the log from the endpoint's durable
//! checkpoint, hands the records routed there to its [`Sink`] in batches, and moves the
//! checkpoint only once a batch is delivered. A failed batch is tried again, with backoff,
//! until it goes through or retention deletes it; at-least-once, so a crash between delivery
//! and checkpoint sends that batch again (each record carries its partition and offset).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use roost_storage::{LogError, LogStore};

use crate::item;
use crate::metrics::EndpointSeries;
use crate::sink::{Sink, SinkError};

/// The checkpoint group of endpoint `name`. Consumer groups of the ops API cannot start with
/// `$endpoint:` ([`is_reserved_group`]).
pub fn group_of(name: &str) -> String {
    format!("{RESERVED_PREFIX}{name}")
}

const RESERVED_PREFIX: &str = "$endpoint:";

/// Whether consumer group `group` belongs to an endpoint's dispatcher.
pub fn is_reserved_group(group: &str) -> bool {
    group.starts_with(RESERVED_PREFIX)
}

/// How long to wait between tries and between polls of an idle log.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// A poll that found nothing new waits this long before the next.
    pub idle: Duration,
    /// The first retry of a failed batch waits this long, doubling up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            idle: Duration::from_millis(20),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// A flag that ends a dispatcher, waking it from any wait.
#[derive(Default)]
pub struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    pub fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits `d` or until stopped; true when stopped.
    pub fn sleep(&self, d: Duration) -> bool {
        let guard = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .wake
            .wait_timeout_while(guard, d, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// Makes sure endpoint `name` has a checkpoint in every partition: a new endpoint starts at
/// the log's current end, since no record before it can have been routed to it. Called
/// before the epoch that adds the endpoint is in force on any shard.
pub fn start_at_end(log: &dyn LogStore, name: &str) -> Result<(), LogError> {
    let group = group_of(name);
    let mut missing = Vec::new();
    for p in 0..log.partition_count() {
        if log.checkpoint(&group, p)?.is_none() {
            missing.push((p, log.next_offset(p)?));
        }
    }
    match missing.is_empty() {
        true => Ok(()),
        false => log.commit_checkpoint(&group, &missing),
    }
}

pub struct Dispatcher {
    pub name: String,
    pub log: Arc<dyn LogStore>,
    pub sink: Box<dyn Sink>,
    pub series: EndpointSeries,
    pub stop: Arc<Stop>,
    pub pace: Pace,
}

impl Dispatcher {
    /// Runs until stopped.
    pub fn run(mut self) {
        let group = group_of(&self.name);
        let partitions = self.log.partition_count();
        let mut next = vec![0u64; partitions];
        for (p, n) in next.iter_mut().enumerate() {
            *n = self.log.checkpoint(&group, p).ok().flatten().unwrap_or(0);
        }
        let mut warned_at: Option<Instant> = None;
        while !self.stop.is_stopped() {
            let mut moved = false;
            for p in 0..partitions {
                match self.pass(&group, p, &mut next, &mut warned_at) {
                    Ok(m) => moved |= m,
                    Err(e) => {
                        self.series.failures(e.error_code()).inc();
                        tracing::warn!(endpoint = %self.name, partition = p, error = %e, "reading the events log failed");
                        self.stop
                            .sleep(self.pace.max_backoff.min(Duration::from_secs(1)));
                    }
                }
                if self.stop.is_stopped() {
                    return;
                }
            }
            self.series.lag.set(self.lag(&next) as i64);
            if !moved && self.stop.sleep(self.pace.idle) {
                return;
            }
        }
    }

    /// Records of `p` not yet looked at, summed.
    fn lag(&self, next: &[u64]) -> u64 {
        next.iter()
            .enumerate()
            .map(|(p, n)| {
                self.log
                    .next_offset(p)
                    .map_or(0, |end| end.saturating_sub(*n))
            })
            .sum()
    }

    /// One batch of partition `p`: read, deliver (retrying), checkpoint. True when it moved.
    fn pass(
        &mut self,
        group: &str,
        p: usize,
        positions: &mut [u64],
        warned_at: &mut Option<Instant>,
    ) -> Result<bool, LogError> {
        let next = positions[p];
        let end = self.log.next_offset(p)?;
        if next >= end {
            return Ok(false);
        }
        let first = self.log.first_offset(p, end)?;
        if next < first {
            self.series.expired.inc_by(first - next);
            tracing::warn!(endpoint = %self.name, partition = p, records = first - next, "retention deleted records before this endpoint took them");
            positions[p] = first;
        }
        let (items, read_to) = item::read(
            &self.log,
            p,
            positions[p],
            &self.name,
            self.sink.form(),
            self.sink.batch(),
        )?;
        if !items.is_empty() && !self.deliver(&items, positions, warned_at) {
            return Ok(false); // stopped
        }
        self.log.commit_checkpoint(group, &[(p, read_to)])?;
        positions[p] = read_to;
        Ok(true)
    }

    /// Delivers `items`, retrying with backoff (the lag shown meanwhile is from `positions`);
    /// false if stopped first.
    fn deliver(
        &mut self,
        items: &[crate::item::Item],
        positions: &[u64],
        warned_at: &mut Option<Instant>,
    ) -> bool {
        let mut wait = self.pace.backoff;
        loop {
            let started = Instant::now();
            match self.sink.deliver(items) {
                Ok(()) => {
                    self.series.seconds.observe(started.elapsed().as_secs_f64());
                    self.series.deliveries.inc_by(items.len() as u64);
                    if warned_at.take().is_some() {
                        tracing::info!(endpoint = %self.name, "endpoint delivers again");
                    }
                    return true;
                }
                Err(e) => {
                    self.series.failures(e.error_code()).inc();
                    self.series.lag.set(self.lag(positions) as i64);
                    self.warn(&e, warned_at);
                }
            }
            if self.stop.sleep(wait) {
                return false;
            }
            wait = (wait * 2).min(self.pace.max_backoff);
        }
    }

    /// One warning per minute while an endpoint keeps failing.
    fn warn(&self, e: &SinkError, warned_at: &mut Option<Instant>) {
        if warned_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            tracing::warn!(endpoint = %self.name, error = %e, "endpoint delivery failed; retrying with backoff");
            *warned_at = Some(Instant::now());
        }
    }
}
