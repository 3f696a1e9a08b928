//! Two-ended tests of the session: a [`ServerSession`] and a model client, in memory, on
//! virtual time (a `now` the test moves; nothing sleeps, nothing opens a socket).
//!
//! Everything crosses as bytes. The client encodes its packets with [`Packet::encode`] and
//! frames and parses what the server writes with [`check`] and [`parse`], as a device would;
//! the server side is driven exactly as the `ServerSession` doc tells a driver to. `drive` is
//! bounded, so a livelock fails the test instead of hanging it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use crate::{
    check, parse, ConnAck, Connect, ConnectReturnCode, Error, Event, Inflight, InflightMessage,
    Limits, Packet, Publish, QoS, SendError, ServerSession, SessionConfig, State, Str, Violation,
};

/// Rounds after which `drive` calls it a livelock.
const MAX_ROUNDS: usize = 1000;

const C2D: &str = "devices/d1/messages/devicebound/";

/// What the client does with each PUBLISH that reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnPublish {
    /// PUBACK a QoS 1 message at once.
    Ack,
    /// Keep the packet id in `held`; the test acks it with `Client::ack`.
    Hold,
    /// The network ate it: the client never sees it.
    Lose,
}

/// A device, as far as these tests need one.
struct Client {
    on_publish: OnPublish,
    /// Everything the client received on the current connection, in order.
    received: Vec<Packet>,
    /// QoS 1 packet ids received on this connection and not yet acknowledged.
    held: Vec<u16>,
    /// On top of `on_publish`: PUBLISH number `i` (counted over the client's life) is lost if
    /// bit `i % 8` is set.
    loss_mask: u8,
    publishes_seen: u32,
    /// Bytes from the server not yet a whole frame.
    rx: BytesMut,
    /// Bytes for the server; it reads them frame by frame.
    tx: BytesMut,
}

impl Client {
    fn new() -> Self {
        Client {
            on_publish: OnPublish::Ack,
            received: Vec::new(),
            held: Vec::new(),
            loss_mask: 0,
            publishes_seen: 0,
            rx: BytesMut::new(),
            tx: BytesMut::new(),
        }
    }

    fn send(&mut self, packet: &Packet) {
        packet.encode(&mut self.tx);
    }

    /// PUBACKs a held packet id.
    fn ack(&mut self, pkid: u16) {
        let Some(i) = self.held.iter().position(|&p| p == pkid) else {
            panic!("client holds no {pkid}: {:?}", self.held);
        };
        self.held.remove(i);
        self.send(&Packet::PubAck(pkid));
    }

    /// Frames and parses the server's bytes. Returns every PUBLISH that was on the wire,
    /// including the ones the network then lost.
    fn receive(&mut self, bytes: &[u8]) -> Vec<Publish> {
        self.rx.extend_from_slice(bytes);
        // The client's own limit: whatever the server sends must frame and parse.
        let limits = Limits {
            max_frame: usize::MAX,
        };
        let mut on_wire = Vec::new();
        while let Some(len) = check(&self.rx, &limits).expect("server output frames") {
            let packet = parse(self.rx.split_to(len).freeze()).expect("server output parses");
            let Packet::Publish(p) = packet else {
                self.received.push(packet);
                continue;
            };
            on_wire.push(p.clone());
            let masked = self.loss_mask & (1 << (self.publishes_seen % 8)) != 0;
            self.publishes_seen += 1;
            match (self.on_publish, p.qos) {
                _ if masked => continue,
                (OnPublish::Lose, _) => continue,
                (OnPublish::Ack, QoS::AtLeastOnce) => self.send(&Packet::PubAck(p.pkid)),
                (OnPublish::Hold, QoS::AtLeastOnce) => self.held.push(p.pkid),
                _ => {}
            }
            self.received.push(Packet::Publish(p));
        }
        on_wire
    }

    /// The PUBLISHes received on this connection.
    fn publishes(&self) -> Vec<&Publish> {
        self.received
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(p),
                _ => None,
            })
            .collect()
    }
}

/// One server session and one client, joined by two in-memory byte pipes.
struct Pair {
    now: Instant,
    config: SessionConfig,
    server: ServerSession,
    client: Client,
    /// Every event the server raised, oldest first (`Connect` included).
    events: Vec<Event>,
    /// Every PUBLISH the server wrote on any connection, lost or not.
    on_wire: Vec<Publish>,
    violation: Option<Violation>,
}

