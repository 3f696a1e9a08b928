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
