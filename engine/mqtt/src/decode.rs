//! `parse`: one complete frame to one `Packet`, strictly per MQTT 3.1.1.

use bytes::Bytes;

use crate::frame::FixedHeader;
use crate::packet::{
    ConnAck, Connect, ConnectReturnCode, PacketType, Publish, QoS, SubAck, SubackCode, Subscribe,
    Unsubscribe, Will,
};
use crate::reader::Reader;
use crate::{Error, Packet, Str};

/// Parses exactly one complete frame, as delimited by [`check`](crate::check) and split off as
/// `Bytes`. Zero-copy: topics, strings and payloads are slices of `frame`.
///
/// Anything that breaks MQTT 3.1.1 is an [`Error`]; no input makes this panic.
pub fn parse(frame: Bytes) -> Result<Packet, Error> {
    let header = FixedHeader::read(&frame)?.ok_or(Error::Truncated)?;
    if frame.len() < header.total_len() {
        return Err(Error::Truncated);
    }
    if frame.len() > header.total_len() {
        return Err(Error::TrailingBytes);
    }
    let nibble = header.byte0 >> 4;
    let flags = header.byte0 & 0x0F;
    let packet_type = PacketType::from_nibble(nibble).ok_or(Error::UnknownPacketType(nibble))?;
    if packet_type != PacketType::Publish && flags != required_flags(packet_type) {
        return Err(Error::InvalidFlags { packet_type });
    }

    let body = frame.slice(header.header_len..);
    let mut r = Reader::new(&body);
    let packet = match packet_type {
        PacketType::Connect => Packet::Connect(connect(&mut r)?),
        PacketType::ConnAck => Packet::ConnAck(connack(&mut r)?),
        // hot path: the payload is everything after the variable header, taken as one slice.
        PacketType::Publish => Packet::Publish(publish(flags, &mut r)?),
        PacketType::PubAck => Packet::PubAck(pkid(&mut r)?),
        PacketType::PubRec => Packet::PubRec(pkid(&mut r)?),
        PacketType::PubRel => Packet::PubRel(pkid(&mut r)?),
        PacketType::PubComp => Packet::PubComp(pkid(&mut r)?),
        PacketType::Subscribe => Packet::Subscribe(subscribe(&mut r)?),
        PacketType::SubAck => Packet::SubAck(suback(&mut r)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(unsubscribe(&mut r)?),
        PacketType::UnsubAck => Packet::UnsubAck(pkid(&mut r)?),
        PacketType::PingReq => Packet::PingReq,
        PacketType::PingResp => Packet::PingResp,
        PacketType::Disconnect => Packet::Disconnect,
    };
    r.finish()?;
    Ok(packet)
}

/// Fixed-header flags every packet but PUBLISH must carry (§2.2.2).
pub(crate) fn required_flags(packet_type: PacketType) -> u8 {
    match packet_type {
        PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => 0b0010,
        _ => 0,
    }
}

fn connect(r: &mut Reader<'_>) -> Result<Connect, Error> {
    let protocol_name = r.str()?;
    let protocol_level = r.u8()?;
    // The level is checked before anything else so an MQTT 5 client (whose CONNECT carries
    // properties we cannot parse) still gets its CONNACK 1.
    match (protocol_name.as_str(), protocol_level) {
        ("MQTT", 4) | ("MQIsdp", 3) => {}
        ("MQTT" | "MQIsdp", level) => return Err(Error::UnsupportedProtocolLevel(level)),
        _ => return Err(Error::InvalidProtocolName),
    }

    let flags = r.u8()?;
    let reserved = flags & 0b0000_0001 != 0;
    let clean_session = flags & 0b0000_0010 != 0;
    let will_flag = flags & 0b0000_0100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0b0010_0000 != 0;
    let has_password = flags & 0b0100_0000 != 0;
    let has_username = flags & 0b1000_0000 != 0;
    if reserved || (!will_flag && (will_qos != 0 || will_retain)) || (has_password && !has_username)
    {
        return Err(Error::InvalidConnectFlags);
    }
    let will_qos = QoS::try_from(will_qos)?;

    let keep_alive = r.u16()?;
    let client_id = r.str()?;
    let will = if will_flag {
        let topic = topic_name(r.str()?)?;
        let payload = r.bytes_prefixed()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if has_username { Some(r.str()?) } else { None };
    let password = if has_password {
        Some(r.bytes_prefixed()?)
    } else {
        None
    };
    Ok(Connect {
        protocol_name,
        protocol_level,
        clean_session,
        keep_alive,
        client_id,
        will,
        username,
        password,
    })
}

fn connack(r: &mut Reader<'_>) -> Result<ConnAck, Error> {
    let flags = r.u8()?;
    let code = ConnectReturnCode::try_from(r.u8()?)?;
    let session_present = flags & 1 != 0;
    if flags & 0xFE != 0 || (session_present && code != ConnectReturnCode::Accepted) {
        return Err(Error::InvalidConnackFlags);
    }
    Ok(ConnAck {
        session_present,
        code,
    })
}

fn publish(flags: u8, r: &mut Reader<'_>) -> Result<Publish, Error> {
    let dup = flags & 0b1000 != 0;
    let qos = QoS::try_from((flags >> 1) & 0b11)?;
    let retain = flags & 0b0001 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(Error::InvalidFlags {
            packet_type: PacketType::Publish,
        });
    }
    let topic = topic_name(r.str()?)?;
    let pkid = if qos == QoS::AtMostOnce { 0 } else { pkid(r)? };
    let payload = r.rest();
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        pkid,
        payload,
    })
}

