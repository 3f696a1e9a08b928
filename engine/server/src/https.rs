//! Port 443 (`https` listener): one TLS listener on every shard that tells its protocols apart
//! after the handshake by the HTTP request head (issue 11). A WebSocket upgrade on
//! `/$iothub/websocket` with subprotocol `mqtt` becomes an MQTT connection over the same
//! `Wire` (the MQTT adapter, `conn.rs`, with the stream carried in WebSocket frames); with
//! `AMQPWSB10` (on `/$iothub/websocket` or `/$servicebus/websocket`) the stream is tunnelled to
//! the AMQP listener's thread, where it is an AMQP connection like one on 5671. Plain requests
//! are the HTTPS device API (`https_device.rs`: telemetry, and C2D with lock tokens) or the
//! service REST API (`https_service.rs`: forwarded to control over the link), told apart per
//! request on kept-alive connections.
//!
//! Bounded like every pre-authentication path: the connection holds its pre-authentication
//! slot, the TLS handshake has its deadline, and the request head must be whole within 8 KiB
//! and 10 s.

use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use futures_lite::future;
use roost_http::{head, upgrade, Subprotocol, WsSession};
use roost_session::{DisconnectReason, PreAuthSlot};

use crate::conn;
use crate::metrics::Transport;
use crate::shard::Shard;
use crate::wire::Wire;

/// Time for the request head after the TLS handshake.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one accepted connection on port 443 until it is handed to a protocol adapter or
/// answered and closed.
pub async fn serve(shard: Rc<Shard>, mut wire: Wire, pre_auth: PreAuthSlot) {
    let mut input = BytesMut::new();
    let handshake = async { Some(wire.handshake(&shard.rx, &mut input).await) };
    let timeout = async {
        glommio::timer::Timer::new(conn::HANDSHAKE_TIMEOUT).await;
        None
    };
    let disconnects = &shard.metrics.of(Transport::Https).disconnects;
    match future::or(handshake, timeout).await {
        Some(Ok(())) => {}
        Some(Err(_)) => return disconnects.inc(DisconnectReason::TlsHandshakeFailed.error_code()),
        None => return disconnects.inc(DisconnectReason::TlsHandshakeTimeout.error_code()),
    }
    let head = match read_head(&shard, &mut wire, &mut input).await {
        Ok(head) => head,
        Err(Some(e)) => {
            shard
                .shared
                .metrics
                .https_requests
                .with_label_values(&["head", e.error_code()])
                .inc();
            let body = error_body(e.status(), "BadRequest", &e.to_string());
            return answer(wire, &body).await;
        }
        Err(None) => return disconnects.inc(DisconnectReason::ClosedBeforeConnect.error_code()),
    };
    let rest = input.split_off(head.len);
    if upgrade::is_upgrade(&head) {
        return websocket(shard, wire, pre_auth, &head, &rest).await;
    }
    requests(shard, wire, pre_auth, head, rest).await;
}

/// How long a kept-alive connection may sit between requests, and a body may take to arrive.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves plain HTTP requests on a kept-alive connection: the HTTPS device API
/// (`https_device.rs`) or the service API (`https_service.rs`). The token is checked from the
/// headers before a body is read: a request refused before its body was read is answered and
/// the connection closed, with nothing of the body held (and nothing known of what follows it
/// on the stream).
async fn requests(
    shard: Rc<Shard>,
    mut wire: Wire,
    mut pre_auth: PreAuthSlot,
    mut head: head::Head,
    mut input: BytesMut,
) {
    loop {
        let service = crate::https_service::is_service(&head);
        let served = match service {
            true => {
                crate::https_service::request(&shard, &mut wire, &mut pre_auth, &head, &mut input)
                    .await
            }
            false => device_request(&shard, &mut wire, &mut pre_auth, &head, &mut input).await,
        };
        let (answer, in_step) = match served {
            Ok(answer) => (answer, true),
            Err(refused) => (refused, false),
        };
        let route = match service {
            true => "service",
            false => route_of(head.path()),
        };
        shard
            .shared
            .metrics
            .https_requests
            .with_label_values(&[route, &answer.status.to_string()])
            .inc();
        let bytes = match (&answer.error, &answer.message) {
            (Some((code, message)), _) => error_body(answer.status, code, message),
            (None, Some((headers, body))) => with_body(answer.status, headers, body, !in_step),
            (None, None) => format!("HTTP/1.1 {} No Content\r\n\r\n", answer.status).into_bytes(),
        };
        if !in_step {
            return refuse(&shard, wire, &bytes, &head, input.len()).await;
        }
        if head.has_token("connection", "close") {
            return self::answer(wire, &bytes).await;
        }
        if wire.write_all(&bytes).await.is_err() {
            return;
        }
        match next_request(&shard, &mut wire, &mut input).await {
            Some(h) => {
                head = h;
                input = input.split_off(head.len);
            }
            None => return,
        }
    }
}

