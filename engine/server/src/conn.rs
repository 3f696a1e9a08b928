//! One MQTT connection on a shard: reads frames, drives the sans-IO session, authenticates,
//! appends telemetry to the log and sends each PUBACK once its batch is durable.
//!
//! A connection is a single task. It waits on whichever comes first — bytes from the peer, the
//! log making the oldest unacknowledged batch durable, or its [`Signal`] (kick, deadline) — so
//! reading never stalls behind a sync and acknowledgements keep the order of the publishes.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use futures_lite::future;
use roost_iothub::topic::{parse_publish_topic, DeviceTopic};
use roost_model::link::EngineFrame;
use roost_mqtt::{Event, Limits, Packet, Publish, QoS, ServerSession, State, SubackCode};

use crate::auth::{self, Identity};
use crate::shard::Shard;
use crate::signal::{Signal, Wake};
use crate::telemetry::{self, MAX_D2C_BODY};
use crate::wire::{Wire, WireError};

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send CONNECT after the transport is up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest frame read: a 256 KiB body plus topic and headroom (spec §2.3: allow about 300 KB).
const MAX_FRAME: usize = 300 * 1024;
/// A peer that takes longer than this to accept our bytes is dropped (it stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time given to the last bytes and the TLS close of a connection being closed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a busy connection refreshes the device's lastActivityTime at control.
const ACTIVITY_EVERY: Duration = Duration::from_secs(5);

/// Why a connection ended; the metric label of `roost_mqtt_disconnects_total`.
type Reason = &'static str;

enum Woken {
    Read(Result<usize, WireError>),
    Durable(Result<(), crate::log::LogFailed>),
    Signal(Wake),
}

struct Conn {
    shard: Rc<Shard>,
    gid: u64,
    signal: Rc<Signal>,
    deadline: Rc<Cell<Option<Instant>>>,
    session: ServerSession,
    identity: Option<Identity>,
    refused: bool,
    /// QoS 1 publishes waiting for their log batch: (batch id, packet id), in arrival order.
    unacked: VecDeque<(u64, u16)>,
    /// Plaintext received and not yet a whole frame. Empty, with no allocation, between
    /// bursts: reads go through the shard's buffer.
    rbuf: BytesMut,
    wbuf: BytesMut,
    last_activity: Instant,
}

