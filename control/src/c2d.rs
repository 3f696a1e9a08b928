//! Cloud-to-device messages (spec §2.3, §2.5, §4.6, §8): a durable queue per device at
//! control, delivered to the device's engine when it takes messages, completed by the
//! device's acknowledgement, expired after their time to live, with feedback records for the
//! service when a message asked for them.
//!
//! A message is sent with `POST /devices/{id}/messages/deviceBound` (roost's own REST path;
//! IoT Hub's service path is AMQP) and is in the queue (synced) before that is answered. At
//! most [`MAX_PENDING`] wait per device (403004 beyond). The engine says when a client takes
//! messages (`C2dReady`: it subscribed to its devicebound topic, or resumed a session that
//! had): every pending message is sent then, and each new one at once while it stays ready.
//! The device's settlement (`C2dSettled`: an MQTT PUBACK or AMQP accepted) deletes it;
//! an AMQP reject dead-letters it and a release sends it again. One sent to a connection that ended without
//! acknowledging it is sent again, marked redelivered (MQTT DUP), when the client is next
//! ready. Expired messages are dropped by a sweep every second.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use roost_model::link::{C2dMessage, C2dOutcome, DeviceCommand, ServiceReply, ServiceRequest};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::api::now_ms;
use crate::linkserver::Commands;
use crate::metrics::ControlMetrics;
use crate::store::{ServiceQueue, Store, StoreError};

/// Messages that may wait for one device (IoT Hub's limit).
pub const MAX_PENDING: usize = 50;
/// The largest message body (IoT Hub's limit).
pub const MAX_BODY: usize = 64 * 1024;
/// A message's time to live when the sender sets none, and the longest it may set.
pub const DEFAULT_TTL_MS: u64 = 3600 * 1000;
pub const MAX_TTL_MS: u64 = 2 * 24 * 3600 * 1000;
/// How long an HTTPS receive holds a message (IoT Hub's lock).
pub const HTTP_LOCK_MS: u64 = 60_000;
/// Times a message is sent before abandoning it once more dead-letters it (IoT Hub's default
/// max delivery count).
pub const MAX_DELIVERIES: u32 = 10;
/// Feedback records one read returns (IoT Hub batches 64).
const FEEDBACK_BATCH: usize = 64;

const LOCK_KEY: &[u8] = b"c2d_lock";
const FEEDBACK_KEY: &[u8] = b"feedback_seq";

/// What the sender asked to be told (`iothub-ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ack {
    None,
    Positive,
    Negative,
    Full,
}

impl Ack {
    pub fn parse(s: &str) -> Option<Ack> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Some(Ack::None),
            "positive" => Some(Ack::Positive),
            "negative" => Some(Ack::Negative),
            "full" => Some(Ack::Full),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Ack::None => "none",
            Ack::Positive => "positive",
            Ack::Negative => "negative",
            Ack::Full => "full",
        }
    }
}

/// A message as the sender gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub ack: Ack,
    /// Unix milliseconds; `None` for the default time to live.
    pub expiry_ms: Option<u64>,
    pub properties: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl NewMessage {
    /// A message an AMQP service link sent (`C2dMessage`), checked as the REST send is.
    pub fn from_link(m: C2dMessage) -> Result<Self, C2dFailure> {
        let ack = match m.ack.as_deref() {
            None => Ack::None,
            Some(a) => Ack::parse(a).ok_or_else(|| {
                C2dFailure::BadRequest(format!(
                    "iothub-ack must be none, positive, negative or full, not {a}"
                ))
            })?,
        };
        Ok(NewMessage {
            message_id: m.message_id,
            correlation_id: m.correlation_id,
            user_id: m.user_id,
            content_type: m.content_type,
            content_encoding: m.content_encoding,
            ack,
            expiry_ms: m.expiry_ms,
            properties: m.properties,
            body: m.body,
        })
    }
}

/// A message in a device's queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Queued {
    pub lock: u64,
    pub device_id: String,
    pub message_id: String,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub ack: Ack,
    pub enqueued_ms: u64,
    pub expiry_ms: u64,
    pub properties: Vec<(String, String)>,
    /// base64
    pub body: String,
    /// Times it was sent to a connection of the device.
    pub deliveries: u32,
    /// Taken by an HTTPS receive until then (Unix ms; IoT Hub's one-minute lock).
    #[serde(default)]
    pub http_lock_until_ms: Option<u64>,
}

