//! Control's end of the QUIC control link: brings each engine's registry replica up to date
//! (deltas from the change log when it has them, a snapshot otherwise), streams new changes in
//! order, keeps every engine on control's config epoch (sent after `Hello`, re-sent when a
//! heartbeat shows another, not re-sent once rejected), records the connection state engines
//! report, and carries commands for a device session to the engine holding it ([`Commands`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roost_common::link::LinkError;
use roost_model::link::{
    CommandOutcome, ControlFrame, DeviceCommand, EngineFrame, Epoch, EpochHash, FrameError,
    ServiceReply, ServiceRequest, TwinOp,
};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot, watch};

use roost_common::link::read_frame_body;
use roost_iothub::time::iso_ms;

use crate::api::iso_now;
use crate::c2d::C2d;
use crate::methods::Methods;
use crate::metrics::ControlMetrics;
use crate::store::{Store, StoreError};
use crate::twins::Twins;

/// Most registry changes sent in one `Deltas` frame.
const MAX_DELTAS_PER_FRAME: usize = 1024;

/// Why an engine's link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkClosed {
    #[error("link connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("reading from the engine: {0}")]
    Read(#[from] LinkError),
    #[error("the engine sent a frame that is not one: {0}")]
    Frame(#[from] FrameError),
    #[error("expected Hello first, got a {0} frame")]
    NoHello(&'static str),
    #[error("writing to the engine: {0}")]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the engine closed the link")]
    EngineClosed,
    #[error("control is stopping")]
    Stopping,
    #[error("the store's change feed closed")]
    StoreClosed,
}

/// An epoch a heartbeat says an engine lacks is re-sent at most this often.
const EPOCH_RESEND: Duration = Duration::from_secs(5);

pub struct LinkServer {
    pub store: Arc<Store>,
    pub metrics: Arc<ControlMetrics>,
    /// The config epoch every engine should run.
    pub epoch: watch::Sender<Epoch>,
    /// What each linked engine said of the epochs it was sent (`GET /roost/routes`).
    pub verdicts: Arc<crate::routes::Verdicts>,
    pub commands: Arc<Commands>,
    pub twins: Arc<Twins>,
    pub methods: Arc<Methods>,
    pub c2d: Arc<C2d>,
    pub events: Arc<crate::events::HubEvents>,
    /// The service API, for service requests that reached an engine's port 443.
    pub api: Arc<crate::api::Api>,
    /// File uploads, when a blob store is configured.
    pub files: Option<Arc<crate::files::FileUploads>>,
}

/// Twin requests one engine may have queued at control; past it one is answered at once with
/// 503 (the engine caps what it sends too).
const TWIN_QUEUE: usize = 4096;

/// A device's twin request as control queues it.
struct TwinJob {
    device_id: String,
    module_id: Option<String>,
    rid: String,
    op: TwinOp,
}

impl TwinJob {
    fn client_id(&self) -> String {
        match &self.module_id {
            Some(m) => format!("{}/{m}", self.device_id),
            None => self.device_id.clone(),
        }
    }
}

/// Commands for device sessions: which link holds which device, and who waits for which answer.
#[derive(Default)]
pub struct Commands {
    next_id: AtomicU64,
    links: Mutex<HashMap<u64, LinkEntry>>,
    waiting: Mutex<HashMap<u64, oneshot::Sender<CommandOutcome>>>,
}

struct LinkEntry {
    frames: mpsc::UnboundedSender<ControlFrame>,
    /// Client ids (`device`, `device/module`) the engine reported connected.
    clients: HashSet<String>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Commands {
    pub(crate) fn add_link(&self, frames: mpsc::UnboundedSender<ControlFrame>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        locked(&self.links).insert(
            id,
            LinkEntry {
                frames,
                clients: HashSet::new(),
            },
        );
        id
    }

    /// Forgets `link`; returns the client ids its engine had reported connected.
    fn remove_link(&self, link: u64) -> HashSet<String> {
        locked(&self.links)
            .remove(&link)
            .map(|l| l.clients)
            .unwrap_or_default()
    }

    pub(crate) fn connection_state(&self, link: u64, client_id: &str, connected: bool) {
        if let Some(l) = locked(&self.links).get_mut(&link) {
            if connected {
                l.clients.insert(client_id.to_string());
            } else {
                l.clients.remove(client_id);
            }
        }
    }

    pub(crate) fn answer(&self, id: u64, outcome: CommandOutcome) {
        if let Some(tx) = locked(&self.waiting).remove(&id) {
            let _ = tx.send(outcome);
        }
    }

    /// Sends `command` to the session of `client_id` on the engine it is connected to without
    /// waiting for the answer (a desired-property change: a device that misses it reads it
    /// with its next GET). `false` when no engine reported the client connected.
    pub fn post(&self, client_id: &str, command: DeviceCommand) -> bool {
        let links = locked(&self.links);
        let Some(link) = links.values().find(|l| l.clients.contains(client_id)) else {
            return false;
        };
        self.post_on(&link.frames, client_id, command)
    }

    /// Sends `command` for `client_id` on link `link` (the answer to a request that came on
    /// it), without waiting for the answer.
    fn post_to_link(&self, link: u64, client_id: &str, command: DeviceCommand) -> bool {
        let links = locked(&self.links);
        links
            .get(&link)
            .is_some_and(|l| self.post_on(&l.frames, client_id, command))
    }

    /// Sends `frame` on link `link` (an answer to the engine's own call).
    fn reply_on_link(&self, link: u64, frame: ControlFrame) {
        if let Some(l) = locked(&self.links).get(&link) {
            let _ = l.frames.send(frame);
        }
    }

    fn post_on(
        &self,
        frames: &mpsc::UnboundedSender<ControlFrame>,
        client_id: &str,
        command: DeviceCommand,
    ) -> bool {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        frames
            .send(ControlFrame::Command {
                id,
                client_id: client_id.to_string(),
                command,
            })
            .is_ok()
    }

    /// Sends an event for the `events` log to an engine (the one `device_id` is connected to,
    /// else the first linked); the answer is `Delivered` once the engine has it durable, any
    /// other outcome when it could not take it. `None` when no engine is linked.
    pub fn append(
        &self,
        device_id: &str,
        message: roost_model::message::Message,
    ) -> Option<(u64, oneshot::Receiver<CommandOutcome>)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let links = locked(&self.links);
        let link = links
            .values()
            .find(|l| l.clients.contains(device_id))
            .or_else(|| links.values().next())?;
        locked(&self.waiting).insert(id, tx);
        let frame = ControlFrame::Append {
            id,
            device_id: device_id.to_string(),
            message,
        };
        if link.frames.send(frame).is_err() {
            locked(&self.waiting).remove(&id);
            return None;
        }
        Some((id, rx))
    }

    /// Stops waiting for the answer to `id`.
    pub fn forget(&self, id: u64) {
        locked(&self.waiting).remove(&id);
    }

    /// Sends `command` to the session of `client_id` (`device` or `device/module`) on the
    /// engine it is connected to, and waits up to `timeout` for the engine's answer.
    pub async fn send(
        &self,
        client_id: &str,
        command: DeviceCommand,
        timeout: Duration,
    ) -> CommandOutcome {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let links = locked(&self.links);
            let Some(link) = links.values().find(|l| l.clients.contains(client_id)) else {
                return CommandOutcome::NotConnected;
            };
            locked(&self.waiting).insert(id, tx);
            let frame = ControlFrame::Command {
                id,
                client_id: client_id.to_string(),
                command,
            };
            if link.frames.send(frame).is_err() {
                locked(&self.waiting).remove(&id);
                return CommandOutcome::NotConnected;
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(outcome)) => outcome,
            // The link went away with the command unanswered, or the engine took too long.
            _ => {
                locked(&self.waiting).remove(&id);
                CommandOutcome::TimedOut
            }
        }
    }
}

impl LinkServer {
    /// A `deviceConnectionStateEvents` record for `client_id`.
    fn connection_event(&self, client_id: &str, connected: bool, at_ms: u64) {
        let seq = self.commands.next_id.fetch_add(1, Ordering::Relaxed);
        let event = crate::events::HubEvent::connection(client_id, connected, at_ms, seq);
        if let Err(e) = self.events.emit(&event) {
            tracing::warn!(error = %e, "recording a connection-state event failed");
        }
    }

    pub async fn run(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let me = self.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "control link handshake failed");
                        return;
                    }
                };
                me.metrics.links_current.inc();
                let remote = conn.remote_address();
                let (frames_tx, frames_rx) = mpsc::unbounded_channel();
                let link = me.commands.add_link(frames_tx);
                let why = me.serve(&conn, link, frames_rx).await;
                me.verdicts.remove(link);
                let clients = me.commands.remove_link(link);
                let at_ms = crate::api::now_ms();
                for c in &clients {
                    me.c2d.on_disconnected(c);
                    me.connection_event(c, false, at_ms);
                }
                me.metrics.links_current.dec();
                tracing::info!(%remote, reason = %why, "engine link closed");
                // The engine is gone: its devices are no longer connected to it (a module's
                // client id, `device/module`, has no device record of its own yet).
                let now = iso_now();
                for id in clients.iter().filter(|c| !c.contains('/')) {
                    let _ = me.store.touch(id, |d| {
                        d.connection_state = "Disconnected".into();
                        d.connection_state_updated_time = now.clone();
                    });
                }
            });
        }
    }

    async fn serve(
        &self,
        conn: &quinn::Connection,
        link: u64,
        mut outgoing: mpsc::UnboundedReceiver<ControlFrame>,
    ) -> LinkClosed {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => return e.into(),
        };
        // Subscribe before reading the state, so no change falls between the two.
        let mut changes = self.store.subscribe();
        let mut epochs = self.epoch.subscribe();
        let mut sync = EpochSync::default();
        let (hello, engine_epoch) = match read_frame(&mut recv).await {
            Ok(EngineFrame::Hello {
                node,
                registry_seq,
                epoch,
            }) => {
                tracing::info!(%node, registry_seq, epoch = ?epoch, "engine connected");
                self.verdicts.update(link, |v| {
                    v.node = node.clone();
                    v.epoch_hash = epoch.map(|h| h.to_string());
                });
                (registry_seq, epoch)
            }
            Ok(other) => return LinkClosed::NoHello(frame_kind(&other)),
            Err(e) => return e,
        };
        let mut sent = match self.catch_up(&mut send, hello).await {
            Ok(seq) => seq,
            Err(e) => return e,
        };
        let current = epochs.borrow_and_update().clone();
        if let Some(frame) = sync.on_report(&current, engine_epoch, Instant::now()) {
            if let Err(e) = send.write_all(&frame.encode()).await {
                return e.into();
            }
        }
        // One engine's twin requests are answered in the order they came, one at a time: a
        // device's reported patches merge in the order it sent them.
        let (twin_tx, twin_rx) = mpsc::channel(TWIN_QUEUE);
        let twin_worker = tokio::spawn(serve_twins(
            self.twins.clone(),
            self.commands.clone(),
            link,
            twin_rx,
        ));
        let (frames_tx, mut frames_rx) = tokio::sync::mpsc::channel(1024);
        let reader = tokio::spawn(async move {
            loop {
                match read_frame(&mut recv).await {
                    Ok(f) => {
                        if frames_tx.send(f).await.is_err() {
                            return LinkClosed::Stopping;
                        }
                    }
                    Err(e) => return e,
                }
            }
        });
        let why = loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Ok((seq, change)) if seq == sent + 1 => {
                        // Everything already committed goes in the same frame: a bulk import
                        // reaches the engine as one delta, not one replica swap per device.
                        let from_seq = sent;
                        let mut batch = vec![change];
                        sent = seq;
                        let mut resync = false;
                        while batch.len() < MAX_DELTAS_PER_FRAME {
                            match changes.try_recv() {
                                Ok((seq, change)) if seq == sent + 1 => {
                                    batch.push(change);
                                    sent = seq;
                                }
                                Ok((seq, _)) if seq <= sent => {}
                                Err(tokio::sync::broadcast::error::TryRecvError::Empty) => break,
                                _ => {
                                    resync = true;
                                    break;
                                }
                            }
                        }
                        let frame = ControlFrame::Deltas { from_seq, changes: batch };
                        if let Err(e) = send.write_all(&frame.encode()).await { break e.into(); }
                        if resync {
                            match self.catch_up(&mut send, sent).await {
                                Ok(seq) => sent = seq,
                                Err(e) => break e,
                            }
                        }
                    }
                    Ok((seq, _)) if seq <= sent => {}
                    Ok(_) | Err(RecvError::Lagged(_)) => match self.catch_up(&mut send, sent).await {
                        Ok(seq) => sent = seq,
                        Err(e) => break e,
                    },
                    Err(RecvError::Closed) => break LinkClosed::StoreClosed,
                },
                frame = frames_rx.recv() => match frame {
                    Some(f) => {
                        let current = self.epoch.borrow().clone();
                        let resend = self.on_engine_frame(f, link, &mut sync, &current, &twin_tx);
                        if let Some(frame) = resend {
                            if let Err(e) = send.write_all(&frame.encode()).await { break e.into(); }
                        }
                    }
                    None => break LinkClosed::EngineClosed,
                },
                changed = epochs.changed() => {
                    if changed.is_err() { break LinkClosed::Stopping; }
                    let current = epochs.borrow_and_update().clone();
                    let frame = sync.on_new_epoch(&current, Instant::now());
                    if let Err(e) = send.write_all(&frame.encode()).await { break e.into(); }
                }
                frame = outgoing.recv() => {
                    let Some(frame) = frame else { break LinkClosed::Stopping };
                    if let Err(e) = send.write_all(&frame.encode()).await { break e.into(); }
                }
            }
        };
        reader.abort();
        twin_worker.abort();
        // A read error ends the reader first; report it rather than the closed channel.
        match (why, reader.await) {
            (LinkClosed::EngineClosed, Ok(e)) => e,
            (why, _) => why,
        }
    }

    /// Sends what an engine at `have` lacks; returns the sequence it now has.
    async fn catch_up(&self, send: &mut quinn::SendStream, have: u64) -> Result<u64, LinkClosed> {
        let current = self.store.registry_seq()?;
        if have == current {
            return Ok(have);
        }
        let deltas = if have < current {
            self.store.changes_between(have, current)?
        } else {
            None
        };
        let (frame, seq) = match deltas {
            Some(changes) => (
                ControlFrame::Deltas {
                    from_seq: have,
                    changes,
                },
                current,
            ),
            None => {
                let (seq, devices) = self.store.snapshot()?;
                (ControlFrame::Snapshot { seq, devices }, seq)
            }
        };
        send.write_all(&frame.encode()).await?;
        Ok(seq)
    }

    /// Records what an engine reported; returns a frame to send back (an epoch to re-send).
    fn on_engine_frame(
        &self,
        frame: EngineFrame,
        link: u64,
        sync: &mut EpochSync,
        current: &Epoch,
        twins: &mpsc::Sender<TwinJob>,
    ) -> Option<ControlFrame> {
        let kind = frame_kind(&frame);
        self.metrics.link_frames_in.with_label_values(&[kind]).inc();
        let mut reply = None;
        let result = match frame {
            EngineFrame::ConnectionState {
                device_id,
                module_id,
                connected: up,
                at_ms,
            } => {
                let client_id = match &module_id {
                    Some(m) => format!("{device_id}/{m}"),
                    None => device_id.clone(),
                };
                self.commands.connection_state(link, &client_id, up);
                if !up {
                    self.c2d.on_disconnected(&client_id);
                }
                self.connection_event(&client_id, up, at_ms);
                let at = iso_ms(at_ms);
                // A module's connection is the module's, not its device's.
                if let Some(m) = &module_id {
                    let state = if up { "Connected" } else { "Disconnected" };
                    let result = self.store.touch_module(&device_id, m, |md| {
                        md.connection_state = state.into();
                        md.connection_state_updated_time = at.clone();
                        md.last_activity_time = at;
                    });
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "recording a module's connection state failed");
                    }
                    return reply;
                }
                self.store.touch(&device_id, |d| {
                    d.connection_state = if up { "Connected" } else { "Disconnected" }.into();
                    d.connection_state_updated_time = at.clone();
                    d.last_activity_time = at;
                })
            }
            EngineFrame::Activity { device_id, at_ms } => {
                let at = iso_ms(at_ms);
                self.store.touch(&device_id, |d| d.last_activity_time = at)
            }
            EngineFrame::Heartbeat { epoch, .. } => {
                reply = sync.on_report(current, epoch, Instant::now());
                self.verdicts
                    .update(link, |v| v.epoch_hash = epoch.map(|h| h.to_string()));
                Ok(())
            }
            EngineFrame::Applied { hash } => {
                tracing::info!(%hash, "engine runs the config epoch");
                sync.on_applied(hash);
                self.verdicts.update(link, |v| {
                    v.epoch_hash = Some(hash.to_string());
                    v.rejected = None;
                });
                Ok(())
            }
            EngineFrame::Rejected { hash, code, detail } => {
                tracing::warn!(%hash, %code, %detail, "engine rejected the config epoch");
                sync.on_rejected(hash);
                self.verdicts
                    .update(link, |v| v.rejected = Some(format!("{code}: {detail}")));
                Ok(())
            }
            EngineFrame::CommandResult { id, outcome } => {
                self.commands.answer(id, outcome);
                Ok(())
            }
            EngineFrame::EventAppended { id, appended } => {
                let outcome = if appended {
                    CommandOutcome::Delivered
                } else {
                    CommandOutcome::NotConnected
                };
                self.commands.answer(id, outcome);
                Ok(())
            }
            EngineFrame::TwinRequest {
                device_id,
                module_id,
                rid,
                op,
            } => {
                let job = TwinJob {
                    device_id,
                    module_id,
                    rid,
                    op,
                };
                if let Err(e) = twins.try_send(job) {
                    let job = match e {
                        mpsc::error::TrySendError::Full(j)
                        | mpsc::error::TrySendError::Closed(j) => j,
                    };
                    let answer = roost_session::router::twin_error(
                        job.rid.clone(),
                        503,
                        503005,
                        "the hub is busy; retry later",
                    );
                    self.commands.post_to_link(link, &job.client_id(), answer);
                }
                Ok(())
            }
            EngineFrame::C2dReady {
                device_id,
                module_id,
            } => {
                // Off the link's task: delivering writes to the store.
                if module_id.is_none() {
                    let c2d = self.c2d.clone();
                    tokio::task::spawn_blocking(move || c2d.on_ready(&device_id));
                }
                Ok(())
            }
            EngineFrame::C2dSettled {
                device_id,
                module_id,
                lock,
                outcome,
            } => {
                if module_id.is_none() {
                    let c2d = self.c2d.clone();
                    tokio::task::spawn_blocking(move || c2d.on_settled(&device_id, lock, outcome));
                }
                Ok(())
            }
            EngineFrame::Service { id, request } => {
                let commands = self.commands.clone();
                if request.is_rest() {
                    // Served as the service API serves its own port (a method call waits for
                    // its device on the runtime; the rest go to the blocking pool there).
                    let api = self.api.clone();
                    tokio::spawn(async move {
                        let reply = api.forwarded(request).await;
                        commands.reply_on_link(link, ControlFrame::ServiceReply { id, reply });
                    });
                } else if matches!(
                    request,
                    ServiceRequest::FileNotificationReceive
                        | ServiceRequest::FileNotificationComplete { .. }
                ) {
                    let files = self.files.clone();
                    tokio::task::spawn_blocking(move || {
                        let reply = crate::files::serve_notifications(files.as_deref(), request);
                        commands.reply_on_link(link, ControlFrame::ServiceReply { id, reply });
                    });
                } else if let ServiceRequest::FileUpload {
                    device_id,
                    notification,
                    correlation_id,
                    body,
                } = request
                {
                    let files = self.files.clone();
                    tokio::task::spawn_blocking(move || {
                        let (status, body) = match &files {
                            Some(f) => f.serve(&device_id, notification, correlation_id.as_deref(), &body),
                            None => {
                                let why = "file upload is not configured on this hub (control's --blob or --blob-account-url)";
                                (400, crate::api::error_body(400004, why).to_string().into_bytes())
                            }
                        };
                        let headers = vec![("content-type".to_string(), "application/json; charset=utf-8".to_string())];
                        let reply = ServiceReply::Http { status, headers, body };
                        commands.reply_on_link(link, ControlFrame::ServiceReply { id, reply });
                    });
                } else {
                    // Off the link's task: each writes to the store.
                    let c2d = self.c2d.clone();
                    tokio::task::spawn_blocking(move || {
                        let reply = crate::c2d::serve_request(&c2d, request);
                        commands.reply_on_link(link, ControlFrame::ServiceReply { id, reply });
                    });
                }
                Ok(())
            }
            EngineFrame::MethodResponse {
                device_id,
                module_id,
                rid,
                status,
                payload,
            } => {
                let client_id = match &module_id {
                    Some(m) => format!("{device_id}/{m}"),
                    None => device_id,
                };
                self.methods.on_response(&client_id, &rid, status, &payload);
                Ok(())
            }
            EngineFrame::Hello { .. } => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "recording an engine report failed");
        }
        reply
    }
}

