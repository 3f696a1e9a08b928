//! The provisioning service over HTTPS: devices register (`PUT /{idScope}/registrations/
//! {registrationId}/register`, then `GET …/operations/{operationId}`) with a SAS token in
//! `Authorization` or the TLS client certificate, and services manage enrollments
//! (`/enrollments/…`, `/enrollmentGroups/…`, `/registrations/…`) with a token of the service's
//! `provisioningserviceowner` policy, as the Node `azure-iot-provisioning-service` client
//! calls them. A service request's token is checked from its headers before its body is read.

use std::sync::Arc;

use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use roost_common::httpd::{self, PeerCerts, Req, Resp};
use roost_iothub::sas::SasToken;
use roost_iothub::x509::ClientCert;
use serde_json::{json, Value};

use super::enrollments::{self, EnrollmentError};
use super::{Credential, DpsError, Provisioning, RETRY_AFTER};

/// A device's register body: its registration id and optional payload.
const DEVICE_BODY: usize = 16 * 1024;
/// An enrollment (a certificate or two and an initial twin), or a query.
const ENROLLMENT_BODY: usize = 256 * 1024;
/// A bulk enrollment operation.
const BULK_BODY: usize = 4 * 1024 * 1024;
/// Items in a query page unless `x-ms-max-item-count` says fewer.
const PAGE: usize = 100;

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Register { scope: String, registration: String },
    Operation { scope: String, registration: String, operation: String },
    Enrollment(Method, String),
    EnrollmentQuery,
    EnrollmentBulk,
    EnrollmentAttestation(String),
    Group(Method, String),
    GroupQuery,
    GroupAttestation(String),
    Registration(Method, String),
    GroupRegistrations(String),
}

impl Route {
    fn parse(method: &Method, path: &str) -> Option<Route> {
        let segments: Vec<String> = path
            .trim_start_matches('/')
            .split('/')
            .map(httpd::percent_decode)
            .collect();
        let s: Vec<&str> = segments.iter().map(String::as_str).collect();
        let m = method.clone();
        Some(match (method, s.as_slice()) {
            (&Method::PUT, [scope, "registrations", reg, "register"]) => Route::Register {
                scope: scope.to_string(),
                registration: reg.to_string(),
            },
            (&Method::GET, [scope, "registrations", reg, "operations", op]) => Route::Operation {
                scope: scope.to_string(),
                registration: reg.to_string(),
                operation: op.to_string(),
            },
            (&Method::POST, ["enrollments", "query"]) => Route::EnrollmentQuery,
            (&Method::POST, ["enrollments", ""]) | (&Method::POST, ["enrollments"]) => Route::EnrollmentBulk,
            (&Method::POST, ["enrollments", id, "attestationmechanism"]) => {
                Route::EnrollmentAttestation(id.to_string())
            }
            (&Method::PUT | &Method::GET | &Method::DELETE, ["enrollments", id]) => {
                Route::Enrollment(m, id.to_string())
            }
            (&Method::POST, [g, "query"]) if g.eq_ignore_ascii_case("enrollmentGroups") => Route::GroupQuery,
            (&Method::POST, [g, id, "attestationmechanism"]) if g.eq_ignore_ascii_case("enrollmentGroups") => {
                Route::GroupAttestation(id.to_string())
            }
            (&Method::PUT | &Method::GET | &Method::DELETE, [g, id]) if g.eq_ignore_ascii_case("enrollmentGroups") => {
                Route::Group(m, id.to_string())
            }
            (&Method::POST, ["registrations", group, "query"]) => Route::GroupRegistrations(group.to_string()),
            (&Method::GET | &Method::DELETE, ["registrations", id]) => Route::Registration(m, id.to_string()),
            _ => return None,
        })
    }

    fn is_device(&self) -> bool {
        matches!(self, Route::Register { .. } | Route::Operation { .. })
    }

    fn body_limit(&self) -> usize {
        match self {
            Route::Register { .. } | Route::Operation { .. } => DEVICE_BODY,
            Route::EnrollmentBulk => BULK_BODY,
            _ => ENROLLMENT_BODY,
        }
    }
}

fn error(status: u16, code: u32, message: impl Into<String>) -> Resp {
    let e = DpsError {
        status,
        code,
        message: message.into(),
        reason: "",
    };
    answer_error(&e)
}

fn answer_error(e: &DpsError) -> Resp {
    httpd::json(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.body(),
    )
}

fn enrollment_error(e: EnrollmentError) -> Resp {
    match e {
        EnrollmentError::Invalid(m) => error(400, 400004, m),
        EnrollmentError::NotFound(m) => error(404, 404201, format!("{m} not found")),
        EnrollmentError::EtagMismatch => error(412, 412002, "the etag does not match"),
        EnrollmentError::Store(e) => error(500, 500000, e.to_string()),
    }
}

