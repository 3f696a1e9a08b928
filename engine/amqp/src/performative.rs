//! Performatives (AMQP 1.0 §2.7) and SASL frames (§5.3): typed, read from a frame body and
//! written back.
//!
//! Written the way every Azure SDK can read them (wire spec §0 rule 3): a small-ulong
//! descriptor (`0x00 0x53 code`), the field list as `list8`/`list32` (never `list0`), and every
//! field up to the performative's full arity, trailing nulls included. Read liberally: the
//! descriptor as a code or a symbolic name, trailing fields omitted, any list encoding.

use bytes::{Bytes, BytesMut};

use crate::types::{encode, Reader, Str, Value};
use crate::Error;

/// A link's role: the side that sends messages, or the side that receives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
}

impl Role {
    fn value(self) -> Value {
        Value::Bool(self == Role::Receiver)
    }
}

/// An error carried by DETACH, END, CLOSE and the `rejected` outcome (§2.8.14).
#[derive(Debug, Clone, PartialEq)]
pub struct AmqpError {
    /// A symbol, such as `amqp:unauthorized-access`.
    pub condition: Str,
    pub description: Option<Str>,
    pub info: Value,
}

impl AmqpError {
    pub fn new(condition: &str, description: impl Into<String>) -> Self {
        AmqpError {
            condition: condition.into(),
            description: Some(Str::from(description.into())),
            info: Value::Null,
        }
    }

    fn value(&self) -> Value {
        Value::described_list(
            0x1d,
            vec![
                Value::Symbol(self.condition.clone()),
                self.description.clone().map_or(Value::Null, Value::String),
                self.info.clone(),
            ],
        )
    }

    fn read(v: &Value, performative: &'static str) -> Result<Option<AmqpError>, Error> {
        if v.is_null() {
            return Ok(None);
        }
        let f = Fields::of(v, 0x1d, "amqp:error:list", performative, "error")?;
        Ok(Some(AmqpError {
            condition: f.sym(0, "condition")?.ok_or(f.missing("condition"))?,
            description: f.string(1, "description")?,
            info: f.raw(2),
        }))
    }
}

/// A terminus: the source or target of a link (§3.5.3, §3.5.4). The fields every client
/// here uses are typed; the rest stay values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Terminus {
    pub address: Option<Str>,
    pub durable: Value,
    pub expiry_policy: Value,
    pub timeout: Value,
    pub dynamic: Value,
    pub dynamic_node_properties: Value,
    /// Source only: `distribution-mode`.
    pub distribution_mode: Value,
    /// Source only: the filter set (Event Hubs' offset and time selectors).
    pub filter: Value,
    pub default_outcome: Value,
    pub outcomes: Value,
    pub capabilities: Value,
}

impl Terminus {
    pub fn at(address: &str) -> Self {
        Terminus {
            address: Some(address.into()),
            ..Terminus::default()
        }
    }

    fn source_value(&self) -> Value {
        Value::described_list(
            0x28,
            vec![
                self.address.clone().map_or(Value::Null, Value::String),
                self.durable.clone(),
                self.expiry_policy.clone(),
                self.timeout.clone(),
                self.dynamic.clone(),
                self.dynamic_node_properties.clone(),
                self.distribution_mode.clone(),
                self.filter.clone(),
                self.default_outcome.clone(),
                self.outcomes.clone(),
                self.capabilities.clone(),
            ],
        )
    }

    fn target_value(&self) -> Value {
        Value::described_list(
            0x29,
            vec![
                self.address.clone().map_or(Value::Null, Value::String),
                self.durable.clone(),
                self.expiry_policy.clone(),
                self.timeout.clone(),
                self.dynamic.clone(),
                self.dynamic_node_properties.clone(),
                self.capabilities.clone(),
            ],
        )
    }

