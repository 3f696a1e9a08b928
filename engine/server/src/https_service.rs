//! The service REST API on port 443 (issue 11): the Azure service SDKs call
//! `https://{hub host}` on the default port, the port that also carries the device API and the
//! WebSocket upgrades. Control serves that API (on its own `--service` port too); here a
//! request is forwarded to it over the control link, so control can run on another host and
//! port 443 still needs one listener:
//!
//! - A request is the service API's when it carries a shared access policy's token (`skn=`,
//!   which the device API never takes) or names a path the device API does not serve (control
//!   then answers 404, or 401 without a token).
//! - Nothing of a body is read before control has admitted the head (`ServiceRequest::RestAdmit`:
//!   the same check, from the headers alone, that control's own port makes: the route, the
//!   token and its right); a request without a body goes in one call.
//! - The answer is control's, status, headers and body as its own port would send them.
//!
//! The pre-authentication slot is given back once control accepts a request; a request refused
//! with 401 closes the connection like a refused device request.

use bytes::{Bytes, BytesMut};
use roost_http::{head, Head};
use roost_model::link::{RestHead, ServiceReply, ServiceRequest};
use roost_session::PreAuthSlot;
use std::time::Duration;

use crate::https_device::{self, call, Answer, Route};
use crate::shard::Shard;
use crate::wire::Wire;

/// Time for control to judge a head.
const ADMIT_TIMEOUT: Duration = crate::service_calls::CALL_TIMEOUT;
/// Time for control to serve a request: a direct method may wait for its device for its connect
/// timeout and then its response timeout (at most 300 s each), and control always answers
/// within them; the link going down ends a call at once.
const SERVE_TIMEOUT: Duration = Duration::from_secs(630);

/// Whether a request on port 443 is for the service API rather than the device API.
pub fn is_service(head: &Head) -> bool {
    let policy_token = head.header("authorization").is_some_and(|token| {
        token
            .split(['&', ' '])
            .any(|param| param.starts_with("skn="))
    });
    policy_token || https_device::route(head.path()) == Route::Other
}

/// Headers that are about this connection or this body's framing, not the request: the engine
/// reads the body whole, so control sees neither.
const NOT_FORWARDED: [&str; 8] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// One service API request, forwarded to control: `Err` when it is refused before its body was
/// read (or refused 401), which closes the connection; `Ok` with control's answer otherwise.
pub async fn request(
    shard: &Shard,
    wire: &mut Wire,
    pre_auth: &mut PreAuthSlot,
    head: &Head,
    input: &mut BytesMut,
) -> Result<Answer, Answer> {
    let rest = RestHead {
        method: head.method.clone(),
        target: head.target.clone(),
        headers: head
            .headers
            .iter()
            .filter(|(name, _)| !NOT_FORWARDED.iter().any(|h| name.eq_ignore_ascii_case(h)))
            .map(|(name, value)| (name.clone(), String::from_utf8_lossy(value).into_owned()))
            .collect(),
    };
    let has_body = head::is_chunked(head)
        || match head.content_length() {
            Ok(n) => n.unwrap_or(0) > 0,
            Err(e) => return Err(Answer::err(400, "ArgumentInvalid", e.to_string())),
        };
    let body = if has_body {
        let admitted = call(
            shard,
            ServiceRequest::RestAdmit { head: rest.clone() },
            ADMIT_TIMEOUT,
        );
        let limit = match admitted.await? {
            ServiceReply::Admitted { body_limit } => body_limit as usize,
            ServiceReply::Http {
                status,
                headers,
                body,
            } => return Err(Answer::with_body(status, headers, body)),
            _ => {
                return Err(Answer::err(
                    500,
                    "ServerError",
                    "control answered something else",
                ))
            }
        };
        pre_auth.release();
        crate::https::read_body(shard, wire, head, input, limit).await?
    } else {
        Bytes::new()
    };
    let served = call(
        shard,
        ServiceRequest::Rest {
            head: rest,
            body: body.to_vec(),
        },
        SERVE_TIMEOUT,
    );
    match served.await? {
        ServiceReply::Http {
            status,
            headers,
            body,
        } => {
            let answer = Answer::with_body(status, headers, body);
            if status == 401 {
                return Err(answer);
            }
            pre_auth.release();
            Ok(answer)
        }
        _ => Err(Answer::err(
            500,
            "ServerError",
            "control answered something else",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, target: &str, auth: Option<&str>) -> Head {
        let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: hub\r\n");
        if let Some(a) = auth {
            raw.push_str(&format!("Authorization: {a}\r\n"));
        }
        raw.push_str("\r\n");
        head::parse(raw.as_bytes(), head::HeadLimits::default())
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_policy_token_or_a_path_the_device_api_lacks_is_the_service_apis() {
        let policy = "SharedAccessSignature sr=hub&sig=x&se=1&skn=iothubowner";
        let device = "SharedAccessSignature sr=hub%2Fdevices%2Fd&sig=x&se=1";
        // The device API's paths with a device's token, or none, stay the device API's.
        assert!(!is_service(&head(
            "POST",
            "/devices/d/messages/events?api-version=2020-09-30",
            Some(device)
        )));
        assert!(!is_service(&head(
            "GET",
            "/devices/d/messages/deviceBound",
            None
        )));
        // A policy's token is the service's, on any path (C2D send is a POST to deviceBound).
        assert!(is_service(&head(
            "POST",
            "/devices/d/messages/deviceBound",
            Some(policy)
        )));
        assert!(is_service(&head(
            "GET",
            "/devices/d?api-version=2021-04-12",
            Some(policy)
        )));
        // Paths only the service API has, whatever the token.
        assert!(is_service(&head(
            "GET",
            "/devices/d?api-version=2021-04-12",
            None
        )));
        assert!(is_service(&head("POST", "/devices/query", Some(device))));
        assert!(is_service(&head("GET", "/twins/d", None)));
        assert!(is_service(&head("GET", "/statistics/devices", None)));
    }
}
