//! The HTTPS device API on port 443 (spec §3), telemetry part: `POST
//! /devices/{d}[/modules/{m}]/messages/events` with the message's properties in headers, or a
//! batch (`application/vnd.microsoft.iothub.json`), each request authenticated by the SAS
//! token in its `Authorization` header, routed and appended to this shard's log like MQTT
//! telemetry, and answered 204 once durable. A request holds no device session: HTTP devices
//! do not connect, so nothing is claimed and nobody is kicked.
//!
//! Cloud-to-device over HTTPS (`…/messages/deviceBound` with lock tokens) is not served yet
//! (501).

use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use roost_http::Head;
use roost_iothub::props::{PropertyBag, SystemProps};
use roost_session::auth::{authenticate_sas, Identity, SasClaim};
use roost_session::quota::Admit;
use roost_session::telemetry;

use crate::shard::{Shard, Stored};

/// The largest request body taken: IoT Hub's 256 KiB message (a batch holds at most as much)
/// with room for a batch's JSON and base64.
pub const MAX_BODY: usize = 256 * 1024 * 4 / 3 + 16 * 1024;

/// An answer: status, IoT Hub's error code name and message (none for success).
pub struct Answer {
    pub status: u16,
    pub error: Option<(&'static str, String)>,
}

impl Answer {
    fn ok() -> Self {
        Answer {
            status: 204,
            error: None,
        }
    }

    pub fn err(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Answer {
            status,
            error: Some((code, message.into())),
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
    DeviceBound,
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
        [_, "messages", bound, ..] if bound.eq_ignore_ascii_case("devicebound") => {
            Route::DeviceBound
        }
        _ => Route::Other,
    }
}

/// Checks the request's token against the registry for the identity its path names.
pub fn authenticate(
    shard: &Shard,
    head: &Head,
    device_id: &str,
    module_id: Option<&str>,
) -> Result<Identity, Answer> {
    let Some(token) = head.header("authorization") else {
        return Err(Answer::err(
            401,
            "IotHubUnauthorizedAccess",
            "the request has no Authorization header (a device SAS token)",
        ));
    };
    let claim = SasClaim {
        device_id: device_id.to_string(),
        module_id: module_id.map(str::to_string),
        model_id: None,
        token,
    };
    let registry = shard.shared.registry.load();
    let now = crate::session::unix_now().as_secs();
    authenticate_sas(&claim, &registry, &shard.shared.hostname, now).map_err(|refusal| {
        shard.metrics.refused.inc(refusal.reason());
        Answer::err(
            401,
            "IotHubUnauthorizedAccess",
            format!("the token was refused: {}", refusal.reason()),
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
        shard.metrics.https_messages_in.inc();
        shard.metrics.https_bytes_in.inc_by(body.len() as u64);
    }
    if let Some(batch) = last_batch {
        if shard.log.durable(batch).await.is_err() {
            return Answer::err(503, "ServiceUnavailable", "the events log failed the write");
        }
    }
    Answer::ok()
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
            route("/devices/d/messages/deviceBound/lock/abandon"),
            Route::DeviceBound
        );
        assert_eq!(route("/devices//messages/events"), Route::Other);
        assert_eq!(route("/twins/d"), Route::Other);
    }
}
