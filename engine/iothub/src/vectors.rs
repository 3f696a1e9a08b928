//! The shared test vectors (`testdata/iothub_vectors.json`): tokens and topics produced by the
//! official SDKs' own code.

use serde_json::Value;

const VECTORS: &str = include_str!("../testdata/iothub_vectors.json");

/// The whole vectors document.
pub(crate) fn load() -> Value {
    serde_json::from_str(VECTORS).expect("iothub_vectors.json is valid JSON")
}

/// The entries of one top-level array, e.g. `"device_tokens"`.
pub(crate) fn entries(name: &str) -> Vec<Value> {
    load()[name]
        .as_array()
        .unwrap_or_else(|| panic!("vectors file has no array {name:?}"))
        .clone()
}

/// A string field of an entry.
pub(crate) fn text<'a>(entry: &'a Value, field: &str) -> &'a str {
    entry[field]
        .as_str()
        .unwrap_or_else(|| panic!("vector entry has no string {field:?}: {entry}"))
}

/// The decoded key every vector token was signed with.
pub(crate) fn key() -> Vec<u8> {
    let doc = load();
    let b64 = doc["key_base64"]
        .as_str()
        .expect("vectors file has key_base64");
    crate::sas::decode_key(b64).expect("key_base64 is valid base64")
}
