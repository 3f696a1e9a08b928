//! The MQTT 3.1.1 control packets as plain data.

use std::fmt;

use bytes::Bytes;

use crate::{Error, Str};

/// Quality of service of a PUBLISH or a subscription (§4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl TryFrom<u8> for QoS {
    type Error = Error;

    fn try_from(v: u8) -> Result<Self, Error> {
        match v {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            _ => Err(Error::InvalidQoS),
        }
    }
}

/// The packet type nibble of the fixed header (§2.2.1), without the reserved values 0 and 15.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
}

impl PacketType {
    pub(crate) fn from_nibble(v: u8) -> Option<Self> {
        use PacketType::*;
        let t = match v {
            1 => Connect,
            2 => ConnAck,
            3 => Publish,
            4 => PubAck,
            5 => PubRec,
            6 => PubRel,
            7 => PubComp,
            8 => Subscribe,
            9 => SubAck,
            10 => Unsubscribe,
            11 => UnsubAck,
            12 => PingReq,
            13 => PingResp,
            14 => Disconnect,
            _ => return None,
        };
        Some(t)
    }

    /// The name the spec uses, e.g. `"PUBLISH"`.
    pub fn name(self) -> &'static str {
        use PacketType::*;
        match self {
            Connect => "CONNECT",
            ConnAck => "CONNACK",
            Publish => "PUBLISH",
            PubAck => "PUBACK",
            PubRec => "PUBREC",
            PubRel => "PUBREL",
            PubComp => "PUBCOMP",
            Subscribe => "SUBSCRIBE",
            SubAck => "SUBACK",
            Unsubscribe => "UNSUBSCRIBE",
            UnsubAck => "UNSUBACK",
            PingReq => "PINGREQ",
            PingResp => "PINGRESP",
            Disconnect => "DISCONNECT",
        }
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One MQTT 3.1.1 control packet. Strings and payloads share the frame's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(u16),
    PingReq,
    PingResp,
    Disconnect,
}

impl Packet {
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect => PacketType::Disconnect,
        }
    }
}

/// CONNECT (§3.1). `protocol_name`/`protocol_level` are `MQTT`/4 or `MQIsdp`/3.
#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol_name: Str,
    pub protocol_level: u8,
    pub clean_session: bool,
    pub keep_alive: u16,
    pub client_id: Str,
    pub will: Option<Will>,
    pub username: Option<Str>,
    /// For IoT Hub, a SAS token: never log it (the `Debug` impl prints only its length).
    pub password: Option<Bytes>,
}

impl fmt::Debug for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let password = self.password.as_ref().map(|p| Redacted(p.len()));
        f.debug_struct("Connect")
            .field("protocol_name", &self.protocol_name)
            .field("protocol_level", &self.protocol_level)
            .field("clean_session", &self.clean_session)
            .field("keep_alive", &self.keep_alive)
            .field("client_id", &self.client_id)
            .field("will", &self.will)
            .field("username", &self.username)
            .field("password", &password)
            .finish()
    }
}

struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted, {} bytes>", self.0)
    }
}

/// The last-will message of a CONNECT (§3.1.2.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: Str,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

/// CONNACK (§3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    /// Must be false unless `code` is `Accepted` (§3.2.2.2).
    pub session_present: bool,
    pub code: ConnectReturnCode,
}

/// The CONNACK return code (§3.2.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectReturnCode {
    Accepted = 0,
    UnacceptableProtocolVersion = 1,
    IdentifierRejected = 2,
    ServerUnavailable = 3,
    BadUsernameOrPassword = 4,
    NotAuthorized = 5,
}

impl TryFrom<u8> for ConnectReturnCode {
    type Error = Error;

    fn try_from(v: u8) -> Result<Self, Error> {
        use ConnectReturnCode::*;
        Ok(match v {
            0 => Accepted,
            1 => UnacceptableProtocolVersion,
            2 => IdentifierRejected,
            3 => ServerUnavailable,
            4 => BadUsernameOrPassword,
            5 => NotAuthorized,
            _ => return Err(Error::InvalidConnectReturnCode(v)),
        })
    }
}

/// PUBLISH (§3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: Str,
    /// 0 for QoS 0 (the field is absent on the wire), non-zero otherwise.
    pub pkid: u16,
    pub payload: Bytes,
}

/// SUBSCRIBE (§3.8): one or more filters, each with its requested QoS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub pkid: u16,
    pub filters: Vec<(Str, QoS)>,
}

/// One SUBACK return code (§3.9.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubackCode {
    Granted(QoS),
    /// 0x80.
    Failure,
}

impl SubackCode {
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            SubackCode::Granted(qos) => qos as u8,
            SubackCode::Failure => 0x80,
        }
    }
}

impl TryFrom<u8> for SubackCode {
    type Error = Error;

    fn try_from(v: u8) -> Result<Self, Error> {
        match v {
            0x80 => Ok(SubackCode::Failure),
            0..=2 => QoS::try_from(v).map(SubackCode::Granted),
            _ => Err(Error::InvalidSubackCode(v)),
        }
    }
}

/// SUBACK (§3.9): one code per filter of the SUBSCRIBE, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub pkid: u16,
    pub codes: Vec<SubackCode>,
}

/// UNSUBSCRIBE (§3.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub filters: Vec<Str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_debug_redacts_password() {
        let connect = Connect {
            protocol_name: Str::from_static("MQTT"),
            protocol_level: 4,
            clean_session: false,
            keep_alive: 60,
            client_id: Str::from_static("d1"),
            will: None,
            username: Some(Str::from_static("hub.example/d1/?api-version=2021-04-12")),
            password: Some(Bytes::from_static(
                b"SharedAccessSignature sr=x&sig=SECRET&se=1",
            )),
        };
        let text = format!("{connect:?}");
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.contains("<redacted, 42 bytes>"), "{text}");
        assert!(text.contains("api-version"), "{text}");
    }

    #[test]
    fn suback_code_bytes() {
        for v in 0..=255u8 {
            match SubackCode::try_from(v) {
                Ok(code) => assert_eq!(code.to_u8(), v),
                Err(e) => {
                    assert!(v > 2 && v != 0x80);
                    assert_eq!(e, Error::InvalidSubackCode(v));
                }
            }
        }
    }

    #[test]
    fn packet_type_nibbles() {
        assert_eq!(PacketType::from_nibble(0), None);
        assert_eq!(PacketType::from_nibble(15), None);
        for v in 1..=14u8 {
            let t = PacketType::from_nibble(v).expect("types 1..=14 exist");
            assert_eq!(t as u8, v);
        }
    }
}
