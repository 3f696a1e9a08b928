//! MQTT frames the load generator sends, encoded with `roost_mqtt`.
//!
//! The key decision: a connection's PUBLISH is encoded once ([`PublishTemplate`]) and every
//! message is a byte copy of it with the packet id and the stamp's seq and send time patched in
//! place, so the generator spends its CPU on the wire, not on encoding.

use bytes::{Bytes, BytesMut};
use roost_mqtt::{Connect, Packet, Publish, QoS, Str, Subscribe};

use crate::stamp::{self, Stamp, STAMP_LEN};

/// Why a frame could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A topic, client id or username is not a valid MQTT string (too long, or a NUL).
    #[error("the {0} is not a valid MQTT string")]
    BadString(&'static str),
    /// The payload cannot carry the stamp.
    #[error("a payload of {0} bytes cannot carry the {STAMP_LEN}-byte stamp")]
    PayloadTooSmall(usize),
}

/// A pre-encoded PUBLISH and where its variable parts are.
#[derive(Debug, Clone)]
pub struct PublishTemplate {
    bytes: Vec<u8>,
    /// Offset of the 2-byte packet id, for QoS 1.
    pkid_at: Option<usize>,
    payload_at: usize,
}

impl PublishTemplate {
    /// Encodes a PUBLISH of `payload_len` bytes on `topic`, stamped with `run` and `conn`
    /// (the rest of the payload is a fixed filler).
    pub fn new(
        topic: &str,
        qos: QoS,
        payload_len: usize,
        run: u64,
        conn: u32,
    ) -> Result<Self, FrameError> {
        if payload_len < STAMP_LEN {
            return Err(FrameError::PayloadTooSmall(payload_len));
        }
        let mut payload = vec![b'.'; payload_len];
        Stamp {
            run,
            conn,
            seq: 0,
            sent_ns: 0,
        }
        .write(&mut payload);
        let topic = Str::new(topic).map_err(|_| FrameError::BadString("topic"))?;
        let topic_len = topic.len();
        let has_pkid = qos != QoS::AtMostOnce;
        let packet = Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic,
            pkid: u16::from(has_pkid),
            payload: Bytes::from(payload),
        });
        let mut out = BytesMut::new();
        packet.encode(&mut out);
        let remaining = 2 + topic_len + if has_pkid { 2 } else { 0 } + payload_len;
        let header_len = out.len() - remaining;
        let after_topic = header_len + 2 + topic_len;
        Ok(PublishTemplate {
            bytes: out.to_vec(),
            pkid_at: has_pkid.then_some(after_topic),
            payload_at: after_topic + if has_pkid { 2 } else { 0 },
        })
    }

    /// Bytes of one frame.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Appends one message to `out`: the template with `pkid` (ignored for QoS 0), `seq` and
    /// `sent_ns` patched in.
    pub fn put(&self, out: &mut Vec<u8>, pkid: u16, seq: u32, sent_ns: u64) {
        // hot path: one memcpy of the frame and three small in-place writes.
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        let frame = &mut out[start..];
        if let Some(at) = self.pkid_at {
            frame[at..at + 2].copy_from_slice(&pkid.to_be_bytes());
        }
        stamp::patch(&mut frame[self.payload_at..], seq, sent_ns);
    }
}

/// CONNECT with a clean session, as an IoT Hub device (username + SAS) or an anonymous peer
/// client (neither).
pub fn connect(
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
    keep_alive: u16,
) -> Result<Bytes, FrameError> {
    let username = username
        .map(Str::new)
        .transpose()
        .map_err(|_| FrameError::BadString("username"))?;
    let packet = Packet::Connect(Connect {
        protocol_name: Str::from_static("MQTT"),
        protocol_level: 4,
        clean_session: true,
        keep_alive,
        client_id: Str::new(client_id).map_err(|_| FrameError::BadString("client id"))?,
        will: None,
        username,
        password: password.map(|p| Bytes::copy_from_slice(p.as_bytes())),
    });
    Ok(encode(&packet))
}

pub fn subscribe(pkid: u16, filter: &str, qos: QoS) -> Result<Bytes, FrameError> {
    let filter = Str::new(filter).map_err(|_| FrameError::BadString("filter"))?;
    Ok(encode(&Packet::Subscribe(Subscribe {
        pkid,
        filters: vec![(filter, qos)],
    })))
}

pub fn disconnect() -> Bytes {
    encode(&Packet::Disconnect)
}

pub fn pingreq() -> Bytes {
    encode(&Packet::PingReq)
}

