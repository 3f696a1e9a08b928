//! Feeds arbitrary bytes to the AMQP framer and readers: a protocol header, then frames. No
//! reader may panic, and whatever reads must write back to bytes that read again to the same
//! bytes when written (the written form is canonical: full arity, small-ulong descriptors).

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use roost_amqp::frame::{check, protocol_header, Frame, FrameType};
use roost_amqp::{Message, Performative, Sasl};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    if let Ok(Some(_)) = protocol_header(rest) {
        rest = &rest[8..];
    }
    while let Ok(Some(len)) = check(rest, 1 << 20) {
        assert!(len <= rest.len(), "check claimed {len} bytes of {}", rest.len());
        one_frame(Bytes::copy_from_slice(&rest[..len]));
        rest = &rest[len..];
    }
    // The input as a frame body, bypassing the framer.
    body(FrameType::Amqp, Bytes::copy_from_slice(data));
    body(FrameType::Sasl, Bytes::copy_from_slice(data));
});

fn one_frame(frame: Bytes) {
    if let Ok(f) = Frame::parse(frame) {
        if !f.body.is_empty() {
            body(f.kind, f.body);
        }
    }
}

fn body(kind: FrameType, body: Bytes) {
    match kind {
        FrameType::Amqp => {
            let Ok(p) = Performative::read(&body) else { return };
            let once = written(|out| p.write(out));
            let again = Performative::read(&once).expect("a written performative reads back");
            assert_eq!(written(|out| again.write(out)), once, "writing is not stable");
            if let Performative::Transfer(t) = p {
                if let Ok(m) = Message::read(&t.payload) {
                    let once = written(|out| m.write(out));
                    let again = Message::read(&once).expect("a written message reads back");
                    assert_eq!(written(|out| again.write(out)), once, "writing is not stable");
                }
            }
        }
        FrameType::Sasl => {
            let Ok(s) = Sasl::read(&body) else { return };
            let once = written(|out| s.write(out));
            let again = Sasl::read(&once).expect("a written SASL frame reads back");
            assert_eq!(written(|out| again.write(out)), once, "writing is not stable");
        }
    }
}

fn written(f: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut out = BytesMut::new();
    f(&mut out);
    out.freeze()
}
