//! The WebSocket session as a client would drive it: masked frames in, fragmented or whole,
//! in pieces of any size; each broken rule closes with its code.

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use roost_http::ws::{check, WsError, WsEvent, WsSession};

/// A client frame: masked with `mask`.
fn frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u8(if fin { 0x80 } else { 0 } | opcode);
    match payload.len() {
        n @ 0..=125 => out.put_u8(0x80 | n as u8),
        n @ 126..=0xffff => {
            out.put_u8(0x80 | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(0x80 | 127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(&mask);
    for (i, b) in payload.iter().enumerate() {
        out.put_u8(b ^ mask[i & 3]);
    }
    out.to_vec()
}

fn data(s: &mut WsSession) -> (Vec<u8>, Option<WsEvent>) {
    let mut got = Vec::new();
    let mut end = None;
    while let Some(e) = s.poll_event() {
        match e {
            WsEvent::Data(d) => got.extend_from_slice(&d),
            closed => end = Some(closed),
        }
    }
    (got, end)
}

fn closed_with(s: &mut WsSession) -> (u16, Option<WsError>) {
    match data(s).1 {
        Some(WsEvent::Closed { code, error, .. }) => (code.unwrap_or(0), error),
        other => panic!("not closed: {other:?}"),
    }
}

proptest! {
    /// Any split of a message into fragments, and of the stream into reads, gives the bytes
    /// back in order and holds at most one frame.
    #[test]
    fn a_stream_in_any_pieces_comes_back_whole(
        payload in proptest::collection::vec(any::<u8>(), 0..3000),
        cuts in proptest::collection::vec(1usize..700, 1..8),
        read in 1usize..200,
        mask in any::<[u8; 4]>(),
    ) {
        let mut wire = Vec::new();
        let mut rest = &payload[..];
        let mut first = true;
        for cut in &cuts {
            let n = (*cut).min(rest.len());
            let (part, tail) = rest.split_at(n);
            rest = tail;
            let last = rest.is_empty();
            wire.extend(frame(last, if first { 2 } else { 0 }, part, mask));
            first = false;
            if last { break; }
        }
        if !rest.is_empty() {
            wire.extend(frame(true, if first { 2 } else { 0 }, rest, mask));
        }
        let mut s = WsSession::new(4096);
        for chunk in wire.chunks(read) {
            s.handle_bytes(chunk);
            prop_assert!(s.buffered() <= 4096 + 14);
        }
        let (got, end) = data(&mut s);
        prop_assert_eq!(got, payload);
        prop_assert_eq!(end, None);
        prop_assert_eq!(s.buffered(), 0);
    }

    #[test]
    fn no_input_panics_the_session(input in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut s = WsSession::new(256);
        s.handle_bytes(&input);
        while s.poll_event().is_some() {}
        prop_assert!(s.buffered() <= 256 + 14);
    }
}

#[test]
fn pings_are_answered_and_a_close_is_echoed() {
    let mut s = WsSession::new(1024);
    s.handle_bytes(&frame(true, 0x9, b"hi", [1, 2, 3, 4]));
    assert_eq!(
        s.poll_transmit().expect("the expected value").as_ref(),
        &[0x8a, 2, b'h', b'i']
    );
    s.send(b"abc");
    assert_eq!(
        s.poll_transmit().expect("the expected value").as_ref(),
        &[0x82, 3, b'a', b'b', b'c']
    );
    s.handle_bytes(&frame(true, 0x8, &1001u16.to_be_bytes(), [9, 9, 9, 9]));
    assert_eq!(
        s.poll_transmit().expect("the expected value").as_ref(),
        &[0x88, 2, 0x03, 0xe9]
    );
    assert_eq!(
        data(&mut s).1,
        Some(WsEvent::Closed {
            code: Some(1001),
            by_peer: true,
            error: None
        })
    );
    s.send(b"late");
    assert!(s.poll_transmit().is_none(), "nothing after the close");
}

#[test]
fn each_broken_rule_closes_with_its_code() {
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (vec![0x82, 0x03, b'a', b'b', b'c'], 1002, "unmasked"),
        (frame(true, 0x1, b"text", [1, 1, 1, 1]), 1003, "text_data"),
        (frame(true, 0x3, b"", [1, 1, 1, 1]), 1002, "unknown_opcode"),
        (
            frame(false, 0x9, b"", [1, 1, 1, 1]),
            1002,
            "control_fragmented",
        ),
        (
            frame(true, 0x9, &[0; 126], [1, 1, 1, 1]),
            1002,
            "control_too_long",
        ),
        (
            frame(true, 0x0, b"x", [1, 1, 1, 1]),
            1002,
            "stray_continuation",
        ),
        (
            [
                frame(false, 0x2, b"x", [1, 1, 1, 1]),
                frame(true, 0x2, b"y", [1, 1, 1, 1]),
            ]
            .concat(),
            1002,
            "interleaved_message",
        ),
        (frame(true, 0x8, b"x", [1, 1, 1, 1]), 1002, "bad_close"),
        (vec![0xc2, 0x80, 0, 0, 0, 0], 1002, "reserved_bits"),
    ];
    for (input, code, name) in cases {
        let mut s = WsSession::new(1024);
        s.handle_bytes(&input);
        let (got, error) = closed_with(&mut s);
        assert_eq!(
            (got, error.map(|e| e.error_code())),
            (code, Some(name)),
            "{name}"
        );
        let out = s.poll_transmit().expect("a close frame");
        assert_eq!(&out[..2], &[0x88, 2]);
        assert_eq!(u16::from_be_bytes([out[2], out[3]]), code);
    }
}

#[test]
fn an_oversize_frame_is_refused_from_its_header() {
    // Only the header of a 1 GiB frame: refused before any payload.
    let header = [0x82, 0x80 | 127, 0, 0, 0, 0, 0x40, 0, 0, 0];
    assert!(matches!(
        check(&header, 65536),
        Err(WsError::TooLarge { .. })
    ));
    let mut s = WsSession::new(65536);
    s.handle_bytes(&header);
    assert_eq!(closed_with(&mut s).0, 1009);
    assert_eq!(s.buffered(), 0);
    // A 16-bit length over the limit too.
    assert!(matches!(
        check(&[0x82, 0x80 | 126, 0x10, 0x00], 1024),
        Err(WsError::TooLarge { .. })
    ));
}
