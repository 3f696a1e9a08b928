//! Request heads and WebSocket upgrades from arbitrary bytes: nothing panics, a head is never
//! longer than the input or the limit, and an accepted upgrade is on a WebSocket path with a
//! subprotocol the hub speaks.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_http::{head, upgrade};

fuzz_target!(|data: &[u8]| {
    let limits = head::HeadLimits::default();
    if let Ok(Some(h)) = head::parse(data, limits) {
        assert!(h.len <= data.len() && h.len <= limits.max_bytes);
        let _ = h.content_length();
        if let Ok((protocol, key)) = upgrade::accept(&h) {
            assert!(upgrade::is_websocket_path(h.path()));
            assert!(!key.is_empty());
            let _ = upgrade::response(protocol, &key);
        }
    }
});