    fn read(v: &Value, source: bool) -> Result<Option<Terminus>, Error> {
        if v.is_null() {
            return Ok(None);
        }
        let (code, name, field) = match source {
            true => (0x28, "amqp:source:list", "source"),
            false => (0x29, "amqp:target:list", "target"),
        };
        let f = Fields::of(v, code, name, "attach", field)?;
        // The address is a string in practice; any address type reads as its text.
        let address = match f.raw(0) {
            Value::Null => None,
            Value::String(s) | Value::Symbol(s) => Some(s),
            _ => return Err(f.bad("address", "is not a string")),
        };
        let mut t = Terminus {
            address,
            durable: f.raw(1),
            expiry_policy: f.raw(2),
            timeout: f.raw(3),
            dynamic: f.raw(4),
            dynamic_node_properties: f.raw(5),
            ..Terminus::default()
        };
        match source {
            true => {
                t.distribution_mode = f.raw(6);
                t.filter = f.raw(7);
                t.default_outcome = f.raw(8);
                t.outcomes = f.raw(9);
                t.capabilities = f.raw(10);
            }
            false => t.capabilities = f.raw(6),
        }
        Ok(Some(t))
    }
}

/// A delivery's state or outcome (§3.4).
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryState {
    Received {
        section_number: u32,
        section_offset: u64,
    },
    Accepted,
    Rejected(Option<AmqpError>),
    Released,
    Modified {
        delivery_failed: bool,
        undeliverable_here: bool,
        message_annotations: Value,
    },
    /// Another described state (transactions): kept as it came.
    Other(Value),
}

impl DeliveryState {
    fn value(&self) -> Value {
        match self {
            DeliveryState::Received {
                section_number,
                section_offset,
            } => Value::described_list(
                0x23,
                vec![Value::Uint(*section_number), Value::Ulong(*section_offset)],
            ),
            DeliveryState::Accepted => Value::described_list(0x24, vec![]),
            DeliveryState::Rejected(e) => {
                Value::described_list(0x25, vec![e.as_ref().map_or(Value::Null, AmqpError::value)])
            }
            DeliveryState::Released => Value::described_list(0x26, vec![]),
            DeliveryState::Modified {
                delivery_failed,
                undeliverable_here,
                message_annotations,
            } => Value::described_list(
                0x27,
                vec![
                    Value::Bool(*delivery_failed),
                    Value::Bool(*undeliverable_here),
                    message_annotations.clone(),
                ],
            ),
            DeliveryState::Other(v) => v.clone(),
        }
    }

    fn read(v: &Value, performative: &'static str) -> Result<Option<DeliveryState>, Error> {
        if v.is_null() {
            return Ok(None);
        }
        let code = descriptor(v).ok_or(Error::BadField {
            performative,
            field: "state",
            problem: "is not a delivery state",
        })?;
        let f = |n: &'static str| Fields::of(v, code, n, performative, "state");
        Ok(Some(match code {
            0x23 => {
                let f = f("amqp:received:list")?;
                DeliveryState::Received {
                    section_number: f.u32(0, "section-number")?.unwrap_or(0),
                    section_offset: f.u64(1, "section-offset")?.unwrap_or(0),
                }
            }
            0x24 => DeliveryState::Accepted,
            0x25 => {
                let f = f("amqp:rejected:list")?;
                DeliveryState::Rejected(AmqpError::read(&f.raw(0), performative)?)
            }
            0x26 => DeliveryState::Released,
            0x27 => {
                let f = f("amqp:modified:list")?;
                DeliveryState::Modified {
                    delivery_failed: f.bool(0, "delivery-failed")?.unwrap_or(false),
                    undeliverable_here: f.bool(1, "undeliverable-here")?.unwrap_or(false),
                    message_annotations: f.raw(2),
                }
            }
            _ => DeliveryState::Other(v.clone()),
        }))
    }
}

/// The descriptor code of a described value, symbolic names mapped to their codes.
fn descriptor(v: &Value) -> Option<u64> {
    let Value::Described(d) = v else { return None };
    match &d.0 {
        Value::Symbol(s) => NAMES
            .iter()
            .find(|(_, n)| *n == s.as_str())
            .map(|(c, _)| *c),
        other => other.as_u64(),
    }
}