/// One request of the HTTPS device API: `Err` when it is refused before its body was read
/// (unknown route, wrong method, a token refused, a body that cannot be taken), `Ok` once it
/// was read whole and answered.
async fn device_request(
    shard: &Shard,
    wire: &mut Wire,
    pre_auth: &mut PreAuthSlot,
    head: &head::Head,
    input: &mut BytesMut,
) -> Result<crate::https_device::Answer, crate::https_device::Answer> {
    use crate::https_device::{self, Answer, Route};
    use roost_model::link::C2dOutcome;
    let route = https_device::route(head.path());
    let refuse_method = |what: &str| Err(Answer::err(405, "MethodNotAllowed", what.to_string()));
    // The identity the path names, and for a settlement its outcome.
    let (device_id, module_id, outcome) = match (&route, head.method.as_str()) {
        // `https_service::is_service` took every other path.
        (Route::Other, _) => return Err(Answer::err(404, "IotHubNotFound", "no such route")),
        (
            Route::Events {
                device_id,
                module_id,
            },
            "POST",
        ) => (device_id, module_id.as_deref(), None),
        (Route::Receive { device_id }, "GET") => (device_id, None, None),
        (Route::Events { .. }, _) => return refuse_method("telemetry is a POST"),
        (Route::Receive { .. }, _) => return refuse_method("a receive is a GET"),
        (
            Route::Settle {
                device_id,
                abandon: false,
                ..
            },
            "DELETE",
        ) => {
            let reject = head
                .query()
                .split('&')
                .any(|p| p == "reject" || p.starts_with("reject="));
            let outcome = match reject {
                true => C2dOutcome::Reject,
                false => C2dOutcome::Complete,
            };
            (device_id, None, Some(outcome))
        }
        (
            Route::Settle {
                device_id,
                abandon: true,
                ..
            },
            "POST",
        ) => (device_id, None, Some(C2dOutcome::Abandon)),
        (Route::Settle { .. }, _) => {
            return refuse_method("complete and reject are a DELETE, abandon a POST")
        }
        (Route::Files { device_id, .. }, "POST") => (device_id, None, None),
        (Route::Files { .. }, _) => return refuse_method("file upload requests are POSTs"),
    };
    let cert = wire.client_certs();
    let identity = https_device::authenticate(shard, head, device_id, module_id, cert)?;
    pre_auth.release();
    Ok(match (&route, outcome) {
        (Route::Events { .. }, _) => {
            let body = read_body(shard, wire, head, input, https_device::MAX_BODY).await?;
            https_device::telemetry(shard, head, &identity, body).await
        }
        (Route::Settle { lock, .. }, Some(outcome)) => {
            // A POST may carry an (empty) body: take it before the next request.
            if head::is_chunked(head) || head.content_length().ok().flatten().unwrap_or(0) > 0 {
                read_body(shard, wire, head, input, https_device::MAX_BODY).await?;
            }
            https_device::settle(shard, device_id, lock, outcome).await
        }
        (
            Route::Files {
                notification,
                correlation_id,
                ..
            },
            _,
        ) => {
            let body = read_body(shard, wire, head, input, https_device::FILES_BODY).await?;
            let body = body.to_vec();
            https_device::files(shard, device_id, *notification, correlation_id.as_deref(), body)
                .await
        }
        _ => https_device::receive(shard, device_id).await,
    })
}

