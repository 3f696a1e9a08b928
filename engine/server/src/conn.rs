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
use roost_iothub::topic::{parse_publish_topic, DeviceFilter, DeviceTopic, TopicError};
use roost_iothub::x509::{CertError, ClientCert};
use roost_model::link::{C2dOutcome, DeviceCommand, TwinOp};
use roost_mqtt::{
    ConnectReturnCode, Error as MqttError, Event, QoS, ServerSession, SessionConfig, State, Str,
    SubackCode,
};
use roost_session::auth::{mqtt_credentials, mqtt_x509_claim};
use roost_session::telemetry;
use roost_session::{DisconnectReason, PreAuthSlot, Refusal};

use crate::metrics::Transport;
use crate::session::{unix_now, DeviceSession};
use crate::sessions::Subscriptions;
use crate::shard::{Queue, Shard};
use crate::signal::Wake;
use crate::wire::{Wire, WireError};

/// Time for the TLS handshake; then the MQTT session gives the client as long again to send
/// CONNECT. With the shard's 100 ms deadline precision, a silent peer is gone within 10 s.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(9);
/// A peer that takes longer than this to accept our bytes is dropped (it stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time given to the last bytes and the TLS close of a connection being closed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

type Reason = DisconnectReason;

enum Woken {
    Read(Result<usize, WireError>),
    Durable(Result<(), crate::log::LogFailed>),
    Signal(Wake),
    /// A throttled connection's wait is over.
    Unthrottled,
}

struct Conn {
    session: DeviceSession<u16>,
    mqtt: ServerSession,
    subscribed: Subscriptions,
    /// CleanSession=0: the subscriptions outlive the connection (`crate::sessions`).
    persistent: bool,
    /// C2D messages sent at QoS 1 and not yet acknowledged: (packet id, lock at control).
    /// Those left when the connection ends are redelivered by control to the next one.
    c2d_inflight: Vec<(u16, u64)>,
    /// Plaintext received and not yet a whole frame. Empty, with no allocation, between
    /// bursts: reads go through the shard's buffer.
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Over a send quota: frames are not handled, nor bytes read, until then.
    throttled_until: Option<Instant>,
    /// The certificate the client presented in the TLS handshake, read, until CONNECT decides
    /// what it proves.
    client_cert: Option<Box<Result<ClientCert, CertError>>>,
}

/// Serves one accepted connection (plain or TLS) to the end. `pre_auth` is its place under
/// the caps on unauthenticated connections, given back when it authenticates or ends.
pub async fn serve(shard: std::rc::Rc<Shard>, mut wire: Wire, pre_auth: PreAuthSlot) {
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
                .of(Transport::Mqtt)
                .disconnects
                .inc(DisconnectReason::TlsHandshakeFailed.error_code())
        }
        None => {
            return shard
                .metrics
                .of(Transport::Mqtt)
                .disconnects
                .inc(DisconnectReason::TlsHandshakeTimeout.error_code())
        }
    }
    serve_established(shard, wire, pre_auth, rbuf, Transport::Mqtt).await;
}

/// Frame limits of MQTT over a WebSocket: a frame carries a packet or part of one, so until
/// CONNECT is through it is as small as the session's first-packet limit (plus the headers of
/// both); then as large as the largest packet taken.
pub const WS_FRAME_BEFORE_CONNECT: usize = 8 * 1024 + 64;
pub const WS_FRAME_AFTER_CONNECT: usize = 512 * 1024;

/// Serves a connection whose transport is up (TLS done; on port 443, the WebSocket upgraded:
/// `transport` says which), with `rbuf` holding the MQTT bytes that came already.
pub async fn serve_established(
    shard: std::rc::Rc<Shard>,
    mut wire: Wire,
    pre_auth: PreAuthSlot,
    rbuf: BytesMut,
    transport: Transport,
) {
    let now = Instant::now();
    let mut conn = Conn {
        session: DeviceSession::open(shard.clone(), pre_auth, transport),
        mqtt: ServerSession::new(now, SessionConfig::default()),
        subscribed: Subscriptions::default(),
        persistent: false,
        c2d_inflight: Vec::new(),
        rbuf,
        wbuf: BytesMut::new(),
        throttled_until: None,
        client_cert: wire
            .client_certs()
            .map(|chain| Box::new(ClientCert::from_chain(chain))),
    };
    match conn.until_authenticated(&mut wire).await {
        // The rest of the connection's life is in the devices' task queue.
        Ok(()) => shard.spawn_connection(Queue::Devices, transport, async move {
            wire.set_ws_max_frame(WS_FRAME_AFTER_CONNECT);
            let reason = conn.run(&mut wire).await;
            conn.goodbye(wire, reason).await;
        }),
        Err(reason) => conn.goodbye(wire, reason).await,
    }
}