/// Symbolic descriptors (§2.7, §3.2, §3.4, §3.5, §5.3).
const NAMES: [(u64, &str); 30] = [
    (0x10, "amqp:open:list"),
    (0x11, "amqp:begin:list"),
    (0x12, "amqp:attach:list"),
    (0x13, "amqp:flow:list"),
    (0x14, "amqp:transfer:list"),
    (0x15, "amqp:disposition:list"),
    (0x16, "amqp:detach:list"),
    (0x17, "amqp:end:list"),
    (0x18, "amqp:close:list"),
    (0x1d, "amqp:error:list"),
    (0x23, "amqp:received:list"),
    (0x24, "amqp:accepted:list"),
    (0x25, "amqp:rejected:list"),
    (0x26, "amqp:released:list"),
    (0x27, "amqp:modified:list"),
    (0x28, "amqp:source:list"),
    (0x29, "amqp:target:list"),
    (0x40, "amqp:sasl-mechanisms:list"),
    (0x41, "amqp:sasl-init:list"),
    (0x42, "amqp:sasl-challenge:list"),
    (0x43, "amqp:sasl-response:list"),
    (0x44, "amqp:sasl-outcome:list"),
    (0x70, "amqp:header:list"),
    (0x71, "amqp:delivery-annotations:map"),
    (0x72, "amqp:message-annotations:map"),
    (0x73, "amqp:properties:list"),
    (0x74, "amqp:application-properties:map"),
    (0x75, "amqp:data:binary"),
    (0x76, "amqp:amqp-sequence:list"),
    (0x77, "amqp:amqp-value:*"),
];

/// The fields of a described list, read with their performative's name for errors.
pub(crate) struct Fields {
    items: Vec<Value>,
    performative: &'static str,
}

impl Fields {
    fn of(
        v: &Value,
        code: u64,
        _name: &str,
        performative: &'static str,
        field: &'static str,
    ) -> Result<Fields, Error> {
        let bad = Error::BadField {
            performative,
            field,
            problem: "is not the described list it should be",
        };
        if descriptor(v) != Some(code) {
            return Err(bad);
        }
        let Value::Described(d) = v else {
            return Err(bad);
        };
        match &d.1 {
            Value::List(items) => Ok(Fields {
                items: items.clone(),
                performative,
            }),
            _ => Err(bad),
        }
    }

    pub(crate) fn list(items: Vec<Value>, performative: &'static str) -> Fields {
        Fields {
            items,
            performative,
        }
    }

    fn bad(&self, field: &'static str, problem: &'static str) -> Error {
        Error::BadField {
            performative: self.performative,
            field,
            problem,
        }
    }

    fn missing(&self, field: &'static str) -> Error {
        self.bad(field, "is mandatory")
    }

    pub(crate) fn raw(&self, i: usize) -> Value {
        self.items.get(i).cloned().unwrap_or(Value::Null)
    }

    fn get(&self, i: usize) -> Option<&Value> {
        self.items.get(i).filter(|v| !v.is_null())
    }

    pub(crate) fn u32(&self, i: usize, field: &'static str) -> Result<Option<u32>, Error> {
        self.get(i)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or(self.bad(field, "is not a uint"))
            })
            .transpose()
    }

    pub(crate) fn u64(&self, i: usize, field: &'static str) -> Result<Option<u64>, Error> {
        self.get(i)
            .map(|v| {
                v.as_u64()
                    .ok_or(self.bad(field, "is not an unsigned integer"))
            })
            .transpose()
    }

    fn u16(&self, i: usize, field: &'static str) -> Result<Option<u16>, Error> {
        self.get(i)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or(self.bad(field, "is not a ushort"))
            })
            .transpose()
    }

    fn u8(&self, i: usize, field: &'static str) -> Result<Option<u8>, Error> {
        self.get(i)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u8::try_from(n).ok())
                    .ok_or(self.bad(field, "is not a ubyte"))
            })
            .transpose()
    }

    pub(crate) fn bool(&self, i: usize, field: &'static str) -> Result<Option<bool>, Error> {
        self.get(i)
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                _ => Err(self.bad(field, "is not a boolean")),
            })
            .transpose()
    }

    pub(crate) fn string(&self, i: usize, field: &'static str) -> Result<Option<Str>, Error> {
        self.get(i)
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(self.bad(field, "is not a string")),
            })
            .transpose()
    }

    fn sym(&self, i: usize, field: &'static str) -> Result<Option<Str>, Error> {
        self.get(i)
            .map(|v| match v {
                Value::Symbol(s) | Value::String(s) => Ok(s.clone()),
                _ => Err(self.bad(field, "is not a symbol")),
            })
            .transpose()
    }

    pub(crate) fn binary(&self, i: usize, field: &'static str) -> Result<Option<Bytes>, Error> {
        self.get(i)
            .map(|v| match v {
                Value::Binary(b) => Ok(b.clone()),
                _ => Err(self.bad(field, "is not binary")),
            })
            .transpose()
    }

    /// A symbol or an array of symbols (the spec's "multiple" fields), as a list.
    fn symbols(&self, i: usize, field: &'static str) -> Result<Vec<Str>, Error> {
        match self.get(i) {
            None => Ok(Vec::new()),
            Some(Value::Symbol(s)) => Ok(vec![s.clone()]),
            // An array by the spec; a list read too (some clients build one).
            Some(Value::Array(items) | Value::List(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Symbol(s) => Ok(s.clone()),
                    _ => Err(self.bad(field, "is not an array of symbols")),
                })
                .collect(),
            Some(_) => Err(self.bad(field, "is not a symbol or an array of symbols")),
        }
    }

    fn role(&self, i: usize, field: &'static str) -> Result<Role, Error> {
        match self.bool(i, field)? {
            Some(false) => Ok(Role::Sender),
            Some(true) => Ok(Role::Receiver),
            None => Err(self.missing(field)),
        }
    }
}

