//! roost-endpoints: the dispatchers of the external endpoints (DESIGN.md §2, §5).
//!
//! What it is: a message is stored once, in the engine's `events` log, with the names of the
//! endpoints its routes matched. For each endpoint of another kind than the built-in one, a
//! [`dispatcher::Dispatcher`] on a thread of its own tails every partition of that log from the
//! endpoint's durable checkpoint (a consumer group named `$endpoint:<name>`), hands the records
//! routed there to the endpoint's [`sink::Sink`] in batches, retries a failed batch with
//! backoff, and moves the checkpoint once the destination acknowledged it. Sinks: `webhook`
//! (HTTP POST of a JSON array), `file` (rotating NDJSON), `nats` (JetStream publish, acked by
//! the stream), `mqtt` (republish to an external broker, QoS 0 or 1).
//!
//! Delivery is at least once: after a crash between an acknowledgement and the checkpoint the
//! batch is sent again; every record carries its partition and offset, and NATS gets a
//! `Nats-Msg-Id` so the stream drops the repeat. A dead endpoint holds its own thread only:
//! ingest and the other endpoints never wait for it, and its backlog is the log itself, bounded
//! by retention (what retention deletes first is counted as expired).
//!
//! What it is not: on the message path. Shards never call it; [`Dispatchers::reconcile`] runs
//! when an epoch is applied. No glommio and no RocksDB here (the log is a
//! [`roost_storage::LogStore`]); the webhook sink runs a small tokio runtime of its own.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use roost_routing::config::{Endpoint, EndpointKind};
use roost_storage::{LogError, LogStore};

pub mod dispatcher;
pub mod item;
pub mod metrics;
pub mod sink;

pub use dispatcher::{group_of, is_reserved_group, Pace, Stop};
pub use metrics::EndpointMetrics;

struct Running {
    kind: EndpointKind,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

/// The running dispatchers, one per external endpoint of the epoch in force.
pub struct Dispatchers {
    log: Arc<dyn LogStore>,
    metrics: EndpointMetrics,
    /// Relative file-endpoint paths are taken from here (the hub's data directory).
    base: PathBuf,
    tls: Option<Arc<rustls::ClientConfig>>,
    pace: Pace,
    running: Mutex<HashMap<String, Running>>,
}

impl Dispatchers {
    pub fn new(
        log: Arc<dyn LogStore>,
        metrics: EndpointMetrics,
        base: PathBuf,
        tls: Option<Arc<rustls::ClientConfig>>,
        pace: Pace,
    ) -> Self {
        Dispatchers {
            log,
            metrics,
            base,
            tls,
            pace,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Makes the running dispatchers those of `endpoints`: a new endpoint gets a checkpoint at
    /// the log's end and a dispatcher; one whose settings changed gets a new dispatcher that
    /// starts once the old one has stopped, from the same checkpoint; one gone is stopped (its
    /// checkpoint stays, so an endpoint put back resumes where it was). Call it before the
    /// epoch is in force on the shards. Fails only if the checkpoints cannot be written.
    pub fn reconcile(&self, endpoints: &[Endpoint]) -> Result<(), LogError> {
        let external: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| e.kind != EndpointKind::Builtin)
            .collect();
        for e in &external {
            dispatcher::start_at_end(self.log.as_ref(), &e.name)?;
        }
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|name, r| {
            let keep = external.iter().any(|e| &e.name == name);
            if !keep {
                r.stop.stop();
                self.metrics.forget(name, r.kind.label());
                tracing::info!(endpoint = %name, "endpoint removed; its dispatcher stops");
            }
            keep
        });
        for e in external {
            let previous = match running.get_mut(&e.name) {
                Some(r) if r.kind == e.kind => continue,
                Some(r) => {
                    r.stop.stop();
                    if r.kind.label() != e.kind.label() {
                        self.metrics.forget(&e.name, r.kind.label());
                    }
                    r.thread.take()
                }
                None => None,
            };
            let stop = Arc::new(Stop::default());
            let thread = self.spawn(e, stop.clone(), previous);
            running.insert(
                e.name.clone(),
                Running {
                    kind: e.kind.clone(),
                    stop,
                    thread,
                },
            );
        }
        Ok(())
    }

    /// The endpoints with a running dispatcher, sorted.
    pub fn names(&self) -> Vec<String> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = running.keys().cloned().collect();
        names.sort();
        names
    }

    /// Stops every dispatcher and waits for them (each ends its current attempt first).
    pub fn stop_all(&self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        for r in running.values() {
            r.stop.stop();
        }
        for (_, mut r) in running.drain() {
            if let Some(t) = r.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn spawn(
        &self,
        e: &Endpoint,
        stop: Arc<Stop>,
        previous: Option<JoinHandle<()>>,
    ) -> Option<JoinHandle<()>> {
        let (name, kind) = (e.name.clone(), e.kind.clone());
        let (log, base, tls, pace) = (
            self.log.clone(),
            self.base.clone(),
            self.tls.clone(),
            self.pace,
        );
        let series = self.metrics.series(&name, kind.label());
        let spawned = std::thread::Builder::new()
            .name(format!("endpoint-{name}"))
            .spawn(move || {
                if let Some(p) = previous {
                    let _ = p.join();
                }
                // A sink that cannot be set up (a directory that cannot be made) is tried
                // again like a failed delivery.
                let mut wait = pace.backoff;
                let sink = loop {
                    match sink::open(&name, &kind, &base, tls.clone()) {
                        Ok(s) => break s,
                        Err(e) => {
                            series.failures(e.error_code()).inc();
                            tracing::warn!(endpoint = %name, error = %e, "cannot set up the endpoint; retrying");
                        }
                    }
                    if stop.sleep(wait) {
                        return;
                    }
                    wait = (wait * 2).min(pace.max_backoff);
                };
                tracing::info!(endpoint = %name, kind = kind.label(), "endpoint dispatcher started");
                dispatcher::Dispatcher {
                    name,
                    log,
                    sink,
                    series,
                    stop,
                    pace,
                }
                .run();
            });
        match spawned {
            Ok(t) => Some(t),
            Err(err) => {
                tracing::error!(endpoint = %e.name, error = %err, "cannot start the endpoint's thread");
                None
            }
        }
    }
}

impl Drop for Dispatchers {
    fn drop(&mut self) {
        self.stop_all();
    }
}
