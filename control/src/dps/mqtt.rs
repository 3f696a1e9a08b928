//! The provisioning service over MQTT (wire spec §7): a device connects over TLS with client id
//! = its registration id, username `{idScope}/registrations/{registrationId}/api-version=…`,
//! and a registration SAS token as password (or none, and its client certificate), subscribes
//! to `$dps/registrations/res/#`, publishes `$dps/registrations/PUT/iotdps-register/?$rid=…`
//! and then `$dps/registrations/GET/iotdps-get-operationstatus/?$rid=…&operationId=…`; each
//! is answered on `$dps/registrations/res/{status}/?$rid=…[&retry-after=…]` with a JSON body.
//!
//! The MQTT state machine is roost-mqtt's (the engine's); the credential is checked at CONNECT
//! against the enrollments and again, with the enrollments as they are then, at each request.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use roost_iothub::x509::ClientCert;
use roost_mqtt::{
    check, ConnectReturnCode, Event, Limits, QoS, ServerSession, SessionConfig, State, Str,
    SubackCode,
};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use roost_iothub::dps::{parse_request, parse_username, response_topic};

use super::{answer_status, DpsError, Proof, Provisioning, Registrant};


/// Serves the provisioning service's MQTT port.
pub async fn serve(dps: Arc<Provisioning>, listener: tokio::net::TcpListener, tls: tokio_rustls::TlsAcceptor) {
    super::accept_tls(listener, tls, move |stream, cert| {
        let dps = dps.clone();
        async move { connection(stream, &dps, cert).await }
    })
    .await;
}

pub(super) async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    dps: &Arc<Provisioning>,
    cert: Option<Result<ClientCert, roost_iothub::x509::CertError>>,
) {
    let config = SessionConfig {
        limits: Limits { max_frame: 64 * 1024 },
        ..SessionConfig::default()
    };
    let mut session = ServerSession::new(Instant::now(), config);
    let mut registrant: Option<Registrant> = None;
    let mut cert = cert;
    let mut input = BytesMut::with_capacity(4096);
    let mut output = BytesMut::new();
    loop {
        // Frames already read.
        loop {
            match check(&input, session.limits()) {
                Ok(Some(len)) => {
                    let frame = input.split_to(len).freeze();
                    if session.handle_frame(Instant::now(), frame).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    session.handle_decode_error(e);
                    break;
                }
            }
        }
        while let Some(event) = session.poll_event() {
            match event {
                Event::Connect(c) => {
                    let verdict = admit(dps, &c, cert.take()).await;
                    match verdict {
                        Ok(r) => {
                            registrant = Some(r);
                            session.accept(false);
                        }
                        Err(code) => session.refuse(code),
                    }
                }
                Event::Subscribe(s) => {
                    let codes: Vec<SubackCode> = s
                        .filters
                        .iter()
                        .map(|(f, q)| match f.as_str() {
                            "$dps/registrations/res/#" => SubackCode::Granted(if *q == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce }),
                            _ => SubackCode::Failure,
                        })
                        .collect();
                    session.grant_subscribe(s.pkid, &codes);
                }
                Event::Unsubscribe(u) => session.ack_unsubscribe(u.pkid),
                Event::Publish(p) => {
                    if p.qos == QoS::AtLeastOnce {
                        session.ack_publish(p.pkid);
                    }
                    let Some(r) = &registrant else { continue };
                    let (topic, body) = request(dps, r, p.topic.as_str(), p.payload).await;
                    let _ = session.send_publish(Str::from(topic), Bytes::from(body), QoS::AtMostOnce, false);
                }
                Event::Disconnect => return,
                Event::PubAck(_) => {}
            }
        }
        if session.poll_transmit(&mut output) {
            if stream.write_all(&output).await.is_err() {
                return;
            }
            output.clear();
        }
        if session.state() == State::Closed {
            let _ = stream.shutdown().await;
            return;
        }
        session.release_idle_memory();
        let deadline = session.poll_timeout().map(tokio::time::Instant::from_std);
        let read = stream.read_buf(&mut input);
        let outcome = match deadline {
            Some(d) => match tokio::time::timeout_at(d, read).await {
                Ok(r) => Some(r),
                Err(_) => None,
            },
            None => Some(read.await),
        };
        match outcome {
            Some(Ok(0)) | Some(Err(_)) => return,
            Some(Ok(_)) => {}
            None => {
                if session.handle_timeout(Instant::now()).is_err() {
                    return;
                }
            }
        }
    }
}

/// Checks a CONNECT: the username names the scope and registration, the client id is the
/// registration id, and the password (a token) or the certificate proves it is enrolled.
async fn admit(
    dps: &Arc<Provisioning>,
    c: &roost_mqtt::Connect,
    cert: Option<Result<ClientCert, roost_iothub::x509::CertError>>,
) -> Result<Registrant, ConnectReturnCode> {
    let username = c.username.as_ref().map(|u| u.as_str().to_string()).unwrap_or_default();
    let Some((scope, registration)) = parse_username(&username) else {
        return Err(ConnectReturnCode::BadUsernameOrPassword);
    };
    if c.client_id.as_str() != registration {
        return Err(ConnectReturnCode::IdentifierRejected);
    }
    // With a password the token is the proof; without one, the certificate.
    let proof = match (&c.password, cert) {
        (Some(p), _) => Proof::Token(
            String::from_utf8(p.to_vec()).map_err(|_| ConnectReturnCode::BadUsernameOrPassword)?,
        ),
        (None, Some(Ok(c))) => Proof::Certificate(c),
        (None, Some(Err(_)) | None) => return Err(ConnectReturnCode::NotAuthorized),
    };
    let r = Registrant {
        scope: scope.to_string(),
        registration: registration.to_string(),
        proof,
    };
    match r.blocking(dps, |d, s, reg, c| d.check(s, reg, c)).await {
        Ok(()) => Ok(r),
        Err(e) => {
            dps.metrics.dps_registrations.with_label_values(&[e.reason, "none"]).inc();
            Err(ConnectReturnCode::NotAuthorized)
        }
    }
}

/// Serves one request publish: the answer's topic and body.
async fn request(dps: &Arc<Provisioning>, r: &Registrant, topic: &str, payload: Bytes) -> (String, Vec<u8>) {
    let Some((kind, rid, operation)) = parse_request(topic) else {
        let e = DpsError::bad_request("bad_topic", "not a provisioning request topic");
        return (response_topic(400, "", None), e.body().to_string().into_bytes());
    };
    let result = r
        .blocking(dps, move |d, scope, registration, credential| match kind {
            "register" => {
                let body: Value = serde_json::from_slice(&payload)
                    .map_err(|e| DpsError::bad_request("bad_body", format!("the body must be JSON: {e}")))?;
                if body.get("registrationId").and_then(Value::as_str) != Some(registration) {
                    return Err(DpsError::bad_request("bad_body", "registrationId does not match the connection's"));
                }
                d.register(scope, registration, credential, body.get("payload").cloned())
            }
            _ => d.operation(scope, registration, &operation.unwrap_or_default(), credential),
        })
        .await;
    match result {
        Ok(body) => {
            let (status, retry) = answer_status(&body);
            (response_topic(status, &rid, retry), body.to_string().into_bytes())
        }
        Err(e) => (response_topic(e.status, &rid, None), e.body().to_string().into_bytes()),
    }
}