impl Provisioning {
    /// Before the body: the route, and for the service API the policy's token. A device's
    /// credential is checked with the enrollments once the (small) body is read.
    pub fn admit(&self, parts: &Parts) -> Result<usize, Resp> {
        if super::websocket::is_upgrade(parts) {
            // MQTT or AMQP over a WebSocket: its credential comes in the protocol.
            return Ok(0);
        }
        let Some(route) = Route::parse(&parts.method, parts.uri.path()) else {
            return Err(error(404, 404000, "no such provisioning service path"));
        };
        let authorization = parts.headers.get("authorization").and_then(|v| v.to_str().ok());
        if route.is_device() {
            if authorization.is_none() && parts.extensions.get::<PeerCerts>().is_none() {
                return Err(error(
                    401,
                    401002,
                    "no Authorization header (a registration SAS token) and no client certificate",
                ));
            }
            return Ok(route.body_limit());
        }
        let checked = authorization.ok_or("no Authorization header").and_then(|t| {
            let token = SasToken::parse(t).map_err(|_| "the token cannot be read")?;
            let target = format!("{}{}", self.config.hostname, parts.uri.path());
            if !roost_iothub::sas::authorizes(token.resource(), &target) {
                return Err("the token is not scoped to this provisioning service");
            }
            if token.key_name() != Some(self.identity.policy_name.as_str()) {
                return Err("the token names no policy of this provisioning service");
            }
            let keys = [self.identity.primary_key.as_str(), self.identity.secondary_key.as_str()];
            match super::signed_with(&token, keys.map(Some), super::unix_now()) {
                true => Ok(()),
                false => Err("the token's signature or expiry is not valid"),
            }
        });
        match checked {
            Ok(()) => Ok(route.body_limit()),
            Err(why) => {
                self.metrics.dps_requests.with_label_values(&["service", "401"]).inc();
                Err(error(401, 401002, why))
            }
        }
    }

    /// Serves an admitted request (blocking store work: call it off the async threads).
    pub fn handle(&self, req: &Req) -> Resp {
        let Some(route) = Route::parse(req.method(), req.uri().path()) else {
            return error(404, 404000, "no such provisioning service path");
        };
        let kind = if route.is_device() { "device" } else { "service" };
        let resp = match route {
            Route::Register { scope, registration } => self.http_register(req, &scope, &registration),
            Route::Operation { scope, registration, operation } => {
                let cert = peer_cert(req);
                match credential(req, cert.as_ref()) {
                    Ok(c) => match self.operation(&scope, &registration, &operation, &c) {
                        Ok(body) => operation_answer(body),
                        Err(e) => answer_error(&e),
                    },
                    Err(r) => r,
                }
            }
            Route::Enrollment(method, id) => self.enrollment(req, &method, 'e', &id),
            Route::Group(method, id) => self.enrollment(req, &method, 'g', &id),
            Route::Registration(method, id) => self.enrollment(req, &method, 'r', &id),
            Route::EnrollmentQuery => self.query(req, 'e', None),
            Route::GroupQuery => self.query(req, 'g', None),
            Route::GroupRegistrations(group) => self.query(req, 'r', Some(&group)),
            Route::EnrollmentAttestation(id) => match enrollments::individual(&self.store, &id) {
                Ok(Some(e)) => httpd::json(StatusCode::OK, &e.attestation),
                Ok(None) => error(404, 404201, format!("enrollment {id} not found")),
                Err(e) => error(500, 500000, e.to_string()),
            },
            Route::GroupAttestation(id) => match enrollments::group(&self.store, &id) {
                Ok(Some(g)) => httpd::json(StatusCode::OK, &g.attestation),
                Ok(None) => error(404, 404201, format!("enrollment group {id} not found")),
                Err(e) => error(500, 500000, e.to_string()),
            },
            Route::EnrollmentBulk => self.bulk(req),
        };
        self.metrics
            .dps_requests
            .with_label_values(&[kind, resp.status().as_str()])
            .inc();
        resp
    }

