//! Provisioning over WebSockets on the service's HTTPS port: `GET /$iothub/websocket` upgraded
//! with subprotocol `mqtt` (Python `websockets=True`, Node `MqttWs`) or `AMQPWSB10` (Node
//! `AmqpWs`) carries the MQTT or AMQP flow of `mqtt.rs` / `amqp.rs` unchanged. The WebSocket
//! framing is roost-http's sans-IO `WsSession` (the engine's port 443 uses it too); the bytes
//! it carries go through an in-memory pipe to the protocol's connection code.

use std::sync::Arc;

use hyper::StatusCode;
use roost_common::httpd::{self, PeerCerts, Req, Resp};
use roost_http::{Subprotocol, WsEvent, WsSession};
use roost_iothub::x509::ClientCert;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Provisioning;

/// The largest WebSocket frame taken: an AMQP frame of the listener's 64 KiB with room.
const MAX_FRAME: usize = 68 * 1024;

/// Whether `req` asks for a WebSocket on the device path.
pub fn is_upgrade(req: &hyper::http::request::Parts) -> bool {
    roost_http::upgrade::is_websocket_path(req.uri.path())
        && req
            .headers
            .get("upgrade")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

fn subprotocol(req: &Req) -> Option<Subprotocol> {
    req.headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| {
            if p.eq_ignore_ascii_case("mqtt") {
                Some(Subprotocol::Mqtt)
            } else if p.eq_ignore_ascii_case("AMQPWSB10") {
                Some(Subprotocol::Amqp)
            } else {
                None
            }
        })
}

/// Answers an upgrade request: `101` and the protocol served over the upgraded connection,
/// or why not.
pub fn upgrade(dps: Arc<Provisioning>, mut req: Req) -> Resp {
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    if req.method() != hyper::Method::GET || header("sec-websocket-version").as_deref() != Some("13") {
        return httpd::text(StatusCode::BAD_REQUEST, "a WebSocket upgrade is a GET with Sec-WebSocket-Version 13");
    }
    let Some(key) = header("sec-websocket-key") else {
        return httpd::text(StatusCode::BAD_REQUEST, "no Sec-WebSocket-Key");
    };
    let Some(protocol) = subprotocol(&req) else {
        return httpd::text(StatusCode::BAD_REQUEST, "the subprotocol must be mqtt or AMQPWSB10");
    };
    let cert = req
        .extensions()
        .get::<PeerCerts>()
        .map(|c| ClientCert::from_chain(&c.0));
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let io = hyper_util::rt::TokioIo::new(upgraded);
        carry(io, protocol, dps, cert).await;
    });
    let mut resp = httpd::empty(StatusCode::SWITCHING_PROTOCOLS);
    let h = resp.headers_mut();
    h.insert("upgrade", hyper::header::HeaderValue::from_static("websocket"));
    h.insert("connection", hyper::header::HeaderValue::from_static("Upgrade"));
    if let Ok(v) = hyper::header::HeaderValue::from_str(&roost_http::upgrade::accept_key(&key)) {
        h.insert("sec-websocket-accept", v);
    }
    h.insert(
        "sec-websocket-protocol",
        hyper::header::HeaderValue::from_static(protocol.name()),
    );
    resp
}

/// Carries the protocol's bytes in WebSocket frames both ways until either side ends.
async fn carry<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    protocol: Subprotocol,
    dps: Arc<Provisioning>,
    cert: Option<Result<ClientCert, roost_iothub::x509::CertError>>,
) {
    let (mut here, there) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn(async move {
        match protocol {
            Subprotocol::Mqtt => super::mqtt::connection(there, &dps, cert).await,
            Subprotocol::Amqp => super::amqp::connection(there, &dps, cert.and_then(Result::ok)).await,
        }
    });
    let mut ws = WsSession::new(MAX_FRAME);
    let (mut from_peer, mut from_protocol) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    'outer: loop {
        tokio::select! {
            read = io.read(&mut from_peer) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => ws.handle_bytes(&from_peer[..n]),
            },
            read = here.read(&mut from_protocol) => match read {
                Ok(0) | Err(_) => {
                    ws.close(roost_http::CloseCode::Normal);
                }
                Ok(n) => ws.send(&from_protocol[..n]),
            },
        }
        while let Some(event) = ws.poll_event() {
            match event {
                WsEvent::Data(bytes) => {
                    if here.write_all(&bytes).await.is_err() {
                        ws.close(roost_http::CloseCode::Normal);
                    }
                }
                WsEvent::Closed { .. } => {
                    while let Some(out) = ws.poll_transmit() {
                        let _ = io.write_all(&out).await;
                    }
                    break 'outer;
                }
            }
        }
        while let Some(out) = ws.poll_transmit() {
            if io.write_all(&out).await.is_err() {
                break 'outer;
            }
        }
    }
    let _ = io.shutdown().await;
    drop(here);
    let _ = served.await;
}