impl Pair {
    /// A fresh connection on which the client has sent CONNECT; the server has not answered.
    fn connecting(config: SessionConfig, clean_session: bool, keep_alive: u16) -> Pair {
        let now = Instant::now();
        let mut pair = Pair {
            now,
            config,
            server: ServerSession::new(now, config),
            client: Client::new(),
            events: Vec::new(),
            on_wire: Vec::new(),
            violation: None,
        };
        pair.client_connects(clean_session, keep_alive);
        pair
    }

    /// Connected with a clean session and the window `max_inflight`.
    fn connected(max_inflight: u16) -> Pair {
        let config = SessionConfig {
            max_inflight,
            ..SessionConfig::default()
        };
        let mut pair = Pair::connecting(config, true, 60);
        pair.server.accept(false);
        pair.drive();
        pair
    }

    fn client_connects(&mut self, clean_session: bool, keep_alive: u16) {
        self.client.send(&Packet::Connect(Connect {
            protocol_name: Str::from_static("MQTT"),
            protocol_level: 4,
            clean_session,
            keep_alive,
            client_id: Str::from_static("d1"),
            will: None,
            username: Some(Str::from_static("hub/d1/?api-version=2021-04-12")),
            password: Some(Bytes::from_static(b"SharedAccessSignature sr=x")),
        }));
        self.drive();
        assert!(
            matches!(self.events.last(), Some(Event::Connect(c)) if c.clean_session == clean_session),
            "CONNECT reached the application: {:?}",
            self.events
        );
    }

    /// The connection drops (the client vanished, or a keep-alive ran out) and the client dials
    /// again. Returns what the old session left in flight, for the test to resume or not.
    fn reconnect(&mut self, clean_session: bool) -> Inflight {
        let inflight = self.server.take_inflight();
        assert_eq!(self.server.state(), State::Closed);
        assert_eq!(self.server.inflight_len(), 0);
        self.server = ServerSession::new(self.now, self.config);
        // A new TCP connection: nothing half-read survives, and acks not sent are never sent.
        self.client.received.clear();
        self.client.held.clear();
        self.client.rx.clear();
        self.client.tx.clear();
        self.violation = None;
        self.client_connects(clean_session, 60);
        inflight
    }

    /// Moves both ends until neither has anything to say. Bounded: panics on a livelock.
    fn drive(&mut self) {
        for _ in 0..MAX_ROUNDS {
            let mut progressed = false;
            let mut wire = BytesMut::new();
            if self.server.poll_transmit(&mut wire) {
                progressed = true;
                let on_wire = self.client.receive(&wire);
                self.on_wire.extend(on_wire);
            }
            // The driver's read loop: one limit, `handle_frame` per frame, and no reading
            // while the application decides on a CONNECT.
            while self.server.state() != State::Authenticating
                && self.server.state() != State::Closed
            {
                let len = match check(&self.client.tx, self.server.limits()) {
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    Err(e) => {
                        self.violation = Some(self.server.handle_decode_error(e));
                        break;
                    }
                };
                progressed = true;
                let frame = self.client.tx.split_to(len).freeze();
                if let Err(v) = self.server.handle_frame(self.now, frame) {
                    self.violation = Some(v);
                }
            }
            while let Some(event) = self.server.poll_event() {
                progressed = true;
                self.events.push(event);
            }
            if !progressed {
                return;
            }
        }
        panic!("no quiescence after {MAX_ROUNDS} rounds: livelock");
    }

    /// Virtual time passes; a deadline that falls due fires, as a driver's timer would.
    fn advance(&mut self, by: Duration) {
        self.now += by;
        if self.server.poll_timeout().is_some_and(|t| t <= self.now) {
            if let Err(v) = self.server.handle_timeout(self.now) {
                self.violation = Some(v);
            }
        }
    }

    fn send(&mut self, payload: &'static [u8], qos: QoS) -> Result<Option<u16>, SendError> {
        self.server.send_publish(
            Str::from_static(C2D),
            Bytes::from_static(payload),
            qos,
            false,
        )
    }

    /// Packet ids of the `PubAck` events so far.
    fn pubacks(&self) -> Vec<u16> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::PubAck(pkid) => Some(*pkid),
                _ => None,
            })
            .collect()
    }
}

fn payloads(publishes: &[&Publish]) -> Vec<Bytes> {
    publishes.iter().map(|p| p.payload.clone()).collect()
}

fn connack(session_present: bool) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        code: ConnectReturnCode::Accepted,
    })
}