impl Conn {
    /// Sends what the session still owes (a refusing CONNACK) with the goodbye, closes the
    /// wire (best effort, bounded: the peer may be gone or may have stopped reading) and ends
    /// the session with `reason`.
    async fn goodbye(mut self, mut wire: Wire, reason: Reason) {
        self.mqtt.poll_transmit(&mut self.wbuf);
        let goodbye = async {
            if !self.wbuf.is_empty() {
                let _ = wire.write_all(&self.wbuf).await;
            }
            let _ = wire.close().await;
        };
        let give_up = async {
            glommio::timer::Timer::new(CLOSE_TIMEOUT).await;
        };
        future::or(goodbye, give_up).await;
        self.session.finish(reason);
    }

    /// Serves the connection until its session has authenticated (in the pre-authentication
    /// task queue).
    async fn until_authenticated(&mut self, wire: &mut Wire) -> Result<(), Reason> {
        // Bytes that came with the end of the TLS handshake.
        if !self.rbuf.is_empty() {
            self.on_bytes()?;
        }
        while self.session.identity().is_none() {
            self.step(wire).await?;
        }
        Ok(())
    }

    /// Serves an authenticated connection to its end.
    async fn run(&mut self, wire: &mut Wire) -> Reason {
        loop {
            if let Err(reason) = self.step(wire).await {
                return reason;
            }
        }
    }

