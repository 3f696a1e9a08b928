//! The server connection driven by a scripted client in memory, with virtual time: the SASL
//! and plain starts the SDKs use, a link each way with credit, deliveries joined and split,
//! dispositions, limits, idle time, and every protocol mistake closing with its condition.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use roost_amqp::frame::{check, write_frame, Frame, FrameType, AMQP_HEADER, SASL_HEADER};
use roost_amqp::{
    AmqpError, Attach, Begin, Config, Connection, DeliveryState, Disposition, Event, Flow, LinkId,
    Open, Performative, Role, Sasl, SendError, Terminus, Transfer,
};

/// The client end: frames written with the codec, the server's bytes read back as frames.
struct Client {
    server: Connection,
    now: Instant,
    /// What the server sent that has not been looked at.
    got: BytesMut,
}

impl Client {
    fn new(config: Config) -> Self {
        let now = Instant::now();
        Client {
            server: Connection::new(config, now),
            now,
            got: BytesMut::new(),
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.server.handle_bytes(self.now, bytes);
        while let Some(b) = self.server.poll_transmit() {
            self.got.extend_from_slice(&b);
        }
    }

    fn send(&mut self, channel: u16, p: Performative) {
        let mut out = BytesMut::new();
        write_frame(FrameType::Amqp, channel, &mut out, |o| p.write(o));
        self.send_raw(&out);
    }

    fn send_sasl(&mut self, s: Sasl) {
        let mut out = BytesMut::new();
        write_frame(FrameType::Sasl, 0, &mut out, |o| s.write(o));
        self.send_raw(&out);
    }

    fn take_header(&mut self) -> [u8; 8] {
        let h: [u8; 8] = self.got[..8].try_into().expect("8 bytes");
        let _ = self.got.split_to(8);
        h
    }

    /// Every whole frame the server sent since the last call.
    fn frames(&mut self) -> Vec<Frame> {
        while let Some(b) = self.server.poll_transmit() {
            self.got.extend_from_slice(&b);
        }
        let mut out = Vec::new();
        while self.got.starts_with(b"AMQP") {
            let _ = self.got.split_to(8);
        }
        while let Ok(Some(len)) = check(&self.got, usize::MAX) {
            out.push(Frame::parse(self.got.split_to(len).freeze()).expect("server frame"));
        }
        out
    }

    fn performatives(&mut self) -> Vec<(u16, Performative)> {
        self.frames()
            .into_iter()
            .filter(|f| !f.body.is_empty())
            .map(|f| {
                (
                    f.channel,
                    Performative::read(&f.body).expect("server performative"),
                )
            })
            .collect()
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.server.poll_event()).collect()
    }

    /// Plain start (rhea: no SASL), OPEN and BEGIN; returns the server's channel.
    fn open_plain(&mut self, max_frame: Option<u32>) -> u16 {
        self.send_raw(&AMQP_HEADER);
        assert_eq!(self.take_header(), AMQP_HEADER);
        self.send(
            0,
            Performative::Open(Open {
                container_id: "c".into(),
                max_frame_size: max_frame,
                idle_time_out: Some(10_000),
                ..Open::default()
            }),
        );
        self.send(
            0,
            Performative::Begin(Begin {
                next_outgoing_id: 0,
                incoming_window: 100,
                outgoing_window: 100,
                ..Begin::default()
            }),
        );
        let got = self.performatives();
        assert!(matches!(&got[0], (0, Performative::Open(_))), "{got:?}");
        let (channel, Performative::Begin(b)) = &got[1] else {
            panic!("{got:?}")
        };
        assert_eq!(b.remote_channel, Some(0));
        assert!(matches!(self.events()[..], [Event::Opened { .. }]));
        *channel
    }

    /// Attaches a link with the client's `role` at `address`; returns the server's id for it.
    fn attach(&mut self, handle: u32, role: Role, address: &str) -> (LinkId, Attach) {
        let a = Attach {
            source: Some(Terminus::at(address)),
            target: Some(Terminus::at(address)),
            initial_delivery_count: (role == Role::Sender).then_some(0),
            ..Attach::new(format!("link-{handle}").as_str().into(), handle, role)
        };
        self.send(0, Performative::Attach(a));
        match self.events().pop() {
            Some(Event::Attach { link, attach }) => (link, *attach),
            other => panic!("{other:?}"),
        }
    }

