//! The frames of the wire spec's transcripts (§7), as `fuzz/gen_corpus.py` encodes them on
//! its own (liberal forms included: `list0`, a symbolic descriptor, short field lists): every
//! frame reads, with the fields the SDKs put in it.

use bytes::Bytes;
use roost_amqp::frame::{check, protocol_header, Frame, FrameType, Protocol};
use roost_amqp::{Body, Message, Performative, Sasl, Value};

/// The frames of a client's stream (protocol headers skipped).
fn frames(stream: &'static [u8]) -> Vec<Frame> {
    let mut rest = stream;
    let mut out = Vec::new();
    loop {
        if let Ok(Some(_)) = protocol_header(rest) {
            rest = &rest[8..];
            continue;
        }
        match check(rest, 1 << 20).expect("frame") {
            Some(len) => {
                out.push(Frame::parse(Bytes::from_static(&rest[..len])).expect("parse"));
                rest = &rest[len..];
            }
            None => {
                assert!(rest.is_empty(), "{} bytes left", rest.len());
                return out;
            }
        }
    }
}

#[test]
fn the_python_event_hubs_consumer_stream_reads() {
    let f = frames(include_bytes!(
        "../../../fuzz/corpus/amqp_frame/py_eventhub"
    ));
    assert_eq!(f[0].kind, FrameType::Sasl);
    assert!(
        matches!(Sasl::read(&f[0].body), Ok(Sasl::Init { mechanism, .. }) if mechanism.as_str() == "ANONYMOUS")
    );
    let read: Vec<Performative> = f[1..]
        .iter()
        .filter(|f| !f.body.is_empty())
        .map(|f| Performative::read(&f.body).expect("performative"))
        .collect();
    let names: Vec<&str> = read.iter().map(Performative::name).collect();
    assert_eq!(
        names,
        [
            "open", "begin", "attach", "attach", "flow", "transfer", "attach", "detach", "end",
            "close"
        ]
    );
    let Performative::Open(o) = &read[0] else {
        panic!()
    };
    assert_eq!(o.max_frame_size, Some(1_048_576));
    let Performative::Transfer(t) = &read[5] else {
        panic!()
    };
    let put = Message::read(&t.payload).expect("put-token");
    assert_eq!(
        put.application_property("operation"),
        Some(&Value::string("put-token"))
    );
    assert!(
        matches!(
            put.properties.as_ref().map(|p| &p.message_id),
            Some(Value::Uuid(_))
        ),
        "pyamqp's message id is a uuid"
    );
    let Performative::Attach(a) = &read[6] else {
        panic!()
    };
    let source = a.source.as_ref().expect("source");
    assert_eq!(
        source.address.as_ref().map(|s| s.as_str()),
        Some("amqps://hub.example.net/hub/ConsumerGroups/$Default/Partitions/0")
    );
    let Value::Map(filter) = &source.filter else {
        panic!("filter {:?}", source.filter)
    };
    let Value::Described(d) = &filter[0].1 else {
        panic!()
    };
    assert_eq!(d.1, Value::string("amqp.annotation.x-opt-offset > '-1'"));
    assert_eq!(a.max_message_size, Some(1_048_576));
}

#[test]
fn the_node_device_and_python_c2d_streams_read() {
    assert_eq!(
        protocol_header(include_bytes!(
            "../../../fuzz/corpus/amqp_frame/node_device"
        )),
        Ok(Some(Protocol::Amqp))
    );
    let f = frames(include_bytes!(
        "../../../fuzz/corpus/amqp_frame/node_device"
    ));
    let read: Vec<Performative> = f
        .iter()
        .map(|f| Performative::read(&f.body).expect("performative"))
        .collect();
    let Performative::Open(o) = &read[0] else {
        panic!()
    };
    assert_eq!(
        (o.container_id.as_str(), o.max_frame_size),
        ("rhea-uuid", None),
        "rhea's OPEN: a symbolic descriptor, two fields"
    );
    let Performative::Transfer(t) = &read[3] else {
        panic!()
    };
    let m = Message::read(&t.payload).expect("telemetry");
    assert_eq!(m.data().as_deref(), Some(&b"x"[..]));
    assert_eq!(
        m.properties
            .and_then(|p| p.to)
            .map(|t| t.as_str().to_string())
            .as_deref(),
        Some("/devices/dev1/messages/events")
    );

    let f = frames(include_bytes!("../../../fuzz/corpus/amqp_frame/py_hub_c2d"));
    assert!(
        matches!(Sasl::read(&f[0].body), Ok(Sasl::Init { mechanism, initial_response: None, .. }) if mechanism.as_str() == "MSSBCBS")
    );
    let Performative::Transfer(t) = Performative::read(&f[3].body).expect("transfer") else {
        panic!()
    };
    let m = Message::read(&t.payload).expect("c2d");
    assert_eq!(
        m.application_property("iothub-ack"),
        Some(&Value::string("full"))
    );
    assert!(matches!(m.body, Body::Data(_)));
}