/// Keeps one engine on control's epoch: what was sent when, and what it refused.
#[derive(Debug, Default)]
struct EpochSync {
    sent: Option<(EpochHash, Instant)>,
    rejected: Option<EpochHash>,
}

impl EpochSync {
    /// The engine reported running `theirs` (in `Hello` or a heartbeat): the epoch to send, if
    /// it runs another and has not refused this one, at most once per [`EPOCH_RESEND`].
    fn on_report(
        &mut self,
        current: &Epoch,
        theirs: Option<EpochHash>,
        now: Instant,
    ) -> Option<ControlFrame> {
        if theirs == Some(current.hash) || self.rejected == Some(current.hash) {
            return None;
        }
        if let Some((hash, at)) = self.sent {
            if hash == current.hash && now.duration_since(at) < EPOCH_RESEND {
                return None;
            }
        }
        self.sent = Some((current.hash, now));
        Some(ControlFrame::Apply {
            epoch: current.clone(),
        })
    }

    fn on_new_epoch(&mut self, current: &Epoch, now: Instant) -> ControlFrame {
        self.rejected = None;
        self.sent = Some((current.hash, now));
        ControlFrame::Apply {
            epoch: current.clone(),
        }
    }

    fn on_applied(&mut self, hash: EpochHash) {
        if self.rejected == Some(hash) {
            self.rejected = None;
        }
    }