    fn transfer(&mut self, handle: u32, id: Option<u32>, more: bool, payload: &'static [u8]) {
        self.send(
            0,
            Performative::Transfer(Transfer {
                delivery_id: id,
                delivery_tag: id.map(|i| Bytes::from(i.to_be_bytes().to_vec())),
                message_format: Some(0),
                settled: Some(false),
                more,
                ..Transfer::new(handle, Bytes::from_static(payload))
            }),
        );
    }

    fn closed_with(&mut self) -> Option<String> {
        self.events().into_iter().find_map(|e| match e {
            Event::Closed { error, .. } => Some(
                error
                    .map(|e| e.condition.as_str().to_string())
                    .unwrap_or_default(),
            ),
            _ => None,
        })
    }
}

#[test]
fn sasl_then_amqp_as_the_python_clients_start() {
    let mut c = Client::new(Config::default());
    c.send_raw(&SASL_HEADER);
    assert_eq!(c.take_header(), SASL_HEADER);
    let f = c.frames();
    assert_eq!(
        Sasl::read(&f[0].body),
        Ok(Sasl::Mechanisms(vec!["MSSBCBS".into(), "ANONYMOUS".into()]))
    );
    c.send_sasl(Sasl::Init {
        mechanism: "MSSBCBS".into(),
        initial_response: None,
        hostname: None,
    });
    assert!(
        matches!(&c.events()[..], [Event::SaslInit { mechanism, .. }] if mechanism == "MSSBCBS")
    );
    c.server.sasl_outcome(true);
    let f = c.frames();
    assert_eq!(
        Sasl::read(&f[0].body),
        Ok(Sasl::Outcome {
            code: 0,
            additional_data: None
        })
    );
    c.send_raw(&AMQP_HEADER);
    assert_eq!(c.take_header(), AMQP_HEADER);
    c.send(
        0,
        Performative::Open(Open {
            container_id: "py".into(),
            hostname: Some("hub".into()),
            max_frame_size: Some(1_048_576),
            ..Open::default()
        }),
    );
    let got = c.performatives();
    let Performative::Open(o) = &got[0].1 else {
        panic!()
    };
    assert!(
        o.max_frame_size.is_some_and(|m| m >= 512),
        "pyamqp needs a numeric max-frame-size"
    );
    assert!(matches!(&c.events()[..], [Event::Opened { hostname: Some(h), .. }] if h == "hub"));
}

#[test]
fn a_mechanism_not_offered_or_a_refused_one_closes() {
    let mut c = Client::new(Config::default());
    c.send_raw(&SASL_HEADER);
    c.send_sasl(Sasl::Init {
        mechanism: "PLAIN".into(),
        initial_response: None,
        hostname: None,
    });
    assert_eq!(c.closed_with().as_deref(), Some("amqp:unauthorized-access"));
    let mut c = Client::new(Config::default());
    c.send_raw(&SASL_HEADER);
    c.send_sasl(Sasl::Init {
        mechanism: "ANONYMOUS".into(),
        initial_response: None,
        hostname: None,
    });
    c.server.sasl_outcome(false);
    assert_eq!(c.closed_with().as_deref(), Some("amqp:unauthorized-access"));
    assert!(c.server.is_closed());
}

