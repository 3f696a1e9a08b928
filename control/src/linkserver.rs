//! Control's end of the QUIC control link: brings each engine's registry replica up to date
//! (deltas from the change log when it has them, a snapshot otherwise), streams new changes in
//! order, and records the connection state engines report.

use std::collections::HashSet;
use std::sync::Arc;

use roost_model::link::{ControlFrame, EngineFrame};
use tokio::sync::broadcast::error::RecvError;

use roost_iothub::time::iso_ms;
use roost_server::link::read_frame_body;

use crate::api::iso_now;
use crate::metrics::ControlMetrics;
use crate::store::Store;

/// Most registry changes sent in one `Deltas` frame.
const MAX_DELTAS_PER_FRAME: usize = 1024;

pub struct LinkServer {
    pub store: Arc<Store>,
    pub metrics: Arc<ControlMetrics>,
}

impl LinkServer {
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
                let mut connected = HashSet::new();
                let why = me.serve(&conn, &mut connected).await;
                me.metrics.links_current.dec();
                tracing::info!(%remote, reason = %why, "engine link closed");
                // The engine is gone: its devices are no longer connected to it.
                let now = iso_now();
                for id in connected {
                    let _ = me.store.touch(&id, |d| {
                        d.connection_state = "Disconnected".into();
                        d.connection_state_updated_time = now.clone();
                    });
                }
            });
        }
    }

    async fn serve(&self, conn: &quinn::Connection, connected: &mut HashSet<String>) -> String {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => return e.to_string(),
        };
        // Subscribe before reading the state, so no change falls between the two.
        let mut changes = self.store.subscribe();
        let hello = match read_frame(&mut recv).await {
            Ok(EngineFrame::Hello { node, registry_seq }) => {
                tracing::info!(%node, registry_seq, "engine connected");
                registry_seq
            }
            Ok(other) => return format!("expected Hello, got {other:?}"),
            Err(e) => return e,
        };
        let mut sent = match self.catch_up(&mut send, hello).await {
            Ok(seq) => seq,
            Err(e) => return e,
        };
        let (frames_tx, mut frames_rx) = tokio::sync::mpsc::channel(1024);
        let reader = tokio::spawn(async move {
            loop {
                match read_frame(&mut recv).await {
                    Ok(f) => {
                        if frames_tx.send(f).await.is_err() {
                            return "link closing".to_string();
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
                        if let Err(e) = send.write_all(&frame.encode()).await { break e.to_string(); }
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
                    Err(RecvError::Closed) => break "store closed".into(),
                },
                frame = frames_rx.recv() => match frame {
                    Some(f) => self.on_engine_frame(f, connected),
                    None => break "engine closed the link".into(),
                },
            }
        };
        reader.abort();
        why
    }

    /// Sends what an engine at `have` lacks; returns the sequence it now has.
    async fn catch_up(&self, send: &mut quinn::SendStream, have: u64) -> Result<u64, String> {
        let current = self.store.registry_seq().map_err(|e| e.to_string())?;
        if have == current {
            return Ok(have);
        }
        let deltas = if have < current {
            self.store
                .changes_between(have, current)
                .map_err(|e| e.to_string())?
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
                let (seq, devices) = self.store.snapshot().map_err(|e| e.to_string())?;
                (ControlFrame::Snapshot { seq, devices }, seq)
            }
        };
        send.write_all(&frame.encode())
            .await
            .map_err(|e| e.to_string())?;
        Ok(seq)
    }

    fn on_engine_frame(&self, frame: EngineFrame, connected: &mut HashSet<String>) {
        let kind = match &frame {
            EngineFrame::Hello { .. } => "hello",
            EngineFrame::ConnectionState { .. } => "connection_state",
            EngineFrame::Activity { .. } => "activity",
            EngineFrame::Heartbeat { .. } => "heartbeat",
        };
        self.metrics.link_frames_in.with_label_values(&[kind]).inc();
        let result = match frame {
            EngineFrame::ConnectionState {
                device_id,
                connected: up,
                at_ms,
            } => {
                if up {
                    connected.insert(device_id.clone());
                } else {
                    connected.remove(&device_id);
                }
                let at = iso_ms(at_ms);
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
            EngineFrame::Hello { .. } | EngineFrame::Heartbeat { .. } => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "recording an engine report failed");
        }
    }
}

/// Engines send small frames; a larger one is a broken or hostile peer.
const MAX_ENGINE_FRAME: usize = 1024 * 1024;

async fn read_frame(recv: &mut quinn::RecvStream) -> Result<EngineFrame, String> {
    let body = read_frame_body(recv, MAX_ENGINE_FRAME).await?;
    EngineFrame::decode(&body).map_err(|e| e.to_string())
}
