//! IoT Hub's messaging links over AMQP (spec §4–§5): what a service's
//! `/messages/devicebound` transfer means as a cloud-to-device message, the feedback
//! message `/messages/serviceBound/feedback` delivers, and a device's links — which identity
//! and node a device address names, telemetry as IoT Hub's property bag, and the commands
//! control sends (C2D, method requests, twin answers, desired patches) as the messages the
//! Node device SDK reads, with its method responses and twin requests read back.

use bytes::Bytes;
use roost_amqp::{Body, Message, Properties, Value};
use roost_iothub::encoding::percent_decode;
use roost_iothub::props::{PropertyBag, SystemProps};
use roost_model::link::C2dMessage;

/// Why a message cannot be taken, with the AMQP condition the delivery is rejected with
/// (non-retryable ones: uamqp resends the others).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessagingError {
    #[error("`to` must be /devices/{{deviceId}}/messages/devicebound, not {0:?}")]
    BadTo(String),
    #[error("application property {0:?} is not a string, number or boolean")]
    BadProperty(String),
    #[error("the body must be data sections or one string or binary amqp-value")]
    BadBody,
    #[error("the message has no correlation-id")]
    NoCorrelationId,
    #[error("a method response needs an int IoThub-status application property")]
    NoStatus,
    #[error(
        "a twin request needs the annotation operation GET, PATCH, PUT or DELETE with its resource"
    )]
    BadTwinOperation,
}

impl MessagingError {
    /// The AMQP error condition of the rejection.
    pub fn condition(&self) -> &'static str {
        match self {
            MessagingError::BadTo(_) => "amqp:not-found",
            _ => "amqp:not-allowed",
        }
    }

    pub fn error_code(&self) -> &'static str {
        match self {
            MessagingError::BadTo(_) => "bad_to",
            MessagingError::BadProperty(_) => "bad_property",
            MessagingError::BadBody => "bad_body",
            MessagingError::NoCorrelationId => "no_correlation_id",
            MessagingError::NoStatus => "no_status",
            MessagingError::BadTwinOperation => "bad_twin_operation",
        }
    }
}

/// The text of a message-id or correlation-id in any of its AMQP types: a string or symbol as
/// is, a uuid in its canonical form, a ulong in decimal, a binary as UTF-8.
pub fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) | Value::Symbol(s) => Some(s.as_str().to_string()),
        Value::Uuid(u) => Some(uuid_text(u)),
        Value::Ulong(n) => Some(n.to_string()),
        Value::Binary(b) => std::str::from_utf8(b).ok().map(str::to_string),
        _ => None,
    }
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lowercase.
pub fn uuid_text(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A scalar application property as IoT Hub's string property value.
pub fn property_text(v: &Value) -> Option<String> {
    Some(match v {
        Value::String(s) | Value::Symbol(s) => s.as_str().to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Timestamp(t) => roost_iothub::time::iso_ms(u64::try_from(*t).ok()?),
        Value::Uuid(u) => uuid_text(u),
        other => match (other.as_i64(), other.as_u64()) {
            (Some(n), _) => n.to_string(),
            (_, Some(n)) => n.to_string(),
            _ => match other {
                Value::Float(f) => f.to_string(),
                Value::Double(f) => f.to_string(),
                _ => return None,
            },
        },
    })
}

/// The body's bytes: data sections joined, or a string or binary amqp-value (uamqp sends an
/// empty payload as an amqp-value); none is empty.
pub fn body_bytes(m: &Message) -> Result<Bytes, MessagingError> {
    match &m.body {
        Body::Empty => Ok(Bytes::new()),
        Body::Data(_) => Ok(m.data().unwrap_or_default()),
        Body::Value(Value::Null) => Ok(Bytes::new()),
        Body::Value(Value::String(s)) => Ok(s.as_bytes().clone()),
        Body::Value(Value::Binary(b)) => Ok(b.clone()),
        _ => Err(MessagingError::BadBody),
    }
}

/// A service's cloud-to-device message (spec §4.1): the device from `to`
/// (`/devices/{id}/messages/devicebound`, the id raw or percent-encoded), the system
/// properties, `iothub-ack` and the other application properties, the body.
pub fn c2d_from_service(m: &Message) -> Result<(String, C2dMessage), MessagingError> {
    let p = m.properties.clone().unwrap_or_default();
    let to = p.to.as_ref().map(|s| s.as_str()).unwrap_or_default();
    let device_id = to
        .strip_prefix("/devices/")
        .and_then(|rest| rest.rsplit_once('/'))
        .and_then(|(head, tail)| {
            let (id, messages) = head.rsplit_once('/')?;
            let ok = messages.eq_ignore_ascii_case("messages")
                && tail.eq_ignore_ascii_case("devicebound")
                && !id.is_empty()
                && !id.contains('/');
            ok.then(|| percent_decode(id))
        })
        .ok_or_else(|| MessagingError::BadTo(to.chars().take(200).collect()))?;
    let mut ack = None;
    let mut properties = Vec::new();
    for (k, v) in &m.application_properties {
        let Some(key) = k.as_str() else { continue };
        let value = property_text(v).ok_or_else(|| MessagingError::BadProperty(key.into()))?;
        if key.eq_ignore_ascii_case("iothub-ack") {
            ack = Some(value);
        } else {
            properties.push((key.to_string(), value));
        }
    }
    let sys = system_text(&p);
    let message = C2dMessage {
        message_id: sys.message_id,
        correlation_id: sys.correlation_id,
        user_id: sys.user_id,
        content_type: sys.content_type,
        content_encoding: sys.content_encoding,
        ack,
        expiry_ms: p
            .absolute_expiry_time
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| *t > 0),
        properties,
        body: body_bytes(m)?.to_vec(),
    };
    Ok((device_id, message))
}

