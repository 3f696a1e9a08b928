//! The provisioning service's device formats (roost_iothub::dps): MQTT usernames and request
//! topics, SASL PLAIN responses and link addresses — parsing never panics, what parses names
//! a non-empty scope and registration, and an answer topic carries `$` only in `$dps` and `$rid`
//! (the Python SDK splits it on `$`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_iothub::dps;

fuzz_target!(|data: &[u8]| {
    if let Some((scope, registration, _)) = dps::parse_plain(data) {
        assert!(!scope.is_empty() && !registration.is_empty());
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some((scope, registration)) = dps::parse_username(text) {
        assert!(!scope.is_empty() && !registration.is_empty());
    }
    if let Some((_, rid, _)) = dps::parse_request(text) {
        let topic = dps::response_topic(202, &rid, Some(1));
        assert_eq!(topic.matches('$').count(), 2, "{topic}");
    }
    let _ = dps::parse_address(text);
});