impl Queued {
    /// Its property bag as the device receives it (spec §2.5): system keys first, then
    /// `iothub-ack`, then the application properties.
    fn bag(&self) -> Vec<(String, String)> {
        let mut bag = vec![
            ("$.mid".to_string(), self.message_id.clone()),
            (
                "$.to".to_string(),
                format!("/devices/{}/messages/deviceBound", self.device_id),
            ),
            (
                "$.exp".to_string(),
                roost_iothub::time::iso_ms(self.expiry_ms),
            ),
        ];
        for (key, value) in [
            ("$.cid", &self.correlation_id),
            ("$.uid", &self.user_id),
            ("$.ct", &self.content_type),
            ("$.ce", &self.content_encoding),
        ] {
            if let Some(v) = value {
                bag.push((key.to_string(), v.clone()));
            }
        }
        if self.ack != Ack::None {
            bag.push(("iothub-ack".to_string(), self.ack.name().to_string()));
        }
        bag.extend(self.properties.iter().cloned());
        bag
    }

    fn command(&self) -> DeviceCommand {
        DeviceCommand::C2d {
            lock: self.lock,
            properties: self.bag(),
            body: base64::engine::general_purpose::STANDARD
                .decode(&self.body)
                .unwrap_or_default(),
            redelivered: self.deliveries > 0,
        }
    }

    /// The feedback record for `status`, if the sender asked for it.
    fn feedback(&self, status: &str, now_ms: u64) -> Option<serde_json::Value> {
        let wanted = match (self.ack, status) {
            (Ack::Full, _) => true,
            (Ack::Positive, "Success") => true,
            (Ack::Negative, s) => s != "Success",
            _ => false,
        };
        wanted.then(|| {
            json!({
                "originalMessageId": self.message_id,
                "deviceId": self.device_id,
                "statusCode": status,
                "description": match status {
                    "Success" => "Success",
                    "Expired" => "Message expired",
                    "Rejected" => "Message rejected by the device",
                    "DeliveryCountExceeded" => "Message delivered too many times",
                    _ => status,
                },
                "enqueuedTimeUtc": roost_iothub::time::iso_ms(now_ms),
            })
        })
    }
}

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
pub enum C2dFailure {
    #[error("device {0} is not registered")]
    DeviceNotFound(String),
    #[error("device {0} has {MAX_PENDING} messages waiting already")]
    QueueFull(String),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn key(device_id: &str, lock: u64) -> Vec<u8> {
    let mut k = prefix(device_id);
    k.extend_from_slice(&lock.to_be_bytes());
    k
}

fn prefix(device_id: &str) -> Vec<u8> {
    let mut k = device_id.as_bytes().to_vec();
    k.push(0);
    k
}

fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

pub struct C2d {
    pub store: Arc<Store>,
    pub commands: Arc<Commands>,
    pub metrics: Arc<ControlMetrics>,
    /// Clients that take messages now, with the locks sent to them since they became ready.
    ready: Mutex<HashMap<String, HashSet<u64>>>,
    /// Serializes queue changes (send, complete, expire) so counts and deliveries agree.
    queue_lock: Mutex<()>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl C2d {
    pub fn new(store: Arc<Store>, commands: Arc<Commands>, metrics: Arc<ControlMetrics>) -> Self {
        Self {
            store,
            commands,
            metrics,
            ready: Mutex::new(HashMap::new()),
            queue_lock: Mutex::new(()),
        }
    }

    /// The messages waiting for `device_id`, oldest first.
    pub fn pending(&self, device_id: &str) -> Result<Vec<Queued>, StoreError> {
        self.store
            .c2d_scan(&prefix(device_id))?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(corrupt))
            .collect()
    }

