//! The HTTPS device API on port 443 (spec §3), telemetry part: `POST
//! /devices/{d}[/modules/{m}]/messages/events` with the message's properties in headers, or a
//! batch (`application/vnd.microsoft.iothub.json`), each request authenticated by the SAS
//! token in its `Authorization` header, routed and appended to this shard's log like MQTT
//! telemetry, and answered 204 once durable. A request holds no device session: HTTP devices
//! do not connect, so nothing is claimed and nobody is kicked.
//!
//! Cloud-to-device over HTTPS: `GET /devices/{d}/messages/deviceBound` takes the oldest
//! message, locked for a minute, with its lock token as the `ETag`; `DELETE …/deviceBound/{lock}`
//! completes it (`?reject`: dead-letters it), `POST …/deviceBound/{lock}/abandon` gives it back.
//! The queue is control's: each is a call over the control link (`ServiceRequest::C2dReceive`,
//! `C2dSettleLocked`), raced against the shard's own timer.

use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use roost_http::Head;
use roost_iothub::props::{PropertyBag, SystemProps};
use roost_iothub::x509::ClientCert;
use roost_session::auth::{authenticate_sas, authenticate_x509, Identity, SasClaim, X509Claim};
use roost_session::quota::Admit;
use roost_session::telemetry;
use roost_session::Refusal;

use crate::metrics::{AuthCredential, Transport};
use crate::shard::{Shard, Stored};

/// The largest request body taken: IoT Hub's 256 KiB message (a batch holds at most as much)
/// with room for a batch's JSON and base64.
pub const MAX_BODY: usize = 256 * 1024 * 4 / 3 + 16 * 1024;

/// An answer: status, IoT Hub's error code name and message (none for success), or headers
/// and a body (a C2D receive's message, the service API's answer).
pub struct Answer {
    pub status: u16,
    pub error: Option<(&'static str, String)>,
    pub message: Option<(Vec<(String, String)>, Vec<u8>)>,
}

impl Answer {
    /// 204: done, nothing to say.
    pub fn ok() -> Self {
        Answer {
            status: 204,
            error: None,
            message: None,
        }
    }

    pub fn err(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Answer {
            status,
            error: Some((code, message.into())),
            message: None,
        }
    }

    /// A status with headers and a body: a C2D message (200), or the service API's answer.
    pub fn with_body(status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> Self {
        Answer {
            status,
            error: None,
            message: Some((headers, body)),
        }
    }
}

/// What a path on port 443 is for a device.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Events {
        device_id: String,
        module_id: Option<String>,
    },
    /// `…/messages/deviceBound`: a receive (GET).
    Receive {
        device_id: String,
    },
    /// `…/messages/deviceBound/{lock}` (DELETE: complete, or reject with `?reject`) or
    /// `…/messages/deviceBound/{lock}/abandon` (POST).
    Settle {
        device_id: String,
        lock: String,
        abandon: bool,
    },
    /// `…/files` (POST: an upload target), `…/files/notifications[/{correlationId}]` (POST:
    /// the upload is over).
    Files {
        device_id: String,
        notification: bool,
        correlation_id: Option<String>,
    },
    Other,
}

