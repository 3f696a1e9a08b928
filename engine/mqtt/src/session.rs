//! `ServerSession`: the server side of one MQTT connection as a state machine, with no I/O and
//! no clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::encode::{
    encode_connack, encode_pingresp, encode_puback, encode_publish, encode_suback, PublishFlags,
};
use crate::outbound::{check_outbound, Inflight, SendError, Window};
use crate::packet::{
    Connect, ConnectReturnCode, PacketType, Publish, QoS, SubackCode, Subscribe, Unsubscribe,
};
use crate::{parse, Error, Limits, Packet, Str};

/// The longest silence IoT Hub tolerates, whatever the keep-alive: the Azure load balancer's
/// idle timeout (wire spec §2.3).
const MAX_IDLE: Duration = Duration::from_secs(1767);

/// What a session is allowed; owned by it, so every protocol decision uses the same numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Time the client has to send CONNECT once the connection is open.
    pub connect_timeout: Duration,
    /// The one frame limit, both ways: the driver frames input with it
    /// (`check(&buf, session.limits())`) and [`ServerSession::send_publish`] refuses a PUBLISH
    /// that would exceed it.
    pub limits: Limits,
    /// The frame limit until CONNECT has been read: an unauthenticated peer may make the
    /// session hold one frame of at most this much (a CONNECT with IoT Hub's username and a
    /// SAS token is a few hundred bytes).
    pub connect_limits: Limits,
    /// QoS 1 messages sent and not yet acknowledged before `send_publish` answers
    /// [`SendError::WindowFull`]. 0 refuses every QoS 1 send; 65,535 is every packet id.
    pub max_inflight: u16,
}

impl Default for SessionConfig {
    /// 9 s to CONNECT (a silent peer is gone within 10 s), in a frame of at most 8 KiB; then
    /// IoT Hub's frame limit ([`Limits::default`]) and 16 messages in flight.
    fn default() -> Self {
        SessionConfig {
            connect_timeout: Duration::from_secs(9),
            limits: Limits::default(),
            connect_limits: Limits {
                max_frame: 8 * 1024,
            },
            max_inflight: 16,
        }
    }
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for the first packet, which must be CONNECT.
    AwaitingConnect,
    /// CONNECT handed out as [`Event::Connect`]; waiting for [`ServerSession::accept`],
    /// [`ServerSession::accept_resumed`] or [`ServerSession::refuse`].
    Authenticating,
    /// CONNACK 0 queued; packets flow.
    Connected,
    /// Over: flush [`ServerSession::poll_transmit`] (it may still hold a refusing CONNACK) and
    /// close the connection.
    Closed,
}

/// Something the application must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Authenticate, then call `accept` or `refuse`.
    Connect(Connect),
    /// QoS 0 or 1. For QoS 1, call `ack_publish(pkid)` once the message is durable. A
    /// redelivered pkid (DUP) arrives again as its own event.
    Publish(Publish),
    /// Call `grant_subscribe` with one code per filter.
    Subscribe(Subscribe),
    /// Call `ack_unsubscribe`.
    Unsubscribe(Unsubscribe),
    /// The client said goodbye: drop its will, close the connection.
    Disconnect,
    /// The client acknowledged a QoS 1 message sent by
    /// [`ServerSession::send_publish`] (or resumed with
    /// [`ServerSession::accept_resumed`]) and transmitted on this connection; its slot in the
    /// window is free. Once per message: a PUBACK for any other packet id is ignored. For
    /// IoT Hub, a C2D message is complete.
    PubAck(u16),
}

/// Why the session closed the connection. After any of these the state is
/// [`State::Closed`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// The first packet was not CONNECT (§3.1).
    #[error("first packet was {0}, not CONNECT")]
    FirstPacketNotConnect(PacketType),
    /// A second CONNECT on one connection (§3.1).
    #[error("second CONNECT on one connection")]
    SecondConnect,
    /// A packet arrived after CONNECT but before the server answered it. The caller is meant
    /// to stop reading while [`State::Authenticating`], so this is only seen if it did not.
    #[error("{0} received before CONNACK")]
    PacketBeforeConnack(PacketType),
    /// A QoS 2 PUBLISH: IoT Hub closes the connection (wire spec §2.3).
    #[error("QoS 2 PUBLISH is not supported")]
    QoS2Publish,
    /// A packet a client never sends to this server (CONNACK, SUBACK, the QoS 2 flow, ...), or
    /// any packet after the session closed.
    #[error("unexpected {0}")]
    UnexpectedPacket(PacketType),
    /// No packet for 1.5 × keep-alive (at most 1767 s).
    #[error("keep-alive timeout")]
    KeepAliveTimeout,
    /// No CONNECT before the connect timeout.
    #[error("no CONNECT before the connect timeout")]
    ConnectTimeout,
    /// A frame did not parse; see [`ServerSession::handle_decode_error`].
    #[error("malformed packet: {0}")]
    Malformed(Error),
}

impl Violation {
    /// A stable snake_case label for metrics. `Malformed` reports the decode error's own code.
    pub fn error_code(&self) -> &'static str {
        match self {
            Violation::FirstPacketNotConnect(_) => "first_packet_not_connect",
            Violation::SecondConnect => "second_connect",
            Violation::PacketBeforeConnack(_) => "packet_before_connack",
            Violation::QoS2Publish => "qos2_publish",
            Violation::UnexpectedPacket(_) => "unexpected_packet",
            Violation::KeepAliveTimeout => "keepalive_timeout",
            Violation::ConnectTimeout => "connect_timeout",
            Violation::Malformed(e) => e.error_code(),
        }
    }
}

