//! The engine's end of the control link (DESIGN.md §6), on the engine's tokio thread — never on
//! a shard. It keeps the registry replica current (snapshot, then ordered deltas), runs the
//! config epochs control sends (validated, persisted, then put in force; answered `Applied` or
//! `Rejected`), hands commands for a device session to the router, and reports back. While
//! control is away it keeps the latest state per device and reconnects with backoff; the shards
//! go on with the replica and the epoch they have.
//!
//! One code path: start-up applies the persisted replica and epoch with [`apply`], the same
//! function that applies what control sends, only without writing them again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_common::link::{read_frame_body, LinkError};
use roost_common::tls::LINK_SERVER_NAME;
use roost_iothub::x509::TrustedCas;
use roost_model::link::{ControlFrame, DeviceAuth, EngineFrame, Epoch, EpochHash, RegistryChange};
use roost_registry::{Projection, Registry};
use roost_session::quota::{QuotaCell, Quotas};
use roost_storage::{ReplicaStore, StoreError};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use roost_endpoints::Dispatchers;
use roost_routing::config::Endpoint;

use crate::metrics::Metrics;
use crate::router::{RouterInput, RouterTx};
use crate::routing::{RoutesCell, RoutesSource};
use crate::shard::ShardCommand;

/// What the engine runs, as the link changes it: the registry projection and the epoch.
pub struct EngineState {
    pub registry: Arc<Registry>,
    pub replica: Arc<dyn ReplicaStore>,
    epoch: Mutex<Option<Epoch>>,
    /// Held for the whole of an apply: an apply still running for a link that has gone cannot
    /// interleave with one for its successor.
    applying: Mutex<()>,
    pub metrics: Arc<Metrics>,
    pub router: RouterTx,
    /// The quotas of the epoch in force (the default before the first).
    pub quotas: Arc<QuotaCell>,
    /// The routes and plugins of the epoch in force (the default routing before the first).
    pub routes: Arc<RoutesCell>,
    /// The dispatchers of the epoch's external endpoints.
    pub endpoints: Arc<Dispatchers>,
    /// The shared access policies of the epoch in force (the AMQP endpoint checks tokens
    /// against them).
    pub policies: Arc<std::sync::RwLock<Vec<roost_eventhubs::PolicyKeys>>>,
    /// The Event Hubs consumer groups of the epoch in force besides `$Default`, lowercase.
    pub consumer_groups: Arc<std::sync::RwLock<Vec<String>>>,
    /// The CAs of the epoch in force (`certificateAuthority` devices chain to one of them).
    pub cas: Arc<CasCell>,
    /// Calls AMQP service links make of control, waiting for their answers.
    pub services: Arc<crate::service_calls::ServiceCalls>,
}

impl EngineState {
    /// An empty engine: no devices, no epoch. [`apply`] fills it.
    pub fn empty(
        replica: Arc<dyn ReplicaStore>,
        metrics: Arc<Metrics>,
        router: RouterTx,
        endpoints: Arc<Dispatchers>,
    ) -> Self {
        Self {
            registry: Arc::new(Registry::new(Projection::default())),
            replica,
            epoch: Mutex::new(None),
            applying: Mutex::new(()),
            metrics: metrics.clone(),
            router: router.clone(),
            quotas: Arc::default(),
            routes: Arc::default(),
            endpoints,
            policies: Arc::default(),
            consumer_groups: Arc::default(),
            cas: Arc::default(),
            services: Arc::new(crate::service_calls::ServiceCalls::new(
                router.clone(),
                metrics.clone(),
            )),
        }
    }

    /// The hash of the epoch in force, if any.
    pub fn epoch_hash(&self) -> Option<EpochHash> {
        self.epoch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|e| e.hash)
    }
}

/// The CAs the hub trusts, replaced whole by each epoch.
#[derive(Default)]
pub struct CasCell(std::sync::RwLock<Arc<TrustedCas>>);

impl CasCell {
    pub fn load(&self) -> Arc<TrustedCas> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `next` in force; answers whether the set of CAs changed.
    fn replace(&self, next: TrustedCas) -> bool {
        let mut current = self.0.write().unwrap_or_else(|p| p.into_inner());
        let changed = !current.ids().eq(next.ids());
        *current = Arc::new(next);
        changed
    }
}

