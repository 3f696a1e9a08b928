//! MQTT usernames (`{host}/{device}[/{module}]/?api-version=…`) and the claim an MQTT CONNECT
//! makes from them: parsing never panics, and an accepted claim's client id is the one sent.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_iothub::username::Username;
use roost_session::auth::mqtt_credentials;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = Username::parse(text);
    // The first line is the client id, the rest the username.
    let (client_id, username) = text.split_once('\n').unwrap_or(("d1", text));
    if let Ok(claim) = mqtt_credentials(client_id, Some(username), Some(b"token")) {
        assert_eq!(claim.client_id(), client_id);
    }
});