/// A packet the session owes the client, held as its fields and encoded straight into the
/// caller's buffer by `poll_transmit`. Only SUBACK allocates (its code list); PUBACK and
/// PUBLISH do not.
#[derive(Debug)]
enum Outgoing {
    ConnAck(bool, ConnectReturnCode),
    PubAck(u16),
    SubAck(u16, Vec<SubackCode>),
    UnsubAck(u16),
    PingResp,
    /// A QoS 0 PUBLISH; it is nowhere else.
    Publish0 {
        topic: Str,
        payload: Bytes,
        retain: bool,
    },
    /// A QoS 1 PUBLISH, by packet id: the message itself is in the window, so it is not held
    /// twice and a resend after reconnect is the same bytes.
    Publish1(u16),
}

impl Outgoing {
    fn is_publish(&self) -> bool {
        matches!(self, Outgoing::Publish0 { .. } | Outgoing::Publish1(_))
    }
}

/// The server side of one MQTT 3.1.1 connection: it checks packet order and keep-alive,
/// answers PINGREQ itself, and keeps the window of QoS 1 messages it sends; the application
/// decides everything else.
///
/// It does no I/O and reads no clock: `now` comes in with every input. The driver (one per
/// connection) loops:
///
/// 1. `new(now, config)` when the connection opens.
/// 2. For each frame from the socket: [`check`](crate::check)`(&buf, session.limits())`, then
///    `handle_frame(now, frame)` for a complete frame, or `handle_decode_error(err)` if
///    `check` failed (a frame too large). `handle_frame` parses and answers what does not
///    parse (an MQTT 5 CONNECT gets CONNACK 1), so no protocol decision is left to the driver.
///    While the state is [`State::Authenticating`], stop reading: clients may pipeline packets
///    behind CONNECT (§3.1.4), and they must wait in the socket until CONNACK is decided.
/// 3. Drain `poll_event` and act on each event; the answers (`accept`, `accept_resumed`,
///    `refuse`, `ack_publish`, `grant_subscribe`, `ack_unsubscribe`) may come later, from
///    other tasks. A CleanSession=0 client that has a kept [`Inflight`] is answered with
///    `accept_resumed(inflight)`, which redelivers it before anything else is sent.
/// 4. Once `Connected`, `send_publish(topic, payload, qos, retain)` for each message to the
///    client. QoS 1 sends stop at `max_inflight`: while `can_send()` is false, hold messages
///    back; each [`Event::PubAck`] frees a slot.
/// 5. `poll_transmit(buf)` and write `buf` to the socket.
/// 6. Arm a timer for `poll_timeout()`; when it fires, `handle_timeout(now)`.
/// 7. Once `state()` is [`State::Closed`] (or any call returned a [`Violation`]), flush
///    `poll_transmit` and close the socket; then `take_inflight()` and keep what it returns
///    for the client's next connection (or requeue it, for a CleanSession=1 client).
///
/// ```
/// use std::time::Instant;
/// use bytes::{Bytes, BytesMut};
/// use roost_mqtt::{check, Event, QoS, ServerSession, SessionConfig, Str};
///
/// let now = Instant::now();
/// let mut session = ServerSession::new(now, SessionConfig::default());
/// // CONNECT from "d1", MQTT 3.1.1, CleanSession=1, keep-alive 60, as read from a socket.
/// let mut rbuf = BytesMut::from(&b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02d1"[..]);
/// while let Some(len) = check(&rbuf, session.limits())? {
///     session.handle_frame(now, rbuf.split_to(len).freeze())?;
/// }
/// assert!(matches!(session.poll_event(), Some(Event::Connect(_))));
/// session.accept(false);
/// let topic = Str::from_static("devices/d1/messages/devicebound/");
/// let pkid = session.send_publish(topic, Bytes::from_static(b"hi"), QoS::AtLeastOnce, false)?;
/// assert_eq!(pkid, Some(1));
/// let mut wbuf = BytesMut::new();
/// assert!(session.poll_transmit(&mut wbuf)); // CONNACK, then the PUBLISH
/// assert_eq!(session.inflight_len(), 1); // until the client's PUBACK
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ServerSession {
    state: State,
    config: SessionConfig,
    /// Connect deadline before CONNECT, keep-alive deadline after; `None` when there is none.
    deadline: Option<Instant>,
    /// Silence allowed between packets; `None` for keep-alive 0.
    idle_timeout: Option<Duration>,
    /// From the CONNECT: a clean session is never resumed (§3.1.2.4).
    clean_session: bool,
    events: VecDeque<Event>,
    outgoing: VecDeque<Outgoing>,
    /// Outbound QoS 1 messages not yet acknowledged.
    window: Window,
}

