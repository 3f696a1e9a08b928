//! A shard: one glommio executor on one core, with its listeners, its connections, its log
//! partition and its counters. Nothing here is shared with another thread except through the
//! [`Shared`] context (read-only) and the command channels.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender};
use glommio::net::TcpListener;
use glommio::timer::Timer;
use glommio::{Latency, Shares};
use rkyv::util::AlignedVec;
use rocksdb::DB;
use roost_model::link::EngineFrame;
use roost_registry::Registry;
use rustls::ServerConfig;

use crate::conn;
use crate::log::{partition_cf, Durability, Partition};
use crate::metrics::{Metrics, ShardMetrics};
use crate::signal::Signal;
use crate::wire::{RxBuf, Wire};

/// Work sent to a shard from another thread.
#[derive(Debug, Clone)]
pub enum ShardCommand {
    /// Close the connection of `device_id` if it connected before `before` (commands travel
    /// slowly; a newer connection than the one that sent the kick must survive it).
    Kick {
        device_id: String,
        before: Instant,
        reason: &'static str,
    },
    /// Stop accepting, close every connection, flush the log and return.
    Shutdown,
}

/// Engine-wide, read-only context every shard holds.
pub struct Shared {
    pub hostname: String,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub db: Arc<DB>,
    pub durability: Durability,
    pub commit_window: Duration,
    pub link: tokio::sync::mpsc::UnboundedSender<EngineFrame>,
    pub shards: Vec<Sender<ShardCommand>>,
    /// Each shard's wake-up from outside (`nudge.rs`), by shard id.
    pub nudges: Vec<crate::nudge::Nudge>,
}

/// Where a shard listens.
#[derive(Clone)]
pub struct Listeners {
    pub mqtt_tls: Option<(SocketAddr, Arc<ServerConfig>)>,
    pub mqtt_plain: Option<SocketAddr>,
}

struct ConnEntry {
    signal: Rc<Signal>,
    deadline: Rc<Cell<Option<Instant>>>,
}

/// Per-shard state.
pub struct Shard {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub metrics: Rc<ShardMetrics>,
    pub log: Rc<Partition>,
    conns: RefCell<HashMap<u64, ConnEntry>>,
    /// Device → (connection id, when it authenticated).
    devices: RefCell<HashMap<String, (u64, Instant)>>,
    next_conn: Cell<u64>,
    /// Reused buffer for archiving records, so an append does not allocate.
    pub scratch: RefCell<AlignedVec>,
    /// The buffer every connection of the shard receives into (see `wire`).
    pub rx: RxBuf,
}

/// How often a shard flushes counters, drains commands and checks deadlines.
const TICK: Duration = Duration::from_millis(100);

impl Shard {
    /// Registers a new connection; returns its engine-wide id and its handles.
    pub fn register(&self) -> (u64, Rc<Signal>, Rc<Cell<Option<Instant>>>) {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        let gid = ((self.id as u64) << 48) | n;
        let signal = Rc::new(Signal::default());
        let deadline = Rc::new(Cell::new(None));
        self.conns.borrow_mut().insert(
            gid,
            ConnEntry {
                signal: signal.clone(),
                deadline: deadline.clone(),
            },
        );
        (gid, signal, deadline)
    }

    /// Records that `gid` is now `device_id`'s connection, closing any earlier one on this shard
    /// and asking every other shard to do the same (one connection per identity, spec §2.3).
    pub fn claim_device(&self, device_id: &str, gid: u64) {
        let now = Instant::now();
        let previous = self
            .devices
            .borrow_mut()
            .insert(device_id.to_string(), (gid, now));
        if let Some((old, _)) = previous.filter(|(old, _)| *old != gid) {
            if let Some(e) = self.conns.borrow().get(&old) {
                e.signal.close("replaced_by_new_connection");
            }
        }
        for (k, tx) in self.shared.shards.iter().enumerate() {
            if k != self.id {
                let _ = tx.send(ShardCommand::Kick {
                    device_id: device_id.to_string(),
                    before: now,
                    reason: "replaced_by_new_connection",
                });
            }
        }
    }

    pub fn unregister(&self, gid: u64, device_id: Option<&str>) {
        self.conns.borrow_mut().remove(&gid);
        if let Some(d) = device_id {
            let mut devices = self.devices.borrow_mut();
            if devices.get(d).is_some_and(|(g, _)| *g == gid) {
                devices.remove(d);
            }
        }
    }

    fn kick(&self, device_id: &str, before: Instant, reason: &'static str) {
        let Some((gid, since)) = self.devices.borrow().get(device_id).copied() else {
            return;
        };
        if since >= before {
            return;
        }
        if let Some(e) = self.conns.borrow().get(&gid) {
            e.signal.close(reason);
        }
    }

