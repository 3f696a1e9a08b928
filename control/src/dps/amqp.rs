//! The provisioning service over AMQP 1.0, as the Node `azure-iot-provisioning-device-amqp`
//! transport speaks it: TLS, then SASL PLAIN with username `{idScope}/registrations/
//! {registrationId}` and a registration token as password — or no SASL at all and the TLS
//! client certificate — then a sender and a receiver link on the address
//! `{idScope}/registrations/{registrationId}`. Requests carry the application property
//! `iotdps-operation-type` (`iotdps-register` with the register body in a data section,
//! `iotdps-get-operationstatus` with `iotdps-operation-id`) and a `correlation-id` the answer
//! echoes; the answer's body is the JSON of the MQTT and HTTPS flows, in a data section.
//!
//! The AMQP state machine is roost-amqp's (the engine's).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use roost_amqp::{
    AmqpError, Body, Config, Connection, DeliveryState, Event, LinkId, Message, Properties, Role,
    Value,
};
use roost_iothub::x509::ClientCert;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use roost_iothub::dps::{parse_address, parse_plain};

use super::{answer_status, DpsError, Proof, Provisioning, Registrant};

/// Requests a device may have unanswered (the credit of its sending link).
const CREDIT: u32 = 8;
/// Answers held for a receiver that gives no credit; past it the connection is closed.
const MAX_REPLIES: usize = 64;

/// Serves the provisioning service's AMQP port.
pub async fn serve(dps: Arc<Provisioning>, listener: tokio::net::TcpListener, tls: tokio_rustls::TlsAcceptor) {
    super::accept_tls(listener, tls, move |stream, cert| {
        let dps = dps.clone();
        async move { connection(stream, &dps, cert.and_then(Result::ok)).await }
    })
    .await;
}

pub(super) async fn connection<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, dps: &Arc<Provisioning>, cert: Option<ClientCert>) {
    let config = Config {
        container_id: format!("roost-dps-{}", dps.config.hostname),
        sasl_mechanisms: vec!["PLAIN".into()],
        max_message_size: 64 * 1024,
        ..Config::default()
    };
    let mut conn = Connection::new(config, Instant::now());
    let mut registrant: Option<Registrant> = None;
    let mut reply_link: Option<LinkId> = None;
    let mut replies: VecDeque<Message> = VecDeque::new();
    let mut next_tag: u64 = 0;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while let Some(event) = conn.poll_event() {
            match event {
                Event::SaslInit { mechanism, initial_response, .. } => {
                    let parsed = (mechanism == "PLAIN")
                        .then(|| initial_response.as_deref().and_then(parse_plain))
                        .flatten();
                    let ok = match parsed {
                        Some((scope, registration, token)) => {
                            let r = Registrant { scope, registration, proof: Proof::Token(token) };
                            let checked = r.blocking(dps, |d, s, reg, c| d.check(s, reg, c)).await;
                            if let Err(e) = &checked {
                                dps.metrics.dps_registrations.with_label_values(&[e.reason, "none"]).inc();
                            }
                            registrant = checked.is_ok().then_some(r);
                            registrant.is_some()
                        }
                        None => false,
                    };
                    conn.sasl_outcome(ok);
                }
                Event::Opened { .. } => {}
                Event::Attach { link, attach } => {
                    let address = match attach.role {
                        Role::Sender => attach.target.as_ref(),
                        Role::Receiver => attach.source.as_ref(),
                    }
                    .and_then(|t| t.address.as_ref())
                    .map(|a| a.as_str().to_string())
                    .unwrap_or_default();
                    let Some((scope, registration)) = parse_address(&address) else {
                        conn.refuse_attach(link, &attach, AmqpError::new("amqp:not-found", "not a registration address"));
                        continue;
                    };
                    if let (None, Some(cert)) = (&registrant, &cert) {
                        // No SASL: the certificate proves the registration the address names.
                        let r = Registrant {
                            scope: scope.clone(),
                            registration: registration.clone(),
                            proof: Proof::Certificate(cert.clone()),
                        };
                        match r.blocking(dps, |d, s, reg, c| d.check(s, reg, c)).await {
                            Ok(()) => registrant = Some(r),
                            Err(e) => dps.metrics.dps_registrations.with_label_values(&[e.reason, "none"]).inc(),
                        }
                    }
                    let ours = registrant.as_ref().is_some_and(|r| r.scope == scope && r.registration == registration);
                    if !ours {
                        conn.refuse_attach(link, &attach, AmqpError::new("amqp:unauthorized-access", "this connection did not prove that registration"));
                        continue;
                    }
                    match attach.role {
                        Role::Sender => conn.accept_attach(link, &attach, CREDIT),
                        Role::Receiver => {
                            reply_link = Some(link);
                            conn.accept_attach(link, &attach, 0);
                        }
                    }
                }
                Event::Credit { .. } => {}
                Event::Delivery { link, delivery_id, payload, settled, .. } => {
                    let answer = match (&registrant, Message::read(&payload)) {
                        (Some(r), Ok(m)) => Some(request(dps, r, &m).await),
                        _ => None,
                    };
                    if !settled {
                        let state = match answer {
                            Some(_) => DeliveryState::Accepted,
                            None => DeliveryState::Rejected(Some(AmqpError::new("amqp:decode-error", "not a provisioning request"))),
                        };
                        conn.disposition(link.channel, delivery_id, delivery_id, true, state);
                    }
                    if let Some(a) = answer {
                        replies.push_back(a);
                    }
                    if replies.len() > MAX_REPLIES {
                        conn.close(Some(AmqpError::new(
                            "amqp:resource-limit-exceeded",
                            "answers are waiting for credit the receiver does not give",
                        )));
                        continue;
                    }
                    conn.grant(link, CREDIT);
                }
                Event::Disposition { .. } | Event::Detached { .. } => {}
                Event::Closed { .. } => {
                    while let Some(out) = conn.poll_transmit() {
                        let _ = stream.write_all(&out).await;
                    }
                    let _ = stream.shutdown().await;
                    return;
                }
            }
        }
        if let Some(link) = reply_link {
            while conn.credit(link) > 0 {
                let Some(m) = replies.pop_front() else { break };
                let mut out = BytesMut::new();
                m.write(&mut out);
                next_tag += 1;
                if conn.send(link, Bytes::copy_from_slice(&next_tag.to_be_bytes()), out.freeze(), true).is_err() {
                    break;
                }
            }
        }
        while let Some(out) = conn.poll_transmit() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
        }
        let deadline = conn.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => conn.handle_bytes(Instant::now(), &buf[..n]),
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                conn.handle_timeout(Instant::now());
            }
        }
    }
}

