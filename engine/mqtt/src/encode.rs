//! Encoding packets, plus the fast-path encoders the server uses for its acknowledgements.

use bytes::{BufMut, Bytes, BytesMut};

use crate::decode::required_flags;
use crate::frame::put_header;
use crate::packet::{
    Connect, ConnectReturnCode, PacketType, Publish, QoS, SubAck, SubackCode, Subscribe,
    Unsubscribe,
};
use crate::{Packet, Str};

impl Packet {
    /// Appends the packet's frame to `out`. Encodes what it is given: a packet that breaks a
    /// decode rule (say pkid 0 on QoS 1) is written as is and will not parse back.
    ///
    /// # Panics
    /// If the packet is larger than the 268,435,455 bytes MQTT can frame, or a binary field
    /// (will payload, password) is over 65,535 bytes: both are bugs in the caller.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Packet::Connect(c) => connect(c, out),
            Packet::ConnAck(c) => encode_connack(c.session_present, c.code, out),
            Packet::Publish(p) => publish(p, out),
            Packet::PubAck(id) => encode_puback(*id, out),
            Packet::PubRec(id) => pkid_only(PacketType::PubRec, *id, out),
            Packet::PubRel(id) => pkid_only(PacketType::PubRel, *id, out),
            Packet::PubComp(id) => pkid_only(PacketType::PubComp, *id, out),
            Packet::Subscribe(s) => subscribe(s, out),
            Packet::SubAck(SubAck { pkid, codes }) => encode_suback(*pkid, codes, out),
            Packet::Unsubscribe(u) => unsubscribe(u, out),
            Packet::UnsubAck(id) => pkid_only(PacketType::UnsubAck, *id, out),
            Packet::PingReq => empty(PacketType::PingReq, out),
            Packet::PingResp => encode_pingresp(out),
            Packet::Disconnect => empty(PacketType::Disconnect, out),
        }
    }
}

/// PUBACK for `pkid`: 4 bytes.
pub fn encode_puback(pkid: u16, out: &mut BytesMut) {
    // hot path: one per QoS 1 message, so a single fixed 4-byte write.
    let [hi, lo] = pkid.to_be_bytes();
    out.put_slice(&[0x40, 0x02, hi, lo]);
}

/// CONNACK. `session_present` must be false when `code` is not `Accepted` (§3.2.2.2).
pub fn encode_connack(session_present: bool, code: ConnectReturnCode, out: &mut BytesMut) {
    out.put_slice(&[0x20, 0x02, u8::from(session_present), code as u8]);
}

pub fn encode_pingresp(out: &mut BytesMut) {
    out.put_slice(&[0xD0, 0x00]);
}

/// SUBACK with one code per filter of the SUBSCRIBE, in order.
pub fn encode_suback(pkid: u16, codes: &[SubackCode], out: &mut BytesMut) {
    put_header(out, first_byte(PacketType::SubAck), 2 + codes.len());
    out.put_u16(pkid);
    out.extend(codes.iter().map(|c| c.to_u8()));
}

fn first_byte(packet_type: PacketType) -> u8 {
    ((packet_type as u8) << 4) | required_flags(packet_type)
}

fn pkid_only(packet_type: PacketType, pkid: u16, out: &mut BytesMut) {
    put_header(out, first_byte(packet_type), 2);
    out.put_u16(pkid);
}

fn empty(packet_type: PacketType, out: &mut BytesMut) {
    put_header(out, first_byte(packet_type), 0);
}

fn connect(c: &Connect, out: &mut BytesMut) {
    let mut len = str_len(&c.protocol_name) + 1 + 1 + 2 + str_len(&c.client_id);
    let mut flags = u8::from(c.clean_session) << 1;
    if let Some(will) = &c.will {
        len += str_len(&will.topic) + 2 + will.payload.len();
        flags |= 0b100 | ((will.qos as u8) << 3) | (u8::from(will.retain) << 5);
    }
    if let Some(username) = &c.username {
        len += str_len(username);
        flags |= 0b1000_0000;
    }
    if let Some(password) = &c.password {
        len += 2 + password.len();
        flags |= 0b0100_0000;
    }
    put_header(out, first_byte(PacketType::Connect), len);
    put_str(&c.protocol_name, out);
    out.put_u8(c.protocol_level);
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    put_str(&c.client_id, out);
    if let Some(will) = &c.will {
        put_str(&will.topic, out);
        put_bytes_prefixed(&will.payload, out);
    }
    if let Some(username) = &c.username {
        put_str(username, out);
    }
    if let Some(password) = &c.password {
        put_bytes_prefixed(password, out);
    }
}

