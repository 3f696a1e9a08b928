//! Drives the WebSocket server session with arbitrary bytes in chunks: nothing may panic, at
//! most one frame's limit is held, a closed session stays closed, and the data handed on is
//! never more than what came in.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_http::ws::{WsEvent, WsSession};

fuzz_target!(|data: &[u8]| {
    let Some((&choices, data)) = data.split_first() else { return };
    let max_frame = 16usize << (choices & 0x07);
    let step = usize::from(choices >> 3) + 1;
    let mut s = WsSession::new(max_frame);
    let mut handed = 0usize;
    let mut closed = false;
    for chunk in data.chunks(step) {
        s.handle_bytes(chunk);
        assert!(s.buffered() <= max_frame + 14, "{} bytes held", s.buffered());
        while let Some(e) = s.poll_event() {
            match e {
                WsEvent::Data(d) => {
                    assert!(!closed, "data after the close");
                    handed += d.len();
                }
                WsEvent::Closed { .. } => closed = true,
            }
        }
        if choices & 0x80 != 0 {
            s.send(b"reply");
        }
        let _ = s.poll_transmit();
    }
    assert!(handed <= data.len());
    assert_eq!(closed, s.is_closed());
});
