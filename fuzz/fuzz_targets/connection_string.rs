//! Device and service connection strings: parsing never panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_iothub::connstr::{self, DeviceConnectionString, ServiceConnectionString};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = connstr::parse(text);
    let _ = DeviceConnectionString::parse(text);
    let _ = ServiceConnectionString::parse(text);
});