#[test]
fn qos0_is_delivered_once_and_not_tracked() {
    let mut pair = Pair::connected(16);
    let sent = pair.server.send_publish(
        Str::from_static(C2D),
        Bytes::from_static(b"zero"),
        QoS::AtMostOnce,
        true,
    );
    assert_eq!(sent, Ok(None));
    assert_eq!(pair.server.inflight_len(), 0, "QoS 0 takes no slot");
    pair.drive();
    assert_eq!(
        pair.client.received,
        [
            connack(false),
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: true,
                topic: Str::from_static(C2D),
                pkid: 0,
                payload: Bytes::from_static(b"zero"),
            })
        ]
    );
    assert!(pair.pubacks().is_empty());
    let inflight = pair.server.take_inflight();
    assert!(
        inflight.is_empty(),
        "nothing of QoS 0 outlives the connection"
    );
}

#[test]
fn qos1_is_delivered_and_its_puback_frees_the_slot() {
    let mut pair = Pair::connected(16);
    assert_eq!(pair.send(b"one", QoS::AtLeastOnce), Ok(Some(1)));
    assert_eq!(pair.server.inflight_len(), 1);
    pair.drive();
    assert_eq!(
        pair.client.publishes(),
        [&Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: Str::from_static(C2D),
            pkid: 1,
            payload: Bytes::from_static(b"one"),
        }]
    );
    assert_eq!(pair.pubacks(), [1]);
    assert_eq!(pair.server.inflight_len(), 0);
    assert_eq!(pair.send(b"two", QoS::AtLeastOnce), Ok(Some(2)));
}

#[test]
fn the_send_after_a_full_window_is_refused_until_an_ack() {
    let mut pair = Pair::connected(3);
    pair.client.on_publish = OnPublish::Hold;
    for want in 1..=3 {
        assert!(pair.server.can_send());
        assert_eq!(pair.send(b"m", QoS::AtLeastOnce), Ok(Some(want)));
    }
    assert!(!pair.server.can_send());
    let full = pair.send(b"m4", QoS::AtLeastOnce);
    assert_eq!(full, Err(SendError::WindowFull));
    assert_eq!(SendError::WindowFull.error_code(), "window_full");
    assert_eq!(
        pair.server.inflight_len(),
        3,
        "a refused send queues nothing"
    );
    assert_eq!(
        pair.send(b"q0", QoS::AtMostOnce),
        Ok(None),
        "QoS 0 is not held back by the window"
    );
    pair.drive();
    assert_eq!(pair.client.held, [1, 2, 3]);
    assert_eq!(
        payloads(&pair.client.publishes()),
        [&b"m"[..], b"m", b"m", b"q0"].map(Bytes::from_static)
    );
    assert!(!pair.server.can_send(), "delivered is not acknowledged");

    pair.client.ack(2);
    pair.drive();
    assert_eq!(pair.pubacks(), [2]);
    assert!(pair.server.can_send());
    assert_eq!(pair.send(b"m4", QoS::AtLeastOnce), Ok(Some(4)));
    assert_eq!(
        pair.send(b"m5", QoS::AtLeastOnce),
        Err(SendError::WindowFull)
    );
}

#[test]
fn out_of_order_pubacks_free_the_right_slots() {
    let mut pair = Pair::connected(4);
    pair.client.on_publish = OnPublish::Hold;
    for payload in [b"a", b"b", b"c", b"d"] {
        pair.send(payload, QoS::AtLeastOnce)
            .expect("window has room");
    }
    pair.drive();
    assert_eq!(pair.client.held, [1, 2, 3, 4]);
    pair.client.ack(3);
    pair.client.ack(1);
    pair.drive();
    assert_eq!(pair.pubacks(), [3, 1]);
    assert_eq!(pair.server.inflight_len(), 2);
    // A second PUBACK for a freed id is not a second event.
    pair.client.send(&Packet::PubAck(3));
    pair.drive();
    assert_eq!(pair.pubacks(), [3, 1]);
    // New ids continue after the last one handed out; 1 and 3 are not reused yet.
    assert_eq!(pair.send(b"e", QoS::AtLeastOnce), Ok(Some(5)));
    let left: Vec<(u16, Bytes)> = pair
        .server
        .take_inflight()
        .into_messages()
        .into_iter()
        .map(|m| (m.pkid, m.payload))
        .collect();
    assert_eq!(
        left,
        [
            (2, Bytes::from_static(b"b")),
            (4, Bytes::from_static(b"d")),
            (5, Bytes::from_static(b"e"))
        ],
        "the unacknowledged messages, in send order"
    );
}