/// The system properties both directions read alike from a properties section: message-id
/// and correlation-id as text (whatever their AMQP type), user-id as UTF-8, content type and
/// encoding.
struct SystemText {
    message_id: Option<String>,
    correlation_id: Option<String>,
    user_id: Option<String>,
    content_type: Option<String>,
    content_encoding: Option<String>,
}

fn system_text(p: &Properties) -> SystemText {
    let text = |s: &Option<roost_amqp::Str>| s.as_ref().map(|s| s.as_str().to_string());
    SystemText {
        message_id: id_text(&p.message_id),
        correlation_id: id_text(&p.correlation_id),
        user_id: p
            .user_id
            .as_ref()
            .and_then(|b| std::str::from_utf8(b).ok().map(str::to_string)),
        content_type: text(&p.content_type),
        content_encoding: text(&p.content_encoding),
    }
}

/// The content type of a feedback message.
pub const FEEDBACK_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.feedback.json";

/// A batch of feedback records (`body`, the JSON array) as the message the feedback receiver
/// gets: one data section, IoT Hub's content type, the lock as its message-id.
pub fn feedback_message(lock: &str, body: Vec<u8>) -> Message {
    service_queue_message(lock, FEEDBACK_CONTENT_TYPE, body)
}

/// A record of a service queue (feedback, file notifications): its JSON in a data section,
/// its lock as the message id, UTF-8 of `content_type`.
fn service_queue_message(lock: &str, content_type: &str, body: Vec<u8>) -> Message {
    Message {
        properties: Some(Properties {
            message_id: Value::string(lock),
            content_type: Some(content_type.into()),
            content_encoding: Some("utf-8".into()),
            ..Properties::default()
        }),
        body: Body::Data(vec![Bytes::from(body)]),
        ..Message::default()
    }
}

/// A file-upload notification's content type (as IoT Hub marks one).
pub const FILE_NOTIFICATION_CONTENT_TYPE: &str =
    "application/vnd.microsoft.iothub.filenotification.json";

/// A file-upload notification for `/messages/serviceBound/filenotifications`: its JSON in a
/// data section (the Node service client reads `data`), its lock as the message id.
pub fn file_notification_message(lock: &str, body: Vec<u8>) -> Message {
    service_queue_message(lock, FILE_NOTIFICATION_CONTENT_TYPE, body)
}

