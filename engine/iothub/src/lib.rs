//! roost-iothub: Azure IoT Hub's wire conventions — SAS tokens, connection strings, the MQTT
//! CONNECT username, device publish topics and `k=v&k=v` property bags.
//!
//! It is pure: it does no I/O, reads no clock and looks nothing up. Verifying a SAS token needs
//! the identity's keys and the current time; the caller finds the keys (in the registry) and
//! passes them in along with `now`.
//!
//! The one design decision: every parser keeps the text exactly as the client sent it next to
//! the decoded form wherever the two can differ, because the official SDKs encode the same
//! value in different ways and some checks must see the raw bytes. The SAS signature is an HMAC
//! over the *raw* `sr` (spec §1.2), while the identity it names comes from the *decoded* `sr`.
//!
//! # Layout
//!
//! - [`sas`]: parse, verify, authorize and sign SAS tokens (spec §1.2).
//! - [`connstr`]: device and service connection strings (spec §1.1).
//! - [`username`]: the MQTT CONNECT username (spec §2.1).
//! - [`topic`]: topics a device may publish to (spec §2.2).
//! - [`props`]: the URL-encoded property bag carried in telemetry and C2D topics (spec §2.5).
//! - [`x509`]: a device's client certificate: thumbprints, validity, common name, the chain
//!   to a trusted CA, proof of possession of a CA's key (spec §1.4).
//! - [`dps`]: the provisioning service's device formats: MQTT username and topics, SASL PLAIN,
//!   AMQP addresses (spec §7).
//! - [`files`]: file upload's blob store formats: blob paths, block lists, ranges (spec §3).

pub mod connstr;
pub mod dps;
pub mod encoding;
pub mod files;
pub mod props;
pub mod sas;
pub mod time;
pub mod topic;
pub mod username;
pub mod x509;

#[cfg(test)]
mod vectors;