fn subscribe(r: &mut Reader<'_>) -> Result<Subscribe, Error> {
    let pkid = pkid(r)?;
    // No `with_capacity`: the count is not known, and guessing from input invites abuse.
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = topic_filter(r.str()?)?;
        let options = r.u8()?;
        if options & 0b1111_1100 != 0 {
            return Err(Error::InvalidSubscribeOptions);
        }
        filters.push((filter, QoS::try_from(options)?));
    }
    if filters.is_empty() {
        return Err(Error::EmptySubscribe);
    }
    Ok(Subscribe { pkid, filters })
}

fn suback(r: &mut Reader<'_>) -> Result<SubAck, Error> {
    let pkid = pkid(r)?;
    let codes = r
        .rest()
        .iter()
        .map(|&b| SubackCode::try_from(b))
        .collect::<Result<Vec<_>, _>>()?;
    if codes.is_empty() {
        return Err(Error::EmptySuback);
    }
    Ok(SubAck { pkid, codes })
}

fn unsubscribe(r: &mut Reader<'_>) -> Result<Unsubscribe, Error> {
    let pkid = pkid(r)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(topic_filter(r.str()?)?);
    }
    if filters.is_empty() {
        return Err(Error::EmptyUnsubscribe);
    }
    Ok(Unsubscribe { pkid, filters })
}

fn pkid(r: &mut Reader<'_>) -> Result<u16, Error> {
    match r.u16()? {
        0 => Err(Error::ZeroPacketId),
        id => Ok(id),
    }
}

/// A topic name is non-empty and has no wildcard (§4.7.3, §3.3.2.1).
fn topic_name(s: Str) -> Result<Str, Error> {
    if !is_topic_name(&s) {
        return Err(Error::InvalidTopicName);
    }
    Ok(s)
}

/// The topic-name rule on its own, for topics the server sends.
pub(crate) fn is_topic_name(s: &Str) -> bool {
    !s.is_empty() && !s.as_bytes().iter().any(|&b| b == b'+' || b == b'#')
}