    fn http_register(&self, req: &Req, scope: &str, registration: &str) -> Resp {
        let body: Value = match serde_json::from_slice(req.body()) {
            Ok(v) => v,
            Err(e) => return error(400, 400004, format!("the body must be JSON: {e}")),
        };
        if body.get("registrationId").and_then(Value::as_str) != Some(registration) {
            return error(400, 400004, "registrationId in the body does not match the path");
        }
        if body.get("tpm").is_some_and(|t| !t.is_null()) {
            return error(400, 400004, "TPM attestation is not offered by this service");
        }
        let cert = peer_cert(req);
        match credential(req, cert.as_ref()) {
            Ok(c) => match self.register(scope, registration, &c, body.get("payload").cloned()) {
                Ok(body) => {
                    let mut resp = httpd::json(StatusCode::ACCEPTED, &body);
                    resp.headers_mut()
                        .insert("retry-after", hyper::header::HeaderValue::from(RETRY_AFTER));
                    resp
                }
                Err(e) => answer_error(&e),
            },
            Err(r) => r,
        }
    }

    fn enrollment(&self, req: &Req, method: &Method, kind: char, id: &str) -> Resp {
        let if_match = req.headers().get("if-match").and_then(|v| v.to_str().ok());
        let store = &self.store;
        match *method {
            Method::GET => {
                let found = match kind {
                    'e' => enrollments::individual(store, id).map(|e| e.map(|e| enrollments::answer(&e))),
                    'g' => enrollments::group(store, id).map(|g| g.map(|g| enrollments::answer(&g))),
                    _ => enrollments::registration(store, id).map(|r| r.map(|r| json!(r.state))),
                };
                match found {
                    Ok(Some(v)) => httpd::json(StatusCode::OK, &v),
                    Ok(None) => error(404, 404201, format!("{id} not found")),
                    Err(e) => error(500, 500000, e.to_string()),
                }
            }
            Method::DELETE => match store.exclusive(|| enrollments::delete(store, kind, id, if_match)) {
                Ok(()) => httpd::empty(StatusCode::NO_CONTENT),
                Err(e) => enrollment_error(e),
            },
            _ => {
                let written = store.exclusive(|| match kind {
                    'e' => enrollments::put_individual(store, id, req.body(), if_match, &self.hub)
                        .map(|(e, _)| enrollments::answer(&e)),
                    _ => enrollments::put_group(store, id, req.body(), if_match, &self.hub)
                        .map(|(g, _)| enrollments::answer(&g)),
                });
                match written {
                    Ok(v) => httpd::json(StatusCode::OK, &v),
                    Err(e) => enrollment_error(e),
                }
            }
        }
    }

    /// `POST …/query` with `{"query": "*"}`: a page of every record of `kind` (for
    /// registrations, of one group), continued with `x-ms-continuation`.
    fn query(&self, req: &Req, kind: char, group: Option<&str>) -> Resp {
        let spec: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
        match spec.get("query").and_then(Value::as_str).map(str::trim) {
            Some("*") | Some("SELECT *") => {}
            _ => return error(400, 400004, "the query must be {\"query\": \"*\"}"),
        }
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let limit = header("x-ms-max-item-count")
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(PAGE)
            .min(1000);
        let mut after = header("x-ms-continuation").map(str::to_string);
        let mut items = Vec::new();
        let more = loop {
            let (page, more) = match enrollments::page(&self.store, kind, after.as_deref(), limit) {
                Ok(p) => p,
                Err(e) => return error(500, 500000, e.to_string()),
            };
            let Some(group) = group else {
                items = page;
                break more;
            };
            // A group's registrations: the stored records name their group.
            for raw in page {
                let id = raw.get("registrationId").and_then(Value::as_str).unwrap_or_default();
                let of_group = enrollments::registration(&self.store, id)
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.group.as_deref() == Some(group));
                if of_group {
                    items.push(raw);
                }
            }
            match more {
                Some(next) if items.len() < limit => after = Some(next),
                other => break other,
            }
        };
        let mut resp = httpd::json(StatusCode::OK, &items);
        if let Some(next) = more {
            if let Ok(v) = hyper::header::HeaderValue::from_str(&next) {
                resp.headers_mut().insert("x-ms-continuation", v);
            }
        }
        resp
    }

    /// `POST /enrollments/` with `{"mode", "enrollments": […]}`.
    fn bulk(&self, req: &Req) -> Resp {
        let op: Value = match serde_json::from_slice(req.body()) {
            Ok(v) => v,
            Err(e) => return error(400, 400004, format!("the body must be JSON: {e}")),
        };
        let mode = op.get("mode").and_then(Value::as_str).unwrap_or_default();
        let Some(list) = op.get("enrollments").and_then(Value::as_array) else {
            return error(400, 400004, "enrollments must be an array");
        };
        if !matches!(mode, "create" | "update" | "updateIfMatchEtag" | "delete") {
            return error(400, 400004, "mode must be create, update, updateIfMatchEtag or delete");
        }
        let mut errors = Vec::new();
        for e in list {
            let id = e.get("registrationId").and_then(Value::as_str).unwrap_or_default().to_string();
            let etag = e.get("etag").and_then(Value::as_str).map(str::to_string);
            let result = self.store.exclusive(|| match mode {
                "delete" => enrollments::delete(&self.store, 'e', &id, None),
                _ => {
                    let exists = enrollments::individual(&self.store, &id)?.is_some();
                    if mode == "create" && exists {
                        return Err(EnrollmentError::Invalid(format!("enrollment {id} exists")));
                    }
                    let if_match = match mode {
                        "updateIfMatchEtag" => etag.as_deref(),
                        _ => Some("*"),
                    };
                    let body = serde_json::to_vec(e).unwrap_or_default();
                    enrollments::put_individual(&self.store, &id, &body, if_match, &self.hub).map(|_| ())
                }
            });
            if let Err(err) = result {
                let (status, code) = match err {
                    EnrollmentError::NotFound(_) => (404, 404201),
                    EnrollmentError::EtagMismatch => (412, 412002),
                    EnrollmentError::Invalid(_) => (400, 400004),
                    EnrollmentError::Store(_) => (500, 500000),
                };
                errors.push(json!({ "registrationId": id, "errorCode": code, "errorStatus": status.to_string() }));
            }
        }
        httpd::json(
            StatusCode::OK,
            &json!({ "isSuccessful": errors.is_empty(), "errors": errors }),
        )
    }
}