/// What the link needs beyond the engine state.
pub struct LinkContext {
    pub node: String,
    pub control: SocketAddr,
    pub client: quinn::ClientConfig,
    pub state: Arc<EngineState>,
    /// Each shard's command channel (events control asks to append go to a shard's partition).
    pub shards: Vec<crossbeam::channel::Sender<ShardCommand>>,
}

/// Where an update comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From control: persisted before it is put in force.
    Control,
    /// From the engine's own replica store at start-up: already durable.
    Replica,
}

/// One change to what the engine runs.
#[derive(Debug)]
pub enum Update {
    Snapshot {
        seq: u64,
        devices: Vec<DeviceAuth>,
    },
    Deltas {
        from_seq: u64,
        changes: Vec<RegistryChange>,
    },
    Epoch(Epoch),
}

/// Why an update was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("delta from {from_seq} does not follow the replica at {have}")]
    OutOfOrder { from_seq: u64, have: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An epoch was refused; the engine keeps the one it had.
    #[error("epoch refused ({code}): {detail}")]
    Rejected { code: &'static str, detail: String },
}

impl ApplyError {
    pub fn error_code(&self) -> &'static str {
        match self {
            ApplyError::OutOfOrder { .. } => "out_of_order",
            ApplyError::Store(_) => "persist_failed",
            ApplyError::Rejected { code, .. } => code,
        }
    }
}

/// Checks an epoch before anything is built from it: its hash, its quotas, and its routes and
/// plugins, by loading them as a shard will (`roost-routing`, the code control checked them
/// with). Returns what to put in force.
fn validate(epoch: &Epoch) -> Result<(Quotas, RoutesSource, Vec<Endpoint>), ApplyError> {
    if !epoch.hash_is_valid() {
        return Err(ApplyError::Rejected {
            code: "hash_mismatch",
            detail: format!("epoch {} does not hash to {}", epoch.version, epoch.hash),
        });
    }
    let p = &epoch.payload;
    let quotas = Quotas::from_named(&p.limits).map_err(|e| ApplyError::Rejected {
        code: "bad_limits",
        detail: e.to_string(),
    })?;
    let routes = RoutesSource {
        version: epoch.version,
        routes: p.routes.clone(),
        plugins: p.plugins.clone(),
    };
    let loaded = routes.load("").map_err(|e| ApplyError::Rejected {
        code: "bad_routes",
        detail: e.to_string(),
    })?;
    let endpoints = loaded.config().endpoints.clone();
    Ok((quotas, routes, endpoints))
}