#[test]
fn a_link_from_the_client_gets_credit_and_its_deliveries_joined() {
    let mut c = Client::new(Config {
        max_message_size: 20,
        ..Config::default()
    });
    let ch = c.open_plain(None);
    let (link, attach) = c.attach(5, Role::Sender, "/devices/d1/messages/events");
    c.server.accept_attach(link, &attach, 2);
    let got = c.performatives();
    let (_, Performative::Attach(reply)) = &got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(reply.role, Role::Receiver);
    assert_eq!(
        reply
            .target
            .as_ref()
            .and_then(|t| t.address.as_ref())
            .map(|a| a.as_str()),
        Some("/devices/d1/messages/events")
    );
    assert!(reply.source.is_some(), "both termini non-null");
    let (_, Performative::Flow(flow)) = &got[1] else {
        panic!("{got:?}")
    };
    assert_eq!(
        (flow.handle, flow.link_credit),
        (Some(link.handle), Some(2))
    );

    // One delivery in three transfers, then one in one.
    c.transfer(5, Some(0), true, b"hel");
    c.transfer(5, None, true, b"lo ");
    c.transfer(5, None, false, b"world");
    c.transfer(5, Some(1), false, b"again");
    let deliveries: Vec<(u32, Bytes)> = c
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Delivery {
                delivery_id,
                payload,
                ..
            } => Some((delivery_id, payload)),
            _ => None,
        })
        .collect();
    assert_eq!(
        deliveries,
        vec![
            (0, Bytes::from_static(b"hello world")),
            (1, Bytes::from_static(b"again"))
        ]
    );
    c.server
        .disposition(ch, 0, 1, true, DeliveryState::Accepted);
    let got = c.performatives();
    let (_, Performative::Disposition(d)) = &got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(
        (d.role, d.first, d.last, d.settled),
        (Role::Receiver, 0, Some(1), true)
    );

    // Out of credit: a third delivery closes the connection.
    c.transfer(5, Some(2), false, b"x");
    assert_eq!(
        c.closed_with().as_deref(),
        Some("amqp:link:transfer-limit-exceeded")
    );
}

#[test]
fn a_delivery_over_the_message_size_detaches_its_link() {
    let mut c = Client::new(Config {
        max_message_size: 8,
        ..Config::default()
    });
    c.open_plain(None);
    let (link, attach) = c.attach(0, Role::Sender, "in");
    c.server.accept_attach(link, &attach, 10);
    c.performatives();
    c.transfer(0, Some(0), true, b"12345");
    c.transfer(0, None, false, b"6789");
    let got = c.performatives();
    let (_, Performative::Detach(d)) = &got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(
        d.error.as_ref().map(|e| e.condition.as_str()),
        Some("amqp:link:message-size-exceeded")
    );
    assert!(c.server.is_open(), "the connection stays");
}

#[test]
fn the_server_sends_within_credit_and_splits_to_the_peer_frame_size() {
    let mut c = Client::new(Config::default());
    let ch = c.open_plain(Some(512));
    let (link, attach) = c.attach(1, Role::Receiver, "$cbs");
    c.server.accept_attach(link, &attach, 0);
    let got = c.performatives();
    let (_, Performative::Attach(reply)) = &got[0] else {
        panic!()
    };
    assert_eq!(
        (reply.role, reply.initial_delivery_count),
        (Role::Sender, Some(0)),
        "initial-delivery-count when the server sends"
    );
    assert_eq!(
        c.server.send(
            link,
            Bytes::from_static(b"t"),
            Bytes::from_static(b"x"),
            true
        ),
        Err(SendError::NoCredit)
    );
    c.send(
        0,
        Performative::Flow(Flow {
            next_incoming_id: Some(0),
            incoming_window: 100,
            next_outgoing_id: 0,
            outgoing_window: 100,
            handle: Some(1),
            delivery_count: Some(0),
            link_credit: Some(2),
            ..Flow::default()
        }),
    );
    assert!(matches!(&c.events()[..], [Event::Credit { credit: 2, .. }]));
    let big = Bytes::from(vec![7u8; 1500]);
    assert_eq!(
        c.server
            .send(link, Bytes::from_static(b"a"), big.clone(), true),
        Ok(0)
    );
    let transfers: Vec<Transfer> = c
        .performatives()
        .into_iter()
        .map(|(chan, p)| {
            assert_eq!(chan, ch);
            match p {
                Performative::Transfer(t) => t,
                other => panic!("{other:?}"),
            }
        })
        .collect();
    assert!(
        transfers.len() >= 3,
        "1,500 bytes in frames of 512: {}",
        transfers.len()
    );
    assert!(
        transfers[..transfers.len() - 1].iter().all(|t| t.more)
            && !transfers.last().expect("last").more
    );
    assert_eq!(transfers[0].delivery_id, Some(0));
    assert!(
        transfers[1..].iter().all(|t| t.delivery_id.is_none()),
        "one delivery, never interleaved"
    );
    let joined: Vec<u8> = transfers.iter().flat_map(|t| t.payload.to_vec()).collect();
    assert_eq!(joined, big.to_vec());
    // Delivery ids count deliveries, not frames: the next is 1 however many frames the first
    // took (rhea checks they are consecutive), while the transfer ids count the frames.
    let next = 1;
    assert_eq!(
        c.server.send(
            link,
            Bytes::from_static(b"b"),
            Bytes::from_static(b"y"),
            true
        ),
        Ok(next)
    );
    assert_eq!(c.server.credit(link), 0);
    // The client settles: the server hears of it.
    c.send(
        0,
        Performative::Disposition(Disposition {
            role: Role::Receiver,
            first: 0,
            last: Some(next),
            settled: true,
            state: Some(DeliveryState::Accepted),
            batchable: None,
        }),
    );
    assert!(matches!(
        &c.events()[..],
        [Event::Disposition {
            first: 0,
            settled: true,
            ..
        }]
    ));
}