#[test]
fn an_event_split_over_two_transfers_joins() {
    let f = frames(include_bytes!(
        "../../../fuzz/corpus/amqp_frame/multi_frame"
    ));
    let parts: Vec<_> = f
        .iter()
        .map(|f| match Performative::read(&f.body).expect("transfer") {
            Performative::Transfer(t) => t,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(parts[0].more && !parts[1].more);
    let joined: Vec<u8> = parts.iter().flat_map(|t| t.payload.to_vec()).collect();
    let m = Message::read(&Bytes::from(joined)).expect("event");
    assert_eq!(m.annotation("x-opt-offset"), Some(&Value::string("0")));
    assert_eq!(m.data().as_deref(), Some(&b"{\"temperature\":31}"[..]));
}

/// The official SDKs' own client streams, recorded through a TLS-terminating proxy
/// (`tests/e2e/amqp_capture.py`, signatures blanked): the Python Event Hubs consumer, the
/// Python service SDK's C2D send (uamqp) and the Node device SDK. Each runs through a server
/// connection that accepts everything: no frame is refused, every delivery reads as a message,
/// and the connection is never closed with an error of ours.
#[test]
fn the_sdks_recorded_streams_run_through_the_server_cleanly() {
    use roost_amqp::{Config, Connection, DeliveryState, Event};
    use std::time::Instant;

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/amqp_frame");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("the corpus") {
        let path = entry.expect("an entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !name.starts_with("sdk_") {
            continue;
        }
        let stream = std::fs::read(&path).expect("a recorded stream");
        let now = Instant::now();
        let mut c = Connection::new(Config::default(), now);
        let (mut deliveries, mut attaches) = (0, 0);
        // A byte at a time: the application answers each frame before the next arrives, as
        // the live clients wait for the server's answers (credit, SASL outcome) before going on.
        for chunk in stream.chunks(1) {
            c.handle_bytes(now, chunk);
            while let Some(e) = c.poll_event() {
                match e {
                    Event::SaslInit { .. } => c.sasl_outcome(true),
                    Event::Attach { link, attach } => {
                        attaches += 1;
                        c.accept_attach(link, &attach, 100);
                    }
                    Event::Delivery {
                        link,
                        delivery_id,
                        payload,
                        ..
                    } => {
                        deliveries += 1;
                        if let Err(e) = Message::read(&payload) {
                            panic!("{name}: delivery {delivery_id} does not read: {e}");
                        }
                        c.disposition(
                            link.channel,
                            delivery_id,
                            delivery_id,
                            true,
                            DeliveryState::Accepted,
                        );
                    }
                    Event::Closed {
                        error: Some(e),
                        by_peer: false,
                    } => panic!("{name}: closed by the server: {e:?}"),
                    _ => {}
                }
            }
            while c.poll_transmit().is_some() {}
        }
        seen.push((name, attaches, deliveries));
    }
    seen.sort();
    let names: Vec<&str> = seen.iter().map(|(n, ..)| n.as_str()).collect();
    assert!(
        ["sdk_node_device", "sdk_py_eventhub", "sdk_py_hub_c2d"]
            .iter()
            .all(|p| names.iter().any(|n| n.starts_with(p))),
        "{names:?}"
    );
    // Each SDK's stream attaches its links and sends at least its put-token.
    for (name, attaches, deliveries) in &seen {
        assert!(
            *attaches >= 2 && *deliveries >= 1,
            "{name}: {attaches} attaches, {deliveries} deliveries"
        );
    }
}