fn publish(p: &Publish, out: &mut BytesMut) {
    let flags = PublishFlags {
        dup: p.dup,
        qos: p.qos,
        retain: p.retain,
    };
    encode_publish(flags, &p.topic, p.pkid, &p.payload, out);
}

/// The fixed-header flags of a PUBLISH (§3.3.1).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PublishFlags {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
}

/// The remaining length of a PUBLISH: topic, packet id (QoS 1 and 2 only), payload.
pub(crate) fn publish_remaining(topic: &Str, qos: QoS, payload_len: usize) -> usize {
    let pkid_len = if qos == QoS::AtMostOnce { 0 } else { 2 };
    str_len(topic) + pkid_len + payload_len
}

/// A PUBLISH from its fields, so the session can encode a message it keeps in its in-flight
/// window without building (and cloning into) a [`Publish`]. `pkid` is ignored for QoS 0.
pub(crate) fn encode_publish(
    flags: PublishFlags,
    topic: &Str,
    pkid: u16,
    payload: &[u8],
    out: &mut BytesMut,
) {
    // hot path: C2D and twin/method deliveries; one reserve (in put_header), no temporaries.
    let len = publish_remaining(topic, flags.qos, payload.len());
    let bits = (u8::from(flags.dup) << 3) | ((flags.qos as u8) << 1) | u8::from(flags.retain);
    put_header(out, ((PacketType::Publish as u8) << 4) | bits, len);
    put_str(topic, out);
    if flags.qos != QoS::AtMostOnce {
        out.put_u16(pkid);
    }
    out.put_slice(payload);
}

fn subscribe(s: &Subscribe, out: &mut BytesMut) {
    let len = 2 + s.filters.iter().map(|(f, _)| str_len(f) + 1).sum::<usize>();
    put_header(out, first_byte(PacketType::Subscribe), len);
    out.put_u16(s.pkid);
    for (filter, qos) in &s.filters {
        put_str(filter, out);
        out.put_u8(*qos as u8);
    }
}

fn unsubscribe(u: &Unsubscribe, out: &mut BytesMut) {
    let len = 2 + u.filters.iter().map(str_len).sum::<usize>();
    put_header(out, first_byte(PacketType::Unsubscribe), len);
    out.put_u16(u.pkid);
    for filter in &u.filters {
        put_str(filter, out);
    }
}

fn str_len(s: &Str) -> usize {
    2 + s.len()
}