    /// Queues `message` for `device_id` (synced before it returns); sends it at once if the
    /// device takes messages. Returns the message id.
    pub fn send(&self, device_id: &str, message: NewMessage) -> Result<String, C2dFailure> {
        if message.body.len() > MAX_BODY {
            return Err(C2dFailure::BadRequest(format!(
                "the message body is over {MAX_BODY} bytes"
            )));
        }
        let now = now_ms();
        let expiry_ms = match message.expiry_ms {
            None => now + DEFAULT_TTL_MS,
            Some(e) if e <= now => {
                return Err(C2dFailure::BadRequest(
                    "iothub-expiry is in the past".into(),
                ))
            }
            Some(e) if e > now + MAX_TTL_MS => {
                return Err(C2dFailure::BadRequest(
                    "iothub-expiry is more than 2 days away".into(),
                ))
            }
            Some(e) => e,
        };
        let _guard = locked(&self.queue_lock);
        if self.store.device(device_id)?.is_none() {
            return Err(C2dFailure::DeviceNotFound(device_id.to_string()));
        }
        let pending = self.pending(device_id)?;
        if pending.len() >= MAX_PENDING {
            self.metrics.c2d.with_label_values(&["queue_full"]).inc();
            return Err(C2dFailure::QueueFull(device_id.to_string()));
        }
        let lock = self.store.next_counter(LOCK_KEY)?;
        let mut queued = Queued {
            lock,
            device_id: device_id.to_string(),
            message_id: message.message_id.unwrap_or_else(|| format!("{lock:016x}")),
            correlation_id: message.correlation_id,
            user_id: message.user_id,
            content_type: message.content_type,
            content_encoding: message.content_encoding,
            ack: message.ack,
            enqueued_ms: now,
            expiry_ms,
            properties: message.properties,
            body: base64::engine::general_purpose::STANDARD.encode(&message.body),
            deliveries: 0,
            http_lock_until_ms: None,
        };
        self.write(&queued)?;
        self.metrics.c2d.with_label_values(&["queued"]).inc();
        self.set_count(device_id, pending.len() + 1);
        let id = queued.message_id.clone();
        self.deliver(device_id, std::slice::from_mut(&mut queued))?;
        Ok(id)
    }

    fn write(&self, q: &Queued) -> Result<(), StoreError> {
        let v = serde_json::to_vec(q).map_err(corrupt)?;
        self.store
            .c2d_write(&[(key(&q.device_id, q.lock), Some(v))])
    }

    /// The device's `cloudToDeviceMessageCount` is its queue's length.
    fn set_count(&self, device_id: &str, n: usize) {
        let _ = self
            .store
            .touch(device_id, |d| d.cloud_to_device_message_count = n as u64);
    }

    /// Sends the messages of `device_id` that its ready client has not been sent yet (none
    /// unless it is ready), counting each delivery.
    fn deliver(&self, device_id: &str, messages: &mut [Queued]) -> Result<(), StoreError> {
        let mut ready = locked(&self.ready);
        let Some(sent) = ready.get_mut(device_id) else {
            return Ok(());
        };
        let now = now_ms();
        for q in messages.iter_mut() {
            if q.expiry_ms <= now || sent.contains(&q.lock) {
                continue;
            }
            let command = q.command();
            if !self.commands.post(device_id, command) {
                break;
            }
            sent.insert(q.lock);
            let outcome = if q.deliveries > 0 {
                "redelivered"
            } else {
                "delivered"
            };
            self.metrics.c2d.with_label_values(&[outcome]).inc();
            q.deliveries += 1;
            self.write(q)?;
        }
        Ok(())
    }

    /// The client takes messages now: send it everything pending.
    pub fn on_ready(&self, client_id: &str) {
        // C2D is for devices; a module has no queue.
        if client_id.contains('/') {
            return;
        }
        let _guard = locked(&self.queue_lock);
        locked(&self.ready).insert(client_id.to_string(), HashSet::new());
        let result = self
            .pending(client_id)
            .and_then(|mut pending| self.deliver(client_id, &mut pending));
        if let Err(e) = result {
            tracing::warn!(error = %e, device = %client_id, "delivering C2D messages failed");
        }
    }

    /// The client's connection ended: what it was sent and did not acknowledge is sent again
    /// when it is next ready.
    pub fn on_disconnected(&self, client_id: &str) {
        locked(&self.ready).remove(client_id);
    }

