//! Turning an accepted PUBLISH on the telemetry topic into the stored record (spec §2.2, §2.5).

use roost_iothub::props::PropertyBag;
use roost_iothub::topic::{parse_publish_topic, DeviceTopic};
use roost_model::{Message, Source, SystemProperties};

use crate::auth::Identity;
use crate::DisconnectReason;

/// The property bag of a publish on `topic` by `identity`, if the identity may publish there:
/// only its own telemetry topic (`devices/{d}/messages/events/` or, for a module,
/// `devices/{d}/modules/{m}/messages/events/`). Another identity's topic, an IoT Hub topic this
/// hub does not take telemetry on, or anything else ends the connection with its reason.
pub fn publish_bag<'t>(identity: &Identity, topic: &'t str) -> Result<&'t str, DisconnectReason> {
    let topic = parse_publish_topic(topic).map_err(|_| DisconnectReason::NotIotHubTopic)?;
    let DeviceTopic::Telemetry {
        device,
        module,
        bag,
    } = topic
    else {
        return Err(DisconnectReason::UnsupportedTopic);
    };
    if device != identity.device_id || module != identity.module_id.as_deref() {
        return Err(DisconnectReason::TopicDeviceMismatch);
    }
    Ok(bag)
}

/// Largest device-to-cloud body IoT Hub accepts (spec §2.3, §8).
pub const MAX_D2C_BODY: usize = 256 * 1024;

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
            auth_method: id.method.stamp().into(),
            data_schema: id.model_id.clone(),
        },
        app,
        body: body.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use roost_iothub::props::decode_bag;

    use super::*;

    fn identity(module: Option<&str>) -> Identity {
        Identity {
            device_id: "dev-1".into(),
            module_id: module.map(str::to_string),
            generation_id: "638000000000000001".into(),
            model_id: Some("dtmi:com:example:Thermostat;1".into()),
            token_expiry: 0,
            method: crate::auth::AuthMethod::Sas,
            ca: None,
        }
    }

    #[test]
    fn the_record_carries_the_device_properties_and_what_the_hub_stamps() {
        let bag = decode_bag("%24.mid=m1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=none")
            .expect("bag");
        let m = record(&identity(Some("mod")), bag, false, b"{}", 1_700_000_000_123);
        assert_eq!(m.source, Source::Telemetry);
        assert_eq!(m.enqueued_ms, 1_700_000_000_123);
        assert_eq!(m.system.message_id.as_deref(), Some("m1"));
        assert_eq!(m.system.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.system.content_encoding.as_deref(), Some("utf-8"));
        assert_eq!(m.system.connection_device_id, "dev-1");
        assert_eq!(m.system.connection_module_id.as_deref(), Some("mod"));
        assert_eq!(m.system.auth_generation_id, "638000000000000001");
        assert_eq!(
            m.system.auth_method,
            r#"{"scope":"device","type":"sas","issuer":"iothub"}"#
        );
        assert_eq!(
            m.system.data_schema.as_deref(),
            Some("dtmi:com:example:Thermostat;1")
        );
        assert_eq!(m.app, vec![("alert".to_string(), "none".to_string())]);
        assert_eq!(m.body, b"{}");
    }

    #[test]
    fn a_retained_publish_is_marked_as_iot_hub_does() {
        let m = record(
            &identity(None),
            decode_bag("").expect("empty bag"),
            true,
            b"x",
            0,
        );
        assert_eq!(m.app, vec![("mqtt-retain".to_string(), "true".to_string())]);
        assert_eq!(m.system.connection_module_id, None);
    }
}
