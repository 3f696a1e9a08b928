//! Property bags (the URL-encoded tail of a telemetry topic): decoding never panics, and what
//! decodes encodes to a bag that decodes to the same properties.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_iothub::props::{decode_bag, encode_bag};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(bag) = decode_bag(text) else { return };
    let again = decode_bag(&encode_bag(&bag)).expect("an encoded bag decodes");
    assert_eq!(again, bag);
});
