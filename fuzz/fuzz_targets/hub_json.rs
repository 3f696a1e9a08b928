//! `hub.json` as a user may leave it: reading it never panics (a file that is not what roost
//! writes is an error naming the file).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = roost_common::hubfile::parse(data, std::path::Path::new("hub.json"));
});
