//! The AMQP 1.0 type system (part 1): every primitive, described values, lists, maps and
//! arrays, decoded zero-copy from a frame (binaries, strings and symbols are slices of it) and
//! encoded into a buffer.
//!
//! Decoding is bounded: a compound's count can claim no more elements than it has bytes, and
//! nesting stops at [`MAX_DEPTH`], so no input makes the decoder allocate beyond the frame's
//! size or recurse without limit.

use bytes::{BufMut, Bytes, BytesMut};

use crate::Error;

/// How deep compounds (lists, maps, arrays, described values) may nest.
pub const MAX_DEPTH: usize = 32;

/// A UTF-8 string that is a slice of the frame it came in.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Str(Bytes);

impl Str {
    pub fn from_utf8(b: Bytes) -> Result<Self, Error> {
        std::str::from_utf8(&b).map_err(|_| Error::InvalidUtf8)?;
        Ok(Str(b))
    }

    pub fn from_static(s: &'static str) -> Self {
        Str(Bytes::from_static(s.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // Checked when made: only from_utf8 and from &str/String build a Str.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }
}

impl std::fmt::Debug for Str {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<&str> for Str {
    fn from(s: &str) -> Self {
        Str(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for Str {
    fn from(s: String) -> Self {
        Str(Bytes::from(s))
    }
}

/// An AMQP value.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    #[default]
    Null,
    Bool(bool),
    Ubyte(u8),
    Ushort(u16),
    Uint(u32),
    Ulong(u64),
    Byte(i8),
    Short(i16),
    Int(i32),
    Long(i64),
    Float(f32),
    Double(f64),
    Decimal32([u8; 4]),
    Decimal64([u8; 8]),
    Decimal128([u8; 16]),
    Char(char),
    /// Milliseconds since the Unix epoch.
    Timestamp(i64),
    Uuid([u8; 16]),
    Binary(Bytes),
    String(Str),
    /// ASCII by the spec; kept as UTF-8 text here.
    Symbol(Str),
    List(Vec<Value>),
    /// Pairs in wire order.
    Map(Vec<(Value, Value)>),
    /// Elements of one type.
    Array(Vec<Value>),
    /// (descriptor, value).
    Described(Box<(Value, Value)>),
}

impl Value {
    pub fn string(s: &str) -> Value {
        Value::String(s.into())
    }

    pub fn symbol(s: &str) -> Value {
        Value::Symbol(s.into())
    }

    /// A described list, as performatives and message sections are: `code` is the small-ulong
    /// descriptor.
    pub fn described_list(code: u64, fields: Vec<Value>) -> Value {
        Value::Described(Box::new((Value::Ulong(code), Value::List(fields))))
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) | Value::Symbol(s) => Some(s.as_str()),
            _ => None,
        }
    }

    /// An unsigned integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Ubyte(v) => Some(v.into()),
            Value::Ushort(v) => Some(v.into()),
            Value::Uint(v) => Some(v.into()),
            Value::Ulong(v) => Some(v),
            _ => None,
        }
    }

    /// A signed or unsigned integer that fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Byte(v) => Some(v.into()),
            Value::Short(v) => Some(v.into()),
            Value::Int(v) => Some(v.into()),
            Value::Long(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The descriptor code of a described value with a numeric descriptor.
    pub fn descriptor_code(&self) -> Option<u64> {
        match self {
            Value::Described(d) => d.0.as_u64(),
            _ => None,
        }
    }
}

/// A bounded reader over one frame body; every read is checked.
pub struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a Bytes) -> Self {
        Reader {
            buf,
            pos: 0,
            end: buf.len(),
        }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.end - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    /// The rest, shared with the frame.
    pub fn rest(&mut self) -> Bytes {
        let b = self.buf.slice(self.pos..self.end);
        self.pos = self.end;
        b
    }

    fn u8(&mut self) -> Result<u8, Error> {
        if self.pos >= self.end {
            return Err(Error::Truncated);
        }
        let b = self.buf[self.pos];
        self.pos += 1;
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let s = self.slice(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&s);
        Ok(out)
    }

    fn slice(&mut self, n: usize) -> Result<Bytes, Error> {
        let end = self.pos.checked_add(n).ok_or(Error::Truncated)?;
        if end > self.end {
            return Err(Error::Truncated);
        }
        let b = self.buf.slice(self.pos..end);
        self.pos = end;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// Reads one value.
    pub fn value(&mut self) -> Result<Value, Error> {
        self.value_at(0)
    }

    fn value_at(&mut self, depth: usize) -> Result<Value, Error> {
        let code = self.u8()?;
        if code == 0x00 {
            if depth >= MAX_DEPTH {
                return Err(Error::TooDeep(MAX_DEPTH));
            }
            let descriptor = self.value_at(depth + 1)?;
            let value = self.value_at(depth + 1)?;
            return Ok(Value::Described(Box::new((descriptor, value))));
        }
        self.body(code, depth)
    }

    /// The value after its constructor `code`.
    fn body(&mut self, code: u8, depth: usize) -> Result<Value, Error> {
        Ok(match code {
            0x40 => Value::Null,
            0x41 => Value::Bool(true),
            0x42 => Value::Bool(false),
            0x56 => Value::Bool(self.u8()? != 0),
            0x50 => Value::Ubyte(self.u8()?),
            0x60 => Value::Ushort(u16::from_be_bytes(self.array()?)),
            0x70 => Value::Uint(self.u32()?),
            0x52 => Value::Uint(self.u8()?.into()),
            0x43 => Value::Uint(0),
            0x80 => Value::Ulong(u64::from_be_bytes(self.array()?)),
            0x53 => Value::Ulong(self.u8()?.into()),
            0x44 => Value::Ulong(0),
            0x51 => Value::Byte(self.u8()? as i8),
            0x61 => Value::Short(i16::from_be_bytes(self.array()?)),
            0x71 => Value::Int(i32::from_be_bytes(self.array()?)),
            0x54 => Value::Int((self.u8()? as i8).into()),
            0x81 => Value::Long(i64::from_be_bytes(self.array()?)),
            0x55 => Value::Long((self.u8()? as i8).into()),
            0x72 => Value::Float(f32::from_be_bytes(self.array()?)),
            0x82 => Value::Double(f64::from_be_bytes(self.array()?)),
            0x74 => Value::Decimal32(self.array()?),
            0x84 => Value::Decimal64(self.array()?),
            0x94 => Value::Decimal128(self.array()?),
            0x73 => Value::Char(char::from_u32(self.u32()?).ok_or(Error::InvalidChar)?),
            0x83 => Value::Timestamp(i64::from_be_bytes(self.array()?)),
            0x98 => Value::Uuid(self.array()?),
            0xa0 => {
                let n = self.u8()?.into();
                Value::Binary(self.slice(n)?)
            }
            0xb0 => {
                let n = self.u32()? as usize;
                Value::Binary(self.slice(n)?)
            }
            0xa1 => {
                let n = self.u8()?.into();
                Value::String(Str::from_utf8(self.slice(n)?)?)
            }
            0xb1 => {
                let n = self.u32()? as usize;
                Value::String(Str::from_utf8(self.slice(n)?)?)
            }
            0xa3 => {
                let n = self.u8()?.into();
                Value::Symbol(Str::from_utf8(self.slice(n)?)?)
            }
            0xb3 => {
                let n = self.u32()? as usize;
                Value::Symbol(Str::from_utf8(self.slice(n)?)?)
            }
            0x45 => Value::List(Vec::new()),
            0xc0 | 0xd0 | 0xc1 | 0xd1 => {
                if depth >= MAX_DEPTH {
                    return Err(Error::TooDeep(MAX_DEPTH));
                }
                let wide = code & 0xf0 == 0xd0;
                let (size, count) = match wide {
                    false => (usize::from(self.u8()?), usize::from(self.u8()?)),
                    true => (self.u32()? as usize, self.u32()? as usize),
                };
                let header = if wide { 4 } else { 1 };
                let body = size.checked_sub(header).ok_or(Error::BadCompound)?;
                let mut inner = self.sub(body)?;
                // Each element takes at least one byte.
                if count > inner.remaining() {
                    return Err(Error::BadCompound);
                }
                let v = if code & 0x0f == 0 {
                    let mut items = Vec::with_capacity(count);
                    for _ in 0..count {
                        items.push(inner.value_at(depth + 1)?);
                    }
                    Value::List(items)
                } else {
                    if count % 2 != 0 {
                        return Err(Error::BadCompound);
                    }
                    let mut pairs = Vec::with_capacity(count / 2);
                    for _ in 0..count / 2 {
                        let k = inner.value_at(depth + 1)?;
                        let v = inner.value_at(depth + 1)?;
                        pairs.push((k, v));
                    }
                    Value::Map(pairs)
                };
                if !inner.is_empty() {
                    return Err(Error::BadCompound);
                }
                v
            }
            0xe0 | 0xf0 => {
                if depth >= MAX_DEPTH {
                    return Err(Error::TooDeep(MAX_DEPTH));
                }
                let wide = code == 0xf0;
                let (size, count) = match wide {
                    false => (usize::from(self.u8()?), usize::from(self.u8()?)),
                    true => (self.u32()? as usize, self.u32()? as usize),
                };
                let header = if wide { 4 } else { 1 };
                let body = size.checked_sub(header).ok_or(Error::BadCompound)?;
                let mut inner = self.sub(body)?;
                let element = inner.u8()?;
                let descriptor = match element {
                    0x00 => Some(inner.value_at(depth + 1)?),
                    _ => None,
                };
                let element = match descriptor {
                    Some(_) => inner.u8()?,
                    None => element,
                };
                // Fixed-width zero-byte encodings (null, true, uint0, …) would let a count
                // claim elements that take no bytes at all.
                if matches!(element, 0x40..=0x45) && count > 0 {
                    return Err(Error::BadArray);
                }
                if count > inner.remaining() {
                    return Err(Error::BadCompound);
                }
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    let v = inner.body(element, depth + 1)?;
                    items.push(match &descriptor {
                        Some(d) => Value::Described(Box::new((d.clone(), v))),
                        None => v,
                    });
                }
                if !inner.is_empty() {
                    return Err(Error::BadCompound);
                }
                Value::Array(items)
            }
            other => return Err(Error::UnknownFormatCode(other)),
        })
    }

    /// A reader over the next `n` bytes, which this one skips.
    fn sub(&mut self, n: usize) -> Result<Reader<'a>, Error> {
        let end = self.pos.checked_add(n).ok_or(Error::Truncated)?;
        if end > self.end {
            return Err(Error::Truncated);
        }
        let r = Reader {
            buf: self.buf,
            pos: self.pos,
            end,
        };
        self.pos = end;
        Ok(r)
    }
}

/// Decodes exactly one value from `bytes`.
pub fn decode(bytes: &Bytes) -> Result<Value, Error> {
    let mut r = Reader::new(bytes);
    let v = r.value()?;
    if !r.is_empty() {
        return Err(Error::TrailingBytes);
    }
    Ok(v)
}

/// Appends `v`'s encoding, in the smallest form the spec allows (lists at least `list8`:
/// never `list0`, which pyamqp cannot read in performatives).
pub fn encode(v: &Value, out: &mut BytesMut) {
    match v {
        Value::Null => out.put_u8(0x40),
        Value::Bool(true) => out.put_u8(0x41),
        Value::Bool(false) => out.put_u8(0x42),
        Value::Ubyte(x) => {
            out.put_u8(0x50);
            out.put_u8(*x);
        }
        Value::Ushort(x) => {
            out.put_u8(0x60);
            out.put_u16(*x);
        }
        Value::Uint(0) => out.put_u8(0x43),
        Value::Uint(x) if *x < 256 => {
            out.put_u8(0x52);
            out.put_u8(*x as u8);
        }
        Value::Uint(x) => {
            out.put_u8(0x70);
            out.put_u32(*x);
        }
        Value::Ulong(0) => out.put_u8(0x44),
        Value::Ulong(x) if *x < 256 => {
            out.put_u8(0x53);
            out.put_u8(*x as u8);
        }
        Value::Ulong(x) => {
            out.put_u8(0x80);
            out.put_u64(*x);
        }
        Value::Byte(x) => {
            out.put_u8(0x51);
            out.put_i8(*x);
        }
        Value::Short(x) => {
            out.put_u8(0x61);
            out.put_i16(*x);
        }
        Value::Int(x) if (-128..128).contains(x) => {
            out.put_u8(0x54);
            out.put_i8(*x as i8);
        }
        Value::Int(x) => {
            out.put_u8(0x71);
            out.put_i32(*x);
        }
        Value::Long(x) if (-128..128).contains(x) => {
            out.put_u8(0x55);
            out.put_i8(*x as i8);
        }
        Value::Long(x) => {
            out.put_u8(0x81);
            out.put_i64(*x);
        }
        Value::Float(x) => {
            out.put_u8(0x72);
            out.put_f32(*x);
        }
        Value::Double(x) => {
            out.put_u8(0x82);
            out.put_f64(*x);
        }
        Value::Decimal32(b) => {
            out.put_u8(0x74);
            out.put_slice(b);
        }
        Value::Decimal64(b) => {
            out.put_u8(0x84);
            out.put_slice(b);
        }
        Value::Decimal128(b) => {
            out.put_u8(0x94);
            out.put_slice(b);
        }
        Value::Char(c) => {
            out.put_u8(0x73);
            out.put_u32(*c as u32);
        }
        Value::Timestamp(t) => {
            out.put_u8(0x83);
            out.put_i64(*t);
        }
        Value::Uuid(u) => {
            out.put_u8(0x98);
            out.put_slice(u);
        }
        Value::Binary(b) => variable(0xa0, 0xb0, b, out),
        Value::String(s) => variable(0xa1, 0xb1, s.as_bytes(), out),
        Value::Symbol(s) => variable(0xa3, 0xb3, s.as_bytes(), out),
        Value::List(items) => compound(0xc0, 0xd0, items.len(), out, |out| {
            for i in items {
                encode(i, out);
            }
        }),
        Value::Map(pairs) => compound(0xc1, 0xd1, pairs.len() * 2, out, |out| {
            for (k, v) in pairs {
                encode(k, out);
                encode(v, out);
            }
        }),
        Value::Array(items) => array(items, out),
        Value::Described(d) => {
            out.put_u8(0x00);
            encode(&d.0, out);
            encode(&d.1, out);
        }
    }
}

fn variable(small: u8, large: u8, b: &[u8], out: &mut BytesMut) {
    match u8::try_from(b.len()) {
        Ok(n) => {
            out.put_u8(small);
            out.put_u8(n);
        }
        Err(_) => {
            out.put_u8(large);
            out.put_u32(b.len() as u32);
        }
    }
    out.put_slice(b);
}

/// A list or map: the elements are written first, then the header fitted to their size.
pub(crate) fn compound(
    small: u8,
    large: u8,
    count: usize,
    out: &mut BytesMut,
    body: impl FnOnce(&mut BytesMut),
) {
    // Written in place behind room for the wide header, then moved down over the spare bytes
    // when the narrow one fits: no buffer of its own per list or map.
    let start = out.len();
    out.put_slice(&[0; 9]);
    body(out);
    let len = out.len() - start - 9;
    if len < 255 && count <= 255 {
        out[start] = small;
        out[start + 1] = (len + 1) as u8;
        out[start + 2] = count as u8;
        out.copy_within(start + 9.., start + 3);
        out.truncate(start + 3 + len);
    } else {
        out[start] = large;
        out[start + 1..start + 5].copy_from_slice(&((len + 4) as u32).to_be_bytes());
        out[start + 5..start + 9].copy_from_slice(&(count as u32).to_be_bytes());
    }
}

/// An array: one constructor for all elements, which must all be of one type (the codec's
/// callers build arrays of symbols and strings). Elements are written in the widest encoding
/// of their type (an array has one constructor, so `uint0`-style compact forms cannot be mixed).
fn array(items: &[Value], out: &mut BytesMut) {
    let inner = array_inner(items);
    if inner.len() < 255 && items.len() <= 255 {
        out.put_u8(0xe0);
        out.put_u8((inner.len() + 1) as u8);
        out.put_u8(items.len() as u8);
    } else {
        out.put_u8(0xf0);
        out.put_u32((inner.len() + 4) as u32);
        out.put_u32(items.len() as u32);
    }
    out.put_slice(&inner);
}

/// An array's element constructor and elements.
fn array_inner(items: &[Value]) -> BytesMut {
    let mut inner = BytesMut::new();
    if let Some(first) = items.first() {
        let (descriptor, sample) = match first {
            Value::Described(d) => (Some(&d.0), &d.1),
            v => (None, v),
        };
        if let Some(d) = descriptor {
            inner.put_u8(0x00);
            encode(d, &mut inner);
        }
        let code = wide_code(sample);
        inner.put_u8(code);
        for item in items {
            let v = match item {
                Value::Described(d) => &d.1,
                v => v,
            };
            wide_body(code, v, &mut inner);
        }
    } else {
        inner.put_u8(0x40);
    }
    inner
}

/// The constructor an array of values like `v` uses.
fn wide_code(v: &Value) -> u8 {
    match v {
        Value::Null => 0x40,
        Value::Bool(_) => 0x56,
        Value::Ubyte(_) => 0x50,
        Value::Ushort(_) => 0x60,
        Value::Uint(_) => 0x70,
        Value::Ulong(_) => 0x80,
        Value::Byte(_) => 0x51,
        Value::Short(_) => 0x61,
        Value::Int(_) => 0x71,
        Value::Long(_) => 0x81,
        Value::Float(_) => 0x72,
        Value::Double(_) => 0x82,
        Value::Decimal32(_) => 0x74,
        Value::Decimal64(_) => 0x84,
        Value::Decimal128(_) => 0x94,
        Value::Char(_) => 0x73,
        Value::Timestamp(_) => 0x83,
        Value::Uuid(_) => 0x98,
        Value::Binary(_) => 0xb0,
        Value::String(_) => 0xb1,
        Value::Symbol(_) => 0xb3,
        Value::List(_) => 0xd0,
        Value::Map(_) => 0xd1,
        Value::Array(_) => 0xf0,
        Value::Described(_) => 0x40,
    }
}

/// One array element's bytes after the shared constructor `code`. An element of another type
/// than the first is left out (and the array is then malformed): arrays hold one type.
fn wide_body(code: u8, v: &Value, out: &mut BytesMut) {
    let mut one = BytesMut::new();
    match (code, v) {
        (0x56, Value::Bool(b)) => out.put_u8(u8::from(*b)),
        (0x70, Value::Uint(x)) => out.put_u32(*x),
        (0x80, Value::Ulong(x)) => out.put_u64(*x),
        (0x71, Value::Int(x)) => out.put_i32(*x),
        (0x81, Value::Long(x)) => out.put_i64(*x),
        (0xb0, Value::Binary(b)) => {
            out.put_u32(b.len() as u32);
            out.put_slice(b);
        }
        (0xb1, Value::String(s)) | (0xb3, Value::Symbol(s)) => {
            out.put_u32(s.as_bytes().len() as u32);
            out.put_slice(s.as_bytes());
        }
        (0xd0, Value::List(items)) => {
            for i in items {
                encode(i, &mut one);
            }
            out.put_u32((one.len() + 4) as u32);
            out.put_u32(items.len() as u32);
            out.put_slice(&one);
        }
        (0xd1, Value::Map(pairs)) => {
            for (k, v) in pairs {
                encode(k, &mut one);
                encode(v, &mut one);
            }
            out.put_u32((one.len() + 4) as u32);
            out.put_u32((pairs.len() * 2) as u32);
            out.put_slice(&one);
        }
        (0xf0, Value::Array(items)) => {
            let inner = array_inner(items);
            out.put_u32((inner.len() + 4) as u32);
            out.put_u32(items.len() as u32);
            out.put_slice(&inner);
        }
        _ => {
            // Fixed-width types: the normal encoding minus its constructor byte.
            encode(v, &mut one);
            if one.first() == Some(&code) {
                out.put_slice(&one[1..]);
            }
        }
    }
}

/// Writes values straight into a buffer, with no [`Value`] tree: for hot paths that encode the
/// same shape many times (events to an Event Hubs receiver). Each call writes one value in the
/// encoding [`encode`] would choose; compounds are opened, filled and closed.
pub mod put {
    use bytes::{BufMut, BytesMut};

