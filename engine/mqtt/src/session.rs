//! `ServerSession`: the server side of one MQTT connection as a state machine, with no I/O and
//! no clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::encode::{encode_connack, encode_pingresp, encode_puback, encode_suback};
use crate::packet::{
    Connect, ConnectReturnCode, PacketType, Publish, QoS, SubackCode, Subscribe, Unsubscribe,
};
use crate::{Error, Packet};

/// The longest silence IoT Hub tolerates, whatever the keep-alive: the Azure load balancer's
/// idle timeout (wire spec §2.3).
const MAX_IDLE: Duration = Duration::from_secs(1767);

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for the first packet, which must be CONNECT.
    AwaitingConnect,
    /// CONNECT handed out as [`Event::Connect`]; waiting for [`ServerSession::accept`] or
    /// [`ServerSession::refuse`].
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
    /// The client acknowledged a QoS 1 delivery (for IoT Hub, a C2D message is complete).
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
/// caller's buffer by `poll_transmit`. Only SUBACK allocates (its code list); PUBACK does not.
#[derive(Debug)]
enum Outgoing {
    ConnAck(bool, ConnectReturnCode),
    PubAck(u16),
    SubAck(u16, Vec<SubackCode>),
    UnsubAck(u16),
    PingResp,
}

/// The server side of one MQTT 3.1.1 connection: it checks packet order and keep-alive and
/// answers PINGREQ itself; the application decides everything else.
///
/// It does no I/O and reads no clock: `now` comes in with every input. The driver (one per
/// connection) loops:
///
/// 1. `new(now, connect_timeout)` when the connection opens.
/// 2. For each frame from the socket ([`check`](crate::check) then [`parse`](crate::parse)):
///    `handle_packet(now, packet)`, or `handle_decode_error(err)` if it did not parse.
///    While the state is [`State::Authenticating`], stop reading: clients may pipeline packets
///    behind CONNECT (§3.1.4), and they must wait in the socket until CONNACK is decided.
/// 3. Drain `poll_event` and act on each event; the answers (`accept`, `refuse`,
///    `ack_publish`, `grant_subscribe`, `ack_unsubscribe`) may come later, from other tasks.
/// 4. `poll_transmit(buf)` and write `buf` to the socket.
/// 5. Arm a timer for `poll_timeout()`; when it fires, `handle_timeout(now)`.
/// 6. Once `state()` is [`State::Closed`] (or any call returned a [`Violation`]), flush
///    `poll_transmit` and close the socket.
#[derive(Debug)]
pub struct ServerSession {
    state: State,
    /// Connect deadline before CONNECT, keep-alive deadline after; `None` when there is none.
    deadline: Option<Instant>,
    /// Silence allowed between packets; `None` for keep-alive 0.
    idle_timeout: Option<Duration>,
    events: VecDeque<Event>,
    outgoing: VecDeque<Outgoing>,
}

impl ServerSession {
    /// A session for a connection opened at `now`; CONNECT must arrive within
    /// `connect_timeout`.
    pub fn new(now: Instant, connect_timeout: Duration) -> Self {
        ServerSession {
            state: State::AwaitingConnect,
            deadline: now.checked_add(connect_timeout),
            idle_timeout: None,
            events: VecDeque::new(),
            outgoing: VecDeque::new(),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Frees the event and output queues when both are empty (a connection going idle); they
    /// grow back with the next packet.
    pub fn release_idle_memory(&mut self) {
        if self.events.is_empty() && self.events.capacity() > 0 {
            self.events = VecDeque::new();
        }
        if self.outgoing.is_empty() && self.outgoing.capacity() > 0 {
            self.outgoing = VecDeque::new();
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

    /// Reports a frame that failed to parse; the session closes. If it was the first frame and
    /// its protocol level is unsupported (an MQTT 5 client), CONNACK 1 is queued first, as
    /// §3.1.2.2 requires.
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
        self.idle_timeout = match connect.keep_alive {
            0 => None,
            secs => Some((Duration::from_secs(u64::from(secs)) * 3 / 2).min(MAX_IDLE)),
        };
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
            Packet::PubAck(pkid) => Event::PubAck(pkid),
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

    /// Appends every packet the session owes the client to `out`; true if it wrote any.
    pub fn poll_transmit(&mut self, out: &mut BytesMut) -> bool {
        // hot path: all PUBACKs queued since the last call go into the caller's buffer together,
        // so a burst of acknowledgements is one socket write.
        let wrote = !self.outgoing.is_empty();
        while let Some(packet) = self.outgoing.pop_front() {
            match packet {
                Outgoing::ConnAck(present, code) => encode_connack(present, code, out),
                Outgoing::PubAck(pkid) => encode_puback(pkid, out),
                Outgoing::SubAck(pkid, codes) => encode_suback(pkid, &codes, out),
                Outgoing::UnsubAck(pkid) => Packet::UnsubAck(pkid).encode(out),
                Outgoing::PingResp => encode_pingresp(out),
            }
        }
        wrote
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

    /// Accepts the CONNECT: queues CONNACK 0 and moves to `Connected`. Ignored unless
    /// `Authenticating` (the session may have timed out while the application decided).
    pub fn accept(&mut self, session_present: bool) {
        if self.state != State::Authenticating {
            return;
        }
        self.outgoing.push_back(Outgoing::ConnAck(
            session_present,
            ConnectReturnCode::Accepted,
        ));
        self.state = State::Connected;
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

    fn close(&mut self) {
        self.state = State::Closed;
        self.deadline = None;
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
        let mut s = ServerSession::new(t0, Duration::from_secs(10));
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

    #[test]
    fn connect_then_accept_sends_connack_0() {
        let t0 = Instant::now();
        let mut s = ServerSession::new(t0, secs(10));
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
        let mut s = ServerSession::new(t0, secs(10));
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
    fn keep_alive_0_means_no_deadline() {
        let t0 = Instant::now();
        let mut s = connected(t0, 0);
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.handle_timeout(t0 + secs(1_000_000)), Ok(()));
        assert_eq!(s.state(), State::Connected);
    }

    #[test]
    fn first_packet_must_be_connect() {
        let t0 = Instant::now();
        let mut s = ServerSession::new(t0, secs(10));
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
        let mut s = ServerSession::new(t0, secs(10));
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
        let mut s = ServerSession::new(t0, secs(10));
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

        let mut s = ServerSession::new(t0, secs(10));
        feed(&mut s, t0, &connect(60)).expect("CONNECT");
        assert_eq!(
            feed(&mut s, t0, &connect(60)),
            Err(Violation::SecondConnect)
        );
    }

    #[test]
    fn packet_before_connack_is_a_violation() {
        let t0 = Instant::now();
        let mut s = ServerSession::new(t0, secs(10));
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
        let mut s = connected(t0, 60);
        feed(&mut s, t0, &Packet::PubAck(42)).expect("PUBACK");
        assert_eq!(events(&mut s), [Event::PubAck(42)]);
    }

    #[test]
    fn mqtt5_connect_gets_connack_1() {
        let t0 = Instant::now();
        let mut s = ServerSession::new(t0, secs(10));
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