/// Applies one update: validate, persist (unless it came from the replica), put in force, then
/// close the connections of devices that may no longer connect.
pub fn apply(state: &EngineState, update: Update, origin: Origin) -> Result<(), ApplyError> {
    let _one_at_a_time = state.applying.lock().unwrap_or_else(|p| p.into_inner());
    let persist = origin == Origin::Control;
    match update {
        Update::Epoch(epoch) => {
            let (quotas, routes, endpoints) = validate(&epoch)?;
            if persist {
                state.replica.save_epoch(&epoch)?;
            }
            // Dispatchers first: a new endpoint's checkpoint is at the log's end before any
            // shard can route to it.
            state
                .endpoints
                .reconcile(&endpoints)
                .map_err(|e| ApplyError::Rejected {
                    code: "endpoint_checkpoint",
                    detail: e.to_string(),
                })?;
            state.quotas.set(quotas);
            state.routes.set(routes);
            *state.policies.write().unwrap_or_else(|p| p.into_inner()) = epoch
                .payload
                .policies
                .iter()
                .map(|p| roost_eventhubs::PolicyKeys {
                    name: p.name.clone(),
                    primary: p.primary_key.clone(),
                    secondary: p.secondary_key.clone(),
                    rights: p
                        .rights
                        .iter()
                        .filter_map(|r| roost_eventhubs::Right::parse(r))
                        .collect(),
                })
                .collect();
            *state
                .consumer_groups
                .write()
                .unwrap_or_else(|p| p.into_inner()) = epoch
                .payload
                .consumer_groups
                .iter()
                .map(|g| g.to_ascii_lowercase())
                .collect();
            let (cas, unusable) = TrustedCas::new(
                epoch
                    .payload
                    .cas
                    .iter()
                    .map(|c| (c.name.as_str(), c.der.as_slice())),
            );
            for (name, e) in unusable {
                tracing::warn!(ca = %name, error = %e, "a CA of the epoch cannot be a trust anchor");
            }
            if state.cas.replace(cas) {
                let ids = state.cas.load().ids().map(str::to_string).collect();
                // Sessions authenticated through a CA no longer trusted end.
                state.router.send(RouterInput::TrustedCas { ids });
            }
            // `Applied` means every shard routes by it (each loads it on its next tick).
            if !state.routes.wait_in_force(Duration::from_secs(10)) {
                tracing::warn!(
                    version = epoch.version,
                    "not every shard has loaded the epoch's routing after 10 s"
                );
            }
            tracing::info!(version = epoch.version, hash = %epoch.hash, "config epoch in force");
            state.metrics.epoch_version.set(epoch.version as i64);
            state.metrics.epoch_info.reset();
            state
                .metrics
                .epoch_info
                .with_label_values(&[&epoch.hash.to_string(), &epoch.version.to_string()])
                .set(1);
            *state.epoch.lock().unwrap_or_else(|p| p.into_inner()) = Some(epoch);
            return Ok(());
        }
        Update::Snapshot { seq, devices } => {
            if persist {
                state.replica.replace(seq, &devices)?;
            }
            let current = state.registry.load();
            let next = Projection::new(seq, devices);
            let revoked = revoked_by_snapshot(&current, &next);
            publish(state, next, revoked);
        }
        Update::Deltas { from_seq, changes } => {
            let current = state.registry.load();
            if from_seq != current.seq() {
                return Err(ApplyError::OutOfOrder {
                    from_seq,
                    have: current.seq(),
                });
            }
            if persist {
                state.replica.apply(from_seq, &changes)?;
            }
            let revoked = changes
                .iter()
                .filter_map(|c| revoked_by_change(&current, c))
                .collect();
            publish(state, current.with_changes(&changes), revoked);
        }
    }
    Ok(())
}

fn publish(state: &EngineState, next: Projection, revoked: Vec<String>) {
    state.metrics.registry_sequence.set(next.seq() as i64);
    state.metrics.registry_devices.set(next.len() as i64);
    tracing::debug!(
        seq = next.seq(),
        devices = next.len(),
        "registry replica updated"
    );
    state.registry.replace(next);
    for device_id in revoked {
        state.router.send(RouterInput::Revoke { device_id });
    }
}

/// Whether connections authenticated under `old` may not stay once `new` (`None`: deleted)
/// is in force: the device is gone or disabled, or its keys changed (a token signed with the
/// key that was regenerated must not outlive it).
fn revokes(old: &DeviceAuth, new: Option<&DeviceAuth>) -> bool {
    new.is_none_or(|new| {
        !new.enabled
            || new.primary_key != old.primary_key
            || new.secondary_key != old.secondary_key
            || new.generation_id != old.generation_id
            || new.x509 != old.x509
    })
}

/// The device whose connections `change` ends, if any.
fn revoked_by_change(current: &Projection, change: &RegistryChange) -> Option<String> {
    let (device_id, new) = match change {
        RegistryChange::Upsert(d) => (&d.device_id, Some(d)),
        RegistryChange::Delete { device_id } => (device_id, None),
    };
    let old = current.device(device_id)?;
    revokes(old, new).then(|| device_id.clone())
}

fn revoked_by_snapshot(old: &Projection, new: &Projection) -> Vec<String> {
    old.device_ids()
        .filter(|id| old.device(id).is_some_and(|d| revokes(d, new.device(id))))
        .map(str::to_string)
        .collect()
}

