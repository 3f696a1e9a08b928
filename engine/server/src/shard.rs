//! A shard: one glommio executor on one core, with its listeners, its connections, its log
//! partition and its counters. Nothing here is shared with another thread except through the
//! [`Shared`] context (read-only), the command channels and the router's input.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::Receiver;
use glommio::net::TcpListener;
use glommio::timer::Timer;
use glommio::{Latency, Shares, TaskQueueHandle};
use rkyv::util::AlignedVec;
use roost_model::link::{CommandOutcome, DeviceCommand, EngineFrame};
use roost_model::Message;
use roost_registry::Registry;
use roost_routing::Verdict;
use roost_session::quota::{Admit, Bucket, Limit, QuotaCell, Quotas};
use roost_session::{Deadlines, DisconnectReason, Holder, Identity, Inbox, PreAuthGate};
use roost_storage::LogStore;
use rustls::ServerConfig;

use crate::conn;
use crate::listeners::Protocol;
use crate::log::{Durability, Partition};
use crate::metrics::{Metrics, ShardMetrics, Transport};
use crate::router::{RouterInput, RouterTx};
use crate::routing::ShardRouting;
use crate::session::unix_now;
use crate::signal::Signal;
use crate::wire::{RxBuf, Wire};

/// Where [`Shard::store`] put a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// In the open batch with this id: durable once the batch is.
    Appended(u64),
    /// Nowhere: dropped or refused by a plugin, or matched no route and no fallback (counted
    /// by the routing).
    Nowhere,
}

/// Why [`Shard::store`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    Archive,
    /// The partition refuses appends (a failed write).
    Log,
}

/// This shard's routing from the engine's [`crate::routing::RoutesCell`] as it is now.
fn load_routing(shared: &Shared, shard: usize) -> Result<ShardRouting, (u64, String)> {
    let version = shared.routes.version();
    let source = shared.routes.get();
    ShardRouting::load(version, &source, &shared.hub_name).map_err(|e| {
        // The link loaded the same sources before putting them in force: a defect, or the
        // shard out of memory. Logged and counted; the caller keeps what it had.
        tracing::error!(shard, epoch = source.version, error = %e, "routing does not load on this shard");
        shared.metrics.routing_load_failures.inc();
        (version, e.to_string())
    })
}

/// Work sent to a shard from another thread.
#[derive(Debug)]
pub enum ShardCommand {
    /// Close connection `conn` (an engine-wide connection id) if it is still open. Ids are
    /// never reused, so a kick meant for a replaced connection cannot close its successor.
    Kick { conn: u64, reason: DisconnectReason },
    /// Put `command` into the inbox of connection `conn`; the outcome goes back to the router
    /// as command `id`'s answer.
    Deliver {
        id: u64,
        conn: u64,
        command: DeviceCommand,
    },
    /// Append `message` (an event control sends: twin change, lifecycle, connection state) to
    /// this shard's partition; `EventAppended { id }` goes to control once it is durable.
    Append {
        id: u64,
        message: Box<roost_model::message::Message>,
    },
    /// Run a device session for a connection another thread serves (AMQP).
    Bridge(Box<crate::bridge::Bridge>),
    /// Stop accepting, close every connection, flush the log and return.
    Shutdown,
}

/// Engine-wide, read-only context every shard holds.
pub struct Shared {
    pub hostname: String,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub log: Arc<dyn LogStore>,
    pub durability: Durability,
    pub commit_window: Duration,
    /// The engine's router: claims, releases, command answers and reports for control.
    pub router: RouterTx,
    /// Each shard's wake-up from outside (`nudge.rs`), by shard id.
    pub nudges: Vec<crate::nudge::Nudge>,
    /// The caps on unauthenticated connections, over every shard and listener.
    pub pre_auth: Arc<PreAuthGate>,
    /// The hub's quotas in force; each shard meters its share of the hub-wide rates.
    pub quotas: Arc<QuotaCell>,
    /// The CAs the hub trusts (`certificateAuthority` devices' chains end at one).
    pub cas: Arc<crate::link::CasCell>,
    /// The routing in force (`routes.lua` and plugins); each shard loads its own VM from it.
    pub routes: Arc<crate::routing::RoutesCell>,
    /// The hub's name (`$iothubname`): the first label of its host name.
    pub hub_name: String,
    /// How many shards the engine runs (the share of a hub-wide rate each meters).
    pub shards: usize,
    /// The clients' persistent sessions (CleanSession=0), engine-wide.
    pub sessions: Arc<crate::sessions::Sessions>,
    /// Where port 443 hands AMQP-over-WebSocket streams to the AMQP listener's thread (none
    /// without `--amqp`).
    pub amqp_tunnels: Option<tokio::sync::mpsc::UnboundedSender<crate::amqp::Tunnel>>,
    /// Calls of control (the HTTPS device API's C2D receive and settlement).
    pub services: Arc<crate::service_calls::ServiceCalls>,
}

