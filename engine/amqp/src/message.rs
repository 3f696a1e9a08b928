//! The message format (AMQP 1.0 part 3.2): the sections of a transfer's payload, read
//! zero-copy (a data section is a slice of the frame) and written the way the Azure SDKs read
//! them (each section `0x00 0x53 <code>`; a body as one data section).

use bytes::{Bytes, BytesMut};

use crate::performative::Fields;
use crate::types::{encode, Reader, Str, Value};
use crate::Error;

/// The `header` section (§3.2.1).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Header {
    pub durable: Option<bool>,
    pub priority: Option<u8>,
    /// Milliseconds.
    pub ttl: Option<u32>,
    pub first_acquirer: Option<bool>,
    pub delivery_count: Option<u32>,
}

/// The `properties` section (§3.2.4). Ids keep their AMQP type: a reply's correlation id must
/// come back in the type the request's message id had (wire spec §0 rule 5).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Properties {
    pub message_id: Value,
    pub user_id: Option<Bytes>,
    pub to: Option<Str>,
    pub subject: Option<Str>,
    pub reply_to: Option<Str>,
    pub correlation_id: Value,
    pub content_type: Option<Str>,
    pub content_encoding: Option<Str>,
    /// Milliseconds since the epoch.
    pub absolute_expiry_time: Option<i64>,
    pub creation_time: Option<i64>,
    pub group_id: Option<Str>,
    pub group_sequence: Option<u32>,
    pub reply_to_group_id: Option<Str>,
}

/// A message body.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Body {
    #[default]
    Empty,
    /// One or more data sections.
    Data(Vec<Bytes>),
    /// amqp-sequence sections.
    Sequence(Vec<Vec<Value>>),
    /// An amqp-value section.
    Value(Value),
}

/// A message, section by section.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Message {
    pub header: Option<Header>,
    pub delivery_annotations: Vec<(Value, Value)>,
    pub message_annotations: Vec<(Value, Value)>,
    pub properties: Option<Properties>,
    pub application_properties: Vec<(Value, Value)>,
    pub body: Body,
    pub footer: Vec<(Value, Value)>,
}

fn map_of(v: Value, what: &'static str) -> Result<Vec<(Value, Value)>, Error> {
    match v {
        Value::Map(pairs) => Ok(pairs),
        Value::Null => Ok(Vec::new()),
        _ => Err(Error::BadMessage(what)),
    }
}

fn ts(v: &Value) -> Option<i64> {
    match v {
        Value::Timestamp(t) => Some(*t),
        _ => None,
    }
}

fn text(v: &Value) -> Option<Str> {
    match v {
        Value::String(s) | Value::Symbol(s) => Some(s.clone()),
        _ => None,
    }
}

impl Message {
    /// Reads a whole message: the payload of a delivery's transfers, joined.
    pub fn read(payload: &Bytes) -> Result<Message, Error> {
        let mut r = Reader::new(payload);
        let mut m = Message::default();
        let mut last = 0u64;
        while !r.is_empty() {
            let v = r.value()?;
            let Value::Described(d) = v else {
                return Err(Error::BadMessage("a section that is not described"));
            };
            let (descriptor, value) = *d;
            let code = descriptor
                .as_u64()
                .ok_or(Error::BadMessage("a section without a numeric descriptor"))?;
            // Sections come in order; data and sequence sections may repeat.
            let repeats = code == last && (code == 0x75 || code == 0x76);
            if code <= last && !repeats {
                return Err(Error::BadMessage("sections out of order"));
            }
            if (0x75..=0x77).contains(&last) && (0x75..=0x77).contains(&code) && code != last {
                return Err(Error::BadMessage("more than one kind of body section"));
            }
            last = code;
            match code {
                0x70 => {
                    let Value::List(items) = value else {
                        return Err(Error::BadMessage("header is not a list"));
                    };
                    let f = Fields::list(items, "header");
                    m.header = Some(Header {
                        durable: f.bool(0, "durable")?,
                        priority: f.u32(1, "priority")?.map(|p| p.min(255) as u8),
                        ttl: f.u32(2, "ttl")?,
                        first_acquirer: f.bool(3, "first-acquirer")?,
                        delivery_count: f.u32(4, "delivery-count")?,
                    });
                }
                0x71 => m.delivery_annotations = map_of(value, "delivery-annotations")?,
                0x72 => m.message_annotations = map_of(value, "message-annotations")?,
                0x73 => {
                    let Value::List(items) = value else {
                        return Err(Error::BadMessage("properties is not a list"));
                    };
                    let f = Fields::list(items, "properties");
                    m.properties = Some(Properties {
                        message_id: f.raw(0),
                        user_id: f.binary(1, "user-id")?,
                        to: text(&f.raw(2)),
                        subject: text(&f.raw(3)),
                        reply_to: text(&f.raw(4)),
                        correlation_id: f.raw(5),
                        content_type: text(&f.raw(6)),
                        content_encoding: text(&f.raw(7)),
                        absolute_expiry_time: ts(&f.raw(8)),
                        creation_time: ts(&f.raw(9)),
                        group_id: text(&f.raw(10)),
                        group_sequence: f.u32(11, "group-sequence")?,
                        reply_to_group_id: text(&f.raw(12)),
                    });
                }
                0x74 => m.application_properties = map_of(value, "application-properties")?,
                0x75 => {
                    let Value::Binary(b) = value else {
                        return Err(Error::BadMessage("data is not binary"));
                    };
                    match &mut m.body {
                        Body::Data(parts) => parts.push(b),
                        _ => m.body = Body::Data(vec![b]),
                    }
                }
                0x76 => {
                    let Value::List(items) = value else {
                        return Err(Error::BadMessage("amqp-sequence is not a list"));
                    };
                    match &mut m.body {
                        Body::Sequence(parts) => parts.push(items),
                        _ => m.body = Body::Sequence(vec![items]),
                    }
                }
                0x77 => m.body = Body::Value(value),
                0x78 => m.footer = map_of(value, "footer")?,
                _ => return Err(Error::BadMessage("an unknown section")),
            }
        }
        Ok(m)
    }