#[test]
fn refusing_a_link_answers_with_a_null_terminus_and_a_detach() {
    let mut c = Client::new(Config::default());
    c.open_plain(None);
    let (link, attach) = c.attach(0, Role::Sender, "/devices/other/messages/events");
    c.server.refuse_attach(
        link,
        &attach,
        AmqpError::new("amqp:unauthorized-access", "not yours"),
    );
    let got = c.performatives();
    let (_, Performative::Attach(reply)) = &got[0] else {
        panic!()
    };
    assert!(reply.target.is_none(), "the refused side is null");
    let (_, Performative::Detach(d)) = &got[1] else {
        panic!()
    };
    assert!(
        d.closed
            && d.error
                .as_ref()
                .is_some_and(|e| e.condition.as_str() == "amqp:unauthorized-access")
    );
    // The handle is free again: the client may attach it anew.
    let (again, _) = c.attach(0, Role::Sender, "/devices/d1/messages/events");
    assert_eq!(again.handle, link.handle);
}

#[test]
fn limits_hold_before_and_after_open() {
    // Before OPEN: a frame over 8 KiB is refused from its size field.
    let mut c = Client::new(Config::default());
    c.send_raw(&AMQP_HEADER);
    c.send_raw(&[0, 1, 0, 0]);
    assert_eq!(
        c.closed_with().as_deref(),
        Some("amqp:connection:framing-error")
    );
    assert_eq!(c.server.buffered(), 4, "nothing more is held");
    // Sessions and links per connection.
    let mut c = Client::new(Config {
        channel_max: 0,
        handle_max: 1,
        ..Config::default()
    });
    c.open_plain(None);
    c.attach(0, Role::Sender, "a");
    c.attach(1, Role::Sender, "b");
    c.send(
        0,
        Performative::Attach(Attach {
            handle: 2,
            ..c.attach_template()
        }),
    );
    assert_eq!(
        c.closed_with().as_deref(),
        Some("amqp:connection:framing-error"),
        "handle over handle-max"
    );
    let mut c = Client::new(Config {
        channel_max: 0,
        ..Config::default()
    });
    c.open_plain(None);
    c.send(
        1,
        Performative::Begin(Begin {
            next_outgoing_id: 0,
            incoming_window: 1,
            outgoing_window: 1,
            ..Begin::default()
        }),
    );
    assert_eq!(
        c.closed_with().as_deref(),
        Some("amqp:resource-limit-exceeded")
    );
}

impl Client {
    fn attach_template(&self) -> Attach {
        Attach::new("x".into(), 9, Role::Sender)
    }
}