fn symbols_value(s: &[Str]) -> Value {
    match s.is_empty() {
        true => Value::Null,
        false => Value::Array(s.iter().cloned().map(Value::Symbol).collect()),
    }
}

/// TRANSFER at full arity (11 fields, pyamqp reads the payload after them), then its payload;
/// the same bytes the value tree would give.
fn write_transfer(t: &Transfer, out: &mut BytesMut) {
    out.extend_from_slice(&[0x00, 0x53, 0x14]);
    crate::types::compound(0xc0, 0xd0, 11, out, |out| {
        encode(&Value::Uint(t.handle), out);
        encode(&opt_u32(t.delivery_id), out);
        match &t.delivery_tag {
            Some(tag) => crate::types::put::binary(out, tag),
            None => crate::types::put::null(out),
        }
        encode(&opt_u32(t.message_format), out);
        encode(&opt_bool(t.settled), out);
        encode(&Value::Bool(t.more), out);
        encode(&t.rcv_settle_mode.map_or(Value::Null, Value::Ubyte), out);
        match &t.state {
            Some(state) => encode(&state.value(), out),
            None => crate::types::put::null(out),
        }
        encode(&opt_bool(t.resume), out);
        encode(&opt_bool(t.aborted), out);
        encode(&opt_bool(t.batchable), out);
    });
    out.extend_from_slice(&t.payload);
}

fn opt_u32(v: Option<u32>) -> Value {
    v.map_or(Value::Null, Value::Uint)
}

fn opt_bool(v: Option<bool>) -> Value {
    v.map_or(Value::Null, Value::Bool)
}

/// OPEN (§2.7.1).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Open {
    pub container_id: Str,
    pub hostname: Option<Str>,
    /// `None`: the default, 4294967295.
    pub max_frame_size: Option<u32>,
    pub channel_max: Option<u16>,
    /// Milliseconds.
    pub idle_time_out: Option<u32>,
    pub outgoing_locales: Vec<Str>,
    pub incoming_locales: Vec<Str>,
    pub offered_capabilities: Vec<Str>,
    pub desired_capabilities: Vec<Str>,
    pub properties: Value,
}

impl Default for Str {
    fn default() -> Self {
        Str::from_static("")
    }
}

/// BEGIN (§2.7.2).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Begin {
    pub remote_channel: Option<u16>,
    pub next_outgoing_id: u32,
    pub incoming_window: u32,
    pub outgoing_window: u32,
    pub handle_max: Option<u32>,
    pub offered_capabilities: Vec<Str>,
    pub desired_capabilities: Vec<Str>,
    pub properties: Value,
}

/// ATTACH (§2.7.3).
#[derive(Debug, Clone, PartialEq)]
pub struct Attach {
    pub name: Str,
    pub handle: u32,
    pub role: Role,
    /// 0 unsettled, 1 settled, 2 mixed (the default).
    pub snd_settle_mode: Option<u8>,
    /// 0 first (the default), 1 second.
    pub rcv_settle_mode: Option<u8>,
    pub source: Option<Terminus>,
    pub target: Option<Terminus>,
    pub unsettled: Value,
    pub incomplete_unsettled: Option<bool>,
    pub initial_delivery_count: Option<u32>,
    pub max_message_size: Option<u64>,
    pub offered_capabilities: Vec<Str>,
    pub desired_capabilities: Vec<Str>,
    pub properties: Value,
}