    fn close_all(&self, reason: &'static str) {
        for e in self.conns.borrow().values() {
            e.signal.close(reason);
        }
    }

    fn poke_expired(&self, now: Instant) {
        for e in self.conns.borrow().values() {
            if e.deadline.get().is_some_and(|d| d <= now) {
                e.signal.check_timeout();
            }
        }
    }

    fn connection_count(&self) -> usize {
        self.conns.borrow().len()
    }
}

/// Runs shard `id` until a [`ShardCommand::Shutdown`]. Reports on `ready` once it listens.
pub async fn run(
    id: usize,
    shared: Arc<Shared>,
    listeners: Listeners,
    commands: Receiver<ShardCommand>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let metrics = Rc::new(shared.metrics.shard(id));
    let log = match Partition::open(
        shared.db.clone(),
        partition_cf(id),
        shared.durability,
        shared.commit_window,
    ) {
        Ok(log) => log,
        Err(e) => {
            let _ = ready.send(Err(format!("shard {id}: {e}")));
            return;
        }
    };
    if let Some(n) = shared.nudges.get(id) {
        glommio::spawn_local(n.clone().listen()).detach();
    }
    // The committer runs in its own task queue: when its commit finishes it is scheduled by
    // its queue's (small) runtime, ahead of the connections' queue, instead of waiting behind
    // every runnable connection (PUBACK latency under load). Not `Latency::Matters`: that makes
    // every finished commit force an eventfd wake-up, which in glommio 0.9 can park a shard
    // that still has runnable tasks (see `nudge.rs`).
    let log_queue = glommio::executor().create_task_queue(
        Shares::default(),
        Latency::NotImportant,
        "log-committer",
    );
    let committer =
        match glommio::spawn_local_into(log.clone().run_committer(metrics.clone()), log_queue) {
            Ok(task) => task,
            Err(e) => {
                let _ = ready.send(Err(format!(
                    "shard {id}: cannot start the log committer: {e}"
                )));
                return;
            }
        };
    let shard = Rc::new(Shard {
        id,
        shared,
        metrics,
        log,
        conns: RefCell::new(HashMap::new()),
        devices: RefCell::new(HashMap::new()),
        next_conn: Cell::new(0),
        scratch: RefCell::new(AlignedVec::new()),
        rx: RxBuf::new(),
    });

    let mut acceptors = Vec::new();
    let mut bind = |addr: SocketAddr, tls: Option<Arc<ServerConfig>>| -> Result<(), String> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| format!("shard {id}: cannot listen on {addr}: {e}"))?;
        acceptors.push(glommio::spawn_local(accept_loop(
            shard.clone(),
            listener,
            tls,
        )));
        Ok(())
    };
    let bound = listeners
        .mqtt_tls
        .clone()
        .map_or(Ok(()), |(addr, tls)| bind(addr, Some(tls)))
        .and_then(|_| listeners.mqtt_plain.map_or(Ok(()), |addr| bind(addr, None)));
    if let Err(e) = bound {
        let _ = ready.send(Err(e));
        return;
    }
    let _ = ready.send(Ok(()));
    tracing::debug!(shard = id, "shard listening");

    loop {
        Timer::new(TICK).await;
        let mut shutdown = false;
        while let Ok(cmd) = commands.try_recv() {
            match cmd {
                ShardCommand::Kick {
                    device_id,
                    before,
                    reason,
                } => shard.kick(&device_id, before, reason),
                ShardCommand::Shutdown => shutdown = true,
            }
        }
        shard.poke_expired(Instant::now());
        shard.metrics.flush();
        if shutdown {
            break;
        }
    }

    for a in acceptors {
        a.cancel().await;
    }
    shard.close_all("server_shutdown");
    // Give connections a moment to flush their last acknowledgements, bounded.
    let deadline = Instant::now() + Duration::from_secs(2);
    while shard.connection_count() > 0 && Instant::now() < deadline {
        Timer::new(Duration::from_millis(10)).await;
    }
    shard.log.stop();
    committer.await;
    shard.metrics.flush();
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, tls: Option<Arc<ServerConfig>>) {
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(shard = shard.id, error = %e, "accept failed");
                Timer::new(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let wire = match &tls {
            None => Wire::plain(stream),
            Some(cfg) => match Wire::tls(stream, cfg.clone()) {
                Ok(wire) => wire,
                Err(e) => {
                    tracing::warn!(shard = shard.id, error = %e, "cannot start TLS");
                    shard.metrics.disconnects.inc("tls_handshake_failed");
                    continue;
                }
            },
        };
        glommio::spawn_local(conn::serve(shard.clone(), wire)).detach();
    }
}