    /// The client settled message `lock`: completed (deleted, feedback `Success`), rejected
    /// (dead-lettered: deleted, feedback `Rejected`) or abandoned (sent again at once, until it
    /// has been sent [`MAX_DELIVERIES`] times; then dead-lettered with
    /// `DeliveryCountExceeded`).
    pub fn on_settled(&self, client_id: &str, lock: u64, outcome: C2dOutcome) {
        let _guard = locked(&self.queue_lock);
        let result = (|| {
            let k = key(client_id, lock);
            let Some((_, v)) = self.store.c2d_scan(&k)?.into_iter().next() else {
                return Ok(()); // expired or settled already
            };
            let mut q: Queued = serde_json::from_slice(&v).map_err(corrupt)?;
            if let Some(ready) = locked(&self.ready).get_mut(client_id) {
                ready.remove(&lock);
            }
            let status = match outcome {
                C2dOutcome::Complete => "Success",
                C2dOutcome::Reject => "Rejected",
                C2dOutcome::Abandon if q.deliveries >= MAX_DELIVERIES => "DeliveryCountExceeded",
                C2dOutcome::Abandon => {
                    self.metrics.c2d.with_label_values(&["abandoned"]).inc();
                    return self.deliver(client_id, std::slice::from_mut(&mut q));
                }
            };
            self.store.c2d_write(&[(k, None)])?;
            let label = match status {
                "Success" => "completed",
                "Rejected" => "rejected",
                _ => "dead_lettered",
            };
            self.metrics.c2d.with_label_values(&[label]).inc();
            if let Some(record) = q.feedback(status, now_ms()) {
                self.add_feedback(&[record])?;
            }
            let left = self.pending(client_id)?.len();
            self.set_count(client_id, left);
            Ok::<(), StoreError>(())
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, device = %client_id, "settling a C2D message failed");
        }
    }

    /// An HTTPS receive (`GET /devices/{id}/messages/deviceBound`): the oldest message not
    /// expired and not locked by an earlier receive, locked for [`HTTP_LOCK_MS`] and counted as
    /// a delivery; its lock token is its lock.
    pub fn receive_locked(&self, device_id: &str) -> Result<Option<Queued>, StoreError> {
        let _guard = locked(&self.queue_lock);
        let now = now_ms();
        for mut q in self.pending(device_id)? {
            if q.expiry_ms <= now || q.http_lock_until_ms.is_some_and(|t| t > now) {
                continue;
            }
            q.http_lock_until_ms = Some(now + HTTP_LOCK_MS);
            q.deliveries += 1;
            self.write(&q)?;
            self.metrics.c2d.with_label_values(&["delivered"]).inc();
            return Ok(Some(q));
        }
        Ok(None)
    }

    /// An HTTPS settlement of the message locked as `lock`: `false` when no message holds that
    /// lock now (settled already, or its lock expired: 412002).
    pub fn settle_locked(
        &self,
        device_id: &str,
        lock: u64,
        outcome: C2dOutcome,
    ) -> Result<bool, StoreError> {
        {
            let _guard = locked(&self.queue_lock);
            let k = key(device_id, lock);
            let Some((_, v)) = self.store.c2d_scan(&k)?.into_iter().next() else {
                return Ok(false);
            };
            let mut q: Queued = serde_json::from_slice(&v).map_err(corrupt)?;
            if !q.http_lock_until_ms.is_some_and(|t| t > now_ms()) {
                return Ok(false);
            }
            q.http_lock_until_ms = None;
            self.write(&q)?;
        }
        self.on_settled(device_id, lock, outcome);
        Ok(true)
    }

    /// Drops every expired message, with feedback where asked; returns how many.
    pub fn sweep_expired(&self) -> Result<usize, StoreError> {
        let _guard = locked(&self.queue_lock);
        let now = now_ms();
        let mut expired = Vec::new();
        for (k, v) in self.store.c2d_scan(&[])? {
            let q: Queued = serde_json::from_slice(&v).map_err(corrupt)?;
            if q.expiry_ms <= now {
                expired.push((k, q));
            }
        }
        if expired.is_empty() {
            return Ok(0);
        }
        let deletes: Vec<_> = expired.iter().map(|(k, _)| (k.clone(), None)).collect();
        self.store.c2d_write(&deletes)?;
        let records: Vec<_> = expired
            .iter()
            .filter_map(|(_, q)| q.feedback("Expired", now))
            .collect();
        self.add_feedback(&records)?;
        let mut devices: Vec<&str> = expired.iter().map(|(_, q)| q.device_id.as_str()).collect();
        devices.dedup();
        for d in devices {
            let left = self.pending(d)?.len();
            self.set_count(d, left);
        }
        self.metrics
            .c2d
            .with_label_values(&["expired"])
            .inc_by(expired.len() as u64);
        Ok(expired.len())
    }

