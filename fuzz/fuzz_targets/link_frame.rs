//! Control-link frames (rkyv archives behind a length prefix): a frame from the peer that does
//! not validate is an error, never a panic or an out-of-bounds read; one that decodes encodes
//! back to a frame that decodes the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_model::link::{frame_len, ControlFrame, EngineFrame};

fuzz_target!(|data: &[u8]| {
    if let Some(prefix) = data.get(..4) {
        let _ = frame_len(prefix.try_into().expect("four bytes"));
    }
    if let Ok(f) = ControlFrame::decode(data) {
        let bytes = f.encode();
        assert!(ControlFrame::decode(&bytes[4..]).is_ok());
    }
    if let Ok(f) = EngineFrame::decode(data) {
        let bytes = f.encode();
        assert!(EngineFrame::decode(&bytes[4..]).is_ok());
    }
});