    /// The body's bytes when it is data sections (joined if there are several).
    pub fn data(&self) -> Option<Bytes> {
        match &self.body {
            Body::Data(parts) if parts.len() == 1 => Some(parts[0].clone()),
            Body::Data(parts) => Some(Bytes::from(parts.concat())),
            _ => None,
        }
    }

    /// An application property by its string key.
    pub fn application_property(&self, key: &str) -> Option<&Value> {
        self.application_properties
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// A message annotation by its symbol key.
    pub fn annotation(&self, key: &str) -> Option<&Value> {
        self.message_annotations
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// Appends the message's sections, those present only, in order.
    pub fn write(&self, out: &mut BytesMut) {
        let section = |code: u64, v: Value, out: &mut BytesMut| {
            encode(&Value::Described(Box::new((Value::Ulong(code), v))), out)
        };
        let opt = |v: Option<bool>| v.map_or(Value::Null, Value::Bool);
        let opt_u32 = |v: Option<u32>| v.map_or(Value::Null, Value::Uint);
        let s = |v: &Option<Str>| v.clone().map_or(Value::Null, Value::String);
        let sym = |v: &Option<Str>| v.clone().map_or(Value::Null, Value::Symbol);
        let t = |v: Option<i64>| v.map_or(Value::Null, Value::Timestamp);
        if let Some(h) = &self.header {
            section(
                0x70,
                Value::List(vec![
                    opt(h.durable),
                    h.priority.map_or(Value::Null, Value::Ubyte),
                    opt_u32(h.ttl),
                    opt(h.first_acquirer),
                    opt_u32(h.delivery_count),
                ]),
                out,
            );
        }
        if !self.delivery_annotations.is_empty() {
            section(0x71, Value::Map(self.delivery_annotations.clone()), out);
        }
        if !self.message_annotations.is_empty() {
            section(0x72, Value::Map(self.message_annotations.clone()), out);
        }
        if let Some(p) = &self.properties {
            section(
                0x73,
                Value::List(vec![
                    p.message_id.clone(),
                    p.user_id.clone().map_or(Value::Null, Value::Binary),
                    s(&p.to),
                    s(&p.subject),
                    s(&p.reply_to),
                    p.correlation_id.clone(),
                    sym(&p.content_type),
                    sym(&p.content_encoding),
                    t(p.absolute_expiry_time),
                    t(p.creation_time),
                    s(&p.group_id),
                    opt_u32(p.group_sequence),
                    s(&p.reply_to_group_id),
                ]),
                out,
            );
        }
        if !self.application_properties.is_empty() {
            section(0x74, Value::Map(self.application_properties.clone()), out);
        }
        match &self.body {
            Body::Empty => {}
            Body::Data(parts) => {
                for p in parts {
                    section(0x75, Value::Binary(p.clone()), out);
                }
            }
            Body::Sequence(parts) => {
                for p in parts {
                    section(0x76, Value::List(p.clone()), out);
                }
            }
            Body::Value(v) => section(0x77, v.clone(), out),
        }
        if !self.footer.is_empty() {
            section(0x78, Value::Map(self.footer.clone()), out);
        }
    }
}