impl Attach {
    /// An ATTACH of link `name` on `handle` in `role` with every optional field absent (no
    /// termini, settle modes, delivery count or properties): set the rest with `..`.
    pub fn new(name: Str, handle: u32, role: Role) -> Self {
        Attach {
            name,
            handle,
            role,
            snd_settle_mode: None,
            rcv_settle_mode: None,
            source: None,
            target: None,
            unsettled: Value::Null,
            incomplete_unsettled: None,
            initial_delivery_count: None,
            max_message_size: None,
            offered_capabilities: vec![],
            desired_capabilities: vec![],
            properties: Value::Null,
        }
    }
}

/// FLOW (§2.7.4).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Flow {
    pub next_incoming_id: Option<u32>,
    pub incoming_window: u32,
    pub next_outgoing_id: u32,
    pub outgoing_window: u32,
    pub handle: Option<u32>,
    pub delivery_count: Option<u32>,
    pub link_credit: Option<u32>,
    pub available: Option<u32>,
    pub drain: Option<bool>,
    pub echo: Option<bool>,
    pub properties: Value,
}

/// TRANSFER (§2.7.5), with its payload: the frame's bytes after the performative.
#[derive(Debug, Clone, PartialEq)]
pub struct Transfer {
    pub handle: u32,
    pub delivery_id: Option<u32>,
    pub delivery_tag: Option<Bytes>,
    pub message_format: Option<u32>,
    pub settled: Option<bool>,
    pub more: bool,
    pub rcv_settle_mode: Option<u8>,
    pub state: Option<DeliveryState>,
    pub resume: Option<bool>,
    pub aborted: Option<bool>,
    pub batchable: Option<bool>,
    pub payload: Bytes,
}

impl Transfer {
    /// A TRANSFER on `handle` carrying `payload` with every optional field absent and `more`
    /// false (a later frame of a delivery): set the rest with `..`.
    pub fn new(handle: u32, payload: Bytes) -> Self {
        Transfer {
            handle,
            delivery_id: None,
            delivery_tag: None,
            message_format: None,
            settled: None,
            more: false,
            rcv_settle_mode: None,
            state: None,
            resume: None,
            aborted: None,
            batchable: None,
            payload,
        }
    }
}

/// DISPOSITION (§2.7.6).
#[derive(Debug, Clone, PartialEq)]
pub struct Disposition {
    pub role: Role,
    pub first: u32,
    pub last: Option<u32>,
    pub settled: bool,
    pub state: Option<DeliveryState>,
    pub batchable: Option<bool>,
}

/// DETACH (§2.7.7).
#[derive(Debug, Clone, PartialEq)]
pub struct Detach {
    pub handle: u32,
    pub closed: bool,
    pub error: Option<AmqpError>,
}

/// A frame body of an AMQP frame. One lives per frame being handled, never in bulk, so the
/// size of the largest variant (ATTACH) does not matter.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Performative {
    Open(Open),
    Begin(Begin),
    Attach(Attach),
    Flow(Flow),
    Transfer(Transfer),
    Disposition(Disposition),
    Detach(Detach),
    End(Option<AmqpError>),
    Close(Option<AmqpError>),
}

/// A frame body of a SASL frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Sasl {
    Mechanisms(Vec<Str>),
    Init {
        mechanism: Str,
        initial_response: Option<Bytes>,
        hostname: Option<Str>,
    },
    Challenge(Bytes),
    Response(Bytes),
    /// 0 ok, 1 auth, 2 sys, 3 sys-perm, 4 sys-temp.
    Outcome {
        code: u8,
        additional_data: Option<Bytes>,
    },
}

/// The described list at the start of `body`: (descriptor code, fields, what follows).
fn described_list(body: &Bytes) -> Result<(u64, Vec<Value>, Bytes), Error> {
    let mut r = Reader::new(body);
    let v = r.value()?;
    let code = descriptor(&v).ok_or_else(|| Error::UnknownPerformative(describe(&v)))?;
    let Value::Described(d) = v else {
        return Err(Error::UnknownPerformative("not described".into()));
    };
    let fields = match d.1 {
        Value::List(items) => items,
        other => return Err(Error::UnknownPerformative(describe(&other))),
    };
    Ok((code, fields, r.rest()))
}

