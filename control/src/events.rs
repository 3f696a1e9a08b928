//! The hub's own events (issue 8 §6): twin changes, device and module lifecycle, connection
//! state, in the shapes IoT Hub emits them, appended to the built-in `events` log with
//! `iothub-message-source` `twinChangeEvents`, `deviceLifecycleEvents` and
//! `deviceConnectionStateEvents`.
//!
//! Control knows of these changes and the engines hold the log, so an event goes through an
//! outbox: it is written to control's store (column family `events_out`) in the same batch as
//! the change it tells of, and [`HubEvents::run`] sends the outbox, oldest first, to an engine
//! (`ControlFrame::Append`), deleting each event once the engine answers that it is durable.
//! No engine, or a refusal, and the event waits: at least once, never lost. The routing issue
//! will route them; until then they go to `events`.
//!
//! What it is not: telemetry (the engine appends a device's messages itself).

use std::sync::Arc;
use std::time::Duration;

use roost_iothub::time::iso_ms;
use roost_model::link::CommandOutcome;
use roost_model::message::{Message, Source, SystemProperties};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::api::now_ms;
use crate::linkserver::Commands;
use crate::metrics::ControlMetrics;
use crate::store::{Store, StoreError, Writes};

/// Events sent to an engine at a time (each waits for its own answer).
const BATCH: usize = 256;
/// How long an engine has to make an event durable.
const APPEND_TIMEOUT: Duration = Duration::from_secs(10);

/// An event as the outbox keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HubEvent {
    pub source: EventSource,
    pub device_id: String,
    pub module_id: Option<String>,
    /// `opType`: updateTwin, replaceTwin, createDeviceIdentity, deleteDeviceIdentity,
    /// createModuleIdentity, deleteModuleIdentity, deviceConnected, deviceDisconnected.
    pub op_type: String,
    pub at_ms: u64,
    pub body: Value,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum EventSource {
    TwinChange,
    Lifecycle,
    ConnectionState,
    /// A device's file upload completed.
    FileUpload,
}

impl EventSource {
    fn source(self) -> Source {
        match self {
            EventSource::TwinChange => Source::TwinChangeEvents,
            EventSource::Lifecycle => Source::DeviceLifecycleEvents,
            EventSource::ConnectionState => Source::DeviceConnectionStateEvents,
            EventSource::FileUpload => Source::FileUploadNotifications,
        }
    }

    /// `iothub-message-schema`.
    fn schema(self) -> &'static str {
        match self {
            EventSource::TwinChange => "twinChangeNotification",
            EventSource::Lifecycle => "deviceLifecycleNotification",
            EventSource::ConnectionState => "deviceConnectionStateNotification",
            EventSource::FileUpload => "fileUploadNotification",
        }
    }
}

impl HubEvent {
    pub fn new(source: EventSource, client_id: &str, op_type: &str, body: Value) -> Self {
        let (device_id, module_id) = match client_id.split_once('/') {
            Some((d, m)) => (d.to_string(), Some(m.to_string())),
            None => (client_id.to_string(), None),
        };
        HubEvent {
            source,
            device_id,
            module_id,
            op_type: op_type.to_string(),
            at_ms: now_ms(),
            body,
        }
    }

    /// A connection-state event; `sequenceNumber` orders one device's events (IoT Hub's is an
    /// opaque increasing string too).
    pub fn connection(client_id: &str, connected: bool, at_ms: u64, seq: u64) -> Self {
        let op = if connected {
            "deviceConnected"
        } else {
            "deviceDisconnected"
        };
        let mut e = Self::new(
            EventSource::ConnectionState,
            client_id,
            op,
            json!({ "sequenceNumber": format!("{at_ms:016X}{seq:016X}") }),
        );
        e.at_ms = at_ms;
        e
    }

    /// Adds the event to `writes`, the batch of the change it tells of.
    pub fn write_in(&self, writes: &mut Writes<'_>) {
        writes.put_event(&serde_json::to_vec(self).unwrap_or_default());
    }