fn put_str(s: &Str, out: &mut BytesMut) {
    // A `Str` is at most 65,535 bytes by construction, so the cast is exact.
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_bytes_prefixed(b: &Bytes, out: &mut BytesMut) {
    let len = u16::try_from(b.len())
        .unwrap_or_else(|_| panic!("MQTT binary field of {} bytes exceeds 65535", b.len()));
    out.put_u16(len);
    out.put_slice(b);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::packet::{ConnAck, Will};
    use crate::{check, parse, Limits};

    fn encoded(p: &Packet) -> Bytes {
        let mut out = BytesMut::new();
        p.encode(&mut out);
        out.freeze()
    }

    /// encode → check → parse must give back the packet; every strict prefix must be incomplete.
    fn assert_round_trip(p: &Packet) -> Result<(), TestCaseError> {
        let frame = encoded(p);
        let limits = Limits {
            max_frame: usize::MAX,
        };
        for cut in 0..frame.len() {
            prop_assert_eq!(
                check(&frame[..cut], &limits),
                Ok(None),
                "prefix of {} bytes",
                cut
            );
        }
        prop_assert_eq!(check(&frame, &limits), Ok(Some(frame.len())));
        prop_assert_eq!(parse(frame)?, p.clone());
        Ok(())
    }

    #[test]
    fn fast_path_bytes() {
        let mut out = BytesMut::new();
        encode_puback(0x1234, &mut out);
        encode_connack(true, ConnectReturnCode::Accepted, &mut out);
        encode_connack(false, ConnectReturnCode::NotAuthorized, &mut out);
        encode_pingresp(&mut out);
        encode_suback(
            7,
            &[
                SubackCode::Granted(QoS::AtLeastOnce),
                SubackCode::Failure,
                SubackCode::Granted(QoS::AtMostOnce),
            ],
            &mut out,
        );
        assert_eq!(
            &out[..],
            b"\x40\x02\x12\x34\x20\x02\x01\x00\x20\x02\x00\x05\xd0\x00\x90\x05\x00\x07\x01\x80\x00"
        );
    }

    #[test]
    fn large_publish_uses_multi_byte_lengths() {
        for size in [0, 120, 127, 16_380, 16_384, 300 * 1024, 2_097_152] {
            let p = Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: Str::from_static("t"),
                pkid: 1,
                payload: Bytes::from(vec![0xAB; size]),
            });
            let frame = encoded(&p);
            assert_eq!(
                check(
                    &frame,
                    &Limits {
                        max_frame: usize::MAX
                    }
                ),
                Ok(Some(frame.len()))
            );
            assert_eq!(
                parse(frame).expect("round trip"),
                p,
                "payload of {size} bytes"
            );
        }
    }

    #[test]
    #[should_panic(expected = "exceeds 65535")]
    fn oversized_password_panics_rather_than_corrupting() {
        let c = Connect {
            protocol_name: Str::from_static("MQTT"),
            protocol_level: 4,
            clean_session: true,
            keep_alive: 0,
            client_id: Str::from_static(""),
            will: None,
            username: Some(Str::from_static("u")),
            password: Some(Bytes::from(vec![0; 65_536])),
        };
        encoded(&Packet::Connect(c));
    }

    // Strategies: everything inside protocol validity, so each case must round-trip.

    fn level() -> impl Strategy<Value = String> {
        "[^\\x00/+#]{0,12}"
    }

    fn topic() -> impl Strategy<Value = Str> {
        proptest::collection::vec(level(), 1..5)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("topic names are non-empty", |t| !t.is_empty())
            .prop_map(Str::from)
    }

    fn filter() -> impl Strategy<Value = Str> {
        let level = prop_oneof![3 => level(), 1 => Just("+".to_owned())];
        (proptest::collection::vec(level, 1..5), any::<bool>())
            .prop_map(|(mut levels, multi)| {
                if multi {
                    levels.push("#".to_owned());
                }
                levels.join("/")
            })
            .prop_filter("topic filters are non-empty", |f| !f.is_empty())
            .prop_map(Str::from)
    }

    fn text() -> impl Strategy<Value = Str> {
        "[^\\x00]{0,40}".prop_map(Str::from)
    }

    fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
    }

    fn qos() -> impl Strategy<Value = QoS> {
        prop_oneof![
            Just(QoS::AtMostOnce),
            Just(QoS::AtLeastOnce),
            Just(QoS::ExactlyOnce)
        ]
    }

    fn pkid() -> impl Strategy<Value = u16> {
        1..=u16::MAX
    }

    fn return_code() -> impl Strategy<Value = ConnectReturnCode> {
        use ConnectReturnCode::*;
        prop_oneof![
            Just(Accepted),
            Just(UnacceptableProtocolVersion),
            Just(IdentifierRejected),
            Just(ServerUnavailable),
            Just(BadUsernameOrPassword),
            Just(NotAuthorized),
        ]
    }

    fn suback_code() -> impl Strategy<Value = SubackCode> {
        prop_oneof![
            qos().prop_map(SubackCode::Granted),
            Just(SubackCode::Failure)
        ]
    }

    fn will() -> impl Strategy<Value = Will> {
        (topic(), bytes(64), qos(), any::<bool>()).prop_map(|(topic, payload, qos, retain)| Will {
            topic,
            payload,
            qos,
            retain,
        })
    }

    fn connect() -> impl Strategy<Value = Connect> {
        let protocol = prop_oneof![Just(("MQTT", 4u8)), Just(("MQIsdp", 3u8))];
        let credentials = prop_oneof![
            Just((None, None)),
            text().prop_map(|u| (Some(u), None)),
            (text(), bytes(200)).prop_map(|(u, p)| (Some(u), Some(p))),
        ];
        (
            protocol,
            any::<bool>(),
            any::<u16>(),
            text(),
            proptest::option::of(will()),
            credentials,
        )
            .prop_map(
                |(
                    (name, level),
                    clean_session,
                    keep_alive,
                    client_id,
                    will,
                    (username, password),
                )| Connect {
                    protocol_name: Str::from_static(name),
                    protocol_level: level,
                    clean_session,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                },
            )
    }

    fn connack() -> impl Strategy<Value = ConnAck> {
        (any::<bool>(), return_code()).prop_map(|(present, code)| ConnAck {
            session_present: present && code == ConnectReturnCode::Accepted,
            code,
        })
    }

    fn publish() -> impl Strategy<Value = Publish> {
        (
            qos(),
            any::<bool>(),
            any::<bool>(),
            topic(),
            pkid(),
            bytes(1024),
        )
            .prop_map(|(qos, dup, retain, topic, pkid, payload)| {
                let qos0 = qos == QoS::AtMostOnce;
                Publish {
                    dup: dup && !qos0,
                    qos,
                    retain,
                    topic,
                    pkid: if qos0 { 0 } else { pkid },
                    payload,
                }
            })
    }

    fn packet() -> impl Strategy<Value = Packet> {
        prop_oneof![
            connect().prop_map(Packet::Connect),
            connack().prop_map(Packet::ConnAck),
            publish().prop_map(Packet::Publish),
            pkid().prop_map(Packet::PubAck),
            pkid().prop_map(Packet::PubRec),
            pkid().prop_map(Packet::PubRel),
            pkid().prop_map(Packet::PubComp),
            (pkid(), proptest::collection::vec((filter(), qos()), 1..6))
                .prop_map(|(pkid, filters)| Packet::Subscribe(Subscribe { pkid, filters })),
            (pkid(), proptest::collection::vec(suback_code(), 1..6))
                .prop_map(|(pkid, codes)| Packet::SubAck(SubAck { pkid, codes })),
            (pkid(), proptest::collection::vec(filter(), 1..6))
                .prop_map(|(pkid, filters)| Packet::Unsubscribe(Unsubscribe { pkid, filters })),
            pkid().prop_map(Packet::UnsubAck),
            Just(Packet::PingReq),
            Just(Packet::PingResp),
            Just(Packet::Disconnect),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_packet_round_trips(p in packet()) {
            assert_round_trip(&p)?;
        }

        #[test]
        fn connect_round_trips(c in connect()) {
            assert_round_trip(&Packet::Connect(c))?;
        }

        #[test]
        fn publish_round_trips(p in publish()) {
            assert_round_trip(&Packet::Publish(p))?;
        }

        #[test]
        fn fast_path_encoders_match_packet_encode(
            id in pkid(),
            present in any::<bool>(),
            code in return_code(),
            codes in proptest::collection::vec(suback_code(), 1..6),
        ) {
            let mut fast = BytesMut::new();
            encode_puback(id, &mut fast);
            encode_connack(present, code, &mut fast);
            encode_pingresp(&mut fast);
            encode_suback(id, &codes, &mut fast);
            let mut slow = BytesMut::new();
            Packet::PubAck(id).encode(&mut slow);
            Packet::ConnAck(ConnAck { session_present: present, code }).encode(&mut slow);
            Packet::PingResp.encode(&mut slow);
            Packet::SubAck(SubAck { pkid: id, codes }).encode(&mut slow);
            prop_assert_eq!(fast, slow);
        }

        /// Several frames back to back in one buffer split apart exactly as they were written.
        #[test]
        fn back_to_back_frames_split_cleanly(packets in proptest::collection::vec(packet(), 1..8)) {
            let mut buf = BytesMut::new();
            for p in &packets {
                p.encode(&mut buf);
            }
            let limits = Limits { max_frame: usize::MAX };
            for p in &packets {
                let len = check(&buf, &limits)?;
                let len = len.ok_or_else(|| TestCaseError::fail("frame incomplete"))?;
                prop_assert_eq!(&parse(buf.split_to(len).freeze())?, p);
            }
            prop_assert!(buf.is_empty());
        }
    }
}
