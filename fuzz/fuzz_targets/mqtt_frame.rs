//! Feeds arbitrary bytes to the MQTT framer and parser: neither may panic, and anything that
//! parses must encode to a frame that parses back to the same packet.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use roost_mqtt::{check, parse, Limits};

fuzz_target!(|data: &[u8]| {
    // The input as a stream: frame it the way a connection would, until it runs out or errs.
    let limits = Limits::default();
    let mut rest = data;
    while let Ok(Some(len)) = check(rest, &limits) {
        assert!(len <= rest.len(), "check claimed {len} bytes of {}", rest.len());
        round_trip(Bytes::copy_from_slice(&rest[..len]));
        rest = &rest[len..];
    }
    // The input as one frame, bypassing check, so parse also sees lying length fields.
    round_trip(Bytes::copy_from_slice(data));
});

fn round_trip(frame: Bytes) {
    let Ok(packet) = parse(frame) else { return };
    let mut out = BytesMut::new();
    packet.encode(&mut out);
    let unlimited = Limits { max_frame: usize::MAX };
    assert_eq!(check(&out, &unlimited), Ok(Some(out.len())), "encoded frame is not whole");
    assert_eq!(parse(out.freeze()).as_ref(), Ok(&packet), "encode then parse changed the packet");
}