    fn add_feedback(&self, records: &[serde_json::Value]) -> Result<(), StoreError> {
        let mut rows = Vec::with_capacity(records.len());
        for r in records {
            let seq = self.store.next_counter(FEEDBACK_KEY)?;
            rows.push((seq, serde_json::to_vec(r).map_err(corrupt)?));
        }
        if !rows.is_empty() {
            self.store.queue_put(ServiceQueue::Feedback, &rows)?;
        }
        Ok(())
    }

    /// Up to 64 feedback records, oldest first, and the lock token that completes them
    /// (`None` when there are none).
    pub fn feedback(&self) -> Result<Option<(String, Vec<serde_json::Value>)>, StoreError> {
        let rows = self.store.queue_list(ServiceQueue::Feedback, FEEDBACK_BATCH)?;
        let Some((last, _)) = rows.last() else {
            return Ok(None);
        };
        let lock = last.to_string();
        let records = rows
            .iter()
            .map(|(_, v)| serde_json::from_slice(v).map_err(corrupt))
            .collect::<Result<_, _>>()?;
        Ok(Some((lock, records)))
    }

    /// Completes the feedback records a read with `lock` returned; `false` for a token that
    /// is not a number.
    pub fn complete_feedback(&self, lock: &str) -> Result<bool, StoreError> {
        let Ok(seq) = lock.parse::<u64>() else {
            return Ok(false);
        };
        self.store.queue_delete_through(ServiceQueue::Feedback, seq)?;
        Ok(true)
    }
}

/// Answers an AMQP service link's call (`EngineFrame::Service`) as the REST API answers the
/// same operation.
pub fn serve_request(c2d: &C2d, request: ServiceRequest) -> ServiceReply {
    let refused = |status: u16, code: u32, message: String| ServiceReply::Refused {
        status,
        code,
        message,
    };
    let server = |e: StoreError| refused(500, 500001, e.to_string());
    match request {
        ServiceRequest::C2dSend { device_id, message } => {
            let sent = NewMessage::from_link(*message).and_then(|m| c2d.send(&device_id, m));
            match sent {
                Ok(id) => {
                    tracing::debug!(device = %device_id, message_id = %id, "C2D message queued over AMQP");
                    ServiceReply::Done
                }
                Err(C2dFailure::DeviceNotFound(id)) => {
                    refused(404, 404001, format!("device {id} is not registered"))
                }
                Err(e @ C2dFailure::QueueFull(_)) => refused(403, 403004, e.to_string()),
                Err(C2dFailure::BadRequest(m)) => refused(400, 400004, m),
                Err(C2dFailure::Store(e)) => server(e),
            }
        }
        ServiceRequest::FeedbackReceive => match c2d.feedback() {
            Ok(None) => ServiceReply::NoFeedback,
            Ok(Some((lock, records))) => ServiceReply::Feedback {
                lock,
                body: serde_json::to_vec(&records).unwrap_or_default(),
            },
            Err(e) => server(e),
        },
        ServiceRequest::C2dReceive { device_id } => match c2d.receive_locked(&device_id) {
            Ok(None) => ServiceReply::NoMessage,
            Ok(Some(q)) => match q.command() {
                DeviceCommand::C2d {
                    lock,
                    properties,
                    body,
                    ..
                } => ServiceReply::Message {
                    lock,
                    properties,
                    body,
                },
                _ => server(StoreError::Corrupt("not a C2D message".into())),
            },
            Err(e) => server(e),
        },
        ServiceRequest::C2dSettleLocked {
            device_id,
            lock,
            outcome,
        } => match c2d.settle_locked(&device_id, lock, outcome) {
            Ok(true) => ServiceReply::Done,
            Ok(false) => refused(
                412,
                412002,
                format!("no message of {device_id} holds the lock {lock} (settled, or its lock expired)"),
            ),
            Err(e) => server(e),
        },
        ServiceRequest::FeedbackComplete { lock } => match c2d.complete_feedback(&lock) {
            Ok(true) => ServiceReply::Done,
            Ok(false) => refused(412, 412002, format!("{lock} is not a feedback lock token")),
            Err(e) => server(e),
        },
        // The link server gives these to the service API.
        ServiceRequest::RestAdmit { .. } | ServiceRequest::Rest { .. } => {
            refused(500, 500001, "a REST request is served by the service API".into())
        }
        ServiceRequest::FileUpload { .. }
        | ServiceRequest::FileNotificationReceive
        | ServiceRequest::FileNotificationComplete { .. } => {
            refused(500, 500001, "file uploads are served by the file uploads".into())
        }
    }
}