/// The client certificate of the request's connection, read.
fn peer_cert(req: &Req) -> Option<Result<ClientCert, roost_iothub::x509::CertError>> {
    let certs = req.extensions().get::<PeerCerts>()?;
    Some(ClientCert::from_chain(&certs.0))
}

/// A device request's credential: its token, or without one its certificate.
fn credential<'a>(
    req: &'a Req,
    cert: Option<&'a Result<ClientCert, roost_iothub::x509::CertError>>,
) -> Result<Credential<'a>, Resp> {
    match (req.headers().get("authorization").and_then(|v| v.to_str().ok()), cert) {
        (Some(token), _) => Ok(Credential::Token(token)),
        (None, Some(Ok(cert))) => Ok(Credential::Certificate(cert)),
        (None, Some(Err(_))) => Err(error(401, 401002, "the client certificate cannot be read")),
        (None, None) => Err(error(401, 401002, "no credential")),
    }
}

/// An operation's status: 202 while it is assigning, 200 once decided.
fn operation_answer(body: Value) -> Resp {
    let (status, _) = super::answer_status(&body);
    httpd::json(StatusCode::from_u16(status).unwrap_or(StatusCode::OK), &body)
}

/// Serves the provisioning service's HTTPS port.
pub async fn serve(
    dps: Arc<Provisioning>,
    listener: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    limits: httpd::Limits,
) {
    let admit_dps = dps.clone();
    httpd::serve(
        listener,
        Some(tls),
        limits,
        move |parts: &Parts| admit_dps.admit(parts),
        move |req: Req| {
            let dps = dps.clone();
            async move {
                if roost_http::upgrade::is_websocket_path(req.uri().path()) {
                    return super::websocket::upgrade(dps, req);
                }
                match tokio::task::spawn_blocking(move || dps.handle(&req)).await {
                    Ok(resp) => resp,
                    Err(_) => error(500, 500000, "the request failed"),
                }
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_routed_as_the_sdks_send_them() {
        let r = |m: Method, p: &str| Route::parse(&m, p);
        assert_eq!(
            r(Method::PUT, "/0ne00AB/registrations/dev-1/register"),
            Some(Route::Register { scope: "0ne00AB".into(), registration: "dev-1".into() })
        );
        assert_eq!(
            r(Method::GET, "/0ne00AB/registrations/dev-1/operations/5.ab"),
            Some(Route::Operation { scope: "0ne00AB".into(), registration: "dev-1".into(), operation: "5.ab".into() })
        );
        assert_eq!(r(Method::PUT, "/enrollments/dev%201"), Some(Route::Enrollment(Method::PUT, "dev 1".into())));
        assert_eq!(r(Method::POST, "/enrollments/"), Some(Route::EnrollmentBulk));
        assert_eq!(r(Method::POST, "/enrollmentgroups/g/attestationmechanism"), Some(Route::GroupAttestation("g".into())));
        assert_eq!(r(Method::POST, "/enrollmentGroups/query"), Some(Route::GroupQuery));
        assert_eq!(r(Method::POST, "/registrations/g/query"), Some(Route::GroupRegistrations("g".into())));
        assert_eq!(r(Method::PATCH, "/enrollments/x"), None);
        assert_eq!(r(Method::GET, "/devices/x"), None);
    }
}