fn encode(packet: &Packet) -> Bytes {
    let mut out = BytesMut::new();
    packet.encode(&mut out);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use roost_mqtt::{check, parse, Limits};

    use super::*;

    fn parse_one(bytes: &[u8]) -> Packet {
        let limits = Limits {
            max_frame: usize::MAX,
        };
        let len = check(bytes, &limits)
            .expect("valid header")
            .expect("complete frame");
        assert_eq!(len, bytes.len(), "exactly one frame");
        parse(Bytes::copy_from_slice(bytes)).expect("parses")
    }

    fn publish(p: Packet) -> Publish {
        match p {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    #[test]
    fn patched_qos1_frame_parses_with_the_new_pkid_and_stamp() {
        let t = PublishTemplate::new(
            "devices/d1/messages/events/run=abc",
            QoS::AtLeastOnce,
            100,
            42,
            7,
        )
        .expect("template");
        let mut out = Vec::new();
        t.put(&mut out, 513, 9, 1_000_000_007);
        t.put(&mut out, 65535, 10, 1_000_000_008);
        assert_eq!(out.len(), 2 * t.len());
        let first = publish(parse_one(&out[..t.len()]));
        assert_eq!(first.qos, QoS::AtLeastOnce);
        assert_eq!(first.pkid, 513);
        assert_eq!(first.topic.as_str(), "devices/d1/messages/events/run=abc");
        assert_eq!(first.payload.len(), 100);
        assert_eq!(
            Stamp::read(&first.payload),
            Some(Stamp {
                run: 42,
                conn: 7,
                seq: 9,
                sent_ns: 1_000_000_007
            })
        );
        let second = publish(parse_one(&out[t.len()..]));
        assert_eq!(second.pkid, 65535);
        assert_eq!(Stamp::read(&second.payload).map(|s| s.seq), Some(10));
    }

    #[test]
    fn patched_qos0_frame_has_no_pkid_and_keeps_the_filler() {
        let t = PublishTemplate::new("bench/3", QoS::AtMostOnce, 24, 1, 3).expect("template");
        let mut out = Vec::new();
        t.put(&mut out, 777, 5, 6);
        let p = publish(parse_one(&out));
        assert_eq!((p.qos, p.pkid), (QoS::AtMostOnce, 0));
        assert_eq!(
            Stamp::read(&p.payload),
            Some(Stamp {
                run: 1,
                conn: 3,
                seq: 5,
                sent_ns: 6
            })
        );

        let t = PublishTemplate::new("bench/3", QoS::AtMostOnce, 64, 1, 3).expect("template");
        let mut out = Vec::new();
        t.put(&mut out, 0, 1, 2);
        let p = publish(parse_one(&out));
        assert!(p.payload[STAMP_LEN..].iter().all(|&b| b == b'.'));
    }

    #[test]
    fn large_payload_uses_a_longer_length_field() {
        // 20 000 bytes needs a 3-byte remaining length: offsets must account for it.
        let t = PublishTemplate::new("bench/0", QoS::AtLeastOnce, 20_000, 5, 0).expect("template");
        let mut out = Vec::new();
        t.put(&mut out, 1234, 77, 88);
        let p = publish(parse_one(&out));
        assert_eq!(p.pkid, 1234);
        assert_eq!(
            Stamp::read(&p.payload),
            Some(Stamp {
                run: 5,
                conn: 0,
                seq: 77,
                sent_ns: 88
            })
        );
    }

    #[test]
    fn payload_smaller_than_the_stamp_is_refused() {
        assert!(matches!(
            PublishTemplate::new("t", QoS::AtMostOnce, STAMP_LEN - 1, 0, 0),
            Err(FrameError::PayloadTooSmall(23))
        ));
    }

    #[test]
    fn control_frames_parse() {
        match parse_one(
            &connect(
                "d1",
                Some("h/d1/?api-version=2021-04-12"),
                Some("SharedAccessSignature x"),
                60,
            )
            .expect("connect"),
        ) {
            Packet::Connect(c) => {
                assert_eq!(c.client_id.as_str(), "d1");
                assert!(c.clean_session);
                assert_eq!(c.keep_alive, 60);
                assert_eq!(c.password.as_deref(), Some(&b"SharedAccessSignature x"[..]));
            }
            other => panic!("expected CONNECT, got {other:?}"),
        }
        match parse_one(&subscribe(1, "bench/#", QoS::AtLeastOnce).expect("subscribe")) {
            Packet::Subscribe(s) => assert_eq!(s.filters[0].0.as_str(), "bench/#"),
            other => panic!("expected SUBSCRIBE, got {other:?}"),
        }
        assert_eq!(parse_one(&disconnect()), Packet::Disconnect);
        assert_eq!(parse_one(&pingreq()), Packet::PingReq);
    }
}
