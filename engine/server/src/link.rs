//! The engine's end of the control link (DESIGN.md §6), on the engine's tokio thread — never on
//! a shard. It keeps the registry replica current (snapshot, then ordered deltas; persisted
//! before it is published to the shards) and reports connection state back. While control is
//! away it keeps the latest state per device and reconnects with backoff; the shards go on
//! with the replica they have.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crossbeam::channel::Sender;
use roost_model::link::{ControlFrame, DeviceAuth, EngineFrame, RegistryChange};
use roost_registry::{Projection, Registry, ReplicaStore};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::metrics::Metrics;
use crate::shard::ShardCommand;
use crate::tls::LINK_SERVER_NAME;

/// What the link needs from the engine.
pub struct LinkContext {
    pub node: String,
    pub control: SocketAddr,
    pub client: quinn::ClientConfig,
    pub registry: Arc<Registry>,
    pub replica: Box<dyn ReplicaStore + Send + Sync>,
    pub metrics: Arc<Metrics>,
    pub shards: Vec<Sender<ShardCommand>>,
}

const HEARTBEAT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Runs the link forever: connect, serve, back off, repeat.
pub async fn run(ctx: Arc<LinkContext>, mut events: UnboundedReceiver<EngineFrame>) {
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
    loop {
        match connect(&endpoint, &ctx).await {
            Ok(conn) => {
                backoff = Duration::from_millis(100);
                ctx.metrics.link_connected.set(1);
                tracing::info!(control = %ctx.control, "control link up");
                let why = serve(&ctx, conn, &mut events, &mut pending).await;
                tracing::warn!(reason = %why, "control link down");
                ctx.metrics.link_connected.set(0);
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

fn coalesce(pending: &mut HashMap<String, EngineFrame>, ev: EngineFrame) {
    let key = match &ev {
        EngineFrame::ConnectionState { device_id, .. } => format!("c/{device_id}"),
        EngineFrame::Activity { device_id, .. } => format!("a/{device_id}"),
        _ => return,
    };
    pending.insert(key, ev);
}

async fn connect(
    endpoint: &quinn::Endpoint,
    ctx: &LinkContext,
) -> Result<quinn::Connection, String> {
    let connecting = endpoint
        .connect(ctx.control, LINK_SERVER_NAME)
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())
}

async fn write_frame(send: &mut quinn::SendStream, frame: &EngineFrame) -> Result<(), String> {
    send.write_all(&frame.encode())
        .await
        .map_err(|e| e.to_string())
}

/// Reads one length-prefixed link frame's body, refusing one longer than `max` before
/// allocating for it. Both ends of the link read with this.
pub async fn read_frame_body(recv: &mut quinn::RecvStream, max: usize) -> Result<Vec<u8>, String> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| e.to_string())?;
    let len = roost_model::link::frame_len(prefix).map_err(|e| e.to_string())?;
    if len > max {
        return Err(format!("link frame of {len} bytes exceeds {max}"));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(body)
}

async fn read_frame(recv: &mut quinn::RecvStream) -> Result<ControlFrame, String> {
    let body = read_frame_body(recv, roost_model::link::MAX_FRAME).await?;
    ControlFrame::decode(&body).map_err(|e| e.to_string())
}

async fn serve(
    ctx: &Arc<LinkContext>,
    conn: quinn::Connection,
    events: &mut UnboundedReceiver<EngineFrame>,
    pending: &mut HashMap<String, EngineFrame>,
) -> String {
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    let hello = EngineFrame::Hello {
        node: ctx.node.clone(),
        registry_seq: ctx.registry.load().seq(),
    };
    if let Err(e) = write_frame(&mut send, &hello).await {
        return e;
    }
    for (_, ev) in pending.drain() {
        if let Err(e) = write_frame(&mut send, &ev).await {
            return e;
        }
    }
    // Frames from control are applied by their own task so a slow apply never stalls reports.
    let reader_ctx = ctx.clone();
    let mut reader = tokio::spawn(async move {
        loop {
            let frame = match read_frame(&mut recv).await {
                Ok(f) => f,
                Err(e) => return e,
            };
            if let Err(e) = apply(&reader_ctx, frame) {
                return e;
            }
        }
    });
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let why = loop {
        tokio::select! {
            res = &mut reader => break match res {
                Ok(e) => e,
                Err(e) => e.to_string(),
            },
            ev = events.recv() => {
                let Some(ev) = ev else { break "engine stopping".into() };
                if let Err(e) = write_frame(&mut send, &ev).await {
                    coalesce(pending, ev);
                    break e;
                }
            }
            _ = heartbeat.tick() => {
                let hb = EngineFrame::Heartbeat { registry_seq: ctx.registry.load().seq() };
                if let Err(e) = write_frame(&mut send, &hb).await { break e; }
            }
        }
    };
    reader.abort();
    conn.close(0u32.into(), b"bye");
    why
}

/// Applies one frame: persist first, then publish to the shards, then close connections of
/// devices that may no longer connect.
fn apply(ctx: &LinkContext, frame: ControlFrame) -> Result<(), String> {
    let current = ctx.registry.load();
    let (next, revoked) = match frame {
        ControlFrame::Snapshot { seq, devices } => {
            ctx.replica
                .replace(seq, &devices)
                .map_err(|e| e.to_string())?;
            let next = Projection::new(seq, devices);
            let revoked: Vec<String> = revoked_by_snapshot(&current, &next);
            (next, revoked)
        }
        ControlFrame::Deltas { from_seq, changes } => {
            if from_seq != current.seq() {
                return Err(format!(
                    "delta from {from_seq} does not follow replica at {}",
                    current.seq()
                ));
            }
            ctx.replica
                .apply(from_seq, &changes)
                .map_err(|e| e.to_string())?;
            let revoked = changes.iter().filter_map(revoked_by_change).collect();
            (current.with_changes(&changes), revoked)
        }
    };
    ctx.metrics.registry_sequence.set(next.seq() as i64);
    ctx.metrics.registry_devices.set(next.len() as i64);
    tracing::debug!(
        seq = next.seq(),
        devices = next.len(),
        "registry replica updated"
    );
    ctx.registry.replace(next);
    let now = std::time::Instant::now();
    for device_id in revoked {
        for tx in &ctx.shards {
            let _ = tx.send(ShardCommand::Kick {
                device_id: device_id.clone(),
                before: now,
                reason: "device_revoked",
            });
        }
    }
    Ok(())
}

fn revoked_by_change(change: &RegistryChange) -> Option<String> {
    match change {
        RegistryChange::Upsert(DeviceAuth {
            device_id,
            enabled: false,
            ..
        }) => Some(device_id.clone()),
        RegistryChange::Upsert(_) => None,
        RegistryChange::Delete { device_id } => Some(device_id.clone()),
    }
}

fn revoked_by_snapshot(old: &Projection, new: &Projection) -> Vec<String> {
    old.device_ids()
        .filter(|id| new.device(id).is_none_or(|d| !d.enabled))
        .map(str::to_string)
        .collect()
}
