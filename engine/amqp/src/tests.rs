//! Round trips of values, performatives and messages; the encoding rules the Azure SDKs need;
//! malformed input, each refused with its named error.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use crate::frame::{write_frame, Frame, FrameType};
use crate::types::{decode, encode, MAX_DEPTH};
use crate::*;

fn bytes_of(v: &Value) -> Bytes {
    let mut out = BytesMut::new();
    encode(v, &mut out);
    out.freeze()
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u8>().prop_map(Value::Ubyte),
        any::<u16>().prop_map(Value::Ushort),
        any::<u32>().prop_map(Value::Uint),
        any::<u64>().prop_map(Value::Ulong),
        any::<i8>().prop_map(Value::Byte),
        any::<i16>().prop_map(Value::Short),
        any::<i32>().prop_map(Value::Int),
        any::<i64>().prop_map(Value::Long),
        any::<i32>().prop_map(|f| Value::Float(f as f32)),
        any::<i64>().prop_map(|f| Value::Double(f as f64)),
        any::<[u8; 4]>().prop_map(Value::Decimal32),
        any::<char>().prop_map(Value::Char),
        any::<i64>().prop_map(Value::Timestamp),
        any::<[u8; 16]>().prop_map(Value::Uuid),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| Value::Binary(b.into())),
        ".{0,300}".prop_map(|s: String| Value::String(s.into())),
        "[a-z:.-]{0,40}".prop_map(|s: String| Value::Symbol(s.into())),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::List),
            proptest::collection::vec((inner.clone(), inner.clone()), 0..6).prop_map(Value::Map),
            proptest::collection::vec(any::<u32>(), 0..8)
                .prop_map(|v| Value::Array(v.into_iter().map(Value::Uint).collect())),
            proptest::collection::vec("[a-z]{0,300}", 0..4).prop_map(|v| Value::Array(
                v.into_iter().map(|s| Value::Symbol(s.into())).collect()
            )),
            (any::<u64>(), inner)
                .prop_map(|(d, v)| Value::Described(Box::new((Value::Ulong(d), v)))),
        ]
    })
}

proptest! {
    #[test]
    fn every_value_round_trips(v in value()) {
        prop_assert_eq!(decode(&bytes_of(&v)).expect("decodes"), v);
    }

    /// TRANSFER is written straight into the output (no value tree): the same bytes as the
    /// generic encoding of its fields, and it reads back.
    #[test]
    fn a_transfer_written_directly_is_the_generic_encoding(
        handle in any::<u32>(),
        delivery_id in proptest::option::of(any::<u32>()),
        tag in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
        settled in proptest::option::of(any::<bool>()),
        more in any::<bool>(),
        accepted in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let t = Transfer {
            delivery_id,
            delivery_tag: tag.map(Bytes::from),
            message_format: delivery_id.map(|_| 0),
            settled,
            more,
            state: accepted.then_some(DeliveryState::Accepted),
            ..Transfer::new(handle, Bytes::from(payload))
        };
        let mut direct = BytesMut::new();
        Performative::Transfer(t.clone()).write(&mut direct);
        let opt_u32 = |v: Option<u32>| v.map_or(Value::Null, Value::Uint);
        let opt_bool = |v: Option<bool>| v.map_or(Value::Null, Value::Bool);
        let mut generic = BytesMut::new();
        encode(&Value::described_list(0x14, vec![
            Value::Uint(t.handle),
            opt_u32(t.delivery_id),
            t.delivery_tag.clone().map_or(Value::Null, Value::Binary),
            opt_u32(t.message_format),
            opt_bool(t.settled),
            Value::Bool(t.more),
            Value::Null,
            if accepted { Value::described_list(0x24, vec![]) } else { Value::Null },
            Value::Null,
            Value::Null,
            Value::Null,
        ]), &mut generic);
        generic.extend_from_slice(&t.payload);
        prop_assert_eq!(&direct[..], &generic[..]);
        prop_assert_eq!(Performative::read(&direct.freeze()).expect("reads"), Performative::Transfer(t));
    }

    #[test]
    fn no_input_panics_the_decoders(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let b = Bytes::from(data);
        let _ = decode(&b);
        let _ = Performative::read(&b);
        let _ = Sasl::read(&b);
        let _ = Message::read(&b);
        let _ = Frame::parse(b);
    }
}