/// A listener as a shard binds it.
#[derive(Clone)]
pub struct ShardListener {
    pub protocol: Protocol,
    pub addr: SocketAddr,
    pub tls: Option<Arc<ServerConfig>>,
}

/// What a connection shares with its shard: how to wake it, its deadline, its inbox.
#[derive(Default)]
pub struct ConnHandles {
    pub signal: Signal,
    deadline: Cell<Option<Instant>>,
    /// The deadline the connection is filed under in the shard's wheel, if any.
    filed: Cell<Option<Instant>>,
    pub inbox: RefCell<Inbox>,
    /// Whether the session takes direct method requests (an MQTT device subscribed to
    /// `$iothub/methods/POST/#`); one that does not gets none, and control answers 404103.
    pub takes_methods: Cell<bool>,
    /// Whether it takes cloud-to-device messages (subscribed to its devicebound topic).
    pub takes_c2d: Cell<bool>,
}

/// The shard's share of the hub's quotas, rebuilt whenever the quotas in force change.
struct ShardQuotas {
    version: u64,
    quotas: Quotas,
    /// New connections, metered at accept.
    connect: Option<Bucket>,
    /// Device-to-cloud messages of every connection of the shard.
    d2c: Option<Bucket>,
    /// Devices' twin reads and updates.
    twin_reads: Option<Bucket>,
    twin_updates: Option<Bucket>,
}

impl ShardQuotas {
    fn new(cell: &QuotaCell, shards: usize, now: Instant) -> Self {
        let version = cell.version();
        let quotas = cell.get();
        Self {
            version,
            connect: quotas.bucket(Limit::NewConnectionsPerSec, shards, now),
            d2c: quotas.bucket(Limit::D2cSendsPerSec, shards, now),
            twin_reads: quotas.bucket(Limit::TwinReadsPerSec, shards, now),
            twin_updates: quotas.bucket(Limit::TwinUpdatesPerSec, shards, now),
            quotas,
        }
    }
}

/// Where a connection's task runs: the task queue of connections not yet authenticated, or the
/// authenticated devices' (the executor's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    PreAuth,
    Devices,
}

/// The CPU share of the pre-authentication queue against the devices' (glommio's default,
/// 1,000): under a flood of handshakes and failing CONNECTs the authenticated devices get
/// about 95 % of a saturated shard, and all of an idle one is the flood's.
const PRE_AUTH_SHARES: usize = 50;

/// Per-shard state.
pub struct Shard {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub metrics: Rc<ShardMetrics>,
    pub log: Rc<Partition>,
    conns: RefCell<HashMap<u64, Rc<ConnHandles>>>,
    /// Client id (`device` or `device/module`) → its connection on this shard.
    clients: RefCell<HashMap<String, u64>>,
    next_conn: Cell<u64>,
    deadlines: RefCell<Deadlines<(u64, Instant)>>,
    /// Reused buffer for archiving records, so an append does not allocate.
    pub scratch: RefCell<AlignedVec>,
    /// The buffer every connection of the shard receives into (see `wire`).
    pub rx: RxBuf,
    quotas: RefCell<ShardQuotas>,
    /// This shard's routing (its own Lua VM), reloaded when the epoch's routes change.
    routing: RefCell<ShardRouting>,
    /// Connections run here until they authenticate (TLS handshake, CONNECT, its check).
    pre_auth_queue: TaskQueueHandle,
}