#[test]
fn lost_publish_is_redelivered_with_dup_on_a_resumed_session() {
    let config = SessionConfig::default();
    let mut pair = Pair::connecting(config, false, 60);
    pair.server.accept(false);
    pair.drive();
    // 1 arrives and is acknowledged; 2 and 3 are lost; 4 arrives and its ack never leaves.
    pair.send(b"acked", QoS::AtLeastOnce).expect("room");
    pair.drive();
    pair.client.on_publish = OnPublish::Lose;
    pair.send(b"lost-2", QoS::AtLeastOnce).expect("room");
    pair.send(b"lost-3", QoS::AtLeastOnce).expect("room");
    pair.drive();
    pair.client.on_publish = OnPublish::Hold;
    pair.send(b"unacked-4", QoS::AtLeastOnce).expect("room");
    pair.drive();
    assert_eq!(pair.pubacks(), [1]);
    assert_eq!(pair.client.held, [4]);

    let inflight = pair.reconnect(false);
    assert_eq!(inflight.len(), 3);
    assert!(inflight.messages().iter().all(|m| m.dup));
    assert_eq!(pair.server.accept_resumed(inflight), None, "resumed");
    // Sent after the resume: it must queue behind the redeliveries.
    assert_eq!(pair.send(b"new", QoS::AtLeastOnce), Ok(Some(5)));
    pair.client.on_publish = OnPublish::Ack;
    pair.drive();

    assert_eq!(pair.client.received.first(), Some(&connack(true)));
    let got: Vec<(bool, u16, Bytes)> = pair
        .client
        .publishes()
        .iter()
        .map(|p| (p.dup, p.pkid, p.payload.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (true, 2, Bytes::from_static(b"lost-2")),
            (true, 3, Bytes::from_static(b"lost-3")),
            (true, 4, Bytes::from_static(b"unacked-4")),
            (false, 5, Bytes::from_static(b"new")),
        ],
        "redelivered in order with DUP and their ids, then the new one; 1 never again"
    );
    assert_eq!(pair.pubacks(), [1, 2, 3, 4, 5]);
    assert_eq!(pair.server.inflight_len(), 0);
}

#[test]
fn a_redelivery_carries_dup_from_its_first_transmission() {
    let mut pair = Pair::connecting(SessionConfig::default(), false, 60);
    pair.server.accept(false);
    pair.drive();
    let pkid = pair
        .server
        .send_redelivery(
            Str::from_static("devices/d/messages/devicebound/"),
            Bytes::from_static(b"again"),
        )
        .expect("room");
    pair.send(b"fresh", QoS::AtLeastOnce).expect("room");
    pair.drive();
    let got: Vec<(bool, u16)> = pair
        .client
        .publishes()
        .iter()
        .map(|p| (p.dup, p.pkid))
        .collect();
    assert_eq!(got, [(true, pkid), (false, pkid + 1)]);
    assert_eq!(pair.pubacks(), [pkid, pkid + 1]);
}

#[test]
fn a_message_queued_but_never_transmitted_is_resent_without_dup() {
    let mut pair = Pair::connecting(SessionConfig::default(), false, 60);
    pair.server.accept(false);
    pair.drive();
    pair.send(b"queued", QoS::AtLeastOnce).expect("room");
    // The connection dies before the driver wrote it.
    let inflight = pair.reconnect(false);
    assert!(!inflight.messages()[0].dup);
    assert_eq!(pair.server.accept_resumed(inflight), None);
    pair.drive();
    let got = pair.client.publishes();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].dup, got[0].pkid),
        (false, 1),
        "its first transmission"
    );
}

#[test]
fn clean_session_reconnect_starts_with_nothing_in_flight() {
    let mut pair = Pair::connecting(SessionConfig::default(), false, 60);
    pair.server.accept(false);
    pair.drive();
    pair.client.on_publish = OnPublish::Lose;
    pair.send(b"lost", QoS::AtLeastOnce).expect("room");
    pair.drive();

    let inflight = pair.reconnect(true);
    assert_eq!(inflight.len(), 1);
    let handed_back = pair.server.accept_resumed(inflight.clone());
    assert_eq!(
        handed_back,
        Some(inflight),
        "a clean session does not take the old window"
    );
    assert_eq!(pair.server.state(), State::Connected);
    assert_eq!(pair.server.inflight_len(), 0);
    pair.client.on_publish = OnPublish::Ack;
    pair.drive();
    assert_eq!(
        pair.client.received,
        [connack(false)],
        "session-present 0 and no redelivery"
    );
    assert_eq!(pair.send(b"fresh", QoS::AtLeastOnce), Ok(Some(1)));
}

#[test]
fn clean_session_never_claims_a_session_present() {
    let mut pair = Pair::connecting(SessionConfig::default(), true, 60);
    pair.server.accept(true);
    pair.drive();
    assert_eq!(pair.client.received, [connack(false)], "§3.2.2.2");
}