#[test]
fn compact_forms_are_read_as_their_type() {
    for (bytes, want) in [
        (&[0x43][..], Value::Uint(0)),
        (&[0x52, 7], Value::Uint(7)),
        (&[0x44], Value::Ulong(0)),
        (&[0x53, 0x10], Value::Ulong(16)),
        (&[0x54, 0xff], Value::Int(-1)),
        (&[0x55, 0x80], Value::Long(-128)),
        (&[0x56, 0x01], Value::Bool(true)),
        (&[0x45], Value::List(vec![])),
        (&[0xa3, 2, b'o', b'k'], Value::symbol("ok")),
        (&[0xb1, 0, 0, 0, 1, b'x'], Value::string("x")),
    ] {
        assert_eq!(
            decode(&Bytes::copy_from_slice(bytes)),
            Ok(want),
            "{bytes:x?}"
        );
    }
}

#[test]
fn performatives_are_written_at_full_arity_with_small_ulong_descriptors() {
    // (performative, code, arity): wire spec §0 rule 3.
    let open = Performative::Open(Open {
        container_id: "roost".into(),
        max_frame_size: Some(65536),
        ..Open::default()
    });
    let begin = Performative::Begin(Begin {
        remote_channel: Some(0),
        next_outgoing_id: 1,
        incoming_window: 5000,
        outgoing_window: 5000,
        handle_max: Some(255),
        ..Begin::default()
    });
    let attach = Performative::Attach(Attach {
        source: Some(Terminus::at("$cbs")),
        target: Some(Terminus::at("cbs")),
        initial_delivery_count: Some(0),
        ..Attach::new("l".into(), 0, Role::Sender)
    });
    let flow = Performative::Flow(Flow {
        handle: Some(0),
        delivery_count: Some(0),
        link_credit: Some(100),
        ..Flow::default()
    });
    let transfer = Performative::Transfer(Transfer {
        delivery_id: Some(0),
        delivery_tag: Some(Bytes::from_static(b"\0\0\0\0")),
        message_format: Some(0),
        settled: Some(true),
        ..Transfer::new(0, Bytes::from_static(b"payload"))
    });
    let disposition = Performative::Disposition(Disposition {
        role: Role::Receiver,
        first: 3,
        last: None,
        settled: true,
        state: Some(DeliveryState::Accepted),
        batchable: None,
    });
    let detach = Performative::Detach(Detach {
        handle: 1,
        closed: true,
        error: Some(AmqpError::new("amqp:unauthorized-access", "no")),
    });
    let cases = [
        (open, 0x10, 10),
        (begin, 0x11, 8),
        (attach, 0x12, 14),
        (flow, 0x13, 11),
        (transfer, 0x14, 11),
        (disposition, 0x15, 6),
        (detach, 0x16, 3),
        (Performative::End(None), 0x17, 1),
        (Performative::Close(None), 0x18, 1),
    ];
    for (p, code, arity) in cases {
        let mut out = BytesMut::new();
        p.write(&mut out);
        assert_eq!(
            &out[..3],
            &[0x00, 0x53, code],
            "{}: small-ulong descriptor",
            p.name()
        );
        assert!(
            matches!(out[3], 0xc0 | 0xd0),
            "{}: list8 or list32, never list0",
            p.name()
        );
        let count = if out[3] == 0xc0 {
            usize::from(out[5])
        } else {
            u32::from_be_bytes([out[8], out[9], out[10], out[11]]) as usize
        };
        assert_eq!(count, arity, "{}: full arity", p.name());
        assert_eq!(Performative::read(&out.freeze()).expect("reads back"), p);
    }
    let mut out = BytesMut::new();
    Sasl::Mechanisms(vec!["MSSBCBS".into(), "ANONYMOUS".into()]).write(&mut out);
    assert_eq!(&out[..4], &[0x00, 0x53, 0x40, 0xc0]);
    assert_eq!(out[5], 1, "sasl-mechanisms: one field");
    assert_eq!(out[6], 0xe0, "the mechanisms as an array of symbols");
    let mut out = BytesMut::new();
    Sasl::Outcome {
        code: 0,
        additional_data: None,
    }
    .write(&mut out);
    assert_eq!(
        &out[..],
        &[0x00, 0x53, 0x44, 0xc0, 0x04, 0x02, 0x50, 0x00, 0x40]
    );
}

