//! Query strings of the consumer API and the service API (`?from=…&max=…&api-version=…`):
//! parameter lookup and percent-decoding never panic.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use roost_common::httpd::{percent_decode, query_param};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = percent_decode(text);
    let Ok(req) = hyper::Request::builder().uri(format!("/events/partitions/0/records?{text}")).body(Bytes::new()) else {
        return;
    };
    for name in ["from", "max", "top", "api-version", ""] {
        let _ = query_param(&req, name);
    }
});
