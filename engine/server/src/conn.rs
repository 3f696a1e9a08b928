//! The MQTT adapter: one MQTT connection on a shard. It reads frames into `roost-mqtt`'s
//! sans-IO session (every protocol decision is the state machine's), turns a CONNECT into a
//! SAS claim and a telemetry PUBLISH into a record for the protocol-neutral
//! [`DeviceSession`], sends PUBACK once the session says the record is durable, and publishes
//! what control puts in the session's inbox on the topics the device subscribed to.
//!
//! A connection is a single task. It waits on whichever comes first — bytes from the peer, the
//! log making the oldest unacknowledged batch durable, or its signal (kick, deadline, inbox) —
//! so reading never stalls behind a sync and acknowledgements keep the order of the publishes.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::future;
use roost_iothub::props::{encode_bag, PropertyBag, SystemProps};
use roost_iothub::topic::{device_may_subscribe, parse_publish_topic, DeviceTopic};
use roost_model::link::DeviceCommand;
use roost_mqtt::{
    ConnectReturnCode, Error as MqttError, Event, QoS, ServerSession, SessionConfig, State, Str,
    SubackCode,
};
use roost_session::auth::mqtt_credentials;
use roost_session::telemetry::{self, MAX_D2C_BODY};
use roost_session::DisconnectReason;