fn describe(v: &Value) -> String {
    match v {
        Value::Described(d) => match &d.0 {
            Value::Symbol(s) => s.as_str().chars().take(64).collect(),
            other => other
                .as_u64()
                .map_or("a described value".into(), |c| format!("0x{c:x}")),
        },
        _ => "a value that is not described".into(),
    }
}

impl Performative {
    /// Reads an AMQP frame's body (not empty: an empty body is a heartbeat).
    pub fn read(body: &Bytes) -> Result<Performative, Error> {
        let (code, items, rest) = described_list(body)?;
        if code != 0x14 && !rest.is_empty() {
            return Err(Error::TrailingBytes);
        }
        let name = match code {
            0x10 => "open",
            0x11 => "begin",
            0x12 => "attach",
            0x13 => "flow",
            0x14 => "transfer",
            0x15 => "disposition",
            0x16 => "detach",
            0x17 => "end",
            0x18 => "close",
            other => return Err(Error::UnknownPerformative(format!("0x{other:x}"))),
        };
        let f = Fields::list(items, name);
        Ok(match code {
            0x10 => Performative::Open(Open {
                container_id: f
                    .string(0, "container-id")?
                    .ok_or(f.missing("container-id"))?,
                hostname: f.string(1, "hostname")?,
                max_frame_size: f.u32(2, "max-frame-size")?,
                channel_max: f.u16(3, "channel-max")?,
                idle_time_out: f.u32(4, "idle-time-out")?,
                outgoing_locales: f.symbols(5, "outgoing-locales")?,
                incoming_locales: f.symbols(6, "incoming-locales")?,
                offered_capabilities: f.symbols(7, "offered-capabilities")?,
                desired_capabilities: f.symbols(8, "desired-capabilities")?,
                properties: f.raw(9),
            }),
            0x11 => Performative::Begin(Begin {
                remote_channel: f.u16(0, "remote-channel")?,
                next_outgoing_id: f
                    .u32(1, "next-outgoing-id")?
                    .ok_or(f.missing("next-outgoing-id"))?,
                incoming_window: f
                    .u32(2, "incoming-window")?
                    .ok_or(f.missing("incoming-window"))?,
                outgoing_window: f
                    .u32(3, "outgoing-window")?
                    .ok_or(f.missing("outgoing-window"))?,
                handle_max: f.u32(4, "handle-max")?,
                offered_capabilities: f.symbols(5, "offered-capabilities")?,
                desired_capabilities: f.symbols(6, "desired-capabilities")?,
                properties: f.raw(7),
            }),
            0x12 => Performative::Attach(Attach {
                name: f.string(0, "name")?.ok_or(f.missing("name"))?,
                handle: f.u32(1, "handle")?.ok_or(f.missing("handle"))?,
                role: f.role(2, "role")?,
                snd_settle_mode: f.u8(3, "snd-settle-mode")?,
                rcv_settle_mode: f.u8(4, "rcv-settle-mode")?,
                source: Terminus::read(&f.raw(5), true)?,
                target: Terminus::read(&f.raw(6), false)?,
                unsettled: f.raw(7),
                incomplete_unsettled: f.bool(8, "incomplete-unsettled")?,
                initial_delivery_count: f.u32(9, "initial-delivery-count")?,
                max_message_size: f.u64(10, "max-message-size")?,
                offered_capabilities: f.symbols(11, "offered-capabilities")?,
                desired_capabilities: f.symbols(12, "desired-capabilities")?,
                properties: f.raw(13),
            }),
            0x13 => Performative::Flow(Flow {
                next_incoming_id: f.u32(0, "next-incoming-id")?,
                incoming_window: f
                    .u32(1, "incoming-window")?
                    .ok_or(f.missing("incoming-window"))?,
                next_outgoing_id: f
                    .u32(2, "next-outgoing-id")?
                    .ok_or(f.missing("next-outgoing-id"))?,
                outgoing_window: f
                    .u32(3, "outgoing-window")?
                    .ok_or(f.missing("outgoing-window"))?,
                handle: f.u32(4, "handle")?,
                delivery_count: f.u32(5, "delivery-count")?,
                link_credit: f.u32(6, "link-credit")?,
                available: f.u32(7, "available")?,
                drain: f.bool(8, "drain")?,
                echo: f.bool(9, "echo")?,
                properties: f.raw(10),
            }),
            0x14 => Performative::Transfer(Transfer {
                handle: f.u32(0, "handle")?.ok_or(f.missing("handle"))?,
                delivery_id: f.u32(1, "delivery-id")?,
                delivery_tag: f.binary(2, "delivery-tag")?,
                message_format: f.u32(3, "message-format")?,
                settled: f.bool(4, "settled")?,
                more: f.bool(5, "more")?.unwrap_or(false),
                rcv_settle_mode: f.u8(6, "rcv-settle-mode")?,
                state: DeliveryState::read(&f.raw(7), "transfer")?,
                resume: f.bool(8, "resume")?,
                aborted: f.bool(9, "aborted")?,
                batchable: f.bool(10, "batchable")?,
                payload: rest,
            }),
            0x15 => Performative::Disposition(Disposition {
                role: f.role(0, "role")?,
                first: f.u32(1, "first")?.ok_or(f.missing("first"))?,
                last: f.u32(2, "last")?,
                settled: f.bool(3, "settled")?.unwrap_or(false),
                state: DeliveryState::read(&f.raw(4), "disposition")?,
                batchable: f.bool(5, "batchable")?,
            }),
            0x16 => Performative::Detach(Detach {
                handle: f.u32(0, "handle")?.ok_or(f.missing("handle"))?,
                closed: f.bool(1, "closed")?.unwrap_or(false),
                error: AmqpError::read(&f.raw(2), "detach")?,
            }),
            0x17 => Performative::End(AmqpError::read(&f.raw(0), "end")?),
            _ => Performative::Close(AmqpError::read(&f.raw(0), "close")?),
        })
    }