#[test]
fn accept_resumed_after_the_session_closed_hands_the_window_back() {
    let mut pair = Pair::connecting(SessionConfig::default(), false, 60);
    pair.advance(Duration::from_secs(90));
    assert_eq!(pair.violation, Some(Violation::KeepAliveTimeout));
    let inflight = Inflight::new(vec![InflightMessage {
        pkid: 7,
        topic: Str::from_static(C2D),
        payload: Bytes::from_static(b"kept"),
        retain: false,
        dup: true,
    }])
    .expect("valid");
    assert_eq!(pair.server.accept_resumed(inflight.clone()), Some(inflight));
    pair.drive();
    assert_eq!(pair.client.received, [], "nothing is sent");
}

#[test]
fn packet_ids_wrap_around_and_skip_ids_in_flight() {
    let mut pair = Pair::connected(2);
    pair.client.on_publish = OnPublish::Hold;
    assert_eq!(pair.send(b"held", QoS::AtLeastOnce), Ok(Some(1)));
    pair.drive();
    pair.client.on_publish = OnPublish::Ack;
    let mut ids = Vec::new();
    for _ in 0..u16::MAX {
        let pkid = pair.send(b"x", QoS::AtLeastOnce).expect("one slot is free");
        ids.push(pkid.expect("QoS 1 has an id"));
        pair.drive();
    }
    let want: Vec<u16> = (2..=u16::MAX).chain([2]).collect();
    assert_eq!(
        ids, want,
        "after 65535 comes 2: 0 is no id and 1 is in flight"
    );
    assert_eq!(pair.client.held, [1]);
    pair.client.ack(1);
    pair.drive();
    assert_eq!(pair.pubacks().last(), Some(&1));
    assert_eq!(pair.server.inflight_len(), 0);
}

#[test]
fn puback_for_an_unknown_packet_id_is_ignored() {
    let mut pair = Pair::connected(16);
    pair.client.send(&Packet::PubAck(9));
    pair.drive();
    assert_eq!(pair.pubacks(), [], "no message was in flight");
    assert_eq!(pair.server.state(), State::Connected);
    assert_eq!(pair.violation, None);

    // Nor does a PUBACK count for a message not yet transmitted: the client cannot know its id.
    pair.send(b"m", QoS::AtLeastOnce).expect("room");
    let mut wire = BytesMut::new();
    Packet::PubAck(1).encode(&mut wire);
    assert_eq!(pair.server.handle_frame(pair.now, wire.freeze()), Ok(()));
    assert_eq!(pair.server.poll_event(), None);
    assert_eq!(pair.server.inflight_len(), 1);
    pair.drive();
    assert_eq!(pair.pubacks(), [1], "the real PUBACK, after delivery");
}

#[test]
fn puback_for_a_resumed_message_counts_only_once_it_is_resent() {
    let mut pair = Pair::connecting(SessionConfig::default(), false, 60);
    pair.server.accept(false);
    pair.drive();
    pair.client.on_publish = OnPublish::Hold;
    pair.send(b"m", QoS::AtLeastOnce).expect("room");
    pair.drive();
    let inflight = pair.reconnect(false);
    assert_eq!(pair.server.accept_resumed(inflight), None);
    // A stale PUBACK from the old connection arrives before the resend is written.
    let mut wire = BytesMut::new();
    Packet::PubAck(1).encode(&mut wire);
    pair.server
        .handle_frame(pair.now, wire.freeze())
        .expect("PUBACK");
    assert_eq!(pair.server.poll_event(), None);
    pair.drive();
    assert_eq!(pair.client.held, [1], "still redelivered");
    pair.client.ack(1);
    pair.drive();
    assert_eq!(pair.pubacks(), [1]);
}

#[test]
fn send_is_refused_unless_connected() {
    let config = SessionConfig::default();
    let mut s = ServerSession::new(Instant::now(), config);
    let send = |s: &mut ServerSession, qos| {
        s.send_publish(Str::from_static(C2D), Bytes::new(), qos, false)
    };
    assert_eq!(send(&mut s, QoS::AtMostOnce), Err(SendError::NotConnected));
    assert!(!s.can_send());

    let mut pair = Pair::connecting(config, true, 60);
    assert_eq!(pair.server.state(), State::Authenticating);
    assert_eq!(
        pair.send(b"early", QoS::AtLeastOnce),
        Err(SendError::NotConnected),
        "no PUBLISH before CONNACK"
    );
    pair.server.refuse(ConnectReturnCode::NotAuthorized);
    assert_eq!(
        pair.send(b"late", QoS::AtLeastOnce),
        Err(SendError::NotConnected)
    );
    assert_eq!(SendError::NotConnected.error_code(), "not_connected");
    pair.drive();
    assert_eq!(
        pair.client.received,
        [Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::NotAuthorized
        })]
    );
}