    fn on_rejected(&mut self, hash: EpochHash) {
        self.rejected = Some(hash);
    }
}

/// Engines send small frames; a larger one is a broken or hostile peer.
const MAX_ENGINE_FRAME: usize = 1024 * 1024;

async fn read_frame(recv: &mut quinn::RecvStream) -> Result<EngineFrame, LinkClosed> {
    let body = read_frame_body(recv, MAX_ENGINE_FRAME).await?;
    Ok(EngineFrame::decode(&body)?)
}

/// The metric label of an engine frame.
fn frame_kind(frame: &EngineFrame) -> &'static str {
    match frame {
        EngineFrame::Hello { .. } => "hello",
        EngineFrame::ConnectionState { .. } => "connection_state",
        EngineFrame::Activity { .. } => "activity",
        EngineFrame::Heartbeat { .. } => "heartbeat",
        EngineFrame::Applied { .. } => "applied",
        EngineFrame::Rejected { .. } => "rejected",
        EngineFrame::CommandResult { .. } => "command_result",
        EngineFrame::EventAppended { .. } => "event_appended",
        EngineFrame::TwinRequest { .. } => "twin_request",
        EngineFrame::MethodResponse { .. } => "method_response",
        EngineFrame::C2dReady { .. } => "c2d_ready",
        EngineFrame::C2dSettled { .. } => "c2d_settled",
        EngineFrame::Service { .. } => "service",
    }
}

