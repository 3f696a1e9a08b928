//! Every way AMQP input can be wrong, one variant each, with the AMQP error condition a
//! server closes the connection with and a stable label for metrics.

/// Why bytes are not valid AMQP 1.0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The first eight bytes are not `AMQP 0 1 0 0` or `AMQP 3 1 0 0`.
    #[error("not an AMQP 1.0 protocol header")]
    BadProtocolHeader,
    /// A frame's size field claims `len` bytes, more than `max` (the negotiated max-frame-size).
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    /// A frame's size is below the 8-byte header, or its data offset points before the end of
    /// the header or past the frame.
    #[error("malformed frame header")]
    BadFrameHeader,
    /// A frame type other than 0 (AMQP) or 1 (SASL).
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// A value runs past the end of its frame or of its compound.
    #[error("a value runs past the end of the frame")]
    Truncated,
    /// A format code the type system does not define.
    #[error("unknown format code 0x{0:02x}")]
    UnknownFormatCode(u8),
    /// A string or symbol that is not valid UTF-8 (symbols: ASCII).
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// A char that is not a Unicode scalar value.
    #[error("invalid char")]
    InvalidChar,
    /// Compounds nested deeper than the decoder allows.
    #[error("values nested deeper than {0}")]
    TooDeep(usize),
    /// A compound's count does not fit the bytes it says it has, or a map has an odd count.
    #[error("malformed compound")]
    BadCompound,
    /// An array element of a type that arrays cannot hold, or a described array element.
    #[error("malformed array")]
    BadArray,
    /// A frame body that is not a described list of a known performative.
    #[error("unknown performative {0}")]
    UnknownPerformative(String),
    /// A performative field missing where mandatory, or of the wrong type.
    #[error("{performative}: field {field} {problem}")]
    BadField {
        performative: &'static str,
        field: &'static str,
        problem: &'static str,
    },
    /// Bytes left after what a frame holds (a performative with a payload it cannot carry).
    #[error("trailing bytes after the performative")]
    TrailingBytes,
    /// A message section that is not one of the eleven the message format defines, or out of
    /// order.
    #[error("malformed message: {0}")]
    BadMessage(&'static str),
}

impl Error {
    /// A stable label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            Error::BadProtocolHeader => "bad_protocol_header",
            Error::FrameTooLarge { .. } => "frame_too_large",
            Error::BadFrameHeader => "bad_frame_header",
            Error::UnknownFrameType(_) => "unknown_frame_type",
            Error::Truncated => "truncated",
            Error::UnknownFormatCode(_) => "unknown_format_code",
            Error::InvalidUtf8 => "invalid_utf8",
            Error::InvalidChar => "invalid_char",
            Error::TooDeep(_) => "too_deep",
            Error::BadCompound => "bad_compound",
            Error::BadArray => "bad_array",
            Error::UnknownPerformative(_) => "unknown_performative",
            Error::BadField { .. } => "bad_field",
            Error::TrailingBytes => "trailing_bytes",
            Error::BadMessage(_) => "bad_message",
        }
    }

    /// The AMQP error condition to close the connection with (AMQP 1.0 §2.8.15, §2.8.16).
    pub fn condition(&self) -> &'static str {
        match self {
            Error::BadProtocolHeader
            | Error::FrameTooLarge { .. }
            | Error::BadFrameHeader
            | Error::UnknownFrameType(_)
            | Error::TrailingBytes => "amqp:connection:framing-error",
            Error::UnknownPerformative(_) => "amqp:not-implemented",
            Error::BadField { .. } => "amqp:invalid-field",
            _ => "amqp:decode-error",
        }
    }
}