#[test]
fn what_clients_send_is_read_liberally() {
    // A symbolic descriptor, trailing fields omitted, list0 for an empty error-free end.
    let mut out = BytesMut::new();
    encode(
        &Value::Described(Box::new((
            Value::symbol("amqp:open:list"),
            Value::List(vec![Value::string("client-1"), Value::string("hub.local")]),
        ))),
        &mut out,
    );
    let Performative::Open(o) = Performative::read(&out.freeze()).expect("open") else {
        panic!("not open")
    };
    assert_eq!(
        (
            o.container_id.as_str(),
            o.hostname.as_ref().map(Str::as_str)
        ),
        ("client-1", Some("hub.local"))
    );
    assert_eq!(o.max_frame_size, None);
    let end = Bytes::from_static(&[0x00, 0x53, 0x17, 0x45]);
    assert_eq!(Performative::read(&end), Ok(Performative::End(None)));
    // sasl-init as pyamqp sends it: ANONYMOUS, no initial response.
    let mut out = BytesMut::new();
    encode(
        &Value::described_list(0x41, vec![Value::symbol("ANONYMOUS")]),
        &mut out,
    );
    assert_eq!(
        Sasl::read(&out.freeze()),
        Ok(Sasl::Init {
            mechanism: "ANONYMOUS".into(),
            initial_response: None,
            hostname: None
        })
    );
}

#[test]
fn malformed_input_is_named() {
    let b = |s: &'static [u8]| Bytes::from_static(s);
    assert_eq!(decode(&b(&[0xa1, 5, b'a'])), Err(Error::Truncated));
    assert_eq!(decode(&b(&[0xa1, 2, 0xff, 0xfe])), Err(Error::InvalidUtf8));
    assert_eq!(decode(&b(&[0x99])), Err(Error::UnknownFormatCode(0x99)));
    assert_eq!(decode(&b(&[0x73, 0, 0x11, 0, 0])), Err(Error::InvalidChar));
    // A list8 claiming 200 elements in 3 bytes; a map with an odd count.
    assert_eq!(
        decode(&b(&[0xc0, 4, 200, 0x40, 0x40, 0x40])),
        Err(Error::BadCompound)
    );
    assert_eq!(decode(&b(&[0xc1, 2, 1, 0x40])), Err(Error::BadCompound));
    // A list32 whose count claims four billion elements: refused, nothing allocated.
    assert_eq!(
        decode(&b(&[0xd0, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0x40])),
        Err(Error::BadCompound)
    );
    // An array of four billion nulls (a zero-width element type).
    assert_eq!(
        decode(&b(&[0xf0, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0x40])),
        Err(Error::BadArray)
    );
    assert_eq!(decode(&b(&[0x40, 0x40])), Err(Error::TrailingBytes));
    // Nesting past the limit.
    let mut deep = vec![];
    for _ in 0..=MAX_DEPTH {
        deep.extend_from_slice(&[0x00, 0x53, 0x01]);
    }
    deep.push(0x40);
    assert_eq!(decode(&Bytes::from(deep)), Err(Error::TooDeep(MAX_DEPTH)));
    // Performatives: unknown code, a missing mandatory field, a wrong type.
    assert_eq!(
        Performative::read(&b(&[0x00, 0x53, 0x30, 0x45])),
        Err(Error::UnknownPerformative("0x30".into()))
    );
    assert_eq!(
        Performative::read(&b(&[0x00, 0x53, 0x10, 0x45])),
        Err(Error::BadField {
            performative: "open",
            field: "container-id",
            problem: "is mandatory"
        })
    );
    let mut out = BytesMut::new();
    encode(
        &Value::described_list(
            0x12,
            vec![
                Value::string("l"),
                Value::string("zero"),
                Value::Bool(false),
            ],
        ),
        &mut out,
    );
    assert_eq!(
        Performative::read(&out.freeze()),
        Err(Error::BadField {
            performative: "attach",
            field: "handle",
            problem: "is not a uint"
        })
    );
    for e in [
        Error::Truncated,
        Error::BadFrameHeader,
        Error::UnknownPerformative("x".into()),
    ] {
        assert!(!e.error_code().is_empty() && e.condition().starts_with("amqp:"));
    }
}