#[test]
fn send_refuses_qos2_bad_topics_and_oversized_frames() {
    let config = SessionConfig {
        limits: Limits { max_frame: 100 },
        ..SessionConfig::default()
    };
    let mut pair = Pair::connecting(config, true, 60);
    pair.server.accept(false);
    pair.drive();
    let s = &mut pair.server;
    let send = |s: &mut ServerSession, topic, len: usize| {
        s.send_publish(
            Str::from_static(topic),
            Bytes::from(vec![0; len]),
            QoS::AtLeastOnce,
            false,
        )
    };
    assert_eq!(
        s.send_publish(Str::from_static("t"), Bytes::new(), QoS::ExactlyOnce, false),
        Err(SendError::QoS2Unsupported)
    );
    assert_eq!(send(s, "a/+/b", 0), Err(SendError::InvalidTopicName));
    assert_eq!(send(s, "", 0), Err(SendError::InvalidTopicName));
    // 2-byte header + "t" (3) + pkid (2) + 93 = 100: fits; one more byte does not.
    assert_eq!(send(s, "t", 93), Ok(Some(1)));
    let too_large = send(s, "t", 94);
    assert_eq!(
        too_large,
        Err(SendError::PacketTooLarge { len: 101, max: 100 })
    );
    assert_eq!(
        too_large.expect_err("refused").error_code(),
        "packet_too_large"
    );
    assert_eq!(s.inflight_len(), 1, "refused sends take no slot");
    pair.drive();
    assert_eq!(pair.client.publishes().len(), 1);
}

#[test]
fn keep_alive_is_the_clients_silence_whatever_the_server_sends() {
    // Keep-alive 10 s: the client must speak every 15 s.
    let mut pair = Pair::connecting(SessionConfig::default(), true, 10);
    pair.server.accept(false);
    pair.drive();
    // A client that acknowledges each message stays alive on its PUBACKs alone.
    for _ in 0..12 {
        pair.advance(Duration::from_secs(5));
        pair.send(b"tick", QoS::AtLeastOnce).expect("room");
        pair.drive();
    }
    assert_eq!(pair.violation, None);
    assert_eq!(pair.pubacks().len(), 12);
    assert_eq!(
        pair.server.poll_timeout(),
        Some(pair.now + Duration::from_secs(15))
    );

    // Outbound traffic to a client that stopped answering does not keep it alive.
    pair.client.on_publish = OnPublish::Lose;
    for _ in 0..2 {
        pair.advance(Duration::from_secs(5));
        pair.send(b"tick", QoS::AtMostOnce).expect("QoS 0");
        pair.drive();
    }
    assert_eq!(pair.server.state(), State::Connected);
    pair.advance(Duration::from_secs(5));
    assert_eq!(pair.violation, Some(Violation::KeepAliveTimeout));
    assert_eq!(pair.server.state(), State::Closed);
}

#[test]
fn queued_publishes_are_dropped_when_the_session_closes() {
    let mut pair = Pair::connected(16);
    pair.send(b"q0", QoS::AtMostOnce).expect("QoS 0");
    pair.send(b"q1", QoS::AtLeastOnce).expect("QoS 1");
    // The client says goodbye before the driver wrote anything.
    let mut wire = BytesMut::new();
    Packet::Disconnect.encode(&mut wire);
    pair.server
        .handle_frame(pair.now, wire.freeze())
        .expect("DISCONNECT");
    let mut out = BytesMut::new();
    assert!(
        !pair.server.poll_transmit(&mut out),
        "nothing goes to a closing socket"
    );
    let inflight = pair.server.take_inflight();
    let kept: Vec<&[u8]> = inflight.messages().iter().map(|m| &m.payload[..]).collect();
    assert_eq!(
        kept,
        [b"q1"],
        "the QoS 1 message waits for the next connection"
    );
}

#[test]
fn mqtt5_connect_frame_gets_connack_1_through_handle_frame() {
    let mut s = ServerSession::new(Instant::now(), SessionConfig::default());
    let mut buf = BytesMut::from(&b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00"[..]);
    let len = check(&buf, s.limits())
        .expect("frames")
        .expect("whole frame");
    let result = s.handle_frame(Instant::now(), buf.split_to(len).freeze());
    assert_eq!(
        result,
        Err(Violation::Malformed(Error::UnsupportedProtocolLevel(5)))
    );
    assert_eq!(s.state(), State::Closed);
    let mut out = BytesMut::new();
    assert!(s.poll_transmit(&mut out));
    let reply = parse(out.freeze()).expect("CONNACK parses");
    assert_eq!(
        reply,
        Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::UnacceptableProtocolVersion
        })
    );
}

