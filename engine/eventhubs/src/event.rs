//! A log record as the event IoT Hub's built-in endpoint delivers (spec §3.4): the offset,
//! sequence number and enqueued time annotations, the `iothub-*` annotations, the device's
//! system properties in the properties section, its application properties (and the
//! `events` enrichments) in application-properties, and the body as one data section.

use bytes::Bytes;
use roost_amqp::{Body, Message, Properties, Value};
use roost_storage::record::BUILTIN;
use roost_storage::RecordView;

fn text(s: Option<&str>) -> Option<roost_amqp::Str> {
    s.map(Into::into)
}

fn id(s: Option<&str>) -> Value {
    s.map_or(Value::Null, Value::string)
}

fn time(s: Option<&str>) -> Option<i64> {
    s.and_then(roost_iothub::time::parse_iso_ms)
        .map(|ms| ms as i64)
}

/// The event for the record at `offset` of `partition` (its body copied once into the
/// message: the record lives in memory the log reader reuses).
pub fn event(offset: u64, view: &RecordView<'_>) -> Message {
    let m = view.message();
    let s = &m.system;
    let enqueued = m.enqueued_ms.to_native() as i64;
    let sym = Value::symbol;
    let mut annotations = vec![
        (sym("x-opt-sequence-number"), Value::Long(offset as i64)),
        (sym("x-opt-offset"), Value::string(&offset.to_string())),
        (sym("x-opt-enqueued-time"), Value::Timestamp(enqueued)),
        (
            sym("iothub-connection-device-id"),
            Value::string(&s.connection_device_id),
        ),
    ];
    if let Some(module) = s.connection_module_id.as_deref() {
        annotations.push((sym("iothub-connection-module-id"), Value::string(module)));
    }
    annotations.extend([
        (
            sym("iothub-connection-auth-method"),
            Value::string(&s.auth_method),
        ),
        (
            sym("iothub-connection-auth-generation-id"),
            Value::string(&s.auth_generation_id),
        ),
        (sym("iothub-enqueuedtime"), Value::Timestamp(enqueued)),
        (
            sym("iothub-message-source"),
            Value::string(m.source.as_str()),
        ),
    ]);
    for (k, v) in [
        ("dt-dataschema", s.data_schema.as_deref()),
        ("dt-subject", s.subject.as_deref()),
    ] {
        if let Some(v) = v {
            annotations.push((sym(k), Value::string(v)));
        }
    }
    if let Some(v) = s.interface_id.as_deref() {
        annotations.push((sym("iothub-interface-id"), Value::string(v)));
    }
    let properties = Properties {
        message_id: id(s.message_id.as_deref()),
        user_id: s
            .user_id
            .as_deref()
            .map(|u| Bytes::copy_from_slice(u.as_bytes())),
        correlation_id: id(s.correlation_id.as_deref()),
        content_type: text(s.content_type.as_deref()),
        content_encoding: text(s.content_encoding.as_deref()),
        absolute_expiry_time: time(s.expiry.as_deref()),
        creation_time: time(s.creation_time.as_deref()),
        ..Properties::default()
    };
    let stamps = view
        .endpoint(BUILTIN)
        .into_iter()
        .flat_map(|i| view.stamps(i));
    let application_properties = m
        .app
        .iter()
        .map(|kv| (kv.0.as_str(), kv.1.as_str()))
        .chain(stamps)
        .map(|(k, v)| (Value::string(k), Value::string(v)))
        .collect();
    Message {
        message_annotations: annotations,
        properties: Some(properties),
        application_properties,
        body: Body::Data(vec![Bytes::copy_from_slice(m.body.as_slice())]),
        ..Message::default()
    }
}