fn unix_ms() -> u64 {
    unix_now().as_millis() as u64
}

/// How often a shard flushes counters, drains commands and fires due deadlines; also the
/// precision of connection deadlines.
const TICK: Duration = Duration::from_millis(100);

impl Shard {
    /// Registers a new connection; returns its engine-wide id and its handles.
    pub fn register(&self) -> (u64, Rc<ConnHandles>) {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        let gid = ((self.id as u64) << 48) | n;
        let handles = Rc::new(ConnHandles::default());
        self.conns.borrow_mut().insert(gid, handles.clone());
        (gid, handles)
    }

    /// Sets connection `gid`'s next deadline. It is filed in the wheel only when it comes
    /// earlier than the one filed; a deadline that moves later is found when the earlier one
    /// fires (see `roost_session::Deadlines`).
    pub fn set_deadline(&self, gid: u64, handles: &ConnHandles, at: Option<Instant>) {
        handles.deadline.set(at);
        let Some(at) = at else { return };
        if handles.filed.get().is_some_and(|f| f <= at) {
            return;
        }
        handles.filed.set(Some(at));
        self.deadlines.borrow_mut().insert((gid, at), at);
    }

    fn fire_deadlines(&self, now: Instant) {
        let due = self.deadlines.borrow_mut().expired(now);
        if due.is_empty() {
            return;
        }
        let conns = self.conns.borrow();
        for (gid, at) in due {
            let Some(h) = conns.get(&gid) else { continue };
            if h.filed.get() != Some(at) {
                continue; // re-filed earlier since; that entry is the live one
            }
            h.filed.set(None);
            match h.deadline.get() {
                Some(d) if d <= now => h.signal.check_timeout(),
                Some(d) => {
                    h.filed.set(Some(d));
                    self.deadlines.borrow_mut().insert((gid, d), d);
                }
                None => {}
            }
        }
    }

    /// Records that `gid` is now `identity`'s connection: an earlier one of the same client id
    /// on this shard is closed at once, and the router (which knows every shard's) closes one
    /// elsewhere and tells control the client connected.
    pub fn claim(&self, identity: &Identity, gid: u64) {
        let client_id = identity.client_id();
        let previous = self.clients.borrow_mut().insert(client_id.clone(), gid);
        if let Some(old) = previous.filter(|old| *old != gid) {
            if let Some(e) = self.conns.borrow().get(&old) {
                e.signal.close(DisconnectReason::ReplacedByNewConnection);
            }
        }
        self.shared.router.send(RouterInput::Claimed {
            client_id,
            device_id: identity.device_id.clone(),
            module_id: identity.module_id.clone(),
            holder: Holder {
                shard: self.id,
                conn: gid,
            },
            ca: identity.ca.clone(),
            at_ms: unix_ms(),
        });
    }

    /// Connection `gid` ended; if it had authenticated as `identity`, its client id is released.
    pub fn unregister(&self, gid: u64, identity: Option<&Identity>) {
        self.conns.borrow_mut().remove(&gid);
        let Some(identity) = identity else { return };
        let client_id = identity.client_id();
        {
            let mut clients = self.clients.borrow_mut();
            if clients.get(&client_id) == Some(&gid) {
                clients.remove(&client_id);
            }
        }
        self.shared.router.send(RouterInput::Released {
            client_id,
            device_id: identity.device_id.clone(),
            module_id: identity.module_id.clone(),
            conn: gid,
            at_ms: unix_ms(),
        });
    }

    fn kick(&self, conn: u64, reason: DisconnectReason) {
        if let Some(e) = self.conns.borrow().get(&conn) {
            e.signal.close(reason);
        }
    }

    fn append_event(&self, id: u64, message: roost_model::message::Message) {
        let report = |appended| {
            self.shared
                .router
                .report(EngineFrame::EventAppended { id, appended })
        };
        let source = message.source.as_str();
        let batch = match self.store(message) {
            Ok(Stored::Appended(batch)) => batch,
            // Routed nowhere: nothing to wait for; control may forget it.
            Ok(Stored::Nowhere) => return report(true),
            Err(_) => return report(false),
        };
        self.metrics.hub_events.inc(source);
        let (log, router) = (self.log.clone(), self.shared.router.clone());
        glommio::spawn_local(async move {
            let appended = log.durable(batch).await.is_ok();
            router.report(EngineFrame::EventAppended { id, appended });
        })
        .detach();
    }

