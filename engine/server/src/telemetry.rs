//! Turning an accepted PUBLISH on the telemetry topic into the stored record (spec §2.2, §2.5).

use roost_iothub::props::PropertyBag;
use roost_model::{Message, Source, SystemProperties};

use crate::auth::Identity;

/// Largest device-to-cloud body IoT Hub accepts (spec §2.3, §8).
pub const MAX_D2C_BODY: usize = 256 * 1024;

const SAS_AUTH_METHOD: &str = r#"{"scope":"device","type":"sas","issuer":"iothub"}"#;

/// The record for one telemetry message: the device's properties plus what the hub stamps.
pub fn record(
    id: &Identity,
    bag: PropertyBag,
    retain: bool,
    body: &[u8],
    enqueued_ms: u64,
) -> Message {
    let s = bag.system;
    let mut app = bag.app;
    if retain {
        app.push(("mqtt-retain".into(), "true".into()));
    }
    Message {
        source: Source::Telemetry,
        enqueued_ms,
        system: SystemProperties {
            message_id: s.message_id,
            correlation_id: s.correlation_id,
            user_id: s.user_id,
            content_type: s.content_type,
            content_encoding: s.content_encoding,
            expiry: s.expiry,
            output_name: s.output_name,
            interface_id: s.interface_id,
            creation_time: s.creation_time,
            subject: s.subject,
            connection_device_id: id.device_id.clone(),
            connection_module_id: id.module_id.clone(),
            auth_generation_id: id.generation_id.clone(),
            auth_method: SAS_AUTH_METHOD.into(),
            data_schema: id.model_id.clone(),
        },
        app,
        body: body.to_vec(),
    }
}