/// The node of a device address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceNode {
    /// `messages/events`: telemetry (the device sends) or, for a module receiving, its inputs.
    Events,
    /// `messages/devicebound`: cloud-to-device messages.
    DeviceBound,
    /// `methods/devicebound`: method requests and responses.
    Methods,
    /// `twin`: twin requests and answers.
    Twin,
}

/// Which identity and node a device link's address names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAddress {
    pub device_id: String,
    pub module_id: Option<String>,
    pub node: DeviceNode,
}

impl DeviceAddress {
    /// `device` or `device/module`.
    pub fn client_id(&self) -> String {
        match &self.module_id {
            Some(m) => format!("{}/{m}", self.device_id),
            None => self.device_id.clone(),
        }
    }
}

/// `/devices/{d}[/modules/{m}]/{messages/events|messages/devicebound|methods/devicebound|twin}`,
/// bare or after `amqps://{host}`; the ids raw or percent-encoded. `None` for anything else.
pub fn device_address(address: &str) -> Option<DeviceAddress> {
    let path = match address.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/')?..],
        None => address,
    };
    let rest = path.strip_prefix("/devices/")?;
    let (device, rest) = rest.split_once('/')?;
    let (module, rest) = match rest.strip_prefix("modules/") {
        Some(r) => {
            let (m, rest) = r.split_once('/')?;
            (Some(m), rest)
        }
        None => (None, rest),
    };
    let node = match rest.trim_end_matches('/').to_ascii_lowercase().as_str() {
        "messages/events" => DeviceNode::Events,
        "messages/devicebound" => DeviceNode::DeviceBound,
        "methods/devicebound" => DeviceNode::Methods,
        "twin" => DeviceNode::Twin,
        _ => return None,
    };
    if device.is_empty() || module.is_some_and(str::is_empty) {
        return None;
    }
    Some(DeviceAddress {
        device_id: percent_decode(device),
        module_id: module.map(percent_decode),
        node,
    })
}

/// The identity a device or module token's resource names: `{host}/devices/{d}` or
/// `{host}/devices/{d}/modules/{m}`, raw or percent-encoded, with or without a scheme. `None`
/// when it names no identity (a hub-wide policy token).
pub fn token_identity(resource: &str) -> Option<(String, String, Option<String>)> {
    let decoded = percent_decode(resource);
    let rest = decoded
        .split_once("://")
        .map_or(decoded.as_str(), |(_, r)| r);
    let (host, path) = rest.split_once('/')?;
    let mut parts = path.trim_end_matches('/').split('/');
    if parts.next()? != "devices" {
        return None;
    }
    let device = parts.next().filter(|d| !d.is_empty())?.to_string();
    let module = match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => None,
        (Some("modules"), Some(m), None) if !m.is_empty() => Some(m.to_string()),
        _ => return None,
    };
    Some((host.to_string(), device, module))
}

fn iso(ms: i64) -> Option<String> {
    u64::try_from(ms).ok().map(roost_iothub::time::iso_ms)
}

/// A device's telemetry message as IoT Hub's property bag and body (spec §5.1): the system
/// properties from the properties section and the `iothub-interface-id` / `dt-subject`
/// annotations, `iothub-outputname` as a module's output, every other application property as
/// a user property.
pub fn telemetry(m: &Message) -> Result<(PropertyBag, Bytes), MessagingError> {
    let p = m.properties.clone().unwrap_or_default();
    let annotation = |k: &str| m.annotation(k).and_then(property_text);
    let sys = system_text(&p);
    let mut system = SystemProps {
        message_id: sys.message_id,
        correlation_id: sys.correlation_id,
        user_id: sys.user_id,
        content_type: sys.content_type,
        content_encoding: sys.content_encoding,
        expiry: p.absolute_expiry_time.and_then(iso),
        creation_time: p.creation_time.and_then(iso),
        interface_id: annotation("iothub-interface-id"),
        subject: annotation("dt-subject"),
        ..SystemProps::default()
    };
    let mut app = Vec::new();
    for (k, v) in &m.application_properties {
        let Some(key) = k.as_str() else { continue };
        let value = property_text(v).ok_or_else(|| MessagingError::BadProperty(key.into()))?;
        if key == "iothub-outputname" {
            system.output_name = Some(value);
        } else {
            app.push((key.to_string(), value));
        }
    }
    Ok((PropertyBag { system, app }, body_bytes(m)?))
}