impl ServerSession {
    /// A session for a connection opened at `now`; CONNECT must arrive within
    /// `config.connect_timeout`.
    pub fn new(now: Instant, config: SessionConfig) -> Self {
        ServerSession {
            state: State::AwaitingConnect,
            config,
            deadline: now.checked_add(config.connect_timeout),
            idle_timeout: None,
            clean_session: true,
            events: VecDeque::new(),
            outgoing: VecDeque::new(),
            window: Window::new(config.max_inflight),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The frame limit to give [`check`](crate::check): `connect_limits` until CONNECT has
    /// been read, then `limits`, which also bounds what the session sends.
    pub fn limits(&self) -> &Limits {
        match self.state {
            State::AwaitingConnect => &self.config.connect_limits,
            _ => &self.config.limits,
        }
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Frees the event and output queues when both are empty (a connection going idle), and
    /// the window's buffer when nothing is in flight; they grow back with the next packet.
    pub fn release_idle_memory(&mut self) {
        if self.events.is_empty() && self.events.capacity() > 0 {
            self.events = VecDeque::new();
        }
        if self.outgoing.is_empty() && self.outgoing.capacity() > 0 {
            self.outgoing = VecDeque::new();
        }
        self.window.release_idle_memory();
    }

    /// Feeds one complete frame received at `now`, as split off by [`check`](crate::check):
    /// parses it and hands the packet to `handle_packet`, or the error to
    /// `handle_decode_error`. On `Err` the session is closed (and `poll_transmit` may hold a
    /// CONNACK 1 for an MQTT 5 client).
    pub fn handle_frame(&mut self, now: Instant, frame: Bytes) -> Result<(), Violation> {
        match parse(frame) {
            Ok(packet) => self.handle_packet(now, packet),
            Err(error) => Err(self.handle_decode_error(error)),
        }
    }

    /// Feeds one packet received at `now`. On `Err` the session is closed.
    pub fn handle_packet(&mut self, now: Instant, packet: Packet) -> Result<(), Violation> {
        let result = match self.state {
            State::AwaitingConnect => self.awaiting_connect(now, packet),
            State::Authenticating => Err(match packet {
                Packet::Connect(_) => Violation::SecondConnect,
                other => Violation::PacketBeforeConnack(other.packet_type()),
            }),
            State::Connected => self.connected(now, packet),
            State::Closed => Err(Violation::UnexpectedPacket(packet.packet_type())),
        };
        if result.is_err() {
            self.close();
        }
        result
    }

    /// Reports a frame that failed to parse, or a [`check`](crate::check) error; the session
    /// closes. If it was the first frame and its protocol level is unsupported (an MQTT 5
    /// client), CONNACK 1 is queued first, as §3.1.2.2 requires. `handle_frame` calls this
    /// itself.
    pub fn handle_decode_error(&mut self, error: Error) -> Violation {
        if self.state == State::AwaitingConnect
            && matches!(error, Error::UnsupportedProtocolLevel(_))
        {
            self.outgoing.push_back(Outgoing::ConnAck(
                false,
                ConnectReturnCode::UnacceptableProtocolVersion,
            ));
        }
        self.close();
        Violation::Malformed(error)
    }

    fn awaiting_connect(&mut self, now: Instant, packet: Packet) -> Result<(), Violation> {
        let Packet::Connect(connect) = packet else {
            return Err(Violation::FirstPacketNotConnect(packet.packet_type()));
        };
        // Keep-alive 0 turns the client's pings off, not the server's limit: a silent
        // connection still ends after the longest idle time IoT Hub allows.
        self.idle_timeout = match connect.keep_alive {
            0 => Some(MAX_IDLE),
            secs => Some((Duration::from_secs(u64::from(secs)) * 3 / 2).min(MAX_IDLE)),
        };
        self.clean_session = connect.clean_session;
        self.touch(now);
        self.state = State::Authenticating;
        self.events.push_back(Event::Connect(connect));
        Ok(())
    }

    fn connected(&mut self, now: Instant, packet: Packet) -> Result<(), Violation> {
        // hot path: a QoS 0/1 PUBLISH moves into the event queue (whose buffer is reused), with
        // no other allocation.
        let event = match packet {
            Packet::Publish(p) if p.qos == QoS::ExactlyOnce => return Err(Violation::QoS2Publish),
            Packet::Publish(p) => Event::Publish(p),
            // A PUBACK for an id not in flight (never sent, already acknowledged, or sent on an
            // earlier connection and not yet resent on this one) is ignored, as brokers do:
            // the spec names no error for it, and an event would let a client complete a
            // message it never received.
            Packet::PubAck(pkid) => {
                self.touch(now);
                if self.window.ack(pkid) {
                    self.events.push_back(Event::PubAck(pkid));
                }
                return Ok(());
            }
            Packet::Subscribe(s) => Event::Subscribe(s),
            Packet::Unsubscribe(u) => Event::Unsubscribe(u),
            Packet::PingReq => {
                self.outgoing.push_back(Outgoing::PingResp);
                self.touch(now);
                return Ok(());
            }
            Packet::Disconnect => {
                self.close();
                self.events.push_back(Event::Disconnect);
                return Ok(());
            }
            Packet::Connect(_) => return Err(Violation::SecondConnect),
            other => return Err(Violation::UnexpectedPacket(other.packet_type())),
        };
        self.touch(now);
        self.events.push_back(event);
        Ok(())
    }

    /// The next thing the application must act on, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Appends every packet the session owes the client to `out`, in the order they were
    /// queued; true if it wrote any. A QoS 1 PUBLISH written here counts as sent: from now on
    /// the client may acknowledge it, and a resend carries DUP=1.
    pub fn poll_transmit(&mut self, out: &mut BytesMut) -> bool {
        // hot path: all PUBACKs and PUBLISHes queued since the last call go into the caller's
        // buffer together, so a burst is one socket write.
        let start = out.len();
        while let Some(packet) = self.outgoing.pop_front() {
            match packet {
                Outgoing::ConnAck(present, code) => encode_connack(present, code, out),
                Outgoing::PubAck(pkid) => encode_puback(pkid, out),
                Outgoing::SubAck(pkid, codes) => encode_suback(pkid, &codes, out),
                Outgoing::UnsubAck(pkid) => Packet::UnsubAck(pkid).encode(out),
                Outgoing::PingResp => encode_pingresp(out),
                Outgoing::Publish0 {
                    topic,
                    payload,
                    retain,
                } => {
                    let flags = PublishFlags {
                        dup: false,
                        qos: QoS::AtMostOnce,
                        retain,
                    };
                    encode_publish(flags, &topic, 0, &payload, out);
                }
                Outgoing::Publish1(pkid) => {
                    self.window.transmit(pkid, out);
                }
            }
        }
        out.len() > start
    }

    /// When `handle_timeout` must next be called; `None` if no deadline is armed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// Checks the deadline against `now`. `Err` (and state `Closed`) once it has passed:
    /// `ConnectTimeout` before CONNECT, `KeepAliveTimeout` after.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), Violation> {
        match self.deadline {
            Some(deadline) if now >= deadline => {}
            _ => return Ok(()),
        }
        let violation = match self.state {
            State::AwaitingConnect => Violation::ConnectTimeout,
            _ => Violation::KeepAliveTimeout,
        };
        self.close();
        Err(violation)
    }

    /// Accepts the CONNECT: queues CONNACK 0 and moves to `Connected`, with nothing in flight.
    /// `session_present` is sent as false if the CONNECT asked for a clean session
    /// (§3.2.2.2). Ignored unless `Authenticating` (the session may have timed out while the
    /// application decided).
    pub fn accept(&mut self, session_present: bool) {
        if self.state != State::Authenticating {
            return;
        }
        self.outgoing.push_back(Outgoing::ConnAck(
            session_present && !self.clean_session,
            ConnectReturnCode::Accepted,
        ));
        self.state = State::Connected;
    }

    /// Accepts a CleanSession=0 CONNECT whose session the server kept: queues CONNACK 0 with
    /// session-present 1, then every message of `inflight` again, oldest first, with its own
    /// packet id and DUP=1 if it had been transmitted (§4.4, §4.6), before anything sent
    /// after this call. The messages count against `max_inflight` (a window kept under a
    /// larger limit stays over-full until acknowledged).
    ///
    /// Returns `inflight` untouched if it did not take it: the session is not
    /// `Authenticating` (nothing is sent, as for `accept`), or the CONNECT asked for a clean
    /// session, which must start empty (§3.1.2.4): then it is accepted as by `accept(false)`,
    /// and what becomes of the messages is the application's decision.
    #[must_use = "an Inflight handed back would otherwise be lost"]
    pub fn accept_resumed(&mut self, inflight: Inflight) -> Option<Inflight> {
        if self.state != State::Authenticating {
            return Some(inflight);
        }
        if self.clean_session {
            self.accept(false);
            return Some(inflight);
        }
        self.outgoing
            .push_back(Outgoing::ConnAck(true, ConnectReturnCode::Accepted));
        self.outgoing
            .extend(self.window.resume(inflight).map(Outgoing::Publish1));
        self.state = State::Connected;
        None
    }

    /// Queues a PUBLISH to the client; `poll_transmit` writes it, in order with everything
    /// else. QoS 0: `Ok(None)`, sent once, never tracked. QoS 1: `Ok(Some(pkid))` with a packet
    /// id from 1..=65535 not in flight; the message stays in the window until the client's
    /// PUBACK ([`Event::PubAck`]) or `take_inflight`.
    ///
    /// `Err` queues nothing: [`SendError::NotConnected`] unless `Connected`,
    /// [`SendError::QoS2Unsupported`], [`SendError::InvalidTopicName`],
    /// [`SendError::PacketTooLarge`] beyond the session's frame limit, and for QoS 1
    /// [`SendError::WindowFull`] (check `can_send` first).
    pub fn send_publish(
        &mut self,
        topic: Str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> Result<Option<u16>, SendError> {
        // hot path: a C2D message or a twin/method response; the queues' buffers are reused, so
        // nothing is allocated.
        if self.state != State::Connected {
            return Err(SendError::NotConnected);
        }
        if qos == QoS::ExactlyOnce {
            return Err(SendError::QoS2Unsupported);
        }
        check_outbound(&topic, qos, payload.len(), self.config.limits.max_frame)?;
        if qos == QoS::AtMostOnce {
            self.outgoing.push_back(Outgoing::Publish0 {
                topic,
                payload,
                retain,
            });
            return Ok(None);
        }
        let pkid = self
            .window
            .push(topic, payload, retain)
            .ok_or(SendError::WindowFull)?;
        self.outgoing.push_back(Outgoing::Publish1(pkid));
        Ok(Some(pkid))
    }

    /// A QoS 1 publish of a message an earlier connection of the client was sent and did not
    /// acknowledge (a C2D message redelivered after a reconnect): sent with DUP set.
    pub fn send_redelivery(&mut self, topic: Str, payload: Bytes) -> Result<u16, SendError> {
        if self.state != State::Connected {
            return Err(SendError::NotConnected);
        }
        check_outbound(
            &topic,
            QoS::AtLeastOnce,
            payload.len(),
            self.config.limits.max_frame,
        )?;
        let pkid = self
            .window
            .push_with_dup(topic, payload, false, true)
            .ok_or(SendError::WindowFull)?;
        self.outgoing.push_back(Outgoing::Publish1(pkid));
        Ok(pkid)
    }

    /// True if a QoS 1 `send_publish` would be accepted now: `Connected` with a free slot in
    /// the window.
    pub fn can_send(&self) -> bool {
        self.state == State::Connected && !self.window.is_full()
    }

    /// QoS 1 messages sent (or queued) and not yet acknowledged.
    pub fn inflight_len(&self) -> usize {
        self.window.len()
    }

    /// Ends the session (if it has not ended) and hands over its unacknowledged QoS 1
    /// messages, oldest first, with the window left empty. Call it once the connection is
    /// over: for a CleanSession=0 client, keep the result by client id and pass it to
    /// `accept_resumed` on the next connection; for CleanSession=1 the MQTT session ends here
    /// and the messages are the application's to requeue or drop.
    pub fn take_inflight(&mut self) -> Inflight {
        self.close();
        self.window.take()
    }

    /// Refuses the CONNECT with `code` (not `Accepted`): queues the CONNACK and closes. The
    /// caller flushes `poll_transmit`, then closes the connection. Ignored unless
    /// `Authenticating`.
    pub fn refuse(&mut self, code: ConnectReturnCode) {
        if self.state != State::Authenticating {
            return;
        }
        self.outgoing.push_back(Outgoing::ConnAck(false, code));
        self.close();
    }

    /// Queues the PUBACK for a QoS 1 PUBLISH; call once the message is durable. Ignored unless
    /// `Connected`: after a close the client redelivers anyway.
    pub fn ack_publish(&mut self, pkid: u16) {
        if self.state == State::Connected {
            self.outgoing.push_back(Outgoing::PubAck(pkid));
        }
    }

    /// Queues the SUBACK: one code per filter of the SUBSCRIBE, in order. Ignored unless
    /// `Connected`.
    pub fn grant_subscribe(&mut self, pkid: u16, codes: &[SubackCode]) {
        if self.state == State::Connected {
            self.outgoing
                .push_back(Outgoing::SubAck(pkid, codes.to_vec()));
        }
    }

    /// Queues the UNSUBACK. Ignored unless `Connected`.
    pub fn ack_unsubscribe(&mut self, pkid: u16) {
        if self.state == State::Connected {
            self.outgoing.push_back(Outgoing::UnsubAck(pkid));
        }
    }

    /// Any packet from the client proves it alive (§3.1.2.10).
    fn touch(&mut self, now: Instant) {
        self.deadline = self.idle_timeout.and_then(|idle| now.checked_add(idle));
    }

    /// Queued PUBLISHes are dropped: the connection is going away, a QoS 0 message may be
    /// lost, and a QoS 1 one stays in the window for `take_inflight`.
    fn close(&mut self) {
        self.state = State::Closed;
        self.deadline = None;
        self.outgoing.retain(|o| !o.is_publish());
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::packet::ConnAck;
    use crate::{check, parse, Limits, Str};

    fn connect(keep_alive: u16) -> Packet {
        Packet::Connect(connect_fields(keep_alive))
    }

    fn connect_fields(keep_alive: u16) -> Connect {
        Connect {
            protocol_name: Str::from_static("MQTT"),
            protocol_level: 4,
            clean_session: false,
            keep_alive,
            client_id: Str::from_static("d1"),
            will: None,
            username: Some(Str::from_static(
                "hub.example.net/d1/?api-version=2021-04-12",
            )),
            password: Some(Bytes::from_static(b"SharedAccessSignature sr=x")),
        }
    }

    fn publish(qos: QoS, pkid: u16) -> Packet {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: Str::from_static("devices/d1/messages/events/"),
            pkid,
            payload: Bytes::from_static(b"{}"),
        })
    }

    /// Sends `packet` the way a client would: encoded, framed by `check`, parsed.
    fn feed(session: &mut ServerSession, now: Instant, packet: &Packet) -> Result<(), Violation> {
        let mut wire = BytesMut::new();
        packet.encode(&mut wire);
        let len = check(&wire, &Limits::default())
            .expect("valid frame")
            .expect("complete frame");
        let parsed = parse(wire.split_to(len).freeze()).expect("parses");
        session.handle_packet(now, parsed)
    }

    /// Everything the server wrote, decoded the way the client would.
    fn sent(session: &mut ServerSession) -> Vec<Packet> {
        let mut wire = BytesMut::new();
        session.poll_transmit(&mut wire);
        let mut packets = Vec::new();
        // Bounded: each round consumes at least two bytes, so a bug cannot spin forever.
        for _ in 0..1000 {
            if wire.is_empty() {
                return packets;
            }
            let len = check(&wire, &Limits::default())
                .expect("valid frame")
                .expect("complete frame");
            packets.push(parse(wire.split_to(len).freeze()).expect("server output parses"));
        }
        panic!("server output did not end");
    }

    fn events(session: &mut ServerSession) -> Vec<Event> {
        std::iter::from_fn(|| session.poll_event()).collect()
    }

    /// A session at `t0` that has accepted a client with `keep_alive`.
    fn connected(t0: Instant, keep_alive: u16) -> ServerSession {
        connected_with(t0, keep_alive, timeout(Duration::from_secs(10)))
    }

    fn connected_with(t0: Instant, keep_alive: u16, config: SessionConfig) -> ServerSession {
        let mut s = ServerSession::new(t0, config);
        feed(&mut s, t0, &connect(keep_alive)).expect("CONNECT accepted");
        assert!(matches!(events(&mut s)[..], [Event::Connect(_)]));
        s.accept(false);
        assert_eq!(
            sent(&mut s),
            [Packet::ConnAck(ConnAck {
                session_present: false,
                code: ConnectReturnCode::Accepted
            })]
        );
        s
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// The default configuration with `connect_timeout`.
    fn timeout(connect_timeout: Duration) -> SessionConfig {
        SessionConfig {
            connect_timeout,
            ..SessionConfig::default()
        }
    }

    #[test]
    fn connect_then_accept_sends_connack_0() {
        let t0 = Instant::now();
        let mut s = ServerSession::new(t0, timeout(secs(10)));
        assert_eq!(s.state(), State::AwaitingConnect);
        feed(&mut s, t0, &connect(60)).expect("CONNECT");
        assert_eq!(s.state(), State::Authenticating);
        assert_eq!(events(&mut s), [Event::Connect(connect_fields(60))]);
        let mut wire = BytesMut::new();
        assert!(
            !s.poll_transmit(&mut wire),
            "nothing is sent before the application decides"
        );
        s.accept(true);
        assert_eq!(s.state(), State::Connected);
        assert!(s.poll_transmit(&mut wire));
        assert_eq!(&wire[..], b"\x20\x02\x01\x00");
    }

    #[test]
    fn refuse_sends_connack_5_and_closes() {
        let t0 = Instant::now();
        let mut s = ServerSession::new(t0, timeout(secs(10)));
        feed(&mut s, t0, &connect(60)).expect("CONNECT");
        s.refuse(ConnectReturnCode::NotAuthorized);
        assert_eq!(s.state(), State::Closed);
        let mut wire = BytesMut::new();
        assert!(s.poll_transmit(&mut wire));
        assert_eq!(&wire[..], b"\x20\x02\x00\x05");
        assert_eq!(s.poll_timeout(), None);
        s.accept(false);
        assert_eq!(
            sent(&mut s),
            [],
            "a late accept after refusing sends nothing"
        );
    }

    #[test]
    fn qos1_publish_is_acked_when_the_app_says_so() {
        let t0 = Instant::now();
        let mut s = connected(t0, 60);
        feed(&mut s, t0, &publish(QoS::AtLeastOnce, 7)).expect("PUBLISH");
        let Some(Event::Publish(p)) = s.poll_event() else {
            panic!("no publish event")
        };
        assert_eq!((p.pkid, &p.payload[..]), (7, &b"{}"[..]));
        assert_eq!(sent(&mut s), [], "no PUBACK before the message is durable");
        s.ack_publish(7);
        let mut wire = BytesMut::new();
        assert!(s.poll_transmit(&mut wire));
        assert_eq!(&wire[..], b"\x40\x02\x00\x07");
    }

    #[test]
    fn pubacks_coalesce_into_one_transmit() {
        let t0 = Instant::now();
        let mut s = connected(t0, 60);
        for pkid in 1..=3 {
            feed(&mut s, t0, &publish(QoS::AtLeastOnce, pkid)).expect("PUBLISH");
            s.ack_publish(pkid);
        }
        assert_eq!(events(&mut s).len(), 3);
        let mut wire = BytesMut::new();
        assert!(s.poll_transmit(&mut wire));
        assert_eq!(
            &wire[..],
            b"\x40\x02\x00\x01\x40\x02\x00\x02\x40\x02\x00\x03"
        );
        assert!(!s.poll_transmit(&mut wire), "the queue is drained");
    }

    #[test]
    fn qos0_and_duplicate_qos1_publishes_pass_through() {
        let t0 = Instant::now();
        let mut s = connected(t0, 60);
        feed(&mut s, t0, &publish(QoS::AtMostOnce, 0)).expect("QoS 0");
        feed(&mut s, t0, &publish(QoS::AtLeastOnce, 9)).expect("QoS 1");
        feed(&mut s, t0, &publish(QoS::AtLeastOnce, 9)).expect("same pkid again");
        let pkids: Vec<u16> = events(&mut s)
            .into_iter()
            .map(|e| match e {
                Event::Publish(p) => p.pkid,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(pkids, [0, 9, 9]);
    }

    #[test]
    fn qos2_publish_is_a_violation() {
        let t0 = Instant::now();
        let mut s = connected(t0, 60);
        assert_eq!(
            feed(&mut s, t0, &publish(QoS::ExactlyOnce, 1)),
            Err(Violation::QoS2Publish)
        );
        assert_eq!(Violation::QoS2Publish.error_code(), "qos2_publish");
        assert_eq!(s.state(), State::Closed);
        assert_eq!(events(&mut s), []);
        s.ack_publish(1);
        assert_eq!(sent(&mut s), [], "nothing is acknowledged after a close");
    }

    #[test]
    fn keep_alive_60_times_out_at_90_seconds() {
        let t0 = Instant::now();
        let mut s = connected(t0, 60);
        assert_eq!(s.poll_timeout(), Some(t0 + secs(90)));
        assert_eq!(s.handle_timeout(t0 + secs(89)), Ok(()));
        assert_eq!(s.state(), State::Connected);
        assert_eq!(
            s.handle_timeout(t0 + secs(90)),
            Err(Violation::KeepAliveTimeout)
        );
        assert_eq!(s.state(), State::Closed);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn pingreq_answers_and_refreshes_keep_alive() {
        let t0 = Instant::now();
        let mut s = connected(t0, 60);
        feed(&mut s, t0 + secs(50), &Packet::PingReq).expect("PINGREQ");
        assert_eq!(sent(&mut s), [Packet::PingResp]);
        assert_eq!(s.poll_timeout(), Some(t0 + secs(140)));
        assert_eq!(s.handle_timeout(t0 + secs(139)), Ok(()));
        assert_eq!(
            s.handle_timeout(t0 + secs(140)),
            Err(Violation::KeepAliveTimeout)
        );
    }

    #[test]
    fn any_packet_refreshes_keep_alive() {
        let t0 = Instant::now();
        let mut s = connected(t0, 60);
        feed(&mut s, t0 + secs(80), &publish(QoS::AtMostOnce, 0)).expect("PUBLISH");
        assert_eq!(s.handle_timeout(t0 + secs(100)), Ok(()));
        assert_eq!(s.poll_timeout(), Some(t0 + secs(170)));
    }

    #[test]
    fn keep_alive_is_capped_at_1767_seconds() {
        let t0 = Instant::now();
        // Python's maximum; 1.5 × 1740 = 2610 s would outlive the Azure load balancer.
        let s = connected(t0, 1740);
        assert_eq!(s.poll_timeout(), Some(t0 + secs(1767)));
    }

    #[test]
    fn keep_alive_0_still_gets_the_idle_limit() {
        let t0 = Instant::now();
        let mut s = connected(t0, 0);
        assert_eq!(s.poll_timeout(), Some(t0 + secs(1767)));
        assert_eq!(s.handle_timeout(t0 + secs(1766)), Ok(()));
        assert_eq!(
            s.handle_timeout(t0 + secs(1767)),
            Err(Violation::KeepAliveTimeout)
        );
    }

    #[test]
    fn until_connect_a_frame_may_hold_at_most_8_kib() {
        let t0 = Instant::now();
        let mut s = ServerSession::new(t0, SessionConfig::default());
        assert_eq!(s.limits().max_frame, 8 * 1024);
        // A remaining length claiming 300 KB is refused from its header alone.
        assert!(matches!(
            crate::check(&[0x10, 0x80, 0xC0, 0x12], s.limits()),
            Err(crate::Error::FrameTooLarge { .. })
        ));
        feed(&mut s, t0, &connect(60)).expect("CONNECT accepted");
        s.accept(false);
        assert_eq!(s.limits().max_frame, Limits::default().max_frame);
    }

    #[test]
    fn first_packet_must_be_connect() {
        let t0 = Instant::now();
        let mut s = ServerSession::new(t0, timeout(secs(10)));
        let result = feed(&mut s, t0, &Packet::PingReq);
        assert_eq!(
            result,
            Err(Violation::FirstPacketNotConnect(PacketType::PingReq))
        );
        assert_eq!(s.state(), State::Closed);
        assert_eq!(sent(&mut s), [], "no PINGRESP before CONNECT");
    }

    #[test]
    fn connect_timeout() {
        let t0 = Instant::now();
        let mut s = ServerSession::new(t0, timeout(secs(10)));
        assert_eq!(s.poll_timeout(), Some(t0 + secs(10)));
        assert_eq!(s.handle_timeout(t0 + secs(9)), Ok(()));
        assert_eq!(
            s.handle_timeout(t0 + secs(10)),
            Err(Violation::ConnectTimeout)
        );
        assert_eq!(s.state(), State::Closed);
        // The application's answer to a CONNECT that arrived too late changes nothing.
        assert_eq!(
            feed(&mut s, t0 + secs(11), &connect(60)),
            Err(Violation::UnexpectedPacket(PacketType::Connect))
        );
        s.accept(false);
        assert_eq!(sent(&mut s), []);
    }

    #[test]
    fn connect_arrival_replaces_connect_deadline_with_keep_alive() {
        let t0 = Instant::now();
        let mut s = ServerSession::new(t0, timeout(secs(10)));
        feed(&mut s, t0 + secs(5), &connect(60)).expect("CONNECT");
        assert_eq!(s.poll_timeout(), Some(t0 + secs(95)));
        // Authentication outliving the keep-alive window closes the session; a late accept is
        // then ignored.
        assert_eq!(
            s.handle_timeout(t0 + secs(95)),
            Err(Violation::KeepAliveTimeout)
        );
        s.accept(false);
        assert_eq!(s.state(), State::Closed);
        assert_eq!(sent(&mut s), []);
    }

    #[test]
    fn second_connect_is_a_violation() {
        let t0 = Instant::now();
        let mut s = connected(t0, 60);
        assert_eq!(
            feed(&mut s, t0, &connect(60)),
            Err(Violation::SecondConnect)
        );
        assert_eq!(s.state(), State::Closed);

        let mut s = ServerSession::new(t0, timeout(secs(10)));
        feed(&mut s, t0, &connect(60)).expect("CONNECT");
        assert_eq!(
            feed(&mut s, t0, &connect(60)),
            Err(Violation::SecondConnect)
        );
    }

    #[test]
    fn packet_before_connack_is_a_violation() {
        let t0 = Instant::now();
        let mut s = ServerSession::new(t0, timeout(secs(10)));
        feed(&mut s, t0, &connect(60)).expect("CONNECT");
        let result = feed(&mut s, t0, &publish(QoS::AtLeastOnce, 1));
        assert_eq!(
            result,
            Err(Violation::PacketBeforeConnack(PacketType::Publish))
        );
        assert_eq!(s.state(), State::Closed);
    }

    #[test]
    fn server_only_and_qos2_flow_packets_are_unexpected() {
        let t0 = Instant::now();
        for packet in [
            Packet::PubRec(1),
            Packet::PubRel(1),
            Packet::PubComp(1),
            Packet::PingResp,
            Packet::UnsubAck(1),
        ] {
            let mut s = connected(t0, 60);
            let want = Violation::UnexpectedPacket(packet.packet_type());
            assert_eq!(feed(&mut s, t0, &packet), Err(want));
            assert_eq!(s.state(), State::Closed);
        }
    }

    #[test]
    fn disconnect_closes_with_an_event() {
        let t0 = Instant::now();
        let mut s = connected(t0, 60);
        feed(&mut s, t0, &Packet::Disconnect).expect("DISCONNECT");
        assert_eq!(events(&mut s), [Event::Disconnect]);
        assert_eq!(s.state(), State::Closed);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn subscribe_and_unsubscribe_round_trip() {
        let t0 = Instant::now();
        let mut s = connected(t0, 60);
        let filters = vec![
            (
                Str::from_static("devices/d1/messages/devicebound/#"),
                QoS::AtLeastOnce,
            ),
            (Str::from_static("$iothub/twin/res/#"), QoS::AtMostOnce),
            (Str::from_static("$iothub/methods/POST/#"), QoS::ExactlyOnce),
        ];
        feed(
            &mut s,
            t0,
            &Packet::Subscribe(Subscribe {
                pkid: 3,
                filters: filters.clone(),
            }),
        )
        .expect("SUBSCRIBE");
        assert_eq!(
            events(&mut s),
            [Event::Subscribe(Subscribe { pkid: 3, filters })]
        );
        let codes = [
            SubackCode::Granted(QoS::AtLeastOnce),
            SubackCode::Granted(QoS::AtMostOnce),
            SubackCode::Granted(QoS::AtLeastOnce),
        ];
        s.grant_subscribe(3, &codes);
        let unsub = Unsubscribe {
            pkid: 4,
            filters: vec![Str::from_static("$iothub/twin/res/#")],
        };
        feed(&mut s, t0, &Packet::Unsubscribe(unsub.clone())).expect("UNSUBSCRIBE");
        assert_eq!(events(&mut s), [Event::Unsubscribe(unsub)]);
        s.ack_unsubscribe(4);
        assert_eq!(
            sent(&mut s),
            [
                Packet::SubAck(crate::packet::SubAck {
                    pkid: 3,
                    codes: codes.to_vec()
                }),
                Packet::UnsubAck(4)
            ]
        );
    }

    #[test]
    fn client_puback_is_an_event() {
        let t0 = Instant::now();
        // Only a PUBACK for a message in flight is an event: put 42 of them in flight.
        let config = SessionConfig {
            max_inflight: 64,
            ..SessionConfig::default()
        };
        let mut s = connected_with(t0, 60, config);
        let topic = Str::from_static("devices/d1/messages/devicebound/");
        for want in 1..=42 {
            let sent = s.send_publish(topic.clone(), Bytes::new(), QoS::AtLeastOnce, false);
            assert_eq!(sent, Ok(Some(want)));
        }
        assert_eq!(sent(&mut s).len(), 42);
        feed(&mut s, t0, &Packet::PubAck(42)).expect("PUBACK");
        assert_eq!(events(&mut s), [Event::PubAck(42)]);
    }

    #[test]
    fn mqtt5_connect_gets_connack_1() {
        let t0 = Instant::now();
        let mut s = ServerSession::new(t0, timeout(secs(10)));
        let frame = Bytes::from_static(b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00");
        let err = parse(frame).expect_err("MQTT 5 is refused");
        let violation = s.handle_decode_error(err);
        assert_eq!(
            violation,
            Violation::Malformed(Error::UnsupportedProtocolLevel(5))
        );
        assert_eq!(violation.error_code(), "unsupported_protocol_level");
        assert_eq!(s.state(), State::Closed);
        let mut wire = BytesMut::new();
        assert!(s.poll_transmit(&mut wire));
        assert_eq!(&wire[..], b"\x20\x02\x00\x01");
    }

    #[test]
    fn other_decode_errors_close_silently() {
        let t0 = Instant::now();
        let mut s = connected(t0, 60);
        let violation = s.handle_decode_error(Error::InvalidTopicName);
        assert_eq!(violation.error_code(), "invalid_topic_name");
        assert_eq!(s.state(), State::Closed);
        assert_eq!(sent(&mut s), []);
    }
}