    /// One turn: send what is owed, wait for whichever comes first (bytes, a durable batch,
    /// the signal, the end of a throttle), handle it.
    async fn step(&mut self, wire: &mut Wire) -> Result<(), Reason> {
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
                return Err(DisconnectReason::WriteStalled);
            }
            self.wbuf.clear();
        }
        match self.mqtt.state() {
            State::Closed if self.session.identity().is_none() => {
                return Err(DisconnectReason::Refused)
            }
            State::Closed => return Err(DisconnectReason::ClientDisconnect),
            _ => {}
        }
        if let Some(reason) = self.session.signal().pending_close() {
            return Err(reason);
        }
        self.session.set_deadline(self.mqtt.poll_timeout());
        if self.rbuf.is_empty() && self.session.is_quiet() {
            // Going quiet: an idle connection holds no buffers.
            self.release_buffers(wire);
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
            // While throttled, the input waits (traffic shaping): the peer's bytes stay in
            // its socket, and what was read already stays in `rbuf`.
            let throttled = self.throttled_until;
            let read = async {
                match throttled {
                    None => Woken::Read(wire.read(&shard.rx, rbuf).await),
                    Some(until) => {
                        glommio::timer::Timer::new(until.saturating_duration_since(Instant::now()))
                            .await;
                        Woken::Unthrottled
                    }
                }
            };
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
            self.on_bytes()?;
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
            Woken::Signal(Wake::CheckTimeout) => {
                let now = Instant::now();
                if self.session.expired(now) {
                    Err(DisconnectReason::TokenExpired)
                } else {
                    self.mqtt
                        .handle_timeout(now)
                        .map_err(|v| DisconnectReason::Protocol(v.error_code()))
                }
            }
            Woken::Signal(Wake::Inbox) => self.drain_inbox(),
            Woken::Unthrottled => {
                self.throttled_until = None;
                self.on_bytes()
            }
        };
        step
    }

    /// Counts a refusal decided before the registry was asked (the claim itself is bad).
    fn refused(&mut self, refusal: Refusal) -> Refusal {
        self.session.refuse(refusal.reason());
        refusal
    }

    /// Frees what a quiet connection does not need: the read and write buffers and the
    /// session's queues grow back on the next burst.
    fn release_buffers(&mut self, wire: &mut Wire) {
        if self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
        }
        if self.wbuf.is_empty() && self.wbuf.capacity() > 0 {
            self.wbuf = BytesMut::new();
        }
        self.session.release_idle_memory();
        self.mqtt.release_idle_memory();
        wire.release_idle_memory();
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
        while self.throttled_until.is_none() {
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
                    let (client_id, username) = (
                        c.client_id.as_str(),
                        c.username.as_ref().map(|u| u.as_str()),
                    );
                    // Without a password, the certificate the handshake carried is the proof
                    // (spec §1.4); with one, the SAS token is, certificate or not.
                    let outcome = match (c.password.as_deref(), self.client_cert.take()) {
                        (None, Some(cert)) => match *cert {
                            Ok(cert) => match mqtt_x509_claim(client_id, username, &cert) {
                                Ok(claim) => self.session.authenticate_x509(&claim).map(|_| ()),
                                Err(refusal) => Err(self.refused(refusal)),
                            },
                            Err(e) => {
                                tracing::debug!(error = %e, "a client certificate that cannot be read");
                                Err(self.refused(Refusal::BadCertificate))
                            }
                        },
                        (password, _) => match mqtt_credentials(client_id, username, password) {
                            Ok(claim) => self.session.authenticate(&claim).map(|_| ()),
                            Err(refusal) => Err(self.refused(refusal)),
                        },
                    };
                    match outcome {
                        Ok(()) => {
                            let resumed = self.resume_session(c.clean_session);
                            self.mqtt.accept(resumed);
                        }
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
                    self.save_session();
                }
                Event::Unsubscribe(u) => {
                    for f in &u.filters {
                        if let Some(kind) = self.classify(f.as_str()) {
                            self.subscribed.set(kind, None);
                            match kind {
                                DeviceFilter::Methods => self.session.set_takes_methods(false),
                                DeviceFilter::CloudToDevice => self.session.set_takes_c2d(false),
                                _ => {}
                            }
                        }
                    }
                    self.mqtt.ack_unsubscribe(u.pkid);
                    self.save_session();
                }
                Event::Disconnect => return Err(DisconnectReason::ClientDisconnect),
                Event::PubAck(pkid) => {
                    if let Some(i) = self.c2d_inflight.iter().position(|(p, _)| *p == pkid) {
                        let (_, lock) = self.c2d_inflight.swap_remove(i);
                        self.session.c2d_settled(lock, C2dOutcome::Complete);
                    }
                    self.drain_inbox()?
                }
            }
        }
        Ok(())
    }

    /// After authentication: a CleanSession=0 CONNECT takes up the client's stored
    /// subscriptions (true: CONNACK says session-present); CleanSession=1 forgets them.
    fn resume_session(&mut self, clean_session: bool) -> bool {
        self.persistent = !clean_session;
        let Some(identity) = self.session.identity() else {
            return false;
        };
        let sessions = &self.session.shard.shared.sessions;
        match sessions.on_connect(&identity.client_id(), clean_session) {
            Some(subscriptions) => {
                self.subscribed = subscriptions;
                self.session
                    .set_takes_methods(subscriptions.qos(DeviceFilter::Methods).is_some());
                self.session
                    .set_takes_c2d(subscriptions.qos(DeviceFilter::CloudToDevice).is_some());
                true
            }
            None => false,
        }
    }

    /// Writes a persistent session's subscriptions through to the engine's sessions.
    fn save_session(&self) {
        if !self.persistent {
            return;
        }
        if let Some(identity) = self.session.identity() {
            self.session
                .shard
                .shared
                .sessions
                .save(&identity.client_id(), &self.subscribed);
        }
    }

    /// Which device-bound filter `filter` is for this session's identity, if it may have it.
    fn classify(&self, filter: &str) -> Option<DeviceFilter> {
        let identity = self.session.identity()?;
        DeviceFilter::classify(filter, &identity.device_id, identity.module_id.as_deref())
    }

    /// SUBACK code for a filter (IoT Hub's policy, spec §2.3), remembering what was granted.
    fn grant(&mut self, filter: &str, qos: QoS) -> SubackCode {
        let Some(kind) = self.classify(filter) else {
            return SubackCode::Failure;
        };
        let granted = if qos == QoS::AtMostOnce {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        self.subscribed.set(kind, Some(granted));
        match kind {
            DeviceFilter::Methods => self.session.set_takes_methods(true),
            DeviceFilter::CloudToDevice => self.session.set_takes_c2d(true),
            _ => {}
        }
        SubackCode::Granted(granted)
    }

    /// Publishes what control put in the inbox, oldest first, while the in-flight window has
    /// room. A command for a topic the device has not subscribed to (now) is dropped and
    /// counted: IoT Hub delivers nothing to an unsubscribed device, and when to hold a command
    /// for a subscription yet to come is the cloud-to-device issue's to decide.
    fn drain_inbox(&mut self) -> Result<(), Reason> {
        let Some(identity) = self.session.identity() else {
            return Ok(());
        };
        while self.mqtt.can_send() {
            let Some(command) = self.session.next_command() else {
                return Ok(());
            };
            let kind = command.kind();
            let (filter, topic, body) = match command {
                // The shard closes a connection told to disconnect without going through its
                // inbox; one found here all the same is obeyed.
                DeviceCommand::Disconnect { .. } => return Err(DisconnectReason::ClosedByService),
                DeviceCommand::C2d {
                    lock,
                    properties,
                    body,
                    redelivered,
                } => {
                    let Some(qos) = self.subscribed.qos(DeviceFilter::CloudToDevice) else {
                        self.dropped(kind);
                        continue;
                    };
                    let bag = encode_bag(&PropertyBag {
                        system: SystemProps::default(),
                        app: properties,
                    });
                    let topic = Str::from(format!(
                        "devices/{}/messages/devicebound/{bag}",
                        identity.device_id
                    ));
                    let body = Bytes::from(body);
                    let sent = match (qos, redelivered) {
                        (QoS::AtLeastOnce, true) => {
                            self.mqtt.send_redelivery(topic, body).map(Some)
                        }
                        _ => self.mqtt.send_publish(topic, body, qos, false),
                    };
                    match sent {
                        // Complete when the device acknowledges it (spec §2.3).
                        Ok(Some(pkid)) => self.c2d_inflight.push((pkid, lock)),
                        // At QoS 0, sent is all the device will ever say.
                        Ok(None) => self.session.c2d_settled(lock, C2dOutcome::Complete),
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot publish a C2D message");
                            self.dropped(kind);
                        }
                    }
                    continue;
                }
                DeviceCommand::MethodRequest { name, rid, payload } => (
                    DeviceFilter::Methods,
                    format!("$iothub/methods/POST/{name}/?$rid={rid}"),
                    payload,
                ),
                DeviceCommand::DesiredPatch { version, body } => (
                    DeviceFilter::DesiredPatches,
                    format!("$iothub/twin/PATCH/properties/desired/?$version={version}"),
                    body,
                ),
                DeviceCommand::TwinResponse {
                    rid,
                    status,
                    version,
                    body,
                } => {
                    let version = version
                        .map(|v| format!("&$version={v}"))
                        .unwrap_or_default();
                    (
                        DeviceFilter::TwinResponses,
                        format!("$iothub/twin/res/{status}/?$rid={rid}{version}"),
                        body,
                    )
                }
            };
            let Some(qos) = self.subscribed.qos(filter) else {
                self.dropped(kind);
                continue;
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
        if p.topic.as_str().starts_with("$iothub/") {
            return self.on_iothub_publish(p, now);
        }
        let bag = telemetry::publish_bag(identity, p.topic.as_str())?;
        if p.payload.len() > self.session.max_body(now) {
            return Err(DisconnectReason::PayloadTooLarge);
        }
        self.throttled_until = self.session.meter_send(now)?;
        let Some(identity) = self.session.identity() else {
            return Err(DisconnectReason::PublishBeforeConnect);
        };
        let bag = roost_iothub::props::decode_bag(bag)
            .map_err(|e| DisconnectReason::Protocol(e.error_code()))?;
        let message = telemetry::record(identity, bag, p.retain, &p.payload, wall_ms);
        let ack = (p.qos == QoS::AtLeastOnce).then_some(p.pkid);
        if let Some(pkid) = self.session.ingest(message, ack, p.payload.len(), now)? {
            self.mqtt.ack_publish(pkid);
        }
        Ok(())
    }

    /// A publish on an `$iothub/` topic: a twin request (sent to control; the answer comes
    /// through the inbox) or a method response (sent to control). Anything else there ends the connection.
    fn on_iothub_publish(&mut self, p: roost_mqtt::Publish, now: Instant) -> Result<(), Reason> {
        let topic = parse_publish_topic(p.topic.as_str()).map_err(|e| match e {
            TopicError::NotIotHubTopic => DisconnectReason::NotIotHubTopic,
            _ => DisconnectReason::Protocol(e.error_code()),
        })?;
        let op = match topic {
            DeviceTopic::TwinGet { rid } => Some((rid, TwinOp::Get)),
            DeviceTopic::ReportedPatch { rid } => Some((
                rid,
                TwinOp::PatchReported {
                    body: p.payload.to_vec(),
                },
            )),
            DeviceTopic::MethodResponse { status, rid } => {
                self.session.method_response(rid, status, &p.payload)?;
                None
            }
            DeviceTopic::Telemetry { .. } => return Err(DisconnectReason::UnsupportedTopic),
        };
        if let Some((rid, op)) = op {
            let until = self.session.twin_request(rid, op, now)?;
            if until.is_some() {
                self.throttled_until = until;
            }
        }
        if p.qos == QoS::AtLeastOnce {
            if let Some(pkid) = self.session.ack_in_order(p.pkid) {
                self.mqtt.ack_publish(pkid);
            }
        }
        // An answer given here (a refusal) is in the inbox already.
        self.drain_inbox()
    }
}