/// A cloud-to-device message from the device's queue (its property bag as control sends it,
/// `$.mid`, `$.to`, … first) as the message the device receives (spec §5.2): the system
/// properties in the properties section, `iothub-ack` and the user properties as application
/// properties, the body as one data section.
pub fn c2d_to_device(bag: &[(String, String)], body: &[u8]) -> Message {
    let mut p = Properties::default();
    let mut app = Vec::new();
    for (k, v) in bag {
        match k.as_str() {
            "$.mid" => p.message_id = Value::string(v),
            "$.cid" => p.correlation_id = Value::string(v),
            "$.to" => p.to = Some(v.as_str().into()),
            "$.uid" => p.user_id = Some(Bytes::from(v.clone().into_bytes())),
            "$.ct" => p.content_type = Some(v.as_str().into()),
            "$.ce" => p.content_encoding = Some(v.as_str().into()),
            "$.exp" => {
                p.absolute_expiry_time =
                    roost_iothub::time::parse_iso_ms(v).and_then(|ms| i64::try_from(ms).ok())
            }
            _ => app.push((Value::string(k), Value::string(v))),
        }
    }
    Message {
        properties: Some(p),
        application_properties: app,
        body: Body::Data(vec![Bytes::copy_from_slice(body)]),
        ..Message::default()
    }
}

/// A direct method request (spec §5.3): `IoThub-methodname`, the request id as the
/// correlation-id, the JSON payload as one data section.
pub fn method_request(name: &str, rid: &str, payload: &[u8]) -> Message {
    Message {
        properties: Some(Properties {
            correlation_id: Value::string(rid),
            ..Properties::default()
        }),
        application_properties: vec![(Value::string("IoThub-methodname"), Value::string(name))],
        body: Body::Data(vec![Bytes::copy_from_slice(payload)]),
        ..Message::default()
    }
}

/// A device's method response: the request id (the correlation-id, whatever its AMQP type),
/// the `IoThub-status` and the payload.
pub fn method_response(m: &Message) -> Result<(String, u16, Bytes), MessagingError> {
    let rid = m
        .properties
        .as_ref()
        .and_then(|p| id_text(&p.correlation_id))
        .ok_or(MessagingError::NoCorrelationId)?;
    let status = m
        .application_property("IoThub-status")
        .and_then(Value::as_i64)
        .and_then(|s| u16::try_from(s).ok())
        .ok_or(MessagingError::NoStatus)?;
    Ok((rid, status, body_bytes(m)?))
}

/// What a device's twin request asks (spec §5.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TwinRequest {
    Get,
    PatchReported(Bytes),
    SubscribeDesired,
    UnsubscribeDesired,
}

/// A twin request: its correlation-id (the request id) and operation.
pub fn twin_request(m: &Message) -> Result<(String, TwinRequest), MessagingError> {
    let rid = m
        .properties
        .as_ref()
        .and_then(|p| id_text(&p.correlation_id))
        .ok_or(MessagingError::NoCorrelationId)?;
    let op = m.annotation("operation").and_then(Value::as_str);
    let resource = m.annotation("resource").and_then(Value::as_str);
    let desired = "/notifications/twin/properties/desired";
    let request = match (op, resource) {
        (Some("GET"), _) => TwinRequest::Get,
        (Some("PATCH"), Some("/properties/reported")) => TwinRequest::PatchReported(body_bytes(m)?),
        (Some("PUT"), Some(r)) if r == desired => TwinRequest::SubscribeDesired,
        (Some("DELETE"), Some(r)) if r == desired => TwinRequest::UnsubscribeDesired,
        _ => return Err(MessagingError::BadTwinOperation),
    };
    Ok((rid, request))
}

