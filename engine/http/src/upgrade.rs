//! The WebSocket opening handshake (RFC 6455 §4.2) as IoT Hub serves it on port 443: a GET on
//! `/$iothub/websocket` (or `/$servicebus/websocket`, with or without a trailing slash) asking
//! to upgrade to a WebSocket with subprotocol `mqtt` (any case; the C SDK sends `MQTT`) or
//! `AMQPWSB10`, answered with `101 Switching Protocols`, the accept key and the subprotocol
//! echoed (Node's `ws` and Python's `websocket-client` abort without it).

use base64::Engine as _;

use crate::head::Head;

/// What runs inside the WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subprotocol {
    Mqtt,
    Amqp,
}

impl Subprotocol {
    /// The name echoed in `Sec-WebSocket-Protocol`.
    pub fn name(self) -> &'static str {
        match self {
            Subprotocol::Mqtt => "mqtt",
            Subprotocol::Amqp => "AMQPWSB10",
        }
    }

    /// The `protocol` label of metrics.
    pub fn label(self) -> &'static str {
        match self {
            Subprotocol::Mqtt => "mqtt-ws",
            Subprotocol::Amqp => "amqp-ws",
        }
    }
}

/// Why an upgrade is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    #[error("a WebSocket upgrade is a GET")]
    NotGet,
    #[error("no WebSocket at {0:?} (use /$iothub/websocket)")]
    WrongPath(String),
    #[error("the request does not ask to upgrade to a WebSocket")]
    NotUpgrade,
    #[error("Sec-WebSocket-Version must be 13")]
    Version,
    #[error("Sec-WebSocket-Key must be 16 bytes in base64")]
    Key,
    #[error("no subprotocol this hub speaks was offered (mqtt, AMQPWSB10)")]
    NoSubprotocol,
}

impl UpgradeError {
    pub fn error_code(&self) -> &'static str {
        match self {
            UpgradeError::NotGet => "not_get",
            UpgradeError::WrongPath(_) => "wrong_path",
            UpgradeError::NotUpgrade => "not_upgrade",
            UpgradeError::Version => "bad_version",
            UpgradeError::Key => "bad_key",
            UpgradeError::NoSubprotocol => "no_subprotocol",
        }
    }

    /// The HTTP status it is answered with (426 carries `Sec-WebSocket-Version: 13`).
    pub fn status(&self) -> u16 {
        match self {
            UpgradeError::Version => 426,
            UpgradeError::WrongPath(_) => 404,
            _ => 400,
        }
    }
}

/// Whether `head` asks for a WebSocket at all (then [`accept`] says whether it gets one).
pub fn is_upgrade(head: &Head) -> bool {
    head.has_token("upgrade", "websocket")
}

/// The paths a WebSocket is served on.
pub fn is_websocket_path(path: &str) -> bool {
    matches!(
        path.trim_end_matches('/'),
        "/$iothub/websocket" | "/$servicebus/websocket"
    )
}

/// Checks an upgrade request; returns the subprotocol chosen and the `Sec-WebSocket-Accept`
/// value.
pub fn accept(head: &Head) -> Result<(Subprotocol, String), UpgradeError> {
    if head.method != "GET" {
        return Err(UpgradeError::NotGet);
    }
    if !is_websocket_path(head.path()) {
        return Err(UpgradeError::WrongPath(
            head.path().chars().take(100).collect(),
        ));
    }
    if !is_upgrade(head) || !head.has_token("connection", "upgrade") {
        return Err(UpgradeError::NotUpgrade);
    }
    if head.header("sec-websocket-version") != Some("13") {
        return Err(UpgradeError::Version);
    }
    let key = head.header("sec-websocket-key").ok_or(UpgradeError::Key)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| UpgradeError::Key)?;
    if decoded.len() != 16 {
        return Err(UpgradeError::Key);
    }
    let offered = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-protocol"))
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    let mut chosen = None;
    for p in offered {
        if p.eq_ignore_ascii_case("mqtt") {
            chosen = chosen.or(Some(Subprotocol::Mqtt));
        } else if p.eq_ignore_ascii_case("AMQPWSB10") {
            chosen = chosen.or(Some(Subprotocol::Amqp));
        }
    }
    let protocol = chosen.ok_or(UpgradeError::NoSubprotocol)?;
    Ok((protocol, accept_key(key)))
}

/// `base64(SHA-1(key + GUID))` (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// The `101 Switching Protocols` answer.
pub fn response(protocol: Subprotocol, accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        protocol.name()
    )
    .into_bytes()
}

/// The answer to a refused upgrade: its status, the reason as text, and the connection closed.
pub fn refusal(e: &UpgradeError) -> Vec<u8> {
    let reason = match e.status() {
        426 => "Upgrade Required",
        404 => "Not Found",
        _ => "Bad Request",
    };
    let body = e.to_string();
    let version = match e {
        UpgradeError::Version => "Sec-WebSocket-Version: 13\r\n",
        _ => "",
    };
    format!(
        "HTTP/1.1 {} {reason}\r\n{version}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        e.status(),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::{parse, HeadLimits};

    fn head(raw: &str) -> Head {
        parse(raw.as_bytes(), HeadLimits::default())
            .expect("the expected value")
            .expect("the expected value")
    }

    #[test]
    fn the_accept_key_is_rfc_6455s() {
        // The example of RFC 6455 §1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn iot_hubs_subprotocols_are_chosen_and_the_rest_refused() {
        let req = |path: &str, protocols: &str| {
            head(&format!(
                "GET {path} HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocols}\r\n\r\n"
            ))
        };
        assert_eq!(
            accept(&req("/$iothub/websocket", "mqtt"))
                .expect("the expected value")
                .0,
            Subprotocol::Mqtt
        );
        assert_eq!(
            accept(&req(
                "/$iothub/websocket?iothub-no-client-cert=true",
                "MQTT"
            ))
            .expect("the expected value")
            .0,
            Subprotocol::Mqtt
        );
        assert_eq!(
            accept(&req("/$servicebus/websocket/", "AMQPWSB10"))
                .expect("the expected value")
                .0,
            Subprotocol::Amqp
        );
        assert_eq!(
            accept(&req("/$iothub/websocket", "chat, superchat")),
            Err(UpgradeError::NoSubprotocol)
        );
        assert!(matches!(
            accept(&req("/other", "mqtt")),
            Err(UpgradeError::WrongPath(_))
        ));
        let old = head("GET /$iothub/websocket HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n");
        assert_eq!(accept(&old), Err(UpgradeError::Version));
        assert!(String::from_utf8(refusal(&UpgradeError::Version))
            .expect("the expected value")
            .contains("Sec-WebSocket-Version: 13"));
        let short = head("GET /$iothub/websocket HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n");
        assert_eq!(accept(&short), Err(UpgradeError::Key));
        let r = String::from_utf8(response(Subprotocol::Amqp, "abc")).expect("the expected value");
        assert!(
            r.starts_with("HTTP/1.1 101 ") && r.contains("Sec-WebSocket-Protocol: AMQPWSB10\r\n")
        );
    }
}
