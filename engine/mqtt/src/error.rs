//! Every way a frame or a string can be wrong, one variant each.

use crate::packet::PacketType;

/// Why bytes are not a valid MQTT 3.1.1 frame (or a string is not a valid MQTT string).
///
/// Each variant is one rule of the spec; section numbers refer to MQTT 3.1.1. Any of these from
/// the network means the connection must be closed (§4.8), except
/// [`UnsupportedProtocolLevel`](Error::UnsupportedProtocolLevel), which is answered with
/// CONNACK 1 first (§3.1.2.2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The remaining length announces a frame of `len` bytes (fixed header included), more than
    /// `max` ([`Limits::max_frame`](crate::Limits)).
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    /// The remaining-length field has a continuation bit on its fourth byte (§2.2.3 allows four).
    #[error("remaining length is longer than four bytes")]
    MalformedRemainingLength,
    /// The packet type nibble is 0 or 15, both reserved (§2.2.1).
    #[error("reserved packet type {0}")]
    UnknownPacketType(u8),
    /// The fixed-header flags are not those §2.2.2 requires for this packet type (0b0010 for
    /// PUBREL, SUBSCRIBE and UNSUBSCRIBE, 0 for the others), or a QoS 0 PUBLISH has DUP set
    /// (§3.3.1.1).
    #[error("invalid fixed-header flags for {packet_type}")]
    InvalidFlags { packet_type: PacketType },
    /// A QoS field (PUBLISH flags, CONNECT will QoS, SUBSCRIBE requested QoS) is 3.
    #[error("QoS 3 is not a valid QoS")]
    InvalidQoS,
    /// A field runs past the end of the frame, or the frame is shorter than its header says.
    #[error("a field runs past the end of the frame")]
    Truncated,
    /// Bytes remain after the last field of the packet, or the frame is longer than its header
    /// says.
    #[error("trailing bytes after the end of the packet")]
    TrailingBytes,
    /// A string is not well-formed UTF-8 (§1.5.3).
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// A string contains U+0000, which §1.5.3 forbids.
    #[error("string contains U+0000")]
    NullInString,
    /// A string is longer than the 65,535 bytes a two-byte length prefix can express. Only the
    /// [`Str`](crate::Str) constructors return this; the wire cannot express it.
    #[error("string of {len} bytes exceeds 65535")]
    StringTooLong { len: usize },
    /// The CONNECT protocol name is neither `MQTT` nor `MQIsdp` (§3.1.2.1).
    #[error("protocol name is not MQTT")]
    InvalidProtocolName,
    /// The CONNECT protocol level is not 4 (`MQTT`) or 3 (`MQIsdp`); MQTT 5 clients send 5. The
    /// server answers CONNACK 1 and closes (§3.1.2.2).
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// The CONNECT flags break §3.1.2: the reserved bit is set, will QoS or will retain is set
    /// without the will flag, or a password is present without a user name.
    #[error("invalid CONNECT flags")]
    InvalidConnectFlags,
    /// The CONNACK acknowledge flags have reserved bits set, or session-present is set with a
    /// non-zero return code (§3.2.2).
    #[error("invalid CONNACK flags")]
    InvalidConnackFlags,
    /// The CONNACK return code is above 5 (§3.2.2.3).
    #[error("invalid CONNACK return code {0}")]
    InvalidConnectReturnCode(u8),
    /// A packet identifier that must be non-zero is 0 (§2.3.1).
    #[error("packet identifier 0")]
    ZeroPacketId,
    /// A topic name is empty or contains a wildcard (§4.7.3, §3.3.2.1).
    #[error("invalid topic name")]
    InvalidTopicName,
    /// A topic filter is empty, or `#` or `+` does not fill a whole level, or `#` is not last
    /// (§4.7.1).
    #[error("invalid topic filter")]
    InvalidTopicFilter,
    /// A SUBSCRIBE has no topic filter (§3.8.3).
    #[error("SUBSCRIBE without topic filters")]
    EmptySubscribe,
    /// An UNSUBSCRIBE has no topic filter (§3.10.3).
    #[error("UNSUBSCRIBE without topic filters")]
    EmptyUnsubscribe,
    /// A SUBACK has no return code (§3.9.3).
    #[error("SUBACK without return codes")]
    EmptySuback,
    /// The reserved upper six bits of a SUBSCRIBE requested-QoS byte are set (§3.8.3.1).
    #[error("reserved bits set in SUBSCRIBE options")]
    InvalidSubscribeOptions,
    /// A SUBACK return code is not 0, 1, 2 or 0x80 (§3.9.3).
    #[error("invalid SUBACK return code {0:#04x}")]
    InvalidSubackCode(u8),
}

impl Error {
    /// A stable snake_case label for metrics (`error_code` label). Never changes once published.
    pub fn error_code(&self) -> &'static str {
        match self {
            Error::FrameTooLarge { .. } => "frame_too_large",
            Error::MalformedRemainingLength => "malformed_remaining_length",
            Error::UnknownPacketType(_) => "unknown_packet_type",
            Error::InvalidFlags { .. } => "invalid_flags",
            Error::InvalidQoS => "invalid_qos",
            Error::Truncated => "truncated",
            Error::TrailingBytes => "trailing_bytes",
            Error::InvalidUtf8 => "invalid_utf8",
            Error::NullInString => "null_in_string",
            Error::StringTooLong { .. } => "string_too_long",
            Error::InvalidProtocolName => "invalid_protocol_name",
            Error::UnsupportedProtocolLevel(_) => "unsupported_protocol_level",
            Error::InvalidConnectFlags => "invalid_connect_flags",
            Error::InvalidConnackFlags => "invalid_connack_flags",
            Error::InvalidConnectReturnCode(_) => "invalid_connect_return_code",
            Error::ZeroPacketId => "zero_packet_id",
            Error::InvalidTopicName => "invalid_topic_name",
            Error::InvalidTopicFilter => "invalid_topic_filter",
            Error::EmptySubscribe => "empty_subscribe",
            Error::EmptyUnsubscribe => "empty_unsubscribe",
            Error::EmptySuback => "empty_suback",
            Error::InvalidSubscribeOptions => "invalid_subscribe_options",
            Error::InvalidSubackCode(_) => "invalid_suback_code",
        }
    }
}