/// The answer to twin request `rid`: the same correlation-id string, the annotations `status`
/// (int) and `version` (long), the body (none when empty).
pub fn twin_response(rid: &str, status: u16, version: Option<u64>, body: &[u8]) -> Message {
    let mut annotations = vec![(Value::symbol("status"), Value::Int(i32::from(status)))];
    if let Some(v) = version.and_then(|v| i64::try_from(v).ok()) {
        annotations.push((Value::symbol("version"), Value::Long(v)));
    }
    Message {
        message_annotations: annotations,
        properties: Some(Properties {
            correlation_id: Value::string(rid),
            ..Properties::default()
        }),
        body: match body.is_empty() {
            true => Body::Empty,
            false => Body::Data(vec![Bytes::copy_from_slice(body)]),
        },
        ..Message::default()
    }
}

/// A desired-properties change pushed to a device that subscribed: no correlation-id, the
/// JSON patch (with its `$version`) as the body.
pub fn desired_patch(body: &[u8]) -> Message {
    Message {
        properties: Some(Properties::default()),
        body: Body::Data(vec![Bytes::copy_from_slice(body)]),
        ..Message::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(addr: &str) -> Message {
        Message {
            properties: Some(Properties {
                to: Some(addr.into()),
                message_id: Value::Uuid([0x12; 16]),
                ..Properties::default()
            }),
            application_properties: vec![
                (Value::string("iothub-ack"), Value::string("full")),
                (Value::string("n"), Value::Int(7)),
            ],
            body: Body::Data(vec![Bytes::from_static(b"hi")]),
            ..Message::default()
        }
    }

    #[test]
    fn a_service_c2d_message_names_its_device_raw_or_encoded() {
        let (d, m) = c2d_from_service(&to("/devices/dev%201/messages/devicebound"))
            .expect("the expected value");
        assert_eq!(d, "dev 1");
        assert_eq!(m.ack.as_deref(), Some("full"));
        assert_eq!(m.properties, vec![("n".to_string(), "7".to_string())]);
        assert_eq!(
            m.message_id.as_deref(),
            Some("12121212-1212-1212-1212-121212121212")
        );
        assert_eq!(m.body, b"hi");
        let (d, _) = c2d_from_service(&to("/devices/dev1/messages/deviceBound"))
            .expect("the expected value");
        assert_eq!(d, "dev1");
        for bad in [
            "/devices//messages/devicebound",
            "/devices/a/b/messages/devicebound",
            "/messages/devicebound",
            "",
        ] {
            assert!(
                matches!(c2d_from_service(&to(bad)), Err(MessagingError::BadTo(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_empty_amqp_value_body_is_an_empty_message() {
        let mut m = to("/devices/d/messages/devicebound");
        m.body = Body::Value(Value::string(""));
        assert!(c2d_from_service(&m)
            .expect("the expected value")
            .1
            .body
            .is_empty());
        m.body = Body::Value(Value::List(vec![]));
        assert_eq!(
            c2d_from_service(&m).expect_err("refused"),
            MessagingError::BadBody
        );
    }

    #[test]
    fn ids_of_every_type_read_as_text() {
        assert_eq!(id_text(&Value::Ulong(0)).as_deref(), Some("0"));
        assert_eq!(id_text(&Value::string("x")).as_deref(), Some("x"));
        assert_eq!(id_text(&Value::Null), None);
    }

    #[test]
    fn device_addresses_name_an_identity_and_a_node() {
        let a = device_address("/devices/d1/messages/events").expect("the expected value");
        assert_eq!(
            (a.client_id(), a.node),
            ("d1".to_string(), DeviceNode::Events)
        );
        let a = device_address("/devices/d%201/modules/m1/methods/devicebound")
            .expect("the expected value");
        assert_eq!(
            (a.client_id(), a.node),
            ("d 1/m1".to_string(), DeviceNode::Methods)
        );
        let a = device_address("amqps://hub/devices/d1/twin").expect("the expected value");
        assert_eq!(a.node, DeviceNode::Twin);
        assert_eq!(
            device_address("/devices/d1/messages/devicebound")
                .expect("the expected value")
                .node,
            DeviceNode::DeviceBound
        );
        for bad in [
            "/devices//twin",
            "/devices/d1/other",
            "/devices/d1/modules//twin",
            "$cbs",
            "/messages/devicebound",
        ] {
            assert_eq!(device_address(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_token_resource_names_a_device_or_module_or_nothing() {
        assert_eq!(
            token_identity("hub.local%2Fdevices%2Fd1"),
            Some(("hub.local".into(), "d1".into(), None))
        );
        assert_eq!(
            token_identity("hub.local/devices/d1/modules/m"),
            Some(("hub.local".into(), "d1".into(), Some("m".into())))
        );
        assert_eq!(token_identity("hub.local"), None);
        assert_eq!(token_identity("hub.local/devices/d1/other/x"), None);
    }

    #[test]
    fn telemetry_reads_system_and_user_properties() {
        let m = Message {
            properties: Some(Properties {
                message_id: Value::string("m1"),
                content_type: Some("application/json".into()),
                absolute_expiry_time: Some(1_700_000_000_000),
                ..Properties::default()
            }),
            message_annotations: vec![(Value::symbol("dt-subject"), Value::string("comp"))],
            application_properties: vec![
                (Value::string("alert"), Value::string("hot")),
                (Value::string("iothub-outputname"), Value::string("out1")),
            ],
            body: Body::Data(vec![Bytes::from_static(b"{}")]),
            ..Message::default()
        };
        let (bag, body) = telemetry(&m).expect("the expected value");
        assert_eq!(bag.system.message_id.as_deref(), Some("m1"));
        assert_eq!(bag.system.content_type.as_deref(), Some("application/json"));
        assert_eq!(bag.system.subject.as_deref(), Some("comp"));
        assert_eq!(bag.system.output_name.as_deref(), Some("out1"));
        assert!(bag.system.expiry.is_some());
        assert_eq!(bag.app, vec![("alert".to_string(), "hot".to_string())]);
        assert_eq!(&body[..], b"{}");
    }

    #[test]
    fn c2d_twin_and_method_messages_round_trip_their_ids() {
        let bag = vec![
            ("$.mid".to_string(), "mid".to_string()),
            ("$.exp".to_string(), "2030-01-01T00:00:00.000Z".to_string()),
            ("iothub-ack".to_string(), "full".to_string()),
            ("k".to_string(), "v".to_string()),
        ];
        let m = c2d_to_device(&bag, b"x");
        let p = m.properties.clone().expect("the expected value");
        assert_eq!(p.message_id, Value::string("mid"));
        assert!(p.absolute_expiry_time.expect("the expected value") > 0);
        assert_eq!(
            m.application_property("iothub-ack"),
            Some(&Value::string("full"))
        );
        assert_eq!(m.data().as_deref(), Some(&b"x"[..]));

        let mut answer = method_request("reboot", "rid-1", b"{}");
        answer.application_properties = vec![(Value::string("IoThub-status"), Value::Int(200))];
        assert_eq!(
            method_response(&answer).expect("the expected value").0,
            "rid-1"
        );
        answer
            .properties
            .as_mut()
            .expect("the expected value")
            .correlation_id = Value::Uuid([0xab; 16]);
        assert_eq!(
            method_response(&answer).expect("the expected value").0,
            uuid_text(&[0xab; 16])
        );

        let mut req = Message {
            properties: Some(Properties {
                correlation_id: Value::string("t1"),
                ..Properties::default()
            }),
            message_annotations: vec![
                (Value::symbol("operation"), Value::string("PUT")),
                (
                    Value::symbol("resource"),
                    Value::string("/notifications/twin/properties/desired"),
                ),
            ],
            ..Message::default()
        };
        assert_eq!(
            twin_request(&req).expect("the expected value"),
            ("t1".to_string(), TwinRequest::SubscribeDesired)
        );
        req.message_annotations[0].1 = Value::string("POST");
        assert_eq!(
            twin_request(&req).expect_err("refused"),
            MessagingError::BadTwinOperation
        );
        let r = twin_response("t1", 200, Some(3), b"");
        assert_eq!(r.body, Body::Empty);
        assert_eq!(r.annotation("status"), Some(&Value::Int(200)));
    }
}