    fn deliver(&self, id: u64, conn: u64, command: DeviceCommand) {
        let kind = command.kind();
        let outcome = match self.conns.borrow().get(&conn) {
            None => CommandOutcome::NotConnected,
            // A disconnect takes effect at once: not behind a full inbox or a full window.
            Some(h) if matches!(command, DeviceCommand::Disconnect { .. }) => {
                h.signal.close(DisconnectReason::ClosedByService);
                CommandOutcome::Delivered
            }
            Some(h)
                if matches!(command, DeviceCommand::MethodRequest { .. })
                    && !h.takes_methods.get() =>
            {
                CommandOutcome::NotSubscribed
            }
            Some(h) if matches!(command, DeviceCommand::C2d { .. }) && !h.takes_c2d.get() => {
                CommandOutcome::NotSubscribed
            }
            Some(h) => match h.inbox.borrow_mut().push(command) {
                Ok(()) => {
                    h.signal.inbox();
                    CommandOutcome::Delivered
                }
                Err(_) => CommandOutcome::InboxFull,
            },
        };
        self.shared
            .router
            .send(RouterInput::CommandDone { id, kind, outcome });
    }

    fn close_all(&self, reason: DisconnectReason) {
        for e in self.conns.borrow().values() {
            e.signal.close(reason);
        }
    }

    fn connection_count(&self) -> usize {
        self.conns.borrow().len()
    }

    fn flush_routing(&self) {
        let shard = self.id.to_string();
        self.routing
            .borrow_mut()
            .flush(&self.shared.metrics.routing, &shard);
    }

    /// Loads the routing in force when it changed (from the shard's tick, so between messages).
    fn refresh_routing(&self) {
        let current = self.routing.borrow().cell_version;
        if current == self.shared.routes.version() {
            return;
        }
        let shard = self.id.to_string();
        self.routing
            .borrow_mut()
            .flush(&self.shared.metrics.routing, &shard);
        let version = match load_routing(&self.shared, self.id) {
            Ok(next) => {
                let v = next.cell_version;
                *self.routing.borrow_mut() = next;
                v
            }
            // Not retried every tick: the next epoch changes the version again.
            Err((version, _)) => {
                self.routing.borrow_mut().cell_version = version;
                version
            }
        };
        self.shared.routes.loaded(self.id, version);
    }

    /// Routes `message` and appends it once, with the endpoints it goes to, to the shard's
    /// partition. The routing may read the sender's twin (tags and properties): the registry entry of the
    /// message's device (`device/module` for a module).
    // hot path: no registry read unless the routing reads the twin; archive into the shard's
    // scratch buffer, one memcpy into the open batch.
    pub fn store(&self, message: Message) -> Result<Stored, StoreError> {
        let mut routing = self.routing.borrow_mut();
        let registry;
        let twin = if routing.needs_twin {
            registry = self.shared.registry.load();
            let s = &message.system;
            let entry = match &s.connection_module_id {
                None => registry.device(&s.connection_device_id),
                Some(m) => registry.device(&format!("{}/{m}", s.connection_device_id)),
            };
            entry.map_or("", |d| d.twin.as_str())
        } else {
            ""
        };
        let mut scratch = self.scratch.borrow_mut();
        let buf = std::mem::take(&mut *scratch);
        let (outcome, archived) = routing.route_and_archive(message, twin, buf);
        drop(routing);
        let buf = match archived {
            Ok(buf) => buf,
            Err(buf) => {
                *scratch = buf;
                return match outcome.verdict {
                    Verdict::Route if outcome.endpoints != 0 => Err(StoreError::Archive),
                    _ => Ok(Stored::Nowhere),
                };
            }
        };
        let batch = self.log.append(roost_storage::batch::Record {
            routed: true,
            bytes: &buf,
        });
        *scratch = buf;
        batch.map(Stored::Appended).map_err(|_| StoreError::Log)
    }