/// A topic filter is non-empty; `+` fills a whole level; `#` fills the last level (§4.7.1).
fn topic_filter(s: Str) -> Result<Str, Error> {
    if s.is_empty() {
        return Err(Error::InvalidTopicFilter);
    }
    let mut levels = s.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        let valid = match level {
            "#" => last,
            "+" => true,
            _ => !level.contains(['+', '#']),
        };
        if !valid {
            return Err(Error::InvalidTopicFilter);
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{check, Limits};

    fn parse_bytes(bytes: &[u8]) -> Result<Packet, Error> {
        parse(Bytes::copy_from_slice(bytes))
    }

    /// A CONNECT as the Python SDK sends it: IoT Hub user name, SAS password, CleanSession 0.
    const CONNECT: &[u8] = b"\x10\x53\x00\x04MQTT\x04\xc0\x00\x3c\x00\x02d1\
\x00\x2ahub.example.net/d1/?api-version=2021-04-12\
\x00\x17SharedAccessSignature x";

    /// PUBLISH QoS 1, pkid 7, to the D2C topic, payload "hello".
    const PUBLISH: &[u8] = b"\x32\x24\x00\x1bdevices/d1/messages/events/\x00\x07hello";

    #[test]
    fn parses_iot_hub_connect() {
        let Ok(Packet::Connect(c)) = parse_bytes(CONNECT) else {
            panic!("CONNECT did not parse: {:?}", parse_bytes(CONNECT));
        };
        assert_eq!(c.protocol_name, "MQTT");
        assert_eq!(c.protocol_level, 4);
        assert!(!c.clean_session);
        assert_eq!(c.keep_alive, 60);
        assert_eq!(c.client_id, "d1");
        assert_eq!(c.will, None);
        assert_eq!(
            c.username.as_deref(),
            Some("hub.example.net/d1/?api-version=2021-04-12")
        );
        assert_eq!(c.password.as_deref(), Some(&b"SharedAccessSignature x"[..]));
    }

    #[test]
    fn publish_is_zero_copy() {
        let frame = Bytes::copy_from_slice(PUBLISH);
        let range = frame.as_ptr_range();
        let Ok(Packet::Publish(p)) = parse(frame.clone()) else {
            panic!("PUBLISH did not parse");
        };
        assert_eq!(p.topic, "devices/d1/messages/events/");
        assert_eq!(
            (p.qos, p.pkid, p.dup, p.retain),
            (QoS::AtLeastOnce, 7, false, false)
        );
        assert_eq!(&p.payload[..], b"hello");
        assert!(
            range.contains(&p.payload.as_ptr()),
            "payload must point into the frame"
        );
        assert!(
            range.contains(&p.topic.as_bytes().as_ptr()),
            "topic must point into the frame"
        );
    }

    #[test]
    fn accepts_mqisdp_level_3() {
        let frame = b"\x10\x0e\x00\x06MQIsdp\x03\x02\x00\x00\x00\x00";
        let Ok(Packet::Connect(c)) = parse_bytes(frame) else {
            panic!("MQIsdp CONNECT did not parse")
        };
        assert_eq!(
            (c.protocol_name.as_str(), c.protocol_level, c.clean_session),
            ("MQIsdp", 3, true)
        );
        assert_eq!(c.client_id, "");
    }

    #[test]
    fn parses_subscribe_with_three_filters() {
        let frame = b"\x82\x45\x00\x01\
\x00\x21devices/d1/messages/devicebound/#\x01\
\x00\x0e$iothub/twin/#\x00\
\x00\x0b$iothub/+/x\x02";
        let Ok(Packet::Subscribe(s)) = parse_bytes(frame) else {
            panic!("SUBSCRIBE did not parse: {:?}", parse_bytes(frame));
        };
        assert_eq!(s.pkid, 1);
        let filters: Vec<(&str, QoS)> = s.filters.iter().map(|(f, q)| (f.as_str(), *q)).collect();
        assert_eq!(
            filters,
            [
                ("devices/d1/messages/devicebound/#", QoS::AtLeastOnce),
                ("$iothub/twin/#", QoS::AtMostOnce),
                ("$iothub/+/x", QoS::ExactlyOnce),
            ]
        );
    }

    #[test]
    fn topic_filter_rules() {
        let ok = [
            "#",
            "+",
            "a/#",
            "a/+/b",
            "+/+",
            "/",
            "a//b",
            "$iothub/methods/POST/#",
            "sport/+",
        ];
        for f in ok {
            assert_eq!(topic_filter(Str::from(f)), Ok(Str::from(f)), "{f}");
        }
        let bad = ["", "a#", "#/a", "a/#/b", "a+", "a/+b", "a/b#"];
        for f in bad {
            assert_eq!(
                topic_filter(Str::from(f)),
                Err(Error::InvalidTopicFilter),
                "{f}"
            );
        }
    }

    /// One hand-written frame per way input can be wrong.
    #[test]
    fn every_error_variant_is_reachable() {
        use Error::*;
        let pt = PacketType::Publish;
        let cases: Vec<(&str, &[u8], Error)> = vec![
            (
                "fifth length byte",
                b"\x30\xff\xff\xff\xff\x01",
                MalformedRemainingLength,
            ),
            ("type 0", b"\x00\x00", UnknownPacketType(0)),
            ("type 15", b"\xf0\x00", UnknownPacketType(15)),
            (
                "SUBSCRIBE flags 0",
                b"\x80\x06\x00\x01\x00\x01a\x00",
                InvalidFlags {
                    packet_type: PacketType::Subscribe,
                },
            ),
            (
                "UNSUBSCRIBE flags 0",
                b"\xa0\x05\x00\x01\x00\x01a",
                InvalidFlags {
                    packet_type: PacketType::Unsubscribe,
                },
            ),
            (
                "PUBREL flags 0",
                b"\x60\x02\x00\x01",
                InvalidFlags {
                    packet_type: PacketType::PubRel,
                },
            ),
            (
                "PINGREQ flags 1",
                b"\xc1\x00",
                InvalidFlags {
                    packet_type: PacketType::PingReq,
                },
            ),
            (
                "PUBACK flags 2",
                b"\x42\x02\x00\x01",
                InvalidFlags {
                    packet_type: PacketType::PubAck,
                },
            ),
            (
                "CONNECT flags 2",
                b"\x12\x00",
                InvalidFlags {
                    packet_type: PacketType::Connect,
                },
            ),
            (
                "QoS 0 with DUP",
                b"\x38\x03\x00\x01a",
                InvalidFlags { packet_type: pt },
            ),
            ("PUBLISH QoS 3", b"\x36\x05\x00\x01a\x00\x01", InvalidQoS),
            (
                "will QoS 3",
                b"\x10\x0c\x00\x04MQTT\x04\x1c\x00\x00\x00\x00",
                InvalidQoS,
            ),
            (
                "SUBSCRIBE QoS 3",
                b"\x82\x06\x00\x01\x00\x01a\x03",
                InvalidQoS,
            ),
            (
                "frame shorter than header says",
                b"\x30\x05\x00\x01a",
                Truncated,
            ),
            ("empty frame", b"", Truncated),
            ("topic overruns frame", b"\x30\x03\x00\x05a", Truncated),
            ("QoS 1 without pkid", b"\x32\x03\x00\x01a", Truncated),
            ("PUBACK without pkid", b"\x40\x01\x00", Truncated),
            (
                "password overruns",
                b"\x10\x12\x00\x04MQTT\x04\xc2\x00\x00\x00\x00\x00\x01u\x00\x09p",
                Truncated,
            ),
            (
                "frame longer than header says",
                b"\xc0\x00\x00",
                TrailingBytes,
            ),
            ("PINGREQ with body", b"\xc0\x01\x00", TrailingBytes),
            (
                "PUBACK with extra byte",
                b"\x40\x03\x00\x01\x00",
                TrailingBytes,
            ),
            (
                "CONNECT with extra byte",
                b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x00\x00",
                TrailingBytes,
            ),
            ("topic not UTF-8", b"\x30\x03\x00\x01\xff", InvalidUtf8),
            ("topic with NUL", b"\x30\x04\x00\x02a\x00", NullInString),
            (
                "protocol name MQTX",
                b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x00\x00\x00",
                InvalidProtocolName,
            ),
            (
                "MQTT 5",
                b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x00\x00\x00\x00",
                UnsupportedProtocolLevel(5),
            ),
            (
                "MQTT level 3",
                b"\x10\x0c\x00\x04MQTT\x03\x02\x00\x00\x00\x00",
                UnsupportedProtocolLevel(3),
            ),
            (
                "MQIsdp level 4",
                b"\x10\x0e\x00\x06MQIsdp\x04\x02\x00\x00\x00\x00",
                UnsupportedProtocolLevel(4),
            ),
            (
                "CONNECT reserved bit",
                b"\x10\x0c\x00\x04MQTT\x04\x03\x00\x00\x00\x00",
                InvalidConnectFlags,
            ),
            (
                "will QoS without will",
                b"\x10\x0c\x00\x04MQTT\x04\x0a\x00\x00\x00\x00",
                InvalidConnectFlags,
            ),
            (
                "will retain without will",
                b"\x10\x0c\x00\x04MQTT\x04\x22\x00\x00\x00\x00",
                InvalidConnectFlags,
            ),
            (
                "password without user",
                b"\x10\x0f\x00\x04MQTT\x04\x42\x00\x00\x00\x00\x00\x01p",
                InvalidConnectFlags,
            ),
            (
                "CONNACK reserved flag",
                b"\x20\x02\x02\x00",
                InvalidConnackFlags,
            ),
            (
                "CONNACK present on refusal",
                b"\x20\x02\x01\x05",
                InvalidConnackFlags,
            ),
            (
                "CONNACK code 6",
                b"\x20\x02\x00\x06",
                InvalidConnectReturnCode(6),
            ),
            (
                "PUBLISH QoS 1 pkid 0",
                b"\x32\x05\x00\x01a\x00\x00",
                ZeroPacketId,
            ),
            ("PUBACK pkid 0", b"\x40\x02\x00\x00", ZeroPacketId),
            (
                "SUBSCRIBE pkid 0",
                b"\x82\x06\x00\x00\x00\x01a\x00",
                ZeroPacketId,
            ),
            ("empty topic", b"\x30\x02\x00\x00", InvalidTopicName),
            ("wildcard topic", b"\x30\x03\x00\x01#", InvalidTopicName),
            (
                "will topic with +",
                b"\x10\x11\x00\x04MQTT\x04\x06\x00\x00\x00\x00\x00\x01+\x00\x00",
                InvalidTopicName,
            ),
            (
                "bad filter",
                b"\x82\x07\x00\x01\x00\x02a#\x00",
                InvalidTopicFilter,
            ),
            (
                "empty filter",
                b"\x82\x05\x00\x01\x00\x00\x00",
                InvalidTopicFilter,
            ),
            (
                "bad unsubscribe filter",
                b"\xa2\x06\x00\x01\x00\x02#a",
                InvalidTopicFilter,
            ),
            (
                "SUBSCRIBE without filters",
                b"\x82\x02\x00\x01",
                EmptySubscribe,
            ),
            (
                "UNSUBSCRIBE without filters",
                b"\xa2\x02\x00\x01",
                EmptyUnsubscribe,
            ),
            ("SUBACK without codes", b"\x90\x02\x00\x01", EmptySuback),
            (
                "SUBSCRIBE option bits",
                b"\x82\x06\x00\x01\x00\x01a\x41",
                InvalidSubscribeOptions,
            ),
            (
                "SUBACK code 3",
                b"\x90\x03\x00\x01\x03",
                InvalidSubackCode(3),
            ),
        ];
        let mut seen = std::collections::HashSet::new();
        for (name, frame, want) in cases {
            assert_eq!(parse_bytes(frame), Err(want.clone()), "{name}");
            seen.insert(want.error_code());
        }
        // The two variants parse cannot produce: the size limit belongs to `check`, and the
        // wire cannot express a string over 65535 bytes.
        let limits = Limits { max_frame: 10 };
        assert_eq!(
            check(b"\x30\x0a", &limits),
            Err(FrameTooLarge { len: 12, max: 10 })
        );
        seen.insert(FrameTooLarge { len: 0, max: 0 }.error_code());
        assert!(matches!(
            Str::new(&"a".repeat(70_000)),
            Err(StringTooLong { len: 70_000 })
        ));
        seen.insert(StringTooLong { len: 0 }.error_code());
        assert_eq!(
            seen.len(),
            23,
            "a variant lacks a case here, or two share an error_code: {seen:?}"
        );
    }

    #[test]
    fn truncated_connect_and_publish_never_panic() {
        let limits = Limits::default();
        for frame in [CONNECT, PUBLISH] {
            assert_eq!(check(frame, &limits), Ok(Some(frame.len())));
            for cut in 0..frame.len() {
                let prefix = &frame[..cut];
                assert_eq!(
                    check(prefix, &limits),
                    Ok(None),
                    "check of {cut}-byte prefix"
                );
                assert!(parse_bytes(prefix).is_err(), "parse of {cut}-byte prefix");
            }
        }
    }

    /// Shortening the remaining length (a lying header over a cut body) is an error too.
    #[test]
    fn shortened_length_field_is_an_error() {
        for frame in [CONNECT, PUBLISH] {
            for cut in 0..frame.len() - 2 {
                let mut bytes = frame[..2 + cut].to_vec();
                bytes[1] = cut as u8;
                let result = parse_bytes(&bytes);
                if frame == PUBLISH && cut >= 0x1d + 2 {
                    // Topic and pkid intact: a shorter payload is still a valid PUBLISH.
                    assert!(result.is_ok(), "cut {cut}: {result:?}");
                } else {
                    assert!(result.is_err(), "cut {cut}: {result:?}");
                }
            }
        }
    }

    /// What the fuzz target checks: whatever parses re-encodes to a frame that parses back to
    /// the same packet.
    fn assert_reencodes(frame: &[u8]) -> Result<(), TestCaseError> {
        let Ok(packet) = parse_bytes(frame) else {
            return Ok(());
        };
        let mut out = bytes::BytesMut::new();
        packet.encode(&mut out);
        let unlimited = Limits {
            max_frame: usize::MAX,
        };
        prop_assert_eq!(check(&out, &unlimited), Ok(Some(out.len())));
        prop_assert_eq!(parse(out.freeze()), Ok(packet));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let limits = Limits { max_frame: 1024 };
            if let Ok(Some(len)) = check(&bytes, &limits) {
                prop_assert!(len <= bytes.len());
                assert_reencodes(&bytes[..len])?;
            }
            assert_reencodes(&bytes)?;
        }

        /// Random bodies behind every first byte, so the parsers get past the fixed-header
        /// checks far more often than with fully random bytes.
        #[test]
        fn random_bodies_never_panic(byte0 in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut frame = vec![byte0, body.len() as u8];
            frame.extend_from_slice(&body);
            assert_reencodes(&frame)?;
        }

        /// Valid CONNECT and PUBLISH frames with one byte changed: deep in the parsers, where
        /// random bytes rarely reach.
        #[test]
        fn mutated_frames_never_panic(
            base in prop_oneof![Just(CONNECT), Just(PUBLISH)],
            at in any::<proptest::sample::Index>(),
            value in any::<u8>(),
        ) {
            let mut frame = base.to_vec();
            frame[at.index(base.len())] = value;
            assert_reencodes(&frame)?;
        }
    }
}
