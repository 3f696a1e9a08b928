//! The engine's listeners as data: one [`ListenerSpec`] per (protocol, address, TLS or not).
//! A new protocol or port is one entry here — the command line, `roost up`'s argv for the
//! engine, hub.json and the shards all work from the list.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// What a listener speaks after TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1 (IoT Hub's :8883 with TLS).
    Mqtt,
    /// IoT Hub's :443: WebSocket upgrades (MQTT over WebSockets) and HTTPS, told apart by the
    /// request head (`https.rs`).
    Https,
}

impl Protocol {
    /// Every protocol, with its name on the command line.
    pub const ALL: &'static [(&'static str, Protocol)] =
        &[("mqtt", Protocol::Mqtt), ("https", Protocol::Https)];

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Mqtt => "mqtt",
            Protocol::Https => "https",
        }
    }
}

/// One listener: `mqtt+tls=0.0.0.0:8883`, `mqtt=127.0.0.1:1883`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerSpec {
    pub protocol: Protocol,
    pub addr: SocketAddr,
    pub tls: bool,
}

/// Why a `--listen` value was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenerError {
    #[error("{0:?}: expected PROTOCOL[+tls]=ADDRESS, e.g. mqtt+tls=0.0.0.0:8883")]
    Shape(String),
    #[error("{0:?}: unknown protocol (known: mqtt, https)")]
    Protocol(String),
    #[error("{0:?}: not a socket address")]
    Address(String),
}

impl ListenerSpec {
    pub fn new(protocol: Protocol, addr: SocketAddr, tls: bool) -> Self {
        Self {
            protocol,
            addr,
            tls,
        }
    }

    /// The key of `ports` in hub.json this listener's port goes under: `mqtt` for MQTT over
    /// TLS (IoT Hub's port), `plain_mqtt` for plain MQTT.
    pub fn hub_port_key(&self) -> String {
        match (self.protocol, self.tls) {
            (p, true) => p.name().to_string(),
            (p, false) => format!("plain_{}", p.name()),
        }
    }
}

impl fmt::Display for ListenerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tls = if self.tls { "+tls" } else { "" };
        write!(f, "{}{tls}={}", self.protocol.name(), self.addr)
    }
}

impl FromStr for ListenerSpec {
    type Err = ListenerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (proto, addr) = s
            .split_once('=')
            .ok_or_else(|| ListenerError::Shape(s.to_string()))?;
        let (name, tls) = match proto.strip_suffix("+tls") {
            Some(name) => (name, true),
            None => (proto, false),
        };
        let protocol = Protocol::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .ok_or_else(|| ListenerError::Protocol(s.to_string()))?;
        let addr = addr
            .parse()
            .map_err(|_| ListenerError::Address(s.to_string()))?;
        Ok(Self::new(protocol, addr, tls))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_through_their_text_form() {
        for text in [
            "mqtt+tls=0.0.0.0:8883",
            "mqtt=127.0.0.1:1883",
            "mqtt+tls=[::1]:8883",
        ] {
            let spec: ListenerSpec = text.parse().expect(text);
            assert_eq!(spec.to_string(), text);
        }
        let tls: ListenerSpec = "mqtt+tls=0.0.0.0:8883".parse().expect("tls");
        assert_eq!(tls.hub_port_key(), "mqtt");
        let plain: ListenerSpec = "mqtt=127.0.0.1:1883".parse().expect("plain");
        assert_eq!(plain.hub_port_key(), "plain_mqtt");
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        assert!(matches!(
            "mqtt".parse::<ListenerSpec>(),
            Err(ListenerError::Shape(_))
        ));
        assert!(matches!(
            "amqp+tls=0.0.0.0:5671".parse::<ListenerSpec>(),
            Err(ListenerError::Protocol(_))
        ));
        assert!(matches!(
            "mqtt=localhost".parse::<ListenerSpec>(),
            Err(ListenerError::Address(_))
        ));
    }
}