#[test]
fn protocol_mistakes_close_with_their_condition() {
    type Script = Box<dyn Fn(&mut Client)>;
    let cases: Vec<(&str, Script)> = vec![
        (
            "amqp:illegal-state",
            Box::new(|c: &mut Client| {
                c.send_raw(&AMQP_HEADER);
                c.send(0, Performative::Begin(Begin::default()));
            }),
        ),
        (
            "amqp:connection:framing-error",
            Box::new(|c: &mut Client| {
                c.open_plain(None);
                c.send(7, Performative::Flow(Flow::default()));
            }),
        ),
        (
            "amqp:session:unattached-handle",
            Box::new(|c: &mut Client| {
                c.open_plain(None);
                c.transfer(3, Some(0), false, b"x");
            }),
        ),
        (
            "amqp:decode-error",
            Box::new(|c: &mut Client| {
                c.open_plain(None);
                let mut out = BytesMut::new();
                write_frame(FrameType::Amqp, 0, &mut out, |o| {
                    o.extend_from_slice(&[0x00, 0x53, 0x13, 0xa1, 9, b'x'])
                });
                c.send_raw(&out);
            }),
        ),
        (
            "amqp:connection:framing-error",
            Box::new(|c: &mut Client| {
                c.send_raw(b"AMQP\x00\x01\x00\x00");
                c.send_raw(&[0, 0, 0, 8, 2, 7, 0, 0]);
            }),
        ),
        (
            "amqp:invalid-field",
            Box::new(|c: &mut Client| {
                c.send_raw(&AMQP_HEADER);
                c.send(
                    0,
                    Performative::Open(Open {
                        container_id: "c".into(),
                        max_frame_size: Some(100),
                        ..Open::default()
                    }),
                );
            }),
        ),
    ];
    for (want, script) in cases {
        let mut c = Client::new(Config::default());
        script(&mut c);
        assert_eq!(c.closed_with().as_deref(), Some(want));
        assert!(c.server.is_closed());
        // A CLOSE went out with the condition (after an OPEN if there had been none).
        let got = c.performatives();
        let close = got.iter().find_map(|(_, p)| match p {
            Performative::Close(e) => e.clone(),
            _ => None,
        });
        assert_eq!(
            close.map(|e| e.condition.as_str().to_string()).as_deref(),
            Some(want),
            "{got:?}"
        );
    }
    let mut c = Client::new(Config::default());
    c.send_raw(b"HTTP/1.1 200");
    assert!(c.server.is_closed(), "not AMQP at all");
}

#[test]
fn idle_peers_are_closed_and_the_server_heartbeats() {
    let mut c = Client::new(Config {
        idle_timeout: Duration::from_secs(10),
        ..Config::default()
    });
    c.open_plain(None);
    // The client announced 10 s: the server sends a heartbeat every 5 s of its own silence.
    c.now += Duration::from_secs(6);
    c.server.handle_timeout(c.now);
    let beats = c.frames();
    assert_eq!(beats.len(), 1);
    assert!(beats[0].body.is_empty(), "an empty frame");
    // A peer that heartbeats stays; one silent for twice the idle timeout is closed.
    c.now += Duration::from_secs(15);
    c.send_raw(&[0, 0, 0, 8, 2, 0, 0, 0]);
    c.server.handle_timeout(c.now);
    assert!(c.server.is_open());
    c.now += Duration::from_secs(20);
    assert!(c.server.poll_timeout().is_some_and(|t| t <= c.now));
    c.server.handle_timeout(c.now);
    assert_eq!(
        c.closed_with().as_deref(),
        Some("amqp:resource-limit-exceeded")
    );

    // No OPEN within the open timeout: closed.
    let mut c = Client::new(Config {
        open_timeout: Duration::from_secs(5),
        ..Config::default()
    });
    c.send_raw(&SASL_HEADER);
    c.now += Duration::from_secs(5);
    c.server.handle_timeout(c.now);
    assert!(c.server.is_closed());
}

#[test]
fn a_peer_close_is_answered_and_ends_everything() {
    let mut c = Client::new(Config::default());
    c.open_plain(None);
    let (link, attach) = c.attach(0, Role::Receiver, "x");
    c.server.accept_attach(link, &attach, 0);
    c.performatives();
    c.send(0, Performative::Close(None));
    let got = c.performatives();
    assert!(matches!(got.last(), Some((0, Performative::Close(None)))));
    assert!(matches!(
        c.events().last(),
        Some(Event::Closed {
            by_peer: true,
            error: None
        })
    ));
    assert_eq!(
        c.server.send(link, Bytes::new(), Bytes::new(), true),
        Err(SendError::Closed)
    );
}