use crate::session::{unix_now, DeviceSession};
use crate::shard::Shard;
use crate::signal::Wake;
use crate::wire::{Wire, WireError};

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer that takes longer than this to accept our bytes is dropped (it stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time given to the last bytes and the TLS close of a connection being closed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

type Reason = DisconnectReason;

enum Woken {
    Read(Result<usize, WireError>),
    Durable(Result<(), crate::log::LogFailed>),
    Signal(Wake),
}

/// The device-bound filters a session subscribed to, with the QoS granted for each.
#[derive(Default, Clone, Copy)]
struct Subscribed {
    c2d: Option<QoS>,
    methods: Option<QoS>,
    twin_responses: Option<QoS>,
    desired: Option<QoS>,
}

impl Subscribed {
    /// The slot `filter` fills, if it is one of the device-bound filters.
    fn slot(&mut self, filter: &str) -> Option<&mut Option<QoS>> {
        match filter {
            "$iothub/twin/res/#" => Some(&mut self.twin_responses),
            "$iothub/methods/POST/#" => Some(&mut self.methods),
            "$iothub/twin/PATCH/properties/desired/#" => Some(&mut self.desired),
            f if f.ends_with("/messages/devicebound/#") => Some(&mut self.c2d),
            _ => None,
        }
    }

    fn forget(&mut self, filter: &str) {
        if let Some(slot) = self.slot(filter) {
            *slot = None;
        }
    }
}

struct Conn {
    session: DeviceSession<u16>,
    mqtt: ServerSession,
    subscribed: Subscribed,
    /// Plaintext received and not yet a whole frame. Empty, with no allocation, between
    /// bursts: reads go through the shard's buffer.
    rbuf: BytesMut,
    wbuf: BytesMut,
}

/// Serves one accepted connection (plain or TLS) to the end.
pub async fn serve(shard: std::rc::Rc<Shard>, mut wire: Wire) {
    let mut rbuf = BytesMut::new();
    let handshake = async { Some(wire.handshake(&shard.rx, &mut rbuf).await) };
    let timeout = async {
        glommio::timer::Timer::new(HANDSHAKE_TIMEOUT).await;
        None
    };
    match future::or(handshake, timeout).await {
        Some(Ok(())) => {}
        Some(Err(_)) => {
            return shard
                .metrics
                .disconnects
                .inc(DisconnectReason::TlsHandshakeFailed.error_code())
        }
        None => {
            return shard
                .metrics
                .disconnects
                .inc(DisconnectReason::TlsHandshakeTimeout.error_code())
        }
    }
    let now = Instant::now();
    let mut conn = Conn {
        session: DeviceSession::open(shard),
        mqtt: ServerSession::new(now, SessionConfig::default()),
        subscribed: Subscribed::default(),
        rbuf,
        wbuf: BytesMut::new(),
    };
    let reason = conn.run(&mut wire).await;
    // What the session still owes (a refusing CONNACK) goes out with the goodbye.
    conn.mqtt.poll_transmit(&mut conn.wbuf);
    // Best effort, bounded: the peer may be gone or may have stopped reading.
    let goodbye = async {
        if !conn.wbuf.is_empty() {
            let _ = wire.write_all(&conn.wbuf).await;
        }
        let _ = wire.close().await;
    };
    let give_up = async {
        glommio::timer::Timer::new(CLOSE_TIMEOUT).await;
    };
    future::or(goodbye, give_up).await;
    conn.session.finish(reason);
}

impl Conn {
    async fn run(&mut self, wire: &mut Wire) -> Reason {
        // Bytes that came with the end of the TLS handshake.
        if !self.rbuf.is_empty() {
            if let Err(reason) = self.on_bytes() {
                return reason;
            }
        }
        loop {
            if self.mqtt.poll_transmit(&mut self.wbuf) {
                let write = async { wire.write_all(&self.wbuf).await.is_ok() };
                let stalled = async {
                    glommio::timer::Timer::new(WRITE_TIMEOUT).await;
                    false
                };
                if !future::or(write, stalled).await {
                    // Some of it may be out already; sending it again at goodbye would break
                    // the stream.
                    self.wbuf.clear();
                    return DisconnectReason::WriteStalled;
                }
                self.wbuf.clear();
            }
            match self.mqtt.state() {
                State::Closed if self.session.identity().is_none() => {
                    return DisconnectReason::Refused
                }
                State::Closed => return DisconnectReason::ClientDisconnect,
                _ => {}
            }
            if let Some(reason) = self.session.signal().pending_close() {
                return reason;
            }
            self.session.set_deadline(self.mqtt.poll_timeout());
            if self.rbuf.is_empty() && self.session.is_quiet() {
                // Going quiet: an idle connection holds no buffers.
                self.release_buffers();
            }
            // A connection whose input never runs dry must still let the shard's other tasks
            // (the log committer, other connections) run, and must not outrun the log.
            glommio::yield_if_needed().await;
            self.session.shard.log.room().await;

            let filled = self.rbuf.len();
            let woken = {
                let rbuf = &mut self.rbuf;
                let shard = self.session.shard.clone();
                let sig = self.session.signal();
                let read = async { Woken::Read(wire.read(&shard.rx, rbuf).await) };
                let signal = async { Woken::Signal(sig.wait().await) };
                match self.session.oldest_unacked_batch() {
                    Some(batch) => {
                        let log = shard.log.clone();
                        let durable = async move { Woken::Durable(log.durable(batch).await) };
                        future::or(read, future::or(durable, signal)).await
                    }
                    None => future::or(read, signal).await,
                }
            };
            // A read that lost the race may still have delivered bytes (it appends before it
            // finishes sending TLS output); whatever arrived is handled first, so a packet that
            // came in time is not judged by a keep-alive check that fired meanwhile.
            if self.rbuf.len() > filled {
                if let Err(reason) = self.on_bytes() {
                    return reason;
                }
            }
            let step = match woken {
                Woken::Read(Ok(0)) => Err(if self.session.identity().is_some() {
                    DisconnectReason::ConnectionLost
                } else {
                    DisconnectReason::ClosedBeforeConnect
                }),
                Woken::Read(Ok(_)) => Ok(()),
                Woken::Read(Err(WireError::Io(_))) => Err(DisconnectReason::IoError),
                // A record that fails to decrypt or parse, an alert from the peer.
                Woken::Read(Err(_)) => Err(DisconnectReason::TlsError),
                Woken::Durable(Ok(())) => {
                    self.ack_durable();
                    Ok(())
                }
                Woken::Durable(Err(_)) => Err(DisconnectReason::LogWriteFailed),
                Woken::Signal(Wake::Close(reason)) => Err(reason),
                Woken::Signal(Wake::CheckTimeout) => self
                    .mqtt
                    .handle_timeout(Instant::now())
                    .map_err(|v| DisconnectReason::Protocol(v.error_code())),
                Woken::Signal(Wake::Inbox) => self.drain_inbox(),
            };
            if let Err(reason) = step {
                return reason;
            }
        }
    }

    /// Frees what a quiet connection does not need: the read and write buffers and the
    /// session's queues grow back on the next burst.
    fn release_buffers(&mut self) {
        if self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
        }
        if self.wbuf.is_empty() && self.wbuf.capacity() > 0 {
            self.wbuf = BytesMut::new();
        }
        self.session.release_idle_memory();
        self.mqtt.release_idle_memory();
    }

    /// PUBACKs every publish whose batch is durable, in order.
    fn ack_durable(&mut self) {
        for pkid in self.session.durable_acks() {
            self.mqtt.ack_publish(pkid);
        }
    }

    fn on_bytes(&mut self) -> Result<(), Reason> {
        // One clock read per read batch, not per message: every message in it arrived together.
        let now = Instant::now();
        let wall_ms = unix_now().as_millis() as u64;
        loop {
            let len = match roost_mqtt::check(&self.rbuf, self.mqtt.limits()) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(e) => {
                    let v = self.mqtt.handle_decode_error(e);
                    return Err(DisconnectReason::Protocol(v.error_code()));
                }
            };
            let frame = self.rbuf.split_to(len).freeze();
            if let Err(v) = self.mqtt.handle_frame(now, frame) {
                if let roost_mqtt::Violation::Malformed(MqttError::UnsupportedProtocolLevel(_)) = v
                {
                    // CONNACK 1 is queued; count it as the refusal it is.
                    self.session.refuse("unsupported_protocol");
                }
                return Err(DisconnectReason::Protocol(v.error_code()));
            }
            self.on_events(now, wall_ms)?;
            if self.mqtt.state() == State::Closed {
                break;
            }
        }
        // Ack whatever became durable meanwhile so a pipelining client is not held back.
        self.ack_durable();
        Ok(())
    }

    fn on_events(&mut self, now: Instant, wall_ms: u64) -> Result<(), Reason> {
        while let Some(event) = self.mqtt.poll_event() {
            match event {
                Event::Connect(c) => {
                    let outcome = match mqtt_credentials(
                        c.client_id.as_str(),
                        c.username.as_ref().map(|u| u.as_str()),
                        c.password.as_deref(),
                    ) {
                        Ok(claim) => self.session.authenticate(&claim).map(|_| ()),
                        Err(refusal) => {
                            self.session.refuse(refusal.reason());
                            Err(refusal)
                        }
                    };
                    match outcome {
                        Ok(()) => self.mqtt.accept(false),
                        Err(refusal) => {
                            tracing::debug!(reason = refusal.reason(), client_id = %c.client_id.as_str(), "CONNECT refused");
                            self.mqtt.refuse(ConnectReturnCode::NotAuthorized);
                        }
                    }
                }
                Event::Publish(p) => self.on_publish(p, now, wall_ms)?,
                Event::Subscribe(s) => {
                    let codes: Vec<SubackCode> = s
                        .filters
                        .iter()
                        .map(|(f, q)| self.grant(f.as_str(), *q))
                        .collect();
                    self.mqtt.grant_subscribe(s.pkid, &codes);
                }
                Event::Unsubscribe(u) => {
                    for f in &u.filters {
                        self.subscribed.forget(f.as_str());
                    }
                    self.mqtt.ack_unsubscribe(u.pkid);
                }
                Event::Disconnect => return Err(DisconnectReason::ClientDisconnect),
                Event::PubAck(_) => self.drain_inbox()?,
            }
        }
        Ok(())
    }

    /// SUBACK code for a filter (IoT Hub's policy, spec §2.3), remembering device-bound ones.
    fn grant(&mut self, filter: &str, qos: QoS) -> SubackCode {
        if !device_may_subscribe(filter) {
            return SubackCode::Failure;
        }
        let granted = if qos == QoS::AtMostOnce {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        if let Some(slot) = self.subscribed.slot(filter) {
            *slot = Some(granted);
        }
        SubackCode::Granted(granted)
    }

    /// Publishes what control put in the inbox, oldest first, while the in-flight window has
    /// room. A command for a topic the device has not subscribed to (now) is dropped and
    /// counted: IoT Hub delivers nothing to an unsubscribed device, and when to hold a command
    /// for a subscription yet to come is the cloud-to-device issue's to decide.
    fn drain_inbox(&mut self) -> Result<(), Reason> {
        if self.session.identity().is_none() {
            return Ok(());
        }
        while self.mqtt.can_send() {
            let Some(command) = self.session.next_command() else {
                return Ok(());
            };
            let kind = command.kind();
            let Some(identity) = self.session.identity() else {
                return Ok(());
            };
            let (topic, body, qos) = match command {
                DeviceCommand::Disconnect { .. } => return Err(DisconnectReason::ClosedByService),
                DeviceCommand::C2d {
                    message_id,
                    properties,
                    body,
                } => {
                    let Some(qos) = self.subscribed.c2d else {
                        self.dropped(kind);
                        continue;
                    };
                    let bag = encode_bag(&PropertyBag {
                        system: SystemProps {
                            message_id: Some(message_id),
                            ..SystemProps::default()
                        },
                        app: properties,
                    });
                    let device = &identity.device_id;
                    (
                        format!("devices/{device}/messages/devicebound/{bag}"),
                        body,
                        qos,
                    )
                }
                DeviceCommand::MethodRequest { name, rid, payload } => {
                    let Some(qos) = self.subscribed.methods else {
                        self.dropped(kind);
                        continue;
                    };
                    (
                        format!("$iothub/methods/POST/{name}/?$rid={rid}"),
                        payload,
                        qos,
                    )
                }
                DeviceCommand::DesiredPatch { version, body } => {
                    let Some(qos) = self.subscribed.desired else {
                        self.dropped(kind);
                        continue;
                    };
                    (
                        format!("$iothub/twin/PATCH/properties/desired/?$version={version}"),
                        body,
                        qos,
                    )
                }
                DeviceCommand::TwinResponse {
                    rid,
                    status,
                    version,
                    body,
                } => {
                    let Some(qos) = self.subscribed.twin_responses else {
                        self.dropped(kind);
                        continue;
                    };
                    let version = version
                        .map(|v| format!("&$version={v}"))
                        .unwrap_or_default();
                    (
                        format!("$iothub/twin/res/{status}/?$rid={rid}{version}"),
                        body,
                        qos,
                    )
                }
            };
            if let Err(e) = self
                .mqtt
                .send_publish(Str::from(topic), Bytes::from(body), qos, false)
            {
                tracing::debug!(error = %e, kind, "cannot publish a command");
                self.dropped(kind);
            }
        }
        Ok(())
    }

    fn dropped(&self, kind: &'static str) {
        self.session.shard.metrics.commands_dropped.inc(kind);
    }

    // hot path: parse the property bag, build the record, one append.
    fn on_publish(
        &mut self,
        p: roost_mqtt::Publish,
        now: Instant,
        wall_ms: u64,
    ) -> Result<(), Reason> {
        let Some(identity) = self.session.identity() else {
            return Err(DisconnectReason::PublishBeforeConnect);
        };
        let topic =
            parse_publish_topic(p.topic.as_str()).map_err(|_| DisconnectReason::NotIotHubTopic)?;
        let DeviceTopic::Telemetry {
            device,
            module,
            bag,
        } = topic
        else {
            return Err(DisconnectReason::UnsupportedTopic);
        };
        if device != identity.device_id || module != identity.module_id.as_deref() {
            return Err(DisconnectReason::TopicDeviceMismatch);
        }
        if p.payload.len() > MAX_D2C_BODY {
            return Err(DisconnectReason::PayloadTooLarge);
        }
        let bag = roost_iothub::props::decode_bag(bag)
            .map_err(|e| DisconnectReason::Protocol(e.error_code()))?;
        let message = telemetry::record(identity, bag, p.retain, &p.payload, wall_ms);
        let ack = (p.qos == QoS::AtLeastOnce).then_some(p.pkid);
        self.session.ingest(&message, ack, p.payload.len(), now)
    }
}