const HEARTBEAT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Runs the link forever: connect, serve, back off, repeat. `events` carries frames for
/// control (from the router); frames the link itself answers go through `answers`.
pub async fn run(
    ctx: Arc<LinkContext>,
    mut events: UnboundedReceiver<EngineFrame>,
    answers: UnboundedSender<EngineFrame>,
) {
    let mut endpoint = match quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0))) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot open the control link's UDP socket");
            return;
        }
    };
    endpoint.set_default_client_config(ctx.client.clone());
    let mut pending: HashMap<String, EngineFrame> = HashMap::new();
    let mut backoff = Duration::from_millis(100);
    let metrics = &ctx.state.metrics;
    loop {
        match connect(&endpoint, &ctx).await {
            Ok(conn) => {
                backoff = Duration::from_millis(100);
                metrics.link_connected.set(1);
                tracing::info!(control = %ctx.control, "control link up");
                let why = serve(&ctx, conn, &mut events, &answers, &mut pending).await;
                tracing::warn!(reason = %why, "control link down");
                metrics.link_connected.set(0);
                ctx.state.services.link_lost();
            }
            Err(e) => tracing::debug!(error = %e, "control unreachable"),
        }
        // While control is away, keep only the latest report per device.
        let wait = tokio::time::sleep(backoff);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                ev = events.recv() => match ev {
                    Some(ev) => coalesce(&mut pending, ev),
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Keeps what control must learn after a reconnect; answers to an earlier link (command
/// results, epoch verdicts) are dropped: control times the former out and learns the epoch
/// from `Hello`.
fn coalesce(pending: &mut HashMap<String, EngineFrame>, ev: EngineFrame) {
    let key = match &ev {
        EngineFrame::ConnectionState {
            device_id,
            module_id,
            ..
        } => format!("c/{device_id}/{}", module_id.as_deref().unwrap_or("")),
        EngineFrame::Activity { device_id, .. } => format!("a/{device_id}"),
        _ => return,
    };
    pending.insert(key, ev);
}

/// Why the link went down.
#[derive(Debug, thiserror::Error)]
enum LinkDown {
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("read: {0}")]
    Read(#[from] LinkError),
    #[error("control sent a frame that is not one: {0}")]
    Frame(#[from] roost_model::link::FrameError),
    #[error("applying an update: {0}")]
    Apply(#[from] ApplyError),
    #[error("the engine is stopping")]
    Stopping,
    #[error("the reader task ended: {0}")]
    Reader(String),
}

async fn connect(
    endpoint: &quinn::Endpoint,
    ctx: &LinkContext,
) -> Result<quinn::Connection, LinkDown> {
    let connecting = endpoint.connect(ctx.control, LINK_SERVER_NAME)?;
    Ok(tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| LinkDown::HandshakeTimeout)??)
}

async fn write_frame(send: &mut quinn::SendStream, frame: &EngineFrame) -> Result<(), LinkDown> {
    Ok(send.write_all(&frame.encode()).await?)
}

async fn read_frame(recv: &mut quinn::RecvStream) -> Result<ControlFrame, LinkDown> {
    let body = read_frame_body(recv, roost_model::link::MAX_FRAME).await?;
    Ok(ControlFrame::decode(&body)?)
}

async fn serve(
    ctx: &Arc<LinkContext>,
    conn: quinn::Connection,
    events: &mut UnboundedReceiver<EngineFrame>,
    answers: &UnboundedSender<EngineFrame>,
    pending: &mut HashMap<String, EngineFrame>,
) -> LinkDown {
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return e.into(),
    };
    let state = &ctx.state;
    let hello = EngineFrame::Hello {
        node: ctx.node.clone(),
        registry_seq: state.registry.load().seq(),
        epoch: state.epoch_hash(),
    };
    if let Err(e) = write_frame(&mut send, &hello).await {
        return e;
    }
    for (_, ev) in pending.drain() {
        if let Err(e) = write_frame(&mut send, &ev).await {
            return e;
        }
    }
    // Frames from control are handled by their own task so a slow apply never stalls reports;
    // the synced replica writes run on the blocking pool, not on the thread that serves the
    // ops port.
    let reader_state = ctx.state.clone();
    let shards = ctx.shards.clone();
    let answers = answers.clone();
    let mut reader = tokio::spawn(async move {
        loop {
            let frame = match read_frame(&mut recv).await {
                Ok(f) => f,
                Err(e) => return e,
            };
            if let ControlFrame::Append {
                id,
                device_id,
                message,
            } = frame
            {
                append_event(&shards, &answers, id, &device_id, message);
                continue;
            }
            if let Err(e) = on_control_frame(&reader_state, frame, &answers).await {
                return e;
            }
        }
    });
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let why = loop {
        tokio::select! {
            res = &mut reader => break match res {
                Ok(e) => e,
                Err(e) => LinkDown::Reader(e.to_string()),
            },
            ev = events.recv() => {
                let Some(ev) = ev else { break LinkDown::Stopping };
                if let Err(e) = write_frame(&mut send, &ev).await {
                    coalesce(pending, ev);
                    break e;
                }
            }
            _ = heartbeat.tick() => {
                let hb = EngineFrame::Heartbeat {
                    registry_seq: state.registry.load().seq(),
                    epoch: state.epoch_hash(),
                };
                if let Err(e) = write_frame(&mut send, &hb).await { break e; }
            }
        }
    };
    reader.abort();
    conn.close(0u32.into(), b"bye");
    why
}

/// An event from control goes to the partition of the shard `device_id` hashes to (so one
/// device's events keep their order); the shard answers once it is durable. A shard that is
/// gone is answered for: not appended, and control sends it again.
fn append_event(
    shards: &[crossbeam::channel::Sender<ShardCommand>],
    answers: &UnboundedSender<EngineFrame>,
    id: u64,
    device_id: &str,
    message: roost_model::message::Message,
) {
    let hash = device_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let sent = match shards.len() {
        0 => false,
        n => shards[(hash % n as u64) as usize]
            .send(ShardCommand::Append {
                id,
                message: Box::new(message),
            })
            .is_ok(),
    };
    if !sent {
        let _ = answers.send(EngineFrame::EventAppended {
            id,
            appended: false,
        });
    }
}

async fn on_control_frame(
    state: &Arc<EngineState>,
    frame: ControlFrame,
    answers: &UnboundedSender<EngineFrame>,
) -> Result<(), LinkDown> {
    let update = match frame {
        ControlFrame::Command {
            id,
            client_id,
            command,
        } => {
            state.router.send(RouterInput::Command {
                id,
                client_id,
                command,
            });
            return Ok(());
        }
        ControlFrame::Snapshot { seq, devices } => Update::Snapshot { seq, devices },
        ControlFrame::Deltas { from_seq, changes } => Update::Deltas { from_seq, changes },
        ControlFrame::Apply { epoch } => Update::Epoch(epoch),
        ControlFrame::ServiceReply { id, reply } => {
            state.services.answer(id, reply);
            return Ok(());
        }
        // Handled by the reader, before the registry's updates.
        ControlFrame::Append { id, .. } => {
            let _ = answers.send(EngineFrame::EventAppended {
                id,
                appended: false,
            });
            return Ok(());
        }
    };
    let epoch_hash = match &update {
        Update::Epoch(e) => Some(e.hash),
        _ => None,
    };
    let worker = state.clone();
    let result = tokio::task::spawn_blocking(move || apply(&worker, update, Origin::Control))
        .await
        .map_err(|e| LinkDown::Reader(e.to_string()))?;
    let Some(hash) = epoch_hash else {
        // A registry update that cannot be applied leaves the replica behind: drop the link,
        // and the reconnect's Hello makes control send what is missing.
        return result.map_err(LinkDown::from);
    };
    let metrics = &state.metrics;
    let answer = match result {
        // The engine could not write it: not a verdict on the epoch. Drop the link; the
        // reconnect's Hello makes control send it again.
        Err(e @ ApplyError::Store(_)) => {
            metrics.epochs.with_label_values(&[e.error_code()]).inc();
            return Err(e.into());
        }
        Ok(()) => {
            metrics.epochs.with_label_values(&["applied"]).inc();
            EngineFrame::Applied { hash }
        }
        Err(e) => {
            tracing::warn!(%hash, code = e.error_code(), error = %e, "config epoch rejected; keeping the previous one");
            metrics.epochs.with_label_values(&[e.error_code()]).inc();
            EngineFrame::Rejected {
                hash,
                code: e.error_code().to_string(),
                detail: e.to_string(),
            }
        }
    };
    let _ = answers.send(answer);
    Ok(())
}

#[cfg(test)]
mod tests {
    use roost_model::link::EpochPayload;
    use roost_storage::MemStore;

    use super::*;

    fn dev(id: &str, enabled: bool) -> DeviceAuth {
        DeviceAuth::with_keys(id, enabled, &[1], &[2])
    }

    /// A twin's tags changing reaches the registry view and keeps the device connected.
    #[test]
    fn a_tag_change_does_not_revoke() {
        let old = dev("a", true);
        let mut tagged = old.clone();
        tagged.twin = r#"{"tags":{"site":"oslo"}}"#.into();
        assert!(!revokes(&old, Some(&tagged)));
        let mut rekeyed = tagged.clone();
        rekeyed.primary_key = vec![9];
        assert!(revokes(&tagged, Some(&rekeyed)));
    }

    fn engine(store: Arc<MemStore>) -> (EngineState, UnboundedReceiver<RouterInput>) {
        let (router, rx) = RouterTx::channel();
        let metrics = Arc::new(Metrics::new());
        let endpoints = Arc::new(Dispatchers::new(
            store.clone(),
            metrics.endpoints.clone(),
            std::env::temp_dir(),
            None,
            roost_endpoints::Pace::default(),
        ));
        let state = EngineState::empty(store, metrics, router, endpoints);
        (state, rx)
    }

    /// Start-up as the engine does it: the persisted replica and epoch, through `apply`.
    fn boot(state: &EngineState, store: &MemStore) {
        let (seq, devices) = store.load().expect("load");
        apply(state, Update::Snapshot { seq, devices }, Origin::Replica).expect("replica");
        if let Some(e) = store.load_epoch().expect("load epoch") {
            apply(state, Update::Epoch(e), Origin::Replica).expect("epoch");
        }
    }

    #[test]
    fn what_control_sent_is_what_a_restarted_engine_runs() {
        let store = Arc::new(MemStore::new(0));
        let (state, _rx) = engine(store.clone());
        boot(&state, &store);
        assert_eq!(state.epoch_hash(), None, "an empty engine runs no epoch");
        apply(
            &state,
            Update::Snapshot {
                seq: 2,
                devices: vec![dev("a", true), dev("b", true)],
            },
            Origin::Control,
        )
        .expect("snapshot");
        apply(
            &state,
            Update::Deltas {
                from_seq: 2,
                changes: vec![RegistryChange::Upsert(dev("c", true))],
            },
            Origin::Control,
        )
        .expect("delta");
        let epoch = Epoch::new(1, EpochPayload::default());
        apply(&state, Update::Epoch(epoch.clone()), Origin::Control).expect("epoch");

        let (restarted, _rx) = engine(store.clone());
        boot(&restarted, &store);
        assert_eq!(restarted.registry.load().seq(), 3);
        assert_eq!(restarted.registry.load().len(), 3);
        assert_eq!(restarted.epoch_hash(), Some(epoch.hash));
    }

    #[test]
    fn an_epochs_quotas_are_put_in_force() {
        use roost_session::quota::Tier;
        let store = Arc::new(MemStore::new(0));
        let (state, _rx) = engine(store);
        assert_eq!(state.quotas.get(), Quotas::default());
        let before = state.quotas.version();
        let s1 = Quotas::preset(Tier::S1, 1).expect("preset");
        let epoch = Epoch::new(
            2,
            EpochPayload {
                limits: s1.to_named(),
                ..EpochPayload::default()
            },
        );
        apply(&state, Update::Epoch(epoch), Origin::Control).expect("applied");
        assert_eq!(state.quotas.get(), s1);
        assert!(state.quotas.version() > before, "shards see a new version");
    }

    #[test]
    fn an_epochs_routes_are_checked_then_put_in_force() {
        let store = Arc::new(MemStore::new(0));
        let (state, _rx) = engine(store);
        let before = state.routes.version();
        let routes = "return { fallback = false }".to_string();
        let plugins = vec![
            (
                "p/handler.lua".to_string(),
                "return { on_message = function(m, d, c, s) end }".to_string(),
            ),
            ("p/schema.lua".to_string(), "return {}".to_string()),
        ];
        let epoch = Epoch::new(
            2,
            EpochPayload {
                routes: routes.clone(),
                plugins: plugins.clone(),
                ..EpochPayload::default()
            },
        );
        apply(&state, Update::Epoch(epoch), Origin::Control).expect("applied");
        assert!(state.routes.version() > before, "shards see a new version");
        let source = state.routes.get();
        assert_eq!(
            (source.version, &source.routes, &source.plugins),
            (2, &routes, &plugins)
        );
    }

    #[test]
    fn a_bad_epoch_is_rejected_and_the_previous_one_kept() {
        let store = Arc::new(MemStore::new(0));
        let (state, _rx) = engine(store.clone());
        let good = Epoch::new(1, EpochPayload::default());
        apply(&state, Update::Epoch(good.clone()), Origin::Control).expect("good");
        let mut forged = Epoch::new(2, EpochPayload::default());
        forged.version = 3;
        let err = apply(&state, Update::Epoch(forged), Origin::Control).expect_err("forged");
        assert_eq!(err.error_code(), "hash_mismatch");
        let routes = Epoch::new(
            4,
            EpochPayload {
                routes: "return { routes = { { name = 'a', endpoints = { 'nowhere' } } } }".into(),
                ..EpochPayload::default()
            },
        );
        let err = apply(&state, Update::Epoch(routes), Origin::Control).expect_err("payload");
        assert_eq!(err.error_code(), "bad_routes");
        assert!(
            err.to_string()
                .contains("routes.lua:1: route \"a\": unknown endpoint \"nowhere\""),
            "{err}"
        );
        let unknown_limit = Epoch::new(
            5,
            EpochPayload {
                limits: vec![("d2c_per_fortnight".into(), 1)],
                ..EpochPayload::default()
            },
        );
        let err = apply(&state, Update::Epoch(unknown_limit), Origin::Control).expect_err("limit");
        assert_eq!(err.error_code(), "bad_limits");
        assert_eq!(state.epoch_hash(), Some(good.hash));
        assert_eq!(
            store.load_epoch().expect("load"),
            Some(good),
            "nothing else persisted"
        );
    }

    #[test]
    fn deltas_out_of_order_are_refused_and_revocations_reach_the_router() {
        let store = Arc::new(MemStore::new(0));
        let (state, mut rx) = engine(store.clone());
        apply(
            &state,
            Update::Snapshot {
                seq: 1,
                devices: vec![dev("a", true), dev("b", true)],
            },
            Origin::Control,
        )
        .expect("snapshot");
        let err = apply(
            &state,
            Update::Deltas {
                from_seq: 5,
                changes: vec![],
            },
            Origin::Control,
        )
        .expect_err("gap");
        assert_eq!(err.error_code(), "out_of_order");
        apply(
            &state,
            Update::Deltas {
                from_seq: 1,
                changes: vec![
                    RegistryChange::Upsert(dev("a", false)),
                    RegistryChange::Delete {
                        device_id: "b".into(),
                    },
                ],
            },
            Origin::Control,
        )
        .expect("delta");
        assert_eq!(revocations(&mut rx), ["a", "b"]);
    }

    fn revocations(rx: &mut UnboundedReceiver<RouterInput>) -> Vec<String> {
        let mut revoked = Vec::new();
        while let Ok(RouterInput::Revoke { device_id }) = rx.try_recv() {
            revoked.push(device_id);
        }
        revoked
    }

    #[test]
    fn a_key_change_revokes_and_an_unchanged_upsert_does_not() {
        let store = Arc::new(MemStore::new(0));
        let (state, mut rx) = engine(store.clone());
        let devices = vec![dev("a", true), dev("b", true), dev("c", true)];
        let snapshot = |seq, devices| Update::Snapshot { seq, devices };
        apply(&state, snapshot(1, devices), Origin::Control).expect("snapshot");
        apply(
            &state,
            Update::Deltas {
                from_seq: 1,
                changes: vec![
                    RegistryChange::Upsert(DeviceAuth::with_keys("a", true, &[3], &[2])),
                    RegistryChange::Upsert(DeviceAuth::with_keys("b", true, &[1], &[4])),
                    RegistryChange::Upsert(dev("c", true)),
                    RegistryChange::Upsert(dev("new", true)),
                ],
            },
            Origin::Control,
        )
        .expect("delta");
        assert_eq!(revocations(&mut rx), ["a", "b"]);
        // A snapshot that changes c's keys (the link came back after a regeneration).
        let devices = vec![
            DeviceAuth::with_keys("a", true, &[3], &[2]),
            DeviceAuth::with_keys("b", true, &[1], &[4]),
            DeviceAuth::with_keys("c", true, &[5], &[2]),
            dev("new", true),
        ];
        apply(&state, snapshot(3, devices), Origin::Control).expect("snapshot");
        assert_eq!(revocations(&mut rx), ["c"]);
    }
}