/// Writes the event for the record at `offset` straight into `out` — the same message as
/// [`event`], with no value tree and no copy of anything but into `out` (the hot path of an
/// Event Hubs receiver).
pub fn write_event(offset: u64, view: &RecordView<'_>, out: &mut bytes::BytesMut) {
    use roost_amqp::types::put;
    let m = view.message();
    let s = &m.system;
    let enqueued = m.enqueued_ms.to_native() as i64;

    put::descriptor(out, 0x72);
    let mark = put::open(out, true);
    let mut n = 0u32;
    let mut ann = |out: &mut bytes::BytesMut, k: &str, v: &dyn Fn(&mut bytes::BytesMut)| {
        put::sym(out, k);
        v(out);
        n += 2;
    };
    ann(out, "x-opt-sequence-number", &|o| {
        put::long(o, offset as i64)
    });
    ann(out, "x-opt-offset", &|o| put::str(o, &offset.to_string()));
    ann(out, "x-opt-enqueued-time", &|o| put::timestamp(o, enqueued));
    ann(out, "iothub-connection-device-id", &|o| {
        put::str(o, &s.connection_device_id)
    });
    if let Some(module) = s.connection_module_id.as_deref() {
        ann(out, "iothub-connection-module-id", &|o| put::str(o, module));
    }
    ann(out, "iothub-connection-auth-method", &|o| {
        put::str(o, &s.auth_method)
    });
    ann(out, "iothub-connection-auth-generation-id", &|o| {
        put::str(o, &s.auth_generation_id)
    });
    ann(out, "iothub-enqueuedtime", &|o| put::timestamp(o, enqueued));
    ann(out, "iothub-message-source", &|o| {
        put::str(o, m.source.as_str())
    });
    for (k, v) in [
        ("dt-dataschema", s.data_schema.as_deref()),
        ("dt-subject", s.subject.as_deref()),
    ] {
        if let Some(v) = v {
            ann(out, k, &|o| put::str(o, v));
        }
    }
    if let Some(v) = s.interface_id.as_deref() {
        ann(out, "iothub-interface-id", &|o| put::str(o, v));
    }
    put::close(out, mark, n);

    // properties: message-id, user-id, to, subject, reply-to, correlation-id, content-type,
    // content-encoding, absolute-expiry-time, creation-time, group-id, group-sequence,
    // reply-to-group-id.
    put::descriptor(out, 0x73);
    let mark = put::open(out, false);
    let opt_str = |out: &mut bytes::BytesMut, v: Option<&str>| match v {
        Some(v) => put::str(out, v),
        None => put::null(out),
    };
    let opt_sym = |out: &mut bytes::BytesMut, v: Option<&str>| match v {
        Some(v) => put::sym(out, v),
        None => put::null(out),
    };
    let opt_time = |out: &mut bytes::BytesMut, v: Option<i64>| match v {
        Some(v) => put::timestamp(out, v),
        None => put::null(out),
    };
    opt_str(out, s.message_id.as_deref());
    match s.user_id.as_deref() {
        Some(u) => put::binary(out, u.as_bytes()),
        None => put::null(out),
    }
    put::null(out);
    put::null(out);
    put::null(out);
    opt_str(out, s.correlation_id.as_deref());
    opt_sym(out, s.content_type.as_deref());
    opt_sym(out, s.content_encoding.as_deref());
    opt_time(out, time(s.expiry.as_deref()));
    opt_time(out, time(s.creation_time.as_deref()));
    put::null(out);
    put::null(out);
    put::null(out);
    put::close(out, mark, 13);

    let stamps: Vec<(&str, &str)> = view
        .endpoint(BUILTIN)
        .into_iter()
        .flat_map(|i| view.stamps(i))
        .collect();
    if !m.app.is_empty() || !stamps.is_empty() {
        put::descriptor(out, 0x74);
        let mark = put::open(out, true);
        let mut count = 0u32;
        let own = m.app.iter().map(|kv| (kv.0.as_str(), kv.1.as_str()));
        for (k, v) in own.chain(stamps) {
            put::str(out, k);
            put::str(out, v);
            count += 2;
        }
        put::close(out, mark, count);
    }
    put::descriptor(out, 0x75);
    put::binary(out, m.body.as_slice());
}

#[cfg(test)]
mod tests {
    use roost_model::{Routed, Source, Stamp, SystemProperties};
    use roost_storage::batch::Record;

    use super::*;

    #[test]
    fn a_record_becomes_the_event_iot_hub_delivers() {
        let r = Routed {
            message: roost_model::Message {
                source: Source::Telemetry,
                enqueued_ms: 1_767_225_600_123,
                system: SystemProperties {
                    message_id: Some("m-1".into()),
                    content_type: Some("application/json".into()),
                    content_encoding: Some("utf-8".into()),
                    connection_device_id: "dev1".into(),
                    auth_generation_id: "g1".into(),
                    auth_method: "{\"scope\":\"device\",\"type\":\"sas\",\"issuer\":\"iothub\"}"
                        .into(),
                    ..SystemProperties::default()
                },
                app: vec![("level".into(), "critical".into())],
                body: b"{\"t\":1}".to_vec(),
            },
            endpoints: vec!["events".into()],
            stamps: vec![Stamp {
                key: "site".into(),
                value: "north".into(),
                endpoints: 1,
            }],
        };
        let bytes = r
            .archive_into(rkyv::util::AlignedVec::new())
            .expect("archive");
        let view = RecordView::open(
            Record {
                routed: true,
                bytes: &bytes,
            },
            &bytes,
        )
        .expect("view");
        let e = event(41, &view);
        assert_eq!(
            e.annotation("x-opt-offset"),
            Some(&Value::string("41")),
            "a string"
        );
        assert_eq!(
            e.annotation("x-opt-sequence-number"),
            Some(&Value::Long(41))
        );
        assert_eq!(
            e.annotation("x-opt-enqueued-time"),
            Some(&Value::Timestamp(1_767_225_600_123))
        );
        assert_eq!(
            e.annotation("iothub-connection-device-id"),
            Some(&Value::string("dev1"))
        );
        assert_eq!(
            e.annotation("iothub-message-source"),
            Some(&Value::string("Telemetry"))
        );
        assert_eq!(e.annotation("iothub-connection-module-id"), None);
        assert_eq!(
            e.application_property("level"),
            Some(&Value::string("critical"))
        );
        assert_eq!(
            e.application_property("site"),
            Some(&Value::string("north")),
            "the events enrichment"
        );
        let p = e.properties.as_ref().expect("properties");
        assert_eq!(
            p.content_type.as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(p.message_id, Value::string("m-1"));
        assert_eq!(e.data().as_deref(), Some(&b"{\"t\":1}"[..]));
        // It encodes and reads back; the direct writer gives the same message.
        let mut out = bytes::BytesMut::new();
        e.write(&mut out);
        assert_eq!(Message::read(&out.freeze()).expect("reads"), e);
        let mut direct = bytes::BytesMut::new();
        write_event(41, &view, &mut direct);
        assert_eq!(
            Message::read(&direct.freeze()).expect("reads"),
            e,
            "write_event = event"
        );
    }
}