fn app_property<'a>(m: &'a Message, key: &str) -> Option<&'a str> {
    m.application_properties
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .and_then(|(_, v)| v.as_str())
}

/// Answers one request message.
async fn request(dps: &Arc<Provisioning>, r: &Registrant, m: &Message) -> Message {
    let correlation = m.properties.as_ref().map(|p| p.correlation_id.clone()).unwrap_or(Value::Null);
    let result = match app_property(m, "iotdps-operation-type") {
        Some("iotdps-register") => {
            let body: serde_json::Value = match &m.body {
                Body::Data(chunks) => {
                    let bytes: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
                    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
                }
                _ => serde_json::Value::Null,
            };
            if body.get("registrationId").and_then(serde_json::Value::as_str) != Some(r.registration.as_str()) {
                Err(DpsError::bad_request("bad_body", "registrationId does not match the link's"))
            } else {
                let payload = body.get("payload").cloned();
                r.blocking(dps, move |d, s, reg, c| d.register(s, reg, c, payload)).await
            }
        }
        Some("iotdps-get-operationstatus") => {
            let op = app_property(m, "iotdps-operation-id").unwrap_or_default().to_string();
            r.blocking(dps, move |d, s, reg, c| d.operation(s, reg, &op, c)).await
        }
        _ => Err(DpsError::bad_request("bad_request", "iotdps-operation-type must be iotdps-register or iotdps-get-operationstatus")),
    };
    let (body, status, retry) = match result {
        Ok(v) => {
            let (status, retry) = answer_status(&v);
            (v, status, retry)
        }
        Err(e) => (e.body(), e.status, None),
    };
    let mut application_properties = vec![(Value::String("iotdps-status".into()), Value::String(status.to_string().into()))];
    if let Some(s) = retry {
        application_properties.push((Value::String("retry-after".into()), Value::String(s.to_string().into())));
    }
    Message {
        properties: Some(Properties {
            correlation_id: correlation,
            content_type: Some("application/json".into()),
            ..Properties::default()
        }),
        application_properties,
        body: Body::Data(vec![Bytes::from(body.to_string())]),
        ..Message::default()
    }
}
