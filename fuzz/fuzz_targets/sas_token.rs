//! SAS tokens as a client sends them (MQTT password, HTTP Authorization): parsing, and
//! verification against a key, may refuse but never panic; a token that verifies was signed
//! with that key for its own resource and expiry.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_iothub::sas::{self, SasToken};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(token) = SasToken::parse(text) else { return };
    let key = [7u8; 32];
    let _ = token.verify(&[&key], 1_800_000_000);
    let _ = token.key_name();
    let _ = sas::authorizes(token.resource(), "hub.example.net/devices/d1");
    let _ = sas::names_identity(token.resource(), "hub.example.net/devices/d1");
    // Debug never shows the signature.
    let shown = format!("{token:?}");
    assert!(shown.contains("<redacted>"));
});