#[test]
fn the_session_limit_frames_the_input() {
    let config = SessionConfig {
        limits: Limits { max_frame: 100 },
        ..SessionConfig::default()
    };
    let mut pair = Pair::connecting(config, true, 60);
    pair.server.accept(false);
    pair.drive();
    pair.client.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: Str::from_static("devices/d1/messages/events/"),
        pkid: 0,
        payload: Bytes::from(vec![0; 100]),
    }));
    pair.drive();
    let violation = pair.violation.expect("closed");
    assert_eq!(violation.error_code(), "frame_too_large");
    assert_eq!(pair.server.state(), State::Closed);
}

#[test]
fn malformed_frame_through_handle_frame_closes_without_reply() {
    let mut pair = Pair::connected(16);
    // PUBLISH QoS 0 with DUP set: §3.3.1.1 forbids it.
    pair.client.tx.extend_from_slice(b"\x38\x03\x00\x01t");
    pair.drive();
    let violation = pair.violation.clone().expect("closed");
    assert_eq!(violation.error_code(), "invalid_flags");
    assert_eq!(pair.server.state(), State::Closed);
    assert_eq!(pair.client.received, [connack(false)], "no reply to it");
}

#[test]
fn idle_memory_release_keeps_the_window() {
    let mut pair = Pair::connected(4);
    pair.client.on_publish = OnPublish::Hold;
    pair.send(b"m", QoS::AtLeastOnce).expect("room");
    pair.drive();
    pair.server.release_idle_memory();
    assert_eq!(pair.server.inflight_len(), 1);
    pair.client.ack(1);
    pair.drive();
    assert_eq!(pair.pubacks(), [1]);
    pair.server.release_idle_memory();
    assert_eq!(pair.server.inflight_len(), 0);
}

/// One step of the random exchange in the property test.
#[derive(Debug, Clone)]
enum Op {
    /// The application has one more message for the client.
    Send,
    /// The server writes; each PUBLISH is lost if its bit in the mask is set.
    Deliver { lose: u8 },
    /// The client acknowledges one of the messages it holds, picked at random.
    Ack(prop::sample::Index),
    /// The connection drops; the client comes back with CleanSession=0.
    Reconnect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Send),
        3 => any::<u8>().prop_map(|lose| Op::Deliver { lose }),
        4 => any::<prop::sample::Index>().prop_map(Op::Ack),
        1 => Just(Op::Reconnect),
    ]
}

/// Message `n`'s payload is `n` as four bytes, so every PUBLISH names its message.
fn message_of(p: &Publish) -> u32 {
    let bytes: [u8; 4] = p.payload[..].try_into().expect("four-byte payload");
    u32::from_be_bytes(bytes)
}

/// The property test's world: the pair plus the application's backlog and a record of every
/// transmission.
struct Exchange {
    pair: Pair,
    max_inflight: u16,
    /// Messages the application has and the window has not taken yet, in order.
    backlog: VecDeque<u32>,
    created: u32,
    /// Per message: every transmission as (connection number, pkid, DUP).
    transmissions: Vec<Vec<(u32, u16, bool)>>,
    /// Per message: how many `PubAck` events it produced.
    acked: Vec<u32>,
    connection: u32,
    /// Messages transmitted on the current connection, in order.
    this_connection: Vec<u32>,
    /// How much of `pair.on_wire` is in `transmissions` already.
    absorbed: usize,
}

impl Exchange {
    fn new(max_inflight: u16) -> Self {
        let config = SessionConfig {
            max_inflight,
            ..SessionConfig::default()
        };
        // Keep-alive 0: virtual time does not move in this test.
        let mut pair = Pair::connecting(config, false, 0);
        pair.server.accept(false);
        pair.client.on_publish = OnPublish::Hold;
        pair.drive();
        Exchange {
            pair,
            max_inflight,
            backlog: VecDeque::new(),
            created: 0,
            transmissions: Vec::new(),
            acked: Vec::new(),
            connection: 0,
            this_connection: Vec::new(),
            absorbed: 0,
        }
    }

    /// The application sends what the window has room for, oldest first.
    fn flush_backlog(&mut self) {
        while self.pair.server.can_send() {
            let Some(&n) = self.backlog.front() else {
                return;
            };
            let payload = Bytes::copy_from_slice(&n.to_be_bytes());
            let sent = self.pair.server.send_publish(
                Str::from_static(C2D),
                payload,
                QoS::AtLeastOnce,
                false,
            );
            assert!(matches!(sent, Ok(Some(_))), "can_send said yes: {sent:?}");
            self.backlog.pop_front();
        }
    }