    /// The record the log keeps: IoT Hub's application properties (`hubName`, `deviceId`,
    /// `moduleId`, `opType`, `operationTimestamp`, `iothub-message-schema`), a JSON body.
    pub fn message(&self, hub_name: &str) -> Message {
        let mut app = vec![
            ("hubName".to_string(), hub_name.to_string()),
            ("deviceId".to_string(), self.device_id.clone()),
        ];
        if let Some(m) = &self.module_id {
            app.push(("moduleId".to_string(), m.clone()));
        }
        app.push(("opType".to_string(), self.op_type.clone()));
        app.push(("operationTimestamp".to_string(), iso_ms(self.at_ms)));
        app.push((
            "iothub-message-schema".to_string(),
            self.source.schema().to_string(),
        ));
        Message {
            source: self.source.source(),
            enqueued_ms: now_ms(),
            system: SystemProperties {
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                connection_device_id: self.device_id.clone(),
                connection_module_id: self.module_id.clone(),
                ..SystemProperties::default()
            },
            app,
            body: self.body.to_string().into_bytes(),
        }
    }
}

pub struct HubEvents {
    pub store: Arc<Store>,
    pub commands: Arc<Commands>,
    pub metrics: Arc<ControlMetrics>,
    /// `hubName`: the first label of the hub's host name, as IoT Hub's is.
    pub hub_name: String,
    pub wake: Notify,
}

impl HubEvents {
    pub fn new(
        store: Arc<Store>,
        commands: Arc<Commands>,
        metrics: Arc<ControlMetrics>,
        hostname: &str,
    ) -> Self {
        HubEvents {
            store,
            commands,
            metrics,
            hub_name: hostname.split('.').next().unwrap_or(hostname).to_string(),
            wake: Notify::new(),
        }
    }

    /// An event written on its own (a connection state, which changes nothing else in the
    /// store that must go with it).
    pub fn emit(&self, event: &HubEvent) -> Result<(), StoreError> {
        self.store
            .put_event(&serde_json::to_vec(event).unwrap_or_default())?;
        self.wake.notify_one();
        Ok(())
    }

    /// The outbox has new events (written by the caller in a batch of its own).
    pub fn written(&self) {
        self.wake.notify_one();
    }

    /// Sends the outbox to the engines for as long as control runs.
    pub async fn run(self: Arc<Self>) {
        loop {
            let store = self.store.clone();
            let batch = match tokio::task::spawn_blocking(move || store.events_out(BATCH)).await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reading the event outbox failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(_) => continue,
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            // Every event of the batch is sent before any answer is awaited: the engine's
            // group commit makes them durable together.
            let mut done = Vec::new();
            let mut waits = Vec::with_capacity(batch.len());
            let mut all = true;
            for (seq, bytes) in &batch {
                let event: HubEvent = match serde_json::from_slice(bytes) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(seq, error = %e, "a corrupt event in the outbox is dropped");
                        done.push(*seq);
                        continue;
                    }
                };
                let label = event.source.source().as_str();
                match self
                    .commands
                    .append(&event.device_id, event.message(&self.hub_name))
                {
                    Some((id, answer)) => waits.push((*seq, id, label, answer)),
                    None => {
                        all = false;
                        break;
                    }
                }
            }
            let deadline = tokio::time::Instant::now() + APPEND_TIMEOUT;
            for (seq, id, label, answer) in waits {
                match tokio::time::timeout_at(deadline, answer).await {
                    Ok(Ok(CommandOutcome::Delivered)) => {
                        done.push(seq);
                        self.metrics.hub_events.with_label_values(&[label]).inc();
                    }
                    _ => {
                        self.commands.forget(id);
                        all = false;
                    }
                }
            }
            if !done.is_empty() {
                let store = self.store.clone();
                if let Ok(Err(e)) =
                    tokio::task::spawn_blocking(move || store.delete_events(&done)).await
                {
                    tracing::warn!(error = %e, "clearing the event outbox failed");
                }
            }
            if !all {
                // No engine, or one that could not take them: wait before sending again.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
