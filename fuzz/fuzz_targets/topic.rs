//! Topics and filters a device sends: the publish-topic parser and the subscribe policy never
//! panic, and a granted filter never names another identity's device-bound messages.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_iothub::topic::{parse_publish_topic, DeviceFilter};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = parse_publish_topic(text);
    for module in [None, Some("m1")] {
        if let Some(kind) = DeviceFilter::classify(text, "d1", module) {
            match kind {
                DeviceFilter::CloudToDevice => {
                    assert_eq!(text, "devices/d1/messages/devicebound/#")
                }
                DeviceFilter::ModuleInputs => assert_eq!(text, "devices/d1/modules/m1/inputs/#"),
                _ => assert!(text.starts_with("$iothub/")),
            }
        }
    }
});