    /// Puts quotas that changed in force (from the shard's tick).
    fn refresh_quotas(&self, now: Instant) {
        if self.quotas.borrow().version != self.shared.quotas.version() {
            *self.quotas.borrow_mut() =
                ShardQuotas::new(&self.shared.quotas, self.shared.shards, now);
        }
    }

    /// The hub's quotas as this shard has them in force.
    pub fn quotas(&self) -> Quotas {
        self.quotas.borrow().quotas
    }

    /// Changes whenever [`Self::quotas`] does.
    pub fn quota_version(&self) -> u64 {
        self.quotas.borrow().version
    }

    /// Whether a new connection fits the shard's share of the new-connection rate. Not shaped:
    /// waiting would hold an unauthenticated socket, so one over the rate is closed at once.
    fn admit_connection(&self, now: Instant) -> bool {
        match self.quotas.borrow_mut().connect.as_mut() {
            None => true,
            Some(b) => b.take_now(now, 1.0),
        }
    }

    /// Meters one device-to-cloud message against the shard's share of the hub's send rate.
    pub fn meter_d2c(&self, now: Instant) -> Admit {
        match self.quotas.borrow_mut().d2c.as_mut() {
            None => Admit::Now,
            Some(b) => b.take(now, 1.0),
        }
    }

    /// Meters one device twin request (a read, or an update) against the shard's share of the
    /// hub's twin rates.
    pub fn meter_twin(&self, now: Instant, update: bool) -> Admit {
        let mut q = self.quotas.borrow_mut();
        let bucket = if update {
            q.twin_updates.as_mut()
        } else {
            q.twin_reads.as_mut()
        };
        bucket.map_or(Admit::Now, |b| b.take(now, 1.0))
    }

    /// Runs one connection's task in `queue`, behind an unwind boundary: a panic (a bug) ends
    /// that connection, is counted (`disconnects{reason="panicked"}`) and logged, and the shard
    /// goes on. The connection's session leaves the shard and the router as it is dropped (its
    /// `Drop`).
    pub fn spawn_connection(
        self: &Rc<Self>,
        queue: Queue,
        transport: Transport,
        task: impl std::future::Future<Output = ()> + 'static,
    ) {
        let shard = self.clone();
        let task = unwind_boundary(task, move || {
            shard
                .metrics
                .of(transport)
                .disconnects
                .inc(DisconnectReason::Panicked.error_code());
            tracing::error!(
                shard = shard.id,
                "a connection's task panicked; it was closed"
            );
        });
        let spawned = match queue {
            Queue::Devices => Ok(glommio::spawn_local(task)),
            Queue::PreAuth => glommio::spawn_local_into(task, self.pre_auth_queue),
        };
        match spawned {
            Ok(task) => {
                task.detach();
            }
            // The queue is the shard's own and lives as long as it: not expected.
            Err(e) => {
                tracing::error!(shard = self.id, error = %e, "cannot start a connection's task")
            }
        };
    }
}