/// The next request's head on a kept-alive connection, within the idle timeout; `None` when
/// the connection is over (the peer left, went quiet, or sent a bad head, which is answered).
async fn next_request(shard: &Shard, wire: &mut Wire, input: &mut BytesMut) -> Option<head::Head> {
    let next = async { read_head(shard, wire, input).await };
    let idle = async {
        glommio::timer::Timer::new(IDLE_TIMEOUT).await;
        Err(None)
    };
    match future::or(next, idle).await {
        Ok(h) => Some(h),
        Err(Some(e)) => {
            let body = error_body(e.status(), "BadRequest", &e.to_string());
            let _ = wire.write_all(&body).await;
            let _ = wire.close().await;
            None
        }
        Err(None) => {
            let _ = wire.close().await;
            None
        }
    }
}

/// An answer with headers and a body (a C2D message, or the service API's answer), and
/// `Connection: close` when the connection ends after it.
fn with_body(status: u16, headers: &[(String, String)], body: &[u8], closing: bool) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        // A value with a line break would split the head; control never sends one.
        if !value.contains(['\r', '\n']) {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    if closing {
        out.push_str("Connection: close\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Reads a chunked body (at most `max` bytes of data).
async fn read_chunked(
    shard: &Shard,
    wire: &mut Wire,
    input: &mut BytesMut,
    max: usize,
) -> Result<bytes::Bytes, crate::https_device::Answer> {
    use crate::https_device::Answer;
    let reading = async {
        loop {
            match head::dechunk(input, max) {
                Ok(Some((data, used))) => {
                    let _ = input.split_to(used);
                    return Ok(bytes::Bytes::from(data));
                }
                Ok(None) => {}
                Err(head::HeadError::TooLarge(max)) => {
                    return Err(Answer::err(
                        413,
                        "RequestEntityTooLarge",
                        format!("the body is over {max} bytes"),
                    ))
                }
                Err(e) => return Err(Answer::err(400, "ArgumentInvalid", e.to_string())),
            }
            match wire.read(&shard.rx, input).await {
                Ok(n) if n > 0 => {}
                _ => {
                    return Err(Answer::err(
                        408,
                        "RequestTimeout",
                        "the body did not arrive",
                    ))
                }
            }
        }
    };
    let late = async {
        glommio::timer::Timer::new(IDLE_TIMEOUT).await;
        Err(Answer::err(
            408,
            "RequestTimeout",
            "the body did not arrive",
        ))
    };
    future::or(reading, late).await
}

/// Reads a request's body (`Content-Length` bytes, or chunks, at most `max`), with what came
/// behind the head first.
pub(crate) async fn read_body(
    shard: &Shard,
    wire: &mut Wire,
    head: &head::Head,
    input: &mut BytesMut,
    max: usize,
) -> Result<bytes::Bytes, crate::https_device::Answer> {
    use crate::https_device::Answer;
    if head::is_chunked(head) {
        return read_chunked(shard, wire, input, max).await;
    }
    let len = match head.content_length() {
        Ok(Some(n)) => n,
        Ok(None) => {
            return Err(Answer::err(
                411,
                "LengthRequired",
                "a body needs Content-Length",
            ))
        }
        Err(e) => return Err(Answer::err(400, "ArgumentInvalid", e.to_string())),
    };
    if len > max {
        return Err(Answer::err(
            413,
            "RequestEntityTooLarge",
            format!("the body is over {max} bytes"),
        ));
    }
    let reading = async {
        while input.len() < len {
            match wire.read(&shard.rx, input).await {
                Ok(n) if n > 0 => {}
                _ => return false,
            }
        }
        true
    };
    let late = async {
        glommio::timer::Timer::new(IDLE_TIMEOUT).await;
        false
    };
    if !future::or(reading, late).await {
        return Err(Answer::err(
            408,
            "RequestTimeout",
            "the body did not arrive",
        ));
    }
    Ok(input.split_to(len).freeze())
}

/// A bounded label for a request path.
fn route_of(path: &str) -> &'static str {
    if path.starts_with("/devices/") {
        "device"
    } else if path.starts_with("/$iothub") || path.starts_with("/$servicebus") {
        "websocket_path"
    } else {
        "other"
    }
}

/// Reads until the request head is whole: `Err(None)` when the peer left or the time ran out.
async fn read_head(
    shard: &Shard,
    wire: &mut Wire,
    input: &mut BytesMut,
) -> Result<head::Head, Option<head::HeadError>> {
    let deadline = glommio::timer::Timer::new(HEAD_TIMEOUT);
    let reading = async {
        loop {
            if let Some(h) = head::parse(input, head::HeadLimits::default()).map_err(Some)? {
                return Ok(h);
            }
            match wire.read(&shard.rx, input).await {
                Ok(n) if n > 0 => {}
                _ => return Err(None),
            }
        }
    };
    future::or(reading, async {
        deadline.await;
        Err(None)
    })
    .await
}

/// Upgrades to a WebSocket and hands the connection to its protocol's adapter.
async fn websocket(
    shard: Rc<Shard>,
    mut wire: Wire,
    pre_auth: PreAuthSlot,
    head: &head::Head,
    early: &[u8],
) {
    let upgrades = &shard.shared.metrics.ws_upgrades;
    let (protocol, key) = match upgrade::accept(head) {
        Ok(accepted) => accepted,
        Err(e) => {
            upgrades.with_label_values(&[e.error_code()]).inc();
            return answer(wire, &upgrade::refusal(&e)).await;
        }
    };
    let tunnels = shard.shared.amqp_tunnels.clone();
    if protocol == Subprotocol::Amqp && tunnels.is_none() {
        upgrades.with_label_values(&["not_served"]).inc();
        let body = error_body(
            501,
            "NotImplemented",
            "this engine runs no AMQP listener (--amqp)",
        );
        return answer(wire, &body).await;
    }
    upgrades.with_label_values(&[protocol.label()]).inc();
    if wire
        .write_all(&upgrade::response(protocol, &key))
        .await
        .is_err()
    {
        return;
    }
    let mut rbuf = BytesMut::new();
    let max_frame = match protocol {
        Subprotocol::Mqtt => conn::WS_FRAME_BEFORE_CONNECT,
        Subprotocol::Amqp => AMQP_WS_FRAME,
    };
    let ws = WsSession::new(max_frame);
    if wire.start_websocket(ws, early, &mut rbuf).is_err() {
        return shard
            .metrics
            .of(Transport::Https)
            .disconnects
            .inc(DisconnectReason::ClosedBeforeConnect.error_code());
    }
    match (protocol, tunnels) {
        (Subprotocol::Amqp, Some(tunnels)) => tunnel(shard, wire, pre_auth, rbuf, tunnels).await,
        _ => conn::serve_established(shard, wire, pre_auth, rbuf, Transport::MqttWs).await,
    }
}

/// The WebSocket frame limit for AMQP: one frame of the listener's AMQP max-frame-size (64 KiB)
/// with room for a client that writes a few small frames in one message.
const AMQP_WS_FRAME: usize = 64 * 1024 + 4 * 1024;

/// Hands an AMQP-over-WebSocket connection to the AMQP listener's thread and pumps the stream
/// both ways until either side ends: the socket, TLS and WebSocket framing stay on this shard,
/// the AMQP connection (the same as on 5671) runs there.
async fn tunnel(
    shard: Rc<Shard>,
    mut wire: Wire,
    pre_auth: PreAuthSlot,
    mut input: BytesMut,
    tunnels: tokio::sync::mpsc::UnboundedSender<crate::amqp::Tunnel>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (here, there) = tokio::io::duplex(64 * 1024);
    let handed = tunnels.send(crate::amqp::Tunnel {
        stream: there,
        client_certs: wire.client_certs().map(<[_]>::to_vec),
        slot: pre_auth,
    });
    if handed.is_err() {
        return answer(wire, &[]).await;
    }
    // One direction never waits on the other: while the peer's bytes wait for room in the
    // tunnel, what the AMQP side sends is still taken and written out.
    let (mut from_amqp, mut to_amqp) = tokio::io::split(here);
    let mut back = vec![0u8; 16 * 1024];
    loop {
        enum Turn {
            In(Result<usize, crate::wire::WireError>),
            Wrote(std::io::Result<usize>),
            Out(std::io::Result<usize>),
        }
        let turn = {
            let out = async { Turn::Out(from_amqp.read(&mut back).await) };
            if input.is_empty() {
                let peer = async { Turn::In(wire.read(&shard.rx, &mut input).await) };
                future::or(peer, out).await
            } else {
                let write = async { Turn::Wrote(to_amqp.write(&input).await) };
                future::or(write, out).await
            }
        };
        match turn {
            Turn::In(Ok(n)) if n > 0 => {}
            Turn::Wrote(Ok(n)) if n > 0 => {
                let _ = input.split_to(n);
            }
            Turn::Out(Ok(n)) if n > 0 => {
                if wire.write_all(&back[..n]).await.is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    let _ = to_amqp.shutdown().await;
    let _ = wire.close().await;
}

/// An error answer with IoT Hub's body (`{"Message":"ErrorCode:…;…","ExceptionMessage":""}`),
/// the connection closed after it.
fn error_body(status: u16, code: &str, message: &str) -> Vec<u8> {
    let body = format!(
        r#"{{"Message":"ErrorCode:{code};{}","ExceptionMessage":""}}"#,
        message.replace('"', "'")
    );
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json; charset=utf-8\r\niothub-errorcode: {code}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    )
    .into_bytes()
}

/// How much of a refused request's body is read and dropped before the connection closes, and
/// for how long at most.
const DRAIN_MAX: usize = 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Answers a request refused before its body was read, then closes. A client that sends its
/// body without waiting for an answer (most do) would see its connection reset if it were
/// closed with that body unread; so up to [`DRAIN_MAX`] bytes of what it announced (`held`
/// came already) are read and dropped, within [`DRAIN_TIME`]: it gets to read the answer.
/// Nothing is kept: each read lands in the shard's buffer and is cleared.
async fn refuse(shard: &Shard, mut wire: Wire, bytes: &[u8], head: &head::Head, held: usize) {
    let announced = match head.content_length() {
        Ok(n) => n.unwrap_or(0),
        Err(_) if head::is_chunked(head) => DRAIN_MAX,
        Err(_) => 0,
    };
    let send = async {
        if wire.write_all(bytes).await.is_err() {
            return;
        }
        let mut left = announced.min(DRAIN_MAX).saturating_sub(held);
        let mut sink = BytesMut::new();
        while left > 0 {
            match wire.read(&shard.rx, &mut sink).await {
                Ok(n) if n > 0 => {
                    left = left.saturating_sub(n);
                    sink.clear();
                }
                _ => break,
            }
        }
        let _ = wire.close().await;
    };
    let give_up = async {
        glommio::timer::Timer::new(DRAIN_TIME).await;
    };
    future::or(send, give_up).await;
}

/// A status line's reason phrase (clients read the code; the phrase is for people).
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

/// Writes `bytes` and closes, within the close timeout.
async fn answer(mut wire: Wire, bytes: &[u8]) {
    let send = async {
        let _ = wire.write_all(bytes).await;
        let _ = wire.close().await;
    };
    let give_up = async {
        glommio::timer::Timer::new(Duration::from_secs(2)).await;
    };
    future::or(send, give_up).await;
}