    /// Records the PUBLISHes written since the last call.
    fn absorb_wire(&mut self) {
        for p in &self.pair.on_wire[self.absorbed..] {
            let n = message_of(p);
            assert_eq!(
                self.acked[n as usize], 0,
                "message {n} transmitted after its PUBACK"
            );
            self.transmissions[n as usize].push((self.connection, p.pkid, p.dup));
            self.this_connection.push(n);
        }
        self.absorbed = self.pair.on_wire.len();
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Send => {
                self.backlog.push_back(self.created);
                self.transmissions.push(Vec::new());
                self.acked.push(0);
                self.created += 1;
                self.flush_backlog();
            }
            Op::Deliver { lose } => {
                self.pair.client.loss_mask = *lose;
                self.pair.drive();
                self.pair.client.loss_mask = 0;
            }
            Op::Ack(index) => {
                let held = self.pair.client.held.len();
                if held > 0 {
                    self.ack_held(index.index(held));
                }
            }
            Op::Reconnect => {
                let inflight = self.pair.reconnect(false);
                self.absorb_wire();
                self.connection += 1;
                self.this_connection.clear();
                assert_eq!(self.pair.server.accept_resumed(inflight), None);
                self.flush_backlog();
            }
        }
        self.absorb_wire();
        assert!(self.pair.server.inflight_len() <= usize::from(self.max_inflight));
    }

    /// The client acknowledges the `i`-th message it holds.
    fn ack_held(&mut self, i: usize) {
        let pkid = self.pair.client.held[i];
        let before = self.pair.events.len();
        self.pair.client.ack(pkid);
        self.pair.drive();
        // Whatever the server wrote in the meantime went out before it read the ack.
        self.absorb_wire();
        let new: Vec<&Event> = self.pair.events[before..].iter().collect();
        assert_eq!(new, [&Event::PubAck(pkid)], "one event per held ack");
        let n = self.transmitted_as(pkid);
        self.acked[n as usize] += 1;
        self.flush_backlog();
        self.absorb_wire();
    }

    /// The message the client holds as `pkid`: the last one transmitted with it on this
    /// connection.
    fn transmitted_as(&self, pkid: u16) -> u32 {
        let found = self.this_connection.iter().rev().find(|&&n| {
            self.transmissions[n as usize]
                .iter()
                .any(|&(c, p, _)| c == self.connection && p == pkid)
        });
        *found.expect("a held pkid was transmitted on this connection")
    }

    /// No more loss: deliver, ack and reconnect until every message is acknowledged.
    fn settle(&mut self) {
        for _ in 0..MAX_ROUNDS {
            self.flush_backlog();
            self.apply(&Op::Deliver { lose: 0 });
            while !self.pair.client.held.is_empty() {
                self.ack_held(0);
            }
            if self.backlog.is_empty() && self.pair.server.inflight_len() == 0 {
                return;
            }
            // What was lost comes back only on a new connection.
            if self.pair.client.held.is_empty() && self.pair.server.inflight_len() > 0 {
                self.apply(&Op::Reconnect);
            }
        }
        panic!("the exchange did not settle: livelock");
    }

    fn check_invariants(&self) {
        for (n, sends) in self.transmissions.iter().enumerate() {
            assert_eq!(self.acked[n], 1, "message {n} acknowledged exactly once");
            let Some(&(_, pkid, first_dup)) = sends.first() else {
                panic!("message {n} never transmitted");
            };
            assert!(!first_dup, "message {n}: first transmission has DUP=0");
            for &(_, p, dup) in &sends[1..] {
                assert_eq!(p, pkid, "message {n} keeps its packet id");
                assert!(dup, "message {n}: every resend has DUP=1");
            }
            let mut connections: Vec<u32> = sends.iter().map(|&(c, _, _)| c).collect();
            connections.dedup();
            assert_eq!(
                connections.len(),
                sends.len(),
                "message {n}: at most one transmission per connection"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever is lost, whatever order the acks come in and wherever the connection drops,
    /// every message is acknowledged exactly once; it is resent only across a reconnect, with
    /// DUP=1 and its own id; nothing is sent after its ack; and each connection sends in the
    /// original order (the resends first).
    #[test]
    fn random_loss_ack_order_and_reconnects_lose_and_duplicate_nothing(
        max_inflight in 1u16..6,
        ops in proptest::collection::vec(op(), 0..80),
    ) {
        let mut x = Exchange::new(max_inflight);
        for op in &ops {
            x.apply(op);
            let order = &x.this_connection;
            prop_assert!(
                order.windows(2).all(|w| w[0] < w[1]),
                "connection {} sent out of order: {:?}", x.connection, order
            );
        }
        x.settle();
        x.check_invariants();
        prop_assert_eq!(x.pair.pubacks().len(), x.created as usize);
    }
}
