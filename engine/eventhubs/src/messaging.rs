//! IoT Hub's messaging links over AMQP (spec §4–§5): what a service's
//! `/messages/devicebound` transfer means as a cloud-to-device message, and the feedback
//! message `/messages/serviceBound/feedback` delivers.

use bytes::Bytes;
use roost_amqp::{Body, Message, Properties, Value};
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

/// Percent-decoding of a path segment (Node's `encodeURIComponent` device ids).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
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
    let text = |s: &Option<roost_amqp::Str>| s.as_ref().map(|s| s.as_str().to_string());
    let message = C2dMessage {
        message_id: id_text(&p.message_id),
        correlation_id: id_text(&p.correlation_id),
        user_id: p
            .user_id
            .as_ref()
            .and_then(|b| std::str::from_utf8(b).ok().map(str::to_string)),
        content_type: text(&p.content_type),
        content_encoding: text(&p.content_encoding),
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

/// The content type of a feedback message.
pub const FEEDBACK_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.feedback.json";

/// A batch of feedback records (`body`, the JSON array) as the message the feedback receiver
/// gets: one data section, IoT Hub's content type, the lock as its message-id.
pub fn feedback_message(lock: &str, body: Vec<u8>) -> Message {
    Message {
        properties: Some(Properties {
            message_id: Value::string(lock),
            content_type: Some(FEEDBACK_CONTENT_TYPE.into()),
            content_encoding: Some("utf-8".into()),
            ..Properties::default()
        }),
        body: Body::Data(vec![Bytes::from(body)]),
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
        let (d, m) = c2d_from_service(&to("/devices/dev%201/messages/devicebound")).unwrap();
        assert_eq!(d, "dev 1");
        assert_eq!(m.ack.as_deref(), Some("full"));
        assert_eq!(m.properties, vec![("n".to_string(), "7".to_string())]);
        assert_eq!(
            m.message_id.as_deref(),
            Some("12121212-1212-1212-1212-121212121212")
        );
        assert_eq!(m.body, b"hi");
        let (d, _) = c2d_from_service(&to("/devices/dev1/messages/deviceBound")).unwrap();
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
        assert!(c2d_from_service(&m).unwrap().1.body.is_empty());
        m.body = Body::Value(Value::List(vec![]));
        assert_eq!(c2d_from_service(&m).unwrap_err(), MessagingError::BadBody);
    }

    #[test]
    fn ids_of_every_type_read_as_text() {
        assert_eq!(id_text(&Value::Ulong(0)).as_deref(), Some("0"));
        assert_eq!(id_text(&Value::string("x")).as_deref(), Some("x"));
        assert_eq!(id_text(&Value::Null), None);
    }
}