/// Serves one accepted connection (plain or TLS) to the end.
pub async fn serve(shard: Rc<Shard>, mut wire: Wire) {
    let mut rbuf = BytesMut::new();
    let handshake = async { Some(wire.handshake(&shard.rx, &mut rbuf).await) };
    let timeout = async {
        glommio::timer::Timer::new(HANDSHAKE_TIMEOUT).await;
        None
    };
    match future::or(handshake, timeout).await {
        Some(Ok(())) => {}
        Some(Err(_)) => return shard.metrics.disconnects.inc("tls_handshake_failed"),
        None => return shard.metrics.disconnects.inc("tls_handshake_timeout"),
    }
    let (gid, signal, deadline) = shard.register();
    let now = Instant::now();
    let mut conn = Conn {
        shard: shard.clone(),
        gid,
        signal,
        deadline,
        session: ServerSession::new(now, CONNECT_TIMEOUT),
        identity: None,
        refused: false,
        unacked: VecDeque::new(),
        rbuf,
        wbuf: BytesMut::new(),
        last_activity: now,
    };
    let reason = conn.run(&mut wire).await;
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
    conn.finish(reason);
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
            if self.session.poll_transmit(&mut self.wbuf) {
                let write = async { wire.write_all(&self.wbuf).await.is_ok() };
                let stalled = async {
                    glommio::timer::Timer::new(WRITE_TIMEOUT).await;
                    false
                };
                if !future::or(write, stalled).await {
                    // Some of it may be out already; sending it again at goodbye would break
                    // the stream.
                    self.wbuf.clear();
                    return "write_failed_or_stalled";
                }
                self.wbuf.clear();
            }
            if self.refused {
                return "connack_refused";
            }
            if self.session.state() == State::Closed {
                return "client_disconnect";
            }
            if let Some(reason) = self.signal.pending_close() {
                return reason;
            }
            self.deadline.set(self.session.poll_timeout());
            if self.rbuf.is_empty() && self.unacked.is_empty() {
                // Going quiet: an idle connection holds no buffers.
                self.release_buffers();
            }
            // A connection whose input never runs dry must still let the shard's other tasks
            // (the log committer, other connections) run, and must not outrun the log.
            glommio::yield_if_needed().await;
            self.shard.log.room().await;

            let filled = self.rbuf.len();
            let woken = {
                let rbuf = &mut self.rbuf;
                let rx = &self.shard.rx;
                let sig = &self.signal;
                let read = async { Woken::Read(wire.read(rx, rbuf).await) };
                let signal = async { Woken::Signal(sig.wait().await) };
                match self.unacked.front().map(|(batch, _)| *batch) {
                    Some(batch) => {
                        let log = self.shard.log.clone();
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
                Woken::Read(Ok(0)) => Err(if self.identity.is_some() {
                    "connection_lost"
                } else {
                    "closed_before_connect"
                }),
                Woken::Read(Ok(_)) => Ok(()),
                Woken::Read(Err(WireError::Io(_))) => Err("io_error"),
                // A record that fails to decrypt or parse, an alert from the peer.
                Woken::Read(Err(_)) => Err("tls_error"),
                Woken::Durable(Ok(())) => {
                    self.ack_durable();
                    Ok(())
                }
                Woken::Durable(Err(_)) => Err("log_write_failed"),
                Woken::Signal(Wake::Close(reason)) => Err(reason),
                Woken::Signal(Wake::CheckTimeout) => self
                    .session
                    .handle_timeout(Instant::now())
                    .map_err(|v| v.error_code()),
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
        if self.unacked.capacity() > 0 {
            self.unacked = VecDeque::new();
        }
        self.session.release_idle_memory();
    }

    /// PUBACKs every publish whose batch is durable, in order.
    fn ack_durable(&mut self) {
        while let Some((batch, pkid)) = self.unacked.front().copied() {
            if !self.shard.log.is_durable(batch) {
                break;
            }
            self.unacked.pop_front();
            self.session.ack_publish(pkid);
        }
    }

    fn on_bytes(&mut self) -> Result<(), Reason> {
        let limits = Limits {
            max_frame: MAX_FRAME,
        };
        // One clock read per read batch, not per message: every message in it arrived together.
        let now = Clock {
            mono: Instant::now(),
            wall: unix_now(),
        };
        loop {
            let len = match roost_mqtt::check(&self.rbuf, &limits) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(e) => return Err(e.error_code()),
            };
            let frame = self.rbuf.split_to(len).freeze();
            let packet = roost_mqtt::parse(frame).map_err(|e| e.error_code())?;
            self.on_packet(now, packet)?;
            if self.refused || self.session.state() == State::Closed {
                break;
            }
        }
        // Ack whatever became durable meanwhile so a pipelining client is not held back.
        self.ack_durable();
        Ok(())
    }

    fn on_packet(&mut self, now: Clock, packet: Packet) -> Result<(), Reason> {
        if let Packet::Connect(c) = &packet {
            if c.protocol_level != 4 && c.protocol_level != 3 {
                self.refuse(auth::Refusal::UnsupportedProtocol);
                return Ok(());
            }
        }
        self.session
            .handle_packet(now.mono, packet)
            .map_err(|v| v.error_code())?;
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Connect(c) => self.on_connect(&c),
                Event::Publish(p) => self.on_publish(p, now)?,
                Event::Subscribe(s) => {
                    let codes: Vec<SubackCode> = s
                        .filters
                        .iter()
                        .map(|(f, q)| grant(f.as_str(), *q))
                        .collect();
                    self.session.grant_subscribe(s.pkid, &codes);
                }
                Event::Unsubscribe(u) => self.session.ack_unsubscribe(u.pkid),
                Event::Disconnect => return Err("client_disconnect"),
                Event::PubAck(_) => {}
            }
        }
        Ok(())
    }

    fn refuse(&mut self, refusal: auth::Refusal) {
        self.shard.metrics.refused.inc(refusal.reason());
        self.session.refuse(refusal.connack_code());
        self.refused = true;
    }

    fn on_connect(&mut self, c: &roost_mqtt::Connect) {
        let registry = self.shard.shared.registry.load();
        match auth::authenticate(
            c,
            &registry,
            &self.shard.shared.hostname,
            unix_now().as_secs(),
        ) {
            Err(refusal) => {
                tracing::debug!(reason = refusal.reason(), client_id = %c.client_id.as_str(), "CONNECT refused");
                self.refuse(refusal);
            }
            Ok(identity) => {
                self.shard.claim_device(&identity.device_id, self.gid);
                self.session.accept(false);
                self.shard.metrics.connections_accepted.inc();
                self.shard.metrics.connections_current.inc();
                let _ = self.shard.shared.link.send(EngineFrame::ConnectionState {
                    device_id: identity.device_id.clone(),
                    connected: true,
                    at_ms: unix_now().as_millis() as u64,
                });
                tracing::debug!(device = %identity.device_id, shard = self.shard.id, "device connected");
                self.identity = Some(identity);
            }
        }
    }

    // hot path: parse the property bag, archive into the shard's scratch buffer, one append.
    fn on_publish(&mut self, p: Publish, clock: Clock) -> Result<(), Reason> {
        let Some(identity) = &self.identity else {
            return Err("publish_before_connect");
        };
        let topic = parse_publish_topic(p.topic.as_str()).map_err(|_| "not_iothub_topic")?;
        let DeviceTopic::Telemetry {
            device,
            module,
            bag,
        } = topic
        else {
            return Err("unsupported_topic");
        };
        if device != identity.device_id || module != identity.module_id.as_deref() {
            return Err("topic_device_mismatch");
        }
        if p.payload.len() > MAX_D2C_BODY {
            return Err("payload_too_large");
        }
        let bag = roost_iothub::props::decode_bag(bag).map_err(|e| e.error_code())?;
        let now = clock.wall;
        let message =
            telemetry::record(identity, bag, p.retain, &p.payload, now.as_millis() as u64);
        let batch = {
            let mut scratch = self.shard.scratch.borrow_mut();
            let buf = std::mem::take(&mut *scratch);
            let buf = message.archive_into(buf).map_err(|_| "archive_failed")?;
            let batch = self.shard.log.append(&buf);
            *scratch = buf;
            batch.map_err(|_| "log_write_failed")?
        };
        let m = &self.shard.metrics;
        m.messages_in.inc();
        m.bytes_in.inc_by(p.payload.len() as u64);
        if p.qos == QoS::AtLeastOnce {
            self.unacked.push_back((batch, p.pkid));
        }
        let at = clock.mono;
        if at.duration_since(self.last_activity) >= ACTIVITY_EVERY {
            self.last_activity = at;
            let _ = self.shard.shared.link.send(EngineFrame::Activity {
                device_id: identity.device_id.clone(),
                at_ms: now.as_millis() as u64,
            });
        }
        Ok(())
    }

    fn finish(self, reason: Reason) {
        let shard = &self.shard;
        shard.unregister(
            self.gid,
            self.identity.as_ref().map(|i| i.device_id.as_str()),
        );
        if self.refused {
            return;
        }
        shard.metrics.disconnects.inc(reason);
        let Some(identity) = self.identity else {
            return;
        };
        shard.metrics.connections_current.dec();
        tracing::debug!(device = %identity.device_id, reason, "device disconnected");
        // A replaced connection's successor already reported Connected; do not undo it.
        if reason != "replaced_by_new_connection" {
            let _ = shard.shared.link.send(EngineFrame::ConnectionState {
                device_id: identity.device_id,
                connected: false,
                at_ms: unix_now().as_millis() as u64,
            });
        }
    }
}

/// SUBACK code for a filter: the documented IoT Hub filters at QoS ≤ 1, anything else refused.
fn grant(filter: &str, qos: QoS) -> SubackCode {
    const ALLOWED_PREFIXES: [&str; 3] = [
        "$iothub/twin/res/#",
        "$iothub/methods/POST/#",
        "$iothub/twin/PATCH/properties/desired/#",
    ];
    let device_bound = filter.starts_with("devices/")
        && (filter.ends_with("/messages/devicebound/#") || filter.contains("/inputs/"));
    if !(ALLOWED_PREFIXES.contains(&filter) || device_bound) {
        return SubackCode::Failure;
    }
    SubackCode::Granted(if qos == QoS::AtMostOnce {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    })
}

/// The time a batch of input was read, monotonic and wall.
#[derive(Clone, Copy)]
struct Clock {
    mono: Instant,
    wall: Duration,
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}
