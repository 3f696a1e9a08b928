//! Twin update bodies as a service (REST PATCH/PUT) or a device (reported PATCH over MQTT)
//! sends them: any bytes, as JSON, applied twice to one twin. It never panics; a refused update
//! changes nothing; an accepted one leaves every part within IoT Hub's limits, versions that
//! never go down, and a `$metadata` node for every member.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_twin::{Twin, MAX_SECTION_BYTES, MAX_TAGS_BYTES};
use serde_json::{Map, Value};

fn mirrored(members: &Map<String, Value>, meta: &Map<String, Value>) -> bool {
    members.iter().all(|(k, v)| match (v, meta.get(k)) {
        (Value::Object(inner), Some(Value::Object(node))) => mirrored(inner, node),
        (_, Some(Value::Object(node))) => node.contains_key("$lastUpdated"),
        _ => false,
    })
}

fn size(v: &Map<String, Value>) -> usize {
    serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX)
}

fuzz_target!(|data: &[u8]| {
    let Some((&op, body)) = data.split_first() else { return };
    let Ok(body) = serde_json::from_slice::<Value>(body) else { return };
    let mut twin = Twin::new(1_700_000_000_000);
    for round in 0..2u64 {
        let before = twin.clone();
        let now = 1_700_000_000_000 + round;
        let ok = match (op >> round) % 3 {
            0 => twin.service_patch(&body, now).is_ok(),
            1 => twin.service_replace(&body, now).is_ok(),
            _ => twin.device_patch_reported(&body, now).is_ok(),
        };
        if !ok {
            assert_eq!(twin, before, "a refused update changed the twin");
            continue;
        }
        assert!(twin.version >= before.version);
        assert!(twin.desired.version() >= before.desired.version());
        assert!(twin.reported.version() >= before.reported.version());
        assert!(size(&twin.tags) <= MAX_TAGS_BYTES);
        for section in [&twin.desired, &twin.reported] {
            assert!(size(section.members()) <= MAX_SECTION_BYTES);
            let shown = section.to_json(true);
            let meta = shown["$metadata"].as_object().expect("$metadata is an object");
            assert!(mirrored(section.members(), meta), "a member without $metadata");
        }
    }
});