/// `/devices/{d}[/modules/{m}]/messages/events`, ids percent-decoded; `…/messages/deviceBound…`.
pub fn route(path: &str) -> Route {
    let Some(rest) = path.strip_prefix("/devices/") else {
        return Route::Other;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let decode = |s: &str| roost_iothub::encoding::percent_decode(s);
    match parts.as_slice() {
        [d, "messages", "events"] if !d.is_empty() => Route::Events {
            device_id: decode(d),
            module_id: None,
        },
        [d, "modules", m, "messages", "events"] if !d.is_empty() && !m.is_empty() => {
            Route::Events {
                device_id: decode(d),
                module_id: Some(decode(m)),
            }
        }
        [d, "messages", bound] if !d.is_empty() && bound.eq_ignore_ascii_case("devicebound") => {
            Route::Receive {
                device_id: decode(d),
            }
        }
        [d, "messages", bound, lock]
            if !d.is_empty() && bound.eq_ignore_ascii_case("devicebound") =>
        {
            Route::Settle {
                device_id: decode(d),
                lock: decode(lock).trim_matches('"').to_string(),
                abandon: false,
            }
        }
        [d, "files"] if !d.is_empty() => Route::Files {
            device_id: decode(d),
            notification: false,
            correlation_id: None,
        },
        [d, "files", "notifications"] if !d.is_empty() => Route::Files {
            device_id: decode(d),
            notification: true,
            correlation_id: None,
        },
        [d, "files", "notifications", cid] if !d.is_empty() => Route::Files {
            device_id: decode(d),
            notification: true,
            correlation_id: Some(decode(cid)),
        },
        [d, "messages", bound, lock, "abandon"]
            if !d.is_empty() && bound.eq_ignore_ascii_case("devicebound") =>
        {
            Route::Settle {
                device_id: decode(d),
                lock: decode(lock).trim_matches('"').to_string(),
                abandon: true,
            }
        }
        _ => Route::Other,
    }
}

/// Checks the request's credential against the registry for the identity its path names: the
/// SAS token in its `Authorization` header, or without one, the client certificate the
/// connection's TLS handshake carried (`client_cert`; spec §1.4, as the Node SDK's Http
/// transport sends it).
pub fn authenticate(
    shard: &Shard,
    head: &Head,
    device_id: &str,
    module_id: Option<&str>,
    client_cert: Option<&[rustls::pki_types::CertificateDer<'static>]>,
) -> Result<Identity, Answer> {
    let registry = shard.shared.registry.load();
    let now = crate::session::unix_now().as_secs();
    let (credential, checked) = match (head.header("authorization"), client_cert) {
        (Some(token), _) => {
            let claim = SasClaim {
                device_id: device_id.to_string(),
                module_id: module_id.map(str::to_string),
                model_id: None,
                token,
            };
            let checked = authenticate_sas(&claim, &registry, &shard.shared.hostname, now);
            (AuthCredential::Sas, checked)
        }
        (None, Some(chain)) => {
            let checked = match ClientCert::from_chain(chain) {
                Ok(cert) => {
                    let claim = X509Claim {
                        device_id: device_id.to_string(),
                        module_id: module_id.map(str::to_string),
                        model_id: None,
                        cert: &cert,
                    };
                    authenticate_x509(&claim, &registry, &shard.shared.cas.load(), now)
                }
                Err(_) => Err(Refusal::BadCertificate),
            };
            (AuthCredential::X509, checked)
        }
        (None, None) => {
            return Err(Answer::err(
                401,
                "IotHubUnauthorizedAccess",
                "the request has no Authorization header (a device SAS token) and the connection no client certificate",
            ))
        }
    };
    let m = shard.metrics.of(Transport::Https);
    m.authenticated(
        credential,
        checked.as_ref().map_or_else(Refusal::reason, |_| "accepted"),
    );
    checked.map_err(|refusal| {
        m.refused.inc(refusal.reason());
        Answer::err(
            401,
            "IotHubUnauthorizedAccess",
            format!("the credential was refused: {}", refusal.reason()),
        )
    })
}

/// The property bag the headers carry (spec §3: `iothub-messageid`, `iothub-app-{k}`, …).
fn bag_of(head: &Head) -> PropertyBag {
    let h = |name: &str| head.header(name).map(str::to_string);
    let system = SystemProps {
        message_id: h("iothub-messageid"),
        correlation_id: h("iothub-correlationid"),
        user_id: h("iothub-userid"),
        content_type: h("iothub-contenttype"),
        content_encoding: h("iothub-contentencoding"),
        expiry: h("iothub-expiry"),
        interface_id: h("iothub-interface-id"),
        ..SystemProps::default()
    };
    let app = head
        .headers
        .iter()
        .filter_map(|(name, value)| {
            let key = name.to_ascii_lowercase();
            let key = key.strip_prefix("iothub-app-")?.to_string();
            Some((key, String::from_utf8_lossy(value).into_owned()))
        })
        .collect();
    PropertyBag { system, app }
}

/// One message of a batch (`[{"body", "base64Encoded", "properties"}]`).
#[derive(serde::Deserialize)]
struct BatchItem {
    body: String,
    /// The Node SDK leaves it out and always sends base64.
    #[serde(rename = "base64Encoded", default = "yes")]
    base64_encoded: bool,
    #[serde(default)]
    properties: std::collections::BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// The messages of a request: one, or a batch's.
fn messages(head: &Head, body: Bytes) -> Result<Vec<(PropertyBag, Bytes)>, Answer> {
    let batch = head
        .header("content-type")
        .is_some_and(|ct| ct.starts_with("application/vnd.microsoft.iothub.json"));
    if !batch {
        return Ok(vec![(bag_of(head), body)]);
    }
    let items: Vec<BatchItem> = serde_json::from_slice(&body).map_err(|e| {
        Answer::err(
            400,
            "ArgumentInvalid",
            format!("the batch is not a JSON array of messages: {e}"),
        )
    })?;
    items
        .into_iter()
        .map(|item| {
            let body = match item.base64_encoded {
                true => base64::engine::general_purpose::STANDARD
                    .decode(&item.body)
                    .map_err(|_| {
                        Answer::err(400, "ArgumentInvalid", "a batch body is not base64")
                    })?,
                false => item.body.into_bytes(),
            };
            let mut system = SystemProps::default();
            let mut app = Vec::new();
            for (k, v) in item.properties {
                match k.as_str() {
                    "iothub-messageid" => system.message_id = Some(v),
                    "iothub-correlationid" => system.correlation_id = Some(v),
                    "iothub-contenttype" => system.content_type = Some(v),
                    "iothub-contentencoding" => system.content_encoding = Some(v),
                    _ => match k.strip_prefix("iothub-app-") {
                        Some(key) => app.push((key.to_string(), v)),
                        None => app.push((k, v)),
                    },
                }
            }
            Ok((PropertyBag { system, app }, Bytes::from(body)))
        })
        .collect()
}

/// A telemetry request of `identity`: metered against the hub's send rate, routed and appended
/// to this shard's log; 204 once durable.
pub async fn telemetry(shard: &Shard, head: &Head, identity: &Identity, body: Bytes) -> Answer {
    let messages = match messages(head, body) {
        Ok(m) => m,
        Err(answer) => return answer,
    };
    let max_body = shard
        .quotas()
        .get(roost_session::quota::Limit::D2cMaxBytes)
        .map_or(telemetry::MAX_D2C_BODY, |v| v as usize);
    if messages.iter().any(|(_, b)| b.len() > max_body) {
        return Answer::err(
            413,
            "MessageTooLarge",
            format!("a message body is over {max_body} bytes"),
        );
    }
    let mut last_batch = None;
    for (bag, body) in messages {
        let now = Instant::now();
        match shard.meter_d2c(now) {
            Admit::Now => {}
            Admit::After(d) => {
                glommio::timer::Timer::new(d).await;
            }
            Admit::Refused => {
                return Answer::err(
                    429,
                    "ThrottlingException",
                    "the hub's device-to-cloud send quota is spent; retry later",
                )
            }
        }
        let wall_ms = crate::session::unix_now().as_millis() as u64;
        let message = telemetry::record(identity, bag, false, &body, wall_ms);
        match shard.store(message) {
            Ok(Stored::Appended(batch)) => last_batch = Some(batch),
            Ok(Stored::Nowhere) => {}
            Err(_) => {
                return Answer::err(
                    503,
                    "ServiceUnavailable",
                    "the events log cannot take it now",
                )
            }
        }
        let m = shard.metrics.of(Transport::Https);
        m.messages_in.inc();
        m.bytes_in.inc_by(body.len() as u64);
    }
    if let Some(batch) = last_batch {
        if shard.log.durable(batch).await.is_err() {
            return Answer::err(503, "ServiceUnavailable", "the events log failed the write");
        }
    }
    Answer::ok()
}

/// A call to control over the link, raced against the shard's own timer: 503 when control is
/// away, the link drops, or `within` passes.
pub async fn call(
    shard: &Shard,
    request: roost_model::link::ServiceRequest,
    within: std::time::Duration,
) -> Result<roost_model::link::ServiceReply, Answer> {
    use futures_lite::future;
    let unavailable = |why: &str| Answer::err(503, "ServiceUnavailable", why.to_string());
    let (id, rx) = shard
        .shared
        .services
        .start(request)
        .map_err(|e| unavailable(&e.to_string()))?;
    let answer = async { Some(rx.await.map_err(|_| "the control link went down")) };
    let late = async {
        glommio::timer::Timer::new(within).await;
        None
    };
    let reply = future::or(answer, late).await;
    shard.shared.services.forget(id);
    match reply {
        Some(Ok(reply)) => Ok(reply),
        Some(Err(why)) => Err(unavailable(why)),
        None => Err(unavailable("the control plane did not answer in time")),
    }
}

/// The largest file-upload request body: a blob name or an upload's outcome.
pub const FILES_BODY: usize = 8 * 1024;

/// A file-upload request (`Route::Files`), served by control: its answer as control gave it.
pub async fn files(
    shard: &Shard,
    device_id: &str,
    notification: bool,
    correlation_id: Option<&str>,
    body: Vec<u8>,
) -> Answer {
    use roost_model::link::{ServiceReply, ServiceRequest};
    let request = ServiceRequest::FileUpload {
        device_id: device_id.to_string(),
        notification,
        correlation_id: correlation_id.map(str::to_string),
        body,
    };
    match call(shard, request, crate::service_calls::CALL_TIMEOUT).await {
        Ok(ServiceReply::Http { status, headers, body }) => Answer::with_body(status, headers, body),
        Ok(ServiceReply::Refused { status, message, .. }) => refused(status, message),
        Ok(_) => Answer::err(500, "ServerError", "control answered a file upload with something else"),
        Err(answer) => answer,
    }
}

/// A refusal control answered with, as the HTTP answer.
fn refused(status: u16, message: String) -> Answer {
    let code = match status {
        404 => "DeviceNotFound",
        412 => "DeviceMessageLockLost",
        400 => "ArgumentInvalid",
        _ => "ServerError",
    };
    Answer::err(status, code, message)
}

/// A message for an HTTPS receive: 200, the body, the lock token as a quoted `ETag`, and the
/// properties as the HTTPS device API's headers; 204 when none waits.
pub async fn receive(shard: &Shard, device_id: &str) -> Answer {
    use roost_model::link::{ServiceReply, ServiceRequest};
    let reply = match call(
        shard,
        ServiceRequest::C2dReceive {
            device_id: device_id.to_string(),
        },
        crate::service_calls::CALL_TIMEOUT,
    )
    .await
    {
        Ok(reply) => reply,
        Err(answer) => return answer,
    };
    match reply {
        ServiceReply::NoMessage => Answer::ok(),
        ServiceReply::Message {
            lock,
            properties,
            body,
        } => {
            let mut headers = vec![("ETag".to_string(), format!("\"{lock}\""))];
            for (k, v) in properties {
                let name = match k.as_str() {
                    "$.mid" => "iothub-messageid".to_string(),
                    "$.to" => "iothub-to".to_string(),
                    "$.exp" => "iothub-expiry".to_string(),
                    "$.cid" => "iothub-correlationid".to_string(),
                    "$.uid" => "iothub-userid".to_string(),
                    "$.ct" => "Content-Type".to_string(),
                    "$.ce" => "Content-Encoding".to_string(),
                    "iothub-ack" => "iothub-ack".to_string(),
                    key => format!("iothub-app-{key}"),
                };
                // Header values may not hold line breaks.
                headers.push((name, v.replace(['\r', '\n'], " ")));
            }
            Answer::with_body(200, headers, body)
        }
        ServiceReply::Refused {
            status, message, ..
        } => refused(status, message),
        _ => Answer::err(500, "ServerError", "control answered something else"),
    }
}

/// An HTTPS settlement of the message locked as `lock`.
pub async fn settle(
    shard: &Shard,
    device_id: &str,
    lock: &str,
    outcome: roost_model::link::C2dOutcome,
) -> Answer {
    use roost_model::link::{ServiceReply, ServiceRequest};
    let Ok(lock) = lock.parse::<u64>() else {
        return Answer::err(
            412,
            "DeviceMessageLockLost",
            format!("{lock:?} is not a lock token"),
        );
    };
    match call(
        shard,
        ServiceRequest::C2dSettleLocked {
            device_id: device_id.to_string(),
            lock,
            outcome,
        },
        crate::service_calls::CALL_TIMEOUT,
    )
    .await
    {
        Ok(ServiceReply::Done) => Answer::ok(),
        Ok(ServiceReply::Refused {
            status, message, ..
        }) => refused(status, message),
        Ok(_) => Answer::err(500, "ServerError", "control answered something else"),
        Err(answer) => answer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_paths_name_their_identity() {
        assert_eq!(
            route("/devices/d%201/messages/events"),
            Route::Events {
                device_id: "d 1".into(),
                module_id: None
            }
        );
        assert_eq!(
            route("/devices/d/modules/m/messages/events"),
            Route::Events {
                device_id: "d".into(),
                module_id: Some("m".into())
            }
        );
        assert_eq!(
            route("/devices/d/messages/deviceBound/%2212%22/abandon"),
            Route::Settle {
                device_id: "d".into(),
                lock: "12".into(),
                abandon: true
            }
        );
        assert_eq!(
            route("/devices/d/messages/devicebound"),
            Route::Receive {
                device_id: "d".into()
            }
        );
        assert_eq!(route("/devices//messages/events"), Route::Other);
        assert_eq!(route("/twins/d"), Route::Other);
    }
}