/// Answers one engine's twin requests in order, each in the store on the blocking pool, each
/// answer sent back on the link it came on.
async fn serve_twins(
    twins: Arc<Twins>,
    commands: Arc<Commands>,
    link: u64,
    mut jobs: mpsc::Receiver<TwinJob>,
) {
    while let Some(job) = jobs.recv().await {
        let client_id = job.client_id();
        let twins = twins.clone();
        let answer = tokio::task::spawn_blocking(move || {
            twins.device_request(&job.device_id, job.module_id.as_deref(), job.rid, &job.op)
        })
        .await;
        match answer {
            Ok(answer) => {
                commands.post_to_link(link, &client_id, answer);
            }
            // The engine answers the device for control when no answer comes.
            Err(e) => tracing::error!(error = %e, "a twin request's task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use roost_model::link::EpochPayload;

    use super::*;

    #[test]
    fn an_engine_on_another_epoch_gets_it_again_but_not_after_refusing_it() {
        let t0 = Instant::now();
        let current = Epoch::new(2, EpochPayload::default());
        let old = Epoch::new(1, EpochPayload::default()).hash;
        let mut sync = EpochSync::default();
        assert!(
            sync.on_report(&current, Some(current.hash), t0).is_none(),
            "in step"
        );
        assert!(matches!(
            sync.on_report(&current, Some(old), t0),
            Some(ControlFrame::Apply { .. })
        ));
        assert!(
            sync.on_report(&current, None, t0 + Duration::from_secs(1))
                .is_none(),
            "just sent"
        );
        assert!(
            sync.on_report(&current, None, t0 + EPOCH_RESEND).is_some(),
            "re-sent on mismatch"
        );
        sync.on_rejected(current.hash);
        assert!(
            sync.on_report(&current, Some(old), t0 + EPOCH_RESEND * 3)
                .is_none(),
            "refused: not again"
        );
        let next = Epoch::new(3, EpochPayload::default());
        assert!(matches!(
            sync.on_new_epoch(&next, t0),
            ControlFrame::Apply { .. }
        ));
        assert!(
            sync.on_report(&next, Some(old), t0 + EPOCH_RESEND)
                .is_some(),
            "a new epoch is tried"
        );
    }

    #[tokio::test]
    async fn a_command_goes_to_the_link_holding_the_device_and_waits_for_its_answer() {
        let commands = Arc::new(Commands::default());
        let (tx_a, mut rx_a) = mpsc::unbounded_channel();
        let (tx_b, mut rx_b) = mpsc::unbounded_channel();
        let a = commands.add_link(tx_a);
        let b = commands.add_link(tx_b);
        commands.connection_state(a, "dev-a", true);
        commands.connection_state(b, "dev-b/mod", true);
        let cmd = || DeviceCommand::Disconnect {
            reason: "test".into(),
        };
        assert_eq!(
            commands.send("nobody", cmd(), Duration::from_secs(1)).await,
            CommandOutcome::NotConnected
        );
        let waiting = {
            let commands = commands.clone();
            tokio::spawn(async move {
                commands
                    .send("dev-b/mod", cmd(), Duration::from_secs(5))
                    .await
            })
        };
        let Some(ControlFrame::Command { id, client_id, .. }) = rx_b.recv().await else {
            panic!("the command must go to link b");
        };
        assert_eq!(client_id, "dev-b/mod");
        assert!(rx_a.try_recv().is_err(), "not to link a");
        commands.answer(id, CommandOutcome::Delivered);
        assert_eq!(waiting.await.expect("task"), CommandOutcome::Delivered);
        // No answer: timed out, and a late answer is dropped.
        let outcome = commands
            .send("dev-a", cmd(), Duration::from_millis(20))
            .await;
        assert_eq!(outcome, CommandOutcome::TimedOut);
        assert!(locked(&commands.waiting).is_empty());
        commands.connection_state(a, "dev-a", false);
        assert_eq!(
            commands.send("dev-a", cmd(), Duration::from_secs(1)).await,
            CommandOutcome::NotConnected
        );
    }
}