    pub fn str(out: &mut BytesMut, s: &str) {
        super::variable(0xa1, 0xb1, s.as_bytes(), out);
    }

    pub fn sym(out: &mut BytesMut, s: &str) {
        super::variable(0xa3, 0xb3, s.as_bytes(), out);
    }

    pub fn binary(out: &mut BytesMut, b: &[u8]) {
        super::variable(0xa0, 0xb0, b, out);
    }

    pub fn long(out: &mut BytesMut, v: i64) {
        match i8::try_from(v) {
            Ok(small) => {
                out.put_u8(0x55);
                out.put_i8(small);
            }
            Err(_) => {
                out.put_u8(0x81);
                out.put_i64(v);
            }
        }
    }

    pub fn timestamp(out: &mut BytesMut, ms: i64) {
        out.put_u8(0x83);
        out.put_i64(ms);
    }

    pub fn null(out: &mut BytesMut) {
        out.put_u8(0x40);
    }

    /// `0x00 0x53 code`: a small-ulong descriptor.
    pub fn descriptor(out: &mut BytesMut, code: u8) {
        out.put_slice(&[0x00, 0x53, code]);
    }

    /// Opens a list32 or map32 (`map`: count in elements, keys and values both); returns the
    /// mark [`close`] needs.
    pub fn open(out: &mut BytesMut, map: bool) -> usize {
        out.put_u8(if map { 0xd1 } else { 0xd0 });
        let mark = out.len();
        out.put_u32(0);
        out.put_u32(0);
        mark
    }

    /// Closes a compound opened at `mark` holding `count` elements.
    pub fn close(out: &mut BytesMut, mark: usize, count: u32) {
        let size = (out.len() - mark - 4) as u32;
        out[mark..mark + 4].copy_from_slice(&size.to_be_bytes());
        out[mark + 4..mark + 8].copy_from_slice(&count.to_be_bytes());
    }
}