#[test]
fn a_message_round_trips_with_its_types() {
    let m = Message {
        header: Some(Header {
            durable: Some(true),
            ..Header::default()
        }),
        delivery_annotations: vec![],
        message_annotations: vec![
            (Value::symbol("x-opt-sequence-number"), Value::Long(42)),
            (Value::symbol("x-opt-offset"), Value::string("42")),
            (
                Value::symbol("x-opt-enqueued-time"),
                Value::Timestamp(1_765_000_000_000),
            ),
            (
                Value::symbol("iothub-connection-device-id"),
                Value::string("dev-1"),
            ),
        ],
        properties: Some(Properties {
            message_id: Value::Uuid([7; 16]),
            correlation_id: Value::Ulong(0),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            ..Properties::default()
        }),
        application_properties: vec![(Value::string("level"), Value::string("critical"))],
        body: Body::Data(vec![Bytes::from_static(b"{\"t\":1}")]),
        footer: vec![],
    };
    let mut out = BytesMut::new();
    m.write(&mut out);
    let payload = out.freeze();
    let back = Message::read(&payload).expect("reads");
    assert_eq!(back, m);
    assert_eq!(back.data().as_deref(), Some(&b"{\"t\":1}"[..]));
    assert_eq!(back.annotation("x-opt-offset"), Some(&Value::string("42")));
    assert_eq!(
        back.application_property("level"),
        Some(&Value::string("critical"))
    );
    // The body is a slice of the payload, not a copy.
    let Body::Data(parts) = &back.body else {
        panic!()
    };
    let at = payload.as_ptr() as usize;
    assert!((at..at + payload.len()).contains(&(parts[0].as_ptr() as usize)));

    // In a transfer frame and back.
    let mut frame = BytesMut::new();
    write_frame(FrameType::Amqp, 1, &mut frame, |out| {
        Performative::Transfer(Transfer {
            delivery_id: Some(9),
            delivery_tag: Some(Bytes::from_static(b"t")),
            message_format: Some(0),
            settled: Some(false),
            ..Transfer::new(0, payload.clone())
        })
        .write(out)
    });
    let f = Frame::parse(frame.freeze()).expect("frame");
    let Performative::Transfer(t) = Performative::read(&f.body).expect("transfer") else {
        panic!()
    };
    assert_eq!(Message::read(&t.payload).expect("message"), m);

    // Sections out of order, and two kinds of body.
    let mut bad = BytesMut::new();
    encode(&Value::described_list(0x73, vec![]), &mut bad);
    encode(
        &Value::Described(Box::new((Value::Ulong(0x70), Value::List(vec![])))),
        &mut bad,
    );
    assert_eq!(
        Message::read(&bad.freeze()),
        Err(Error::BadMessage("sections out of order"))
    );
    let mut two = BytesMut::new();
    encode(
        &Value::Described(Box::new((Value::Ulong(0x75), Value::Binary(Bytes::new())))),
        &mut two,
    );
    encode(
        &Value::Described(Box::new((Value::Ulong(0x77), Value::Null))),
        &mut two,
    );
    assert_eq!(
        Message::read(&two.freeze()),
        Err(Error::BadMessage("more than one kind of body section"))
    );
}