/// Runs shard `id` until a [`ShardCommand::Shutdown`]. Reports on `ready` once it listens.
pub async fn run(
    id: usize,
    shared: Arc<Shared>,
    listeners: Vec<ShardListener>,
    commands: Receiver<ShardCommand>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let metrics = Rc::new(shared.metrics.shard(id));
    let log = match Partition::open(
        shared.log.clone(),
        id,
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
    let pre_auth_queue = glommio::executor().create_task_queue(
        Shares::Static(PRE_AUTH_SHARES),
        Latency::NotImportant,
        "pre-auth",
    );
    let quotas = RefCell::new(ShardQuotas::new(
        &shared.quotas,
        shared.shards,
        Instant::now(),
    ));
    let routing = load_routing(&shared, id).unwrap_or_else(|(version, _)| {
        let mut r = ShardRouting::default_routing(&shared.hub_name);
        r.cell_version = version;
        r
    });
    shared.routes.loaded(id, routing.cell_version);
    let routing = RefCell::new(routing);
    let shard = Rc::new(Shard {
        id,
        routing,
        shared,
        metrics,
        log,
        conns: RefCell::new(HashMap::new()),
        clients: RefCell::new(HashMap::new()),
        next_conn: Cell::new(0),
        deadlines: RefCell::new(Deadlines::new(Instant::now(), TICK)),
        scratch: RefCell::new(AlignedVec::new()),
        rx: RxBuf::new(),
        quotas,
        pre_auth_queue,
    });

    let mut acceptors = Vec::new();
    for l in &listeners {
        let listener = match TcpListener::bind(l.addr) {
            Ok(listener) => listener,
            Err(e) => {
                // A port below 1024 (IoT Hub's 443) without the right to bind it: say how to
                // choose another.
                let e = std::io::Error::from(e);
                let hint = match (e.kind(), l.addr.port()) {
                    (std::io::ErrorKind::PermissionDenied, p) if p < 1024 => format!(
                        "; port {p} needs root or CAP_NET_BIND_SERVICE: choose another with {}",
                        match l.protocol {
                            Protocol::Https => "--https ADDR",
                            Protocol::Mqtt => "--mqtt ADDR",
                        }
                    ),
                    _ => String::new(),
                };
                let _ = ready.send(Err(format!(
                    "shard {id}: cannot listen on {} ({}): {e}{hint}",
                    l.addr,
                    l.protocol.name()
                )));
                return;
            }
        };
        acceptors.push(glommio::spawn_local(accept_loop(
            shard.clone(),
            listener,
            l.clone(),
        )));
    }
    let _ = ready.send(Ok(()));
    tracing::debug!(shard = id, "shard listening");

    loop {
        Timer::new(TICK).await;
        let mut shutdown = false;
        while let Ok(cmd) = commands.try_recv() {
            match cmd {
                ShardCommand::Kick { conn, reason } => shard.kick(conn, reason),
                ShardCommand::Deliver { id, conn, command } => shard.deliver(id, conn, command),
                ShardCommand::Append { id, message } => shard.append_event(id, *message),
                ShardCommand::Bridge(bridge) => {
                    let on = shard.clone();
                    let transport = bridge.transport;
                    let task = crate::bridge::serve(on, *bridge);
                    shard.spawn_connection(Queue::Devices, transport, task);
                }
                ShardCommand::Shutdown => shutdown = true,
            }
        }
        let now = Instant::now();
        shard.refresh_quotas(now);
        shard.refresh_routing();
        shard.flush_routing();
        shard.fire_deadlines(now);
        shard.metrics.flush();
        if shutdown {
            break;
        }
    }

    for a in acceptors {
        a.cancel().await;
    }
    shard.close_all(DisconnectReason::ServerShutdown);
    // Give connections a moment to flush their last acknowledgements, bounded.
    let deadline = Instant::now() + Duration::from_secs(2);
    while shard.connection_count() > 0 && Instant::now() < deadline {
        Timer::new(Duration::from_millis(10)).await;
    }
    shard.log.stop();
    committer.await;
    shard.metrics.flush();
}

/// TCP keep-alive on every device connection: a peer that vanished without a FIN (a device
/// losing power, a NAT forgetting the flow) is found within about 3 minutes (probes after 2
/// minutes idle, every 20 s, 3 of them), even when the protocol's own idle limit is longer.
fn set_tcp_keepalive(stream: &glommio::net::TcpStream) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    #[allow(unsafe_code)]
    // SAFETY: the descriptor belongs to `stream`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(120))
        .with_interval(Duration::from_secs(20))
        .with_retries(3);
    socket2::SockRef::from(&fd).set_tcp_keepalive(&keepalive)
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, spec: ShardListener) {
    // Until a connection on port 443 upgrades, it counts as https.
    let transport = match spec.protocol {
        Protocol::Mqtt => Transport::Mqtt,
        Protocol::Https => Transport::Https,
    };
    let disconnects = &shard.metrics.of(transport).disconnects;
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(shard = shard.id, error = %e, "accept failed");
                Timer::new(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Before anything is read or allocated for it: within the new-connection rate and with
        // a place under the caps on unauthenticated connections, or closed at once.
        if !shard.admit_connection(Instant::now()) {
            disconnects.inc(DisconnectReason::ConnectThrottled.error_code());
            continue;
        }
        let source = match stream.peer_addr() {
            Ok(addr) => addr.ip(),
            Err(_) => {
                disconnects.inc(DisconnectReason::IoError.error_code());
                continue;
            }
        };
        let slot = match shard.shared.pre_auth.enter(source) {
            Ok(slot) => slot,
            Err(reason) => {
                disconnects.inc(reason.error_code());
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if let Err(e) = set_tcp_keepalive(&stream) {
            tracing::debug!(error = %e, "cannot set TCP keep-alive");
        }
        let wire = match &spec.tls {
            None => Wire::plain(stream),
            Some(cfg) => match Wire::tls(stream, cfg.clone()) {
                Ok(wire) => wire,
                Err(e) => {
                    tracing::warn!(shard = shard.id, error = %e, "cannot start TLS");
                    disconnects.inc(DisconnectReason::TlsHandshakeFailed.error_code());
                    continue;
                }
            },
        };
        match spec.protocol {
            Protocol::Mqtt => {
                shard.spawn_connection(
                    Queue::PreAuth,
                    transport,
                    conn::serve(shard.clone(), wire, slot),
                );
            }
            Protocol::Https => {
                shard.spawn_connection(
                    Queue::PreAuth,
                    transport,
                    crate::https::serve(shard.clone(), wire, slot),
                );
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A task with a panic inside it caught and turned into a call of `on_panic`.
    ///
    /// A future of its own rather than an `async fn`: the state of an `async fn` keeps its
    /// argument beside what it awaits, so a connection's task (kilobytes) was held twice —
    /// 4.6 KB allocated per idle connection where 2.3 KB are needed (heaptrack, 5,000 idle TLS
    /// connections; docs/benchmarks.md).
    struct UnwindBoundary<F, P> {
        #[pin]
        task: futures_lite::future::CatchUnwind<std::panic::AssertUnwindSafe<F>>,
        on_panic: Option<P>,
    }
}

impl<F: std::future::Future<Output = ()>, P: FnOnce()> std::future::Future
    for UnwindBoundary<F, P>
{
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.project();
        match this.task.poll(cx) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(result) => {
                if result.is_err() {
                    if let Some(on_panic) = this.on_panic.take() {
                        on_panic();
                    }
                }
                std::task::Poll::Ready(())
            }
        }
    }
}

/// `task`, with a panic inside it caught and turned into a call of `on_panic`.
fn unwind_boundary<F: std::future::Future<Output = ()>, P: FnOnce()>(
    task: F,
    on_panic: P,
) -> UnwindBoundary<F, P> {
    use futures_lite::FutureExt;
    UnwindBoundary {
        task: std::panic::AssertUnwindSafe(task).catch_unwind(),
        on_panic: Some(on_panic),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use glommio::{LocalExecutorBuilder, Placement};

    use super::unwind_boundary;

    /// Regression: the boundary around a connection's task held the task twice (an `async fn`
    /// keeps its argument beside what it awaits), doubling the memory of every connection.
    #[test]
    fn the_unwind_boundary_holds_its_task_once() {
        let task = async {
            let buf = [7u8; 1024];
            futures_lite::future::yield_now().await;
            std::hint::black_box(&buf);
        };
        let inner = std::mem::size_of_val(&task);
        assert!(inner >= 1024);
        let outer = std::mem::size_of_val(&unwind_boundary(task, || {}));
        assert!(
            outer < inner + 64,
            "the boundary is {outer} bytes around a {inner}-byte task"
        );
    }

    #[test]
    fn a_panicking_connection_task_is_caught_and_the_executor_goes_on() {
        let handle = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(1 << 20)
            .spawn(|| async {
                let caught = Rc::new(Cell::new(0));
                let c = caught.clone();
                let bug = glommio::spawn_local(unwind_boundary(
                    async {
                        glommio::yield_if_needed().await;
                        panic!("a bug in one connection");
                    },
                    move || c.set(c.get() + 1),
                ));
                let healthy = glommio::spawn_local(unwind_boundary(async {}, || {
                    unreachable!("no panic here")
                }));
                bug.await;
                healthy.await;
                // The executor still runs tasks after the panic.
                glommio::spawn_local(async { 42 }).await + caught.get()
            })
            .expect("executor");
        assert_eq!(handle.join().expect("the executor survived"), 43);
    }
}