    /// Appends the performative (and a transfer's payload) at full arity.
    pub fn write(&self, out: &mut BytesMut) {
        let err = |e: &Option<AmqpError>| e.as_ref().map_or(Value::Null, AmqpError::value);
        let (code, fields) = match self {
            Performative::Open(o) => (
                0x10,
                vec![
                    Value::String(o.container_id.clone()),
                    o.hostname.clone().map_or(Value::Null, Value::String),
                    opt_u32(o.max_frame_size),
                    o.channel_max.map_or(Value::Null, Value::Ushort),
                    opt_u32(o.idle_time_out),
                    symbols_value(&o.outgoing_locales),
                    symbols_value(&o.incoming_locales),
                    symbols_value(&o.offered_capabilities),
                    symbols_value(&o.desired_capabilities),
                    o.properties.clone(),
                ],
            ),
            Performative::Begin(b) => (
                0x11,
                vec![
                    b.remote_channel.map_or(Value::Null, Value::Ushort),
                    Value::Uint(b.next_outgoing_id),
                    Value::Uint(b.incoming_window),
                    Value::Uint(b.outgoing_window),
                    opt_u32(b.handle_max),
                    symbols_value(&b.offered_capabilities),
                    symbols_value(&b.desired_capabilities),
                    b.properties.clone(),
                ],
            ),
            Performative::Attach(a) => (
                0x12,
                vec![
                    Value::String(a.name.clone()),
                    Value::Uint(a.handle),
                    a.role.value(),
                    a.snd_settle_mode.map_or(Value::Null, Value::Ubyte),
                    a.rcv_settle_mode.map_or(Value::Null, Value::Ubyte),
                    a.source
                        .as_ref()
                        .map_or(Value::Null, Terminus::source_value),
                    a.target
                        .as_ref()
                        .map_or(Value::Null, Terminus::target_value),
                    a.unsettled.clone(),
                    opt_bool(a.incomplete_unsettled),
                    opt_u32(a.initial_delivery_count),
                    a.max_message_size.map_or(Value::Null, Value::Ulong),
                    symbols_value(&a.offered_capabilities),
                    symbols_value(&a.desired_capabilities),
                    a.properties.clone(),
                ],
            ),
            Performative::Flow(f) => (
                0x13,
                vec![
                    opt_u32(f.next_incoming_id),
                    Value::Uint(f.incoming_window),
                    Value::Uint(f.next_outgoing_id),
                    Value::Uint(f.outgoing_window),
                    opt_u32(f.handle),
                    opt_u32(f.delivery_count),
                    opt_u32(f.link_credit),
                    opt_u32(f.available),
                    opt_bool(f.drain),
                    opt_bool(f.echo),
                    f.properties.clone(),
                ],
            ),
            // The one written per event: straight into `out`, no value tree.
            Performative::Transfer(t) => return write_transfer(t, out),
            Performative::Disposition(d) => (
                0x15,
                vec![
                    d.role.value(),
                    Value::Uint(d.first),
                    opt_u32(d.last),
                    Value::Bool(d.settled),
                    d.state.as_ref().map_or(Value::Null, DeliveryState::value),
                    opt_bool(d.batchable),
                ],
            ),
            Performative::Detach(d) => (
                0x16,
                vec![Value::Uint(d.handle), Value::Bool(d.closed), err(&d.error)],
            ),
            Performative::End(e) => (0x17, vec![err(e)]),
            Performative::Close(e) => (0x18, vec![err(e)]),
        };
        encode(&Value::described_list(code, fields), out);
    }

    /// The performative's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Performative::Open(_) => "open",
            Performative::Begin(_) => "begin",
            Performative::Attach(_) => "attach",
            Performative::Flow(_) => "flow",
            Performative::Transfer(_) => "transfer",
            Performative::Disposition(_) => "disposition",
            Performative::Detach(_) => "detach",
            Performative::End(_) => "end",
            Performative::Close(_) => "close",
        }
    }
}

impl Sasl {
    /// Reads a SASL frame's body.
    pub fn read(body: &Bytes) -> Result<Sasl, Error> {
        let (code, items, rest) = described_list(body)?;
        if !rest.is_empty() {
            return Err(Error::TrailingBytes);
        }
        let name = match code {
            0x40 => "sasl-mechanisms",
            0x41 => "sasl-init",
            0x42 => "sasl-challenge",
            0x43 => "sasl-response",
            0x44 => "sasl-outcome",
            other => return Err(Error::UnknownPerformative(format!("0x{other:x}"))),
        };
        let f = Fields::list(items, name);
        Ok(match code {
            0x40 => Sasl::Mechanisms(f.symbols(0, "sasl-server-mechanisms")?),
            0x41 => Sasl::Init {
                mechanism: f.sym(0, "mechanism")?.ok_or(f.missing("mechanism"))?,
                initial_response: f.binary(1, "initial-response")?,
                hostname: f.string(2, "hostname")?,
            },
            0x42 => Sasl::Challenge(f.binary(0, "challenge")?.ok_or(f.missing("challenge"))?),
            0x43 => Sasl::Response(f.binary(0, "response")?.ok_or(f.missing("response"))?),
            _ => Sasl::Outcome {
                code: f.u8(0, "code")?.ok_or(f.missing("code"))?,
                additional_data: f.binary(1, "additional-data")?,
            },
        })
    }

    /// Appends the SASL frame body at full arity.
    pub fn write(&self, out: &mut BytesMut) {
        let bin = |b: &Option<Bytes>| b.clone().map_or(Value::Null, Value::Binary);
        let (code, fields) = match self {
            // Always an array, even of one (uamqp and pyamqp both read it so).
            Sasl::Mechanisms(m) => (
                0x40,
                vec![Value::Array(m.iter().cloned().map(Value::Symbol).collect())],
            ),
            Sasl::Init {
                mechanism,
                initial_response,
                hostname,
            } => (
                0x41,
                vec![
                    Value::Symbol(mechanism.clone()),
                    bin(initial_response),
                    hostname.clone().map_or(Value::Null, Value::String),
                ],
            ),
            Sasl::Challenge(b) => (0x42, vec![Value::Binary(b.clone())]),
            Sasl::Response(b) => (0x43, vec![Value::Binary(b.clone())]),
            Sasl::Outcome {
                code,
                additional_data,
            } => (0x44, vec![Value::Ubyte(*code), bin(additional_data)]),
        };
        encode(&Value::described_list(code, fields), out);
    }
}
