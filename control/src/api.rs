//! The service REST API (spec §4): IoT Hub's paths, any `api-version`, SAS tokens of the shared
//! access policies, IoT Hub error bodies. This slice serves the device identity registry.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::http::request::Parts;
use hyper::{HeaderMap, Method, StatusCode};
use roost_common::httpd::{self, percent_decode, query_param, Req, Resp};
use roost_iothub::sas::SasToken;
use roost_model::link::{ServiceReply, ServiceRequest};
use roost_session::quota::{Admit, Bucket, Limit, Quotas};
use serde_json::json;

use crate::c2d::{Ack, C2d, C2dFailure, NewMessage};
use crate::configurations::{ConfigFailure, Configurations};
use crate::device::{
    AuthenticationWrite, Capabilities, Device, DeviceWrite, Module, ModuleWrite, NEVER,
};
use crate::jobs::{JobFailure, Jobs};
use crate::methods::{MethodCall, MethodFailure, Methods};
use crate::metrics::ControlMetrics;
use crate::policies::Right;
use crate::query::{Queries, QueryFailure};
use crate::store::Store;
use crate::store::Writes;
use crate::twins::{TwinFailure, Twins};

/// Most operations one bulk request may carry (IoT Hub's limit).
const MAX_BULK: usize = 100;

/// One entry of a bulk registry request (IoT Hub's ExportImportDevice).
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct BulkItem {
    id: String,
    import_mode: String,
    #[serde(default, rename = "eTag")]
    e_tag: Option<String>,
    #[serde(flatten)]
    device: DeviceWrite,
}

pub struct Api {
    pub store: Arc<Store>,
    pub hostname: String,
    pub metrics: Arc<ControlMetrics>,
    pub throttle: Throttle,
    pub twins: Arc<Twins>,
    pub methods: Arc<Methods>,
    pub c2d: Arc<C2d>,
    pub queries: Arc<Queries>,
    pub jobs: Arc<Jobs>,
    pub configurations: Arc<Configurations>,
    /// The hub's routing (`/roost/routes`, roost's own; IoT Hub configures routes via ARM).
    pub routes: Arc<crate::routes::Routes>,
}

/// The rate quotas the service API meters (spec §8): a bucket per class of operation, with
/// IoT Hub's traffic shaping (a request over the rate waits, within the backlog; beyond it,
/// 429 with 429001).
pub struct Throttle {
    registry: Mutex<Option<Bucket>>,
    c2d_sends: Mutex<Option<Bucket>>,
    twin_reads: Mutex<Option<Bucket>>,
    twin_updates: Mutex<Option<Bucket>>,
    queries: Mutex<Option<Bucket>>,
    jobs: Mutex<Option<Bucket>>,
    method_bytes: Mutex<Option<Bucket>>,
}

impl Throttle {
    pub fn new(quotas: &Quotas) -> Self {
        let now = Instant::now();
        let bucket = |limit| Mutex::new(quotas.bucket(limit, 1, now));
        Self {
            registry: bucket(Limit::RegistryOpsPerMin),
            c2d_sends: bucket(Limit::C2dSendsPerMin),
            twin_reads: bucket(Limit::TwinReadsPerSec),
            twin_updates: bucket(Limit::TwinUpdatesPerSec),
            queries: bucket(Limit::QueriesPerMin),
            jobs: bucket(Limit::JobsOpsPerMin),
            method_bytes: bucket(Limit::MethodBytesPerSec),
        }
    }

    fn bucket(&self, limit: Limit) -> Option<&Mutex<Option<Bucket>>> {
        match limit {
            Limit::RegistryOpsPerMin => Some(&self.registry),
            Limit::C2dSendsPerMin => Some(&self.c2d_sends),
            Limit::TwinReadsPerSec => Some(&self.twin_reads),
            Limit::TwinUpdatesPerSec => Some(&self.twin_updates),
            Limit::QueriesPerMin => Some(&self.queries),
            Limit::JobsOpsPerMin => Some(&self.jobs),
            Limit::MethodBytesPerSec => Some(&self.method_bytes),
            // Metered by the engines (connections, device-to-cloud sends) or not a rate. Named,
            // not `_`: a new service-side quota must get a bucket here, or say why not.
            Limit::NewConnectionsPerSec
            | Limit::D2cSendsPerSec
            | Limit::DeviceD2cSendsPerSec
            | Limit::D2cMaxBytes
            | Limit::ThrottleBacklogMs => None,
        }
    }

    /// Meters one operation under `limit`: how long to hold it first, or the refusal.
    fn take(&self, limit: Limit) -> Result<Option<Duration>, HubError> {
        self.take_n(limit, 1.0)
    }

    /// Meters `amount` of `limit` (bytes, for the method quota).
    fn take_n(&self, limit: Limit, amount: f64) -> Result<Option<Duration>, HubError> {
        let Some(bucket) = self.bucket(limit) else {
            return Ok(None);
        };
        let mut bucket = bucket.lock().unwrap_or_else(|p| p.into_inner());
        let Some(bucket) = bucket.as_mut() else {
            return Ok(None);
        };
        match bucket.take(Instant::now(), amount) {
            Admit::Now => Ok(None),
            Admit::After(d) => Ok(Some(d)),
            Admit::Refused => Err(HubError::new(
                StatusCode::TOO_MANY_REQUESTS,
                429001,
                "ThrottlingException",
                format!("the hub's {} quota is spent; retry later", limit.name()),
            )),
        }
    }
}

/// An IoT Hub error: HTTP status, numeric code and name (spec §4.7, §8).
#[derive(Debug)]
pub struct HubError {
    status: StatusCode,
    code: u32,
    name: &'static str,
    message: String,
}

impl std::fmt::Display for HubError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.name, self.message)
    }
}

impl HubError {
    fn new(status: StatusCode, code: u32, name: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            name,
            message: message.into(),
        }
    }
    fn unauthorized(why: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, 401003, "IotHubUnauthorized", why)
    }
    fn bad_request(why: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, 400004, "ArgumentInvalid", why)
    }
    fn device_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            404001,
            "DeviceNotFound",
            format!("Device {id} not registered"),
        )
    }
    fn precondition_failed() -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            412001,
            "PreconditionFailed",
            "Precondition failed: the etag does not match",
        )
    }
    fn method(e: MethodFailure) -> Self {
        let message = e.to_string();
        match e {
            MethodFailure::BadRequest(m) => Self::bad_request(m),
            MethodFailure::DeviceNotFound(id) => Self::device_not_found(&id),
            MethodFailure::ModuleNotFound(id) => Self::new(
                StatusCode::NOT_FOUND,
                404010,
                "ModuleNotFound",
                format!("Module {id} not registered"),
            ),
            MethodFailure::NotOnline => {
                Self::new(StatusCode::NOT_FOUND, 404103, "DeviceNotOnline", message)
            }
            MethodFailure::Timeout => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                504101,
                "GatewayTimeout",
                message,
            ),
            MethodFailure::TooMany => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                429001,
                "ThrottlingException",
                message,
            ),
            MethodFailure::Store(m) => Self::server(m),
        }
    }
    fn twin(e: TwinFailure) -> Self {
        match e {
            TwinFailure::DeviceNotFound(id) => Self::device_not_found(&id),
            TwinFailure::ModuleNotFound(id) => Self::new(
                StatusCode::NOT_FOUND,
                404010,
                "ModuleNotFound",
                format!("Module {id} not registered"),
            ),
            TwinFailure::PreconditionFailed => Self::precondition_failed(),
            TwinFailure::BadJson(_) | TwinFailure::Invalid(_) => Self::bad_request(e.to_string()),
            TwinFailure::Store(e) => Self::server(e),
        }
    }
    fn config(e: ConfigFailure) -> Self {
        let message = e.to_string();
        match e {
            ConfigFailure::BadRequest(m) => Self::bad_request(m),
            ConfigFailure::NotFound(_) => Self::new(
                StatusCode::NOT_FOUND,
                404000,
                "ConfigurationNotFound",
                message,
            ),
            ConfigFailure::Exists(_) => Self::new(
                StatusCode::CONFLICT,
                409000,
                "ConfigurationAlreadyExists",
                message,
            ),
            ConfigFailure::PreconditionFailed => Self::precondition_failed(),
            ConfigFailure::Store(e) => Self::server(e),
        }
    }
    fn job(e: JobFailure) -> Self {
        let message = e.to_string();
        match e {
            JobFailure::BadRequest(m) => Self::bad_request(m),
            JobFailure::NotFound(_) => {
                Self::new(StatusCode::NOT_FOUND, 404002, "JobNotFound", message)
            }
            JobFailure::Exists(_) => {
                Self::new(StatusCode::CONFLICT, 409104, "JobAlreadyExists", message)
            }
            JobFailure::Store(e) => Self::server(e),
        }
    }
    fn groups(e: crate::consumer_groups::GroupError) -> Self {
        use crate::consumer_groups::GroupError;
        match e {
            GroupError::Invalid(m) => Self::bad_request(m),
            GroupError::NotFound(m) => Self::new(
                StatusCode::NOT_FOUND,
                404001,
                "ConsumerGroupNotFound",
                format!("no consumer group {m:?}"),
            ),
            GroupError::Store(e) => Self::server(e),
        }
    }
    fn cas(e: crate::cas::CaError) -> Self {
        use crate::cas::CaError;
        let message = e.to_string();
        match e {
            CaError::Invalid(m) => Self::bad_request(m),
            CaError::NotFound(_) => Self::new(
                StatusCode::NOT_FOUND,
                404001,
                "CertificateNotFound",
                message,
            ),
            CaError::EtagMismatch => Self::precondition_failed(),
            CaError::VerificationFailed(_) => Self::new(
                StatusCode::BAD_REQUEST,
                400004,
                "CertificateVerificationFailed",
                message,
            ),
            CaError::Store(e) => Self::server(e),
        }
    }
    fn routes(e: crate::routes::RoutesError) -> Self {
        match e {
            crate::routes::RoutesError::Invalid(m) => Self::bad_request(m),
            crate::routes::RoutesError::Store(e) => Self::server(e),
        }
    }
    fn server(e: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            500001,
            "ServerError",
            e.to_string(),
        )
    }

    /// Whether IoT Hub answers this error in its registry form, `ErrorCode:<Name>;<message>`,
    /// which the Node service SDK maps to typed errors (`DeviceNotFoundError`,
    /// `DeviceAlreadyExistsError`, …); the others in the JSON form of spec §4.7.
    fn registry_form(&self) -> bool {
        matches!(
            self.code,
            404001 | 404002 | 404010 | 409001 | 409104 | 409301 | 412001
        )
    }

    fn response(&self) -> Resp {
        let body = if self.registry_form() {
            json!({
                "Message": format!("ErrorCode:{};{}", self.name, self.message),
                "ExceptionMessage": format!("Tracking ID:{}-TimeStamp:{}", tracking_id(), iso_now()),
            })
        } else {
            error_body(self.code, &self.message)
        };
        let mut r = httpd::json(self.status, &body);
        if let Ok(v) = hyper::header::HeaderValue::from_str(self.name) {
            r.headers_mut().insert("iothub-errorcode", v);
        }
        r
    }
}

/// IoT Hub's JSON error body (spec §4.7): the error as JSON text in `Message`.
pub fn error_body(code: u32, message: &str) -> serde_json::Value {
    let inner = json!({
        "errorCode": code,
        "trackingId": tracking_id(),
        "message": message,
        "timestampUtc": iso_now(),
        "info": {},
    });
    json!({ "Message": inner.to_string(), "ExceptionMessage": "" })
}

pub fn tracking_id() -> String {
    let mut b = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Unix milliseconds now (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn iso_now() -> String {
    roost_iothub::time::iso_ms(now_ms())
}

/// Unix seconds now (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A policy's two keys, decoded. A stored key that is not base64 is a fault of the store, and
/// a server error: it must never turn into an empty key that an empty-key signature matches.
fn policy_keys(policy: &crate::policies::Policy) -> Result<[Vec<u8>; 2], HubError> {
    let decode = |k: &str| {
        roost_iothub::sas::decode_key(k).map_err(|_| {
            tracing::error!(policy = %policy.name, "a stored shared access policy key is not base64");
            HubError::server(format!("shared access policy {} has a corrupt key", policy.name))
        })
    };
    Ok([decode(&policy.primary_key)?, decode(&policy.secondary_key)?])
}

/// The request's `If-Match` etag, quotes stripped.
fn if_match(req: &Req) -> Option<String> {
    let value = req.headers().get("if-match")?.to_str().ok()?;
    Some(unquote(value).to_string())
}

/// A response as the link carries it back to the engine: status, headers (those of the
/// response's framing left to the engine), body.
async fn http_reply(resp: Resp) -> ServiceReply {
    use http_body_util::BodyExt as _;
    let (parts, body) = resp.into_parts();
    let headers = parts
        .headers
        .iter()
        .filter(|(name, _)| {
            ![
                hyper::header::CONTENT_LENGTH,
                hyper::header::TRANSFER_ENCODING,
                hyper::header::CONNECTION,
            ]
            .contains(name)
        })
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(never) => match never {},
    };
    ServiceReply::Http {
        status: parts.status.as_u16(),
        headers,
        body,
    }
}

/// Strips the quotes of an etag as sent in `If-Match` or a body.
fn unquote(s: &str) -> &str {
    s.trim().trim_matches('"')
}

/// A service API request, known from its method and path alone.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    List,
    Get(String),
    Put(String),
    Bulk,
    Delete(String),
    Stats,
    TwinGet(String),
    /// `PATCH` (`replace` false) or `PUT` (`replace` true) of a twin.
    TwinWrite {
        id: String,
        replace: bool,
    },
    /// `POST /twins/{id}[/modules/{m}]/methods`.
    Method {
        id: String,
        module: Option<String>,
    },
    /// `POST /devices/{id}/messages/deviceBound` (roost's own: IoT Hub's is AMQP).
    C2dSend(String),
    ModuleList(String),
    ModuleGet(String, String),
    ModulePut(String, String),
    ModuleDelete(String, String),
    /// `POST /devices/query`.
    Query,
    JobPut(String),
    JobGet(String),
    JobCancel(String),
    /// `GET /jobs/v2/query?jobType=&jobStatus=`.
    JobQuery,
    ConfigList,
    ConfigGet(String),
    ConfigPut(String),
    ConfigDelete(String),
    /// `POST /configurations/testQueries`.
    ConfigTest,
    /// `GET /messages/serviceBound/feedback`.
    FeedbackGet,
    /// `DELETE /messages/serviceBound/feedback/{lock}`, or `POST …/{lock}/abandon`.
    FeedbackDone {
        lock: String,
        complete: bool,
    },
    /// `GET /roost/routes`: the routing in force and the engines' verdicts.
    RoutesGet,
    /// `PUT /roost/routes`: a new `routes.lua` and its plugins.
    RoutesPut,
    /// `GET /roost/consumergroups`: the Event Hubs consumer groups.
    GroupsGet,
    /// `PUT /roost/consumergroups/{name}`.
    GroupPut(String),
    /// `DELETE /roost/consumergroups/{name}`.
    GroupDelete(String),
    /// `GET /roost/certificates`: the CA certificates (`cas.rs`).
    CasList,
    /// `GET /roost/certificates/{name}`.
    CaGet(String),
    /// `PUT /roost/certificates/{name}`.
    CaPut(String),
    /// `DELETE /roost/certificates/{name}`.
    CaDelete(String),
    /// `POST /roost/certificates/{name}/generateVerificationCode`.
    CaCode(String),
    /// `POST /roost/certificates/{name}/verify`.
    CaVerify(String),
}

/// Body limits by route: one identity, a bulk request of up to [`MAX_BULK`] of them, a twin
/// (8 KB of tags and 32 KB of desired properties, with room for a twin read and sent back
/// whole, reported section and `$metadata` included), nothing.
const IDENTITY_BODY: usize = 64 * 1024;
const TWIN_BODY: usize = 256 * 1024;
/// A method call: a payload of up to 128 KB and its envelope.
const METHOD_BODY: usize = crate::methods::MAX_PAYLOAD + 16 * 1024;
/// A cloud-to-device message's body (its properties are in the headers).
const C2D_BODY: usize = crate::c2d::MAX_BODY;
const BULK_BODY: usize = 1024 * 1024;
const NO_BODY: usize = 4 * 1024;
/// A job: a twin patch (twin-sized) or a method call, and its condition.
const JOB_BODY: usize = TWIN_BODY + METHOD_BODY;
/// `{"query": ..}` with a query of up to [`roost_query::MAX_QUERY_BYTES`].
const QUERY_BODY: usize = roost_query::MAX_QUERY_BYTES + 1024;

impl Route {
    fn parse(method: &Method, path: &str) -> Result<Route, HubError> {
        let segments: Vec<String> = path
            .trim_matches('/')
            .split('/')
            .map(percent_decode)
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        Ok(match (method, segments.as_slice()) {
            (&Method::GET, ["devices"]) => Route::List,
            (&Method::GET, ["devices", id]) => Route::Get(id.to_string()),
            (&Method::PUT, ["devices", id]) => Route::Put(id.to_string()),
            (&Method::POST, ["devices"]) => Route::Bulk,
            (&Method::POST, ["devices", "query"]) => Route::Query,
            (&Method::GET, ["jobs", "v2", "query"]) => Route::JobQuery,
            (&Method::GET, ["configurations"]) => Route::ConfigList,
            (&Method::POST, ["configurations", "testQueries"]) => Route::ConfigTest,
            (&Method::GET, ["roost", "routes"]) => Route::RoutesGet,
            (&Method::PUT, ["roost", "routes"]) => Route::RoutesPut,
            (&Method::GET, ["roost", "consumergroups"]) => Route::GroupsGet,
            (&Method::PUT, ["roost", "consumergroups", g]) => {
                Route::GroupPut(httpd::percent_decode(g))
            }
            (&Method::DELETE, ["roost", "consumergroups", g]) => {
                Route::GroupDelete(httpd::percent_decode(g))
            }
            (&Method::GET, ["roost", "certificates"]) => Route::CasList,
            (&Method::GET, ["roost", "certificates", n]) => Route::CaGet(n.to_string()),
            (&Method::PUT, ["roost", "certificates", n]) => Route::CaPut(n.to_string()),
            (&Method::DELETE, ["roost", "certificates", n]) => Route::CaDelete(n.to_string()),
            (&Method::POST, ["roost", "certificates", n, "generateVerificationCode"]) => {
                Route::CaCode(n.to_string())
            }
            (&Method::POST, ["roost", "certificates", n, "verify"]) => {
                Route::CaVerify(n.to_string())
            }
            (&Method::GET, ["configurations", id]) => Route::ConfigGet(id.to_string()),
            (&Method::PUT, ["configurations", id]) => Route::ConfigPut(id.to_string()),
            (&Method::DELETE, ["configurations", id]) => Route::ConfigDelete(id.to_string()),
            (&Method::PUT, ["jobs", "v2", id]) => Route::JobPut(id.to_string()),
            (&Method::GET, ["jobs", "v2", id]) => Route::JobGet(id.to_string()),
            (&Method::POST, ["jobs", "v2", id, "cancel"]) => Route::JobCancel(id.to_string()),
            (&Method::DELETE, ["devices", id]) => Route::Delete(id.to_string()),
            (&Method::GET, ["statistics", "devices"]) => Route::Stats,
            (&Method::GET, ["twins", id]) => Route::TwinGet(id.to_string()),
            // A module twin is the twin of the client id `device/module`.
            (&Method::GET, ["twins", id, "modules", m]) => Route::TwinGet(format!("{id}/{m}")),
            (&Method::PATCH, ["twins", id, "modules", m]) => Route::TwinWrite {
                id: format!("{id}/{m}"),
                replace: false,
            },
            (&Method::PUT, ["twins", id, "modules", m]) => Route::TwinWrite {
                id: format!("{id}/{m}"),
                replace: true,
            },
            (&Method::GET, ["devices", id, "modules"]) => Route::ModuleList(id.to_string()),
            (&Method::GET, ["devices", id, "modules", m]) => {
                Route::ModuleGet(id.to_string(), m.to_string())
            }
            (&Method::PUT, ["devices", id, "modules", m]) => {
                Route::ModulePut(id.to_string(), m.to_string())
            }
            (&Method::DELETE, ["devices", id, "modules", m]) => {
                Route::ModuleDelete(id.to_string(), m.to_string())
            }
            (&Method::PATCH, ["twins", id]) => Route::TwinWrite {
                id: id.to_string(),
                replace: false,
            },
            (&Method::PUT, ["twins", id]) => Route::TwinWrite {
                id: id.to_string(),
                replace: true,
            },
            (&Method::POST, ["twins", id, "methods"]) => Route::Method {
                id: id.to_string(),
                module: None,
            },
            (&Method::POST, ["twins", id, "modules", m, "methods"]) => Route::Method {
                id: id.to_string(),
                module: Some(m.to_string()),
            },
            (&Method::POST, ["devices", id, "messages", b])
                if b.eq_ignore_ascii_case("devicebound") =>
            {
                Route::C2dSend(id.to_string())
            }
            (&Method::GET, ["messages", "serviceBound", "feedback"]) => Route::FeedbackGet,
            (&Method::DELETE, ["messages", "serviceBound", "feedback", lock]) => {
                Route::FeedbackDone {
                    lock: lock.to_string(),
                    complete: true,
                }
            }
            (&Method::POST, ["messages", "serviceBound", "feedback", lock, "abandon"]) => {
                Route::FeedbackDone {
                    lock: lock.to_string(),
                    complete: false,
                }
            }
            _ => {
                return Err(HubError::new(
                    StatusCode::NOT_FOUND,
                    404000,
                    "NotFound",
                    format!("no such resource: {path}"),
                ))
            }
        })
    }

    fn right(&self) -> Right {
        match self {
            Route::List
            | Route::Get(_)
            | Route::Stats
            | Route::ModuleList(_)
            | Route::ModuleGet(..)
            | Route::JobGet(_)
            | Route::JobQuery
            | Route::ConfigList
            | Route::ConfigGet(_)
            | Route::ConfigTest
            | Route::RoutesGet
            | Route::GroupsGet
            | Route::CasList
            | Route::CaGet(_) => Right::RegistryRead,
            // The routing decides where every message goes: the hub's own configuration.
            Route::RoutesPut | Route::GroupPut(_) | Route::GroupDelete(_) => Right::RegistryWrite,
            // Trusting a CA admits every device it signs for: registry write.
            Route::CaPut(_) | Route::CaDelete(_) | Route::CaCode(_) | Route::CaVerify(_) => {
                Right::RegistryWrite
            }
            // Configurations write desired properties across the fleet: registry write, as
            // IoT Hub asks for automatic device management.
            Route::ConfigPut(_) | Route::ConfigDelete(_) => Right::RegistryWrite,
            // Jobs write twins and call methods across the registry: IoT Hub asks for
            // registry write (and read) for them.
            Route::JobPut(_) | Route::JobCancel(_) => Right::RegistryWrite,
            Route::Put(_)
            | Route::Bulk
            | Route::Delete(_)
            | Route::ModulePut(..)
            | Route::ModuleDelete(..) => Right::RegistryWrite,
            // Spec §1.3: twins are ServiceConnect's.
            Route::TwinGet(_)
            | Route::TwinWrite { .. }
            | Route::Method { .. }
            | Route::C2dSend(_)
            | Route::Query
            | Route::FeedbackGet
            | Route::FeedbackDone { .. } => Right::ServiceConnect,
        }
    }

    /// The quota the route is metered by (IoT Hub: "identity registry operations" are
    /// create, retrieve, list, update and delete).
    fn quota(&self) -> Option<Limit> {
        match self {
            Route::List
            | Route::Get(_)
            | Route::Put(_)
            | Route::Bulk
            | Route::Delete(_)
            | Route::ModuleList(_)
            | Route::ModuleGet(..)
            | Route::ModulePut(..)
            | Route::ModuleDelete(..) => Some(Limit::RegistryOpsPerMin),
            Route::Stats => None,
            Route::TwinGet(_) => Some(Limit::TwinReadsPerSec),
            Route::TwinWrite { .. } => Some(Limit::TwinUpdatesPerSec),
            // Metered in bytes (IoT Hub's 4 KB units of the request) by `handle`, once the
            // body's size is known.
            Route::Method { .. } => None,
            Route::C2dSend(_) => Some(Limit::C2dSendsPerMin),
            Route::Query => Some(Limit::QueriesPerMin),
            Route::JobPut(_) | Route::JobGet(_) | Route::JobCancel(_) | Route::JobQuery => {
                Some(Limit::JobsOpsPerMin)
            }
            // IoT Hub's "configurations and edge deployments" throttle is metered as registry
            // operations here.
            Route::ConfigList
            | Route::ConfigGet(_)
            | Route::ConfigPut(_)
            | Route::ConfigDelete(_)
            | Route::ConfigTest
            | Route::RoutesGet
            | Route::RoutesPut
            | Route::GroupsGet
            | Route::GroupPut(_)
            | Route::GroupDelete(_)
            | Route::CasList
            | Route::CaGet(_)
            | Route::CaPut(_)
            | Route::CaDelete(_)
            | Route::CaCode(_)
            | Route::CaVerify(_) => Some(Limit::RegistryOpsPerMin),
            Route::FeedbackGet | Route::FeedbackDone { .. } => None,
        }
    }

    fn body_limit(&self) -> usize {
        match self {
            Route::Put(_) | Route::ModulePut(..) => IDENTITY_BODY,
            Route::ModuleList(_) | Route::ModuleGet(..) | Route::ModuleDelete(..) => NO_BODY,
            Route::Bulk => BULK_BODY,
            Route::TwinWrite { .. } => TWIN_BODY,
            Route::Method { .. } => METHOD_BODY,
            Route::C2dSend(_) => C2D_BODY,
            Route::Query => QUERY_BODY,
            Route::JobPut(_) => JOB_BODY,
            Route::JobGet(_) | Route::JobCancel(_) | Route::JobQuery => NO_BODY,
            Route::ConfigPut(_) | Route::ConfigTest => TWIN_BODY,
            Route::ConfigList | Route::ConfigGet(_) | Route::ConfigDelete(_) => NO_BODY,
            Route::FeedbackGet | Route::FeedbackDone { .. } | Route::RoutesGet => NO_BODY,
            Route::GroupsGet | Route::GroupPut(_) | Route::GroupDelete(_) => NO_BODY,
            Route::CasList | Route::CaGet(_) | Route::CaDelete(_) | Route::CaCode(_) => NO_BODY,
            Route::CaPut(_) | Route::CaVerify(_) => crate::cas::MAX_BODY,
            Route::RoutesPut => crate::routes::MAX_BODY,
            Route::List | Route::Get(_) | Route::Delete(_) | Route::Stats | Route::TwinGet(_) => {
                NO_BODY
            }
        }
    }
}

impl Api {
    /// Before the body is read: the route and the SAS token from the headers. A request that
    /// names no route or carries no valid credential for it is answered at once (404, 401), its
    /// body never read; an admitted one may send up to its route's body limit.
    pub fn admit(&self, parts: &Parts) -> Result<usize, Resp> {
        self.check(parts).map_err(|e| {
            self.count(e.status);
            e.response()
        })
    }

    /// A service request that reached an engine's port 443 (issue 11), served as this API
    /// serves its own port: `RestAdmit` is [`Self::admit`] on the head alone (the engine reads
    /// no body before it is admitted); `Rest` is admitted again, held to its route's body
    /// limit, then [`Self::handle`]d.
    pub async fn forwarded(self: Arc<Self>, request: ServiceRequest) -> ServiceReply {
        let (head, body) = match request {
            ServiceRequest::RestAdmit { head } => (head, None),
            ServiceRequest::Rest { head, body } => (head, Some(body)),
            _ => return http_reply(HubError::server("not a REST request").response()).await,
        };
        let mut builder = hyper::Request::builder()
            .method(head.method.as_str())
            .uri(head.target.as_str());
        for (name, value) in &head.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let (parts, ()) = match builder.body(()) {
            Ok(req) => req.into_parts(),
            Err(e) => return http_reply(HubError::bad_request(e.to_string()).response()).await,
        };
        let limit = match self.admit(&parts) {
            Ok(limit) => limit.min(httpd::MAX_BODY),
            Err(refusal) => return http_reply(refusal).await,
        };
        let Some(body) = body else {
            return ServiceReply::Admitted {
                body_limit: limit as u64,
            };
        };
        if body.len() > limit {
            let large = HubError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                413001,
                "RequestEntityTooLarge",
                format!("the body is over {limit} bytes"),
            );
            return http_reply(large.response()).await;
        }
        let resp = self
            .handle(hyper::Request::from_parts(parts, Bytes::from(body)))
            .await;
        http_reply(resp).await
    }

    fn check(&self, parts: &Parts) -> Result<usize, HubError> {
        let route = Route::parse(&parts.method, parts.uri.path())?;
        self.authorize(&parts.headers, parts.uri.path(), route.right())?;
        Ok(route.body_limit())
    }

    /// An admitted request, its body read: metered against its quota (held, or refused with
    /// 429), then served.
    pub async fn handle(self: Arc<Self>, req: Req) -> Resp {
        let quota = Route::parse(req.method(), req.uri().path())
            .ok()
            .and_then(|r| r.quota());
        if let Some(limit) = quota {
            match self.throttle.take(limit) {
                Ok(None) => {}
                Ok(Some(wait)) => {
                    self.metrics
                        .throttled
                        .with_label_values(&[limit.name(), "delayed"])
                        .inc();
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    self.metrics
                        .throttled
                        .with_label_values(&[limit.name(), "refused"])
                        .inc();
                    self.count(e.status);
                    return e.response();
                }
            }
        }
        // A method call waits for a device: on the runtime, never on a blocking-pool thread.
        if let Ok(Route::Method { id, module }) = Route::parse(req.method(), req.uri().path()) {
            // IoT Hub meters method traffic in 4 KB units of the request's size.
            let units = req.body().len().div_ceil(4096).max(1) as f64 * 4096.0;
            match self.throttle.take_n(Limit::MethodBytesPerSec, units) {
                Ok(None) => {}
                Ok(Some(wait)) => {
                    self.metrics
                        .throttled
                        .with_label_values(&[Limit::MethodBytesPerSec.name(), "delayed"])
                        .inc();
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    self.metrics
                        .throttled
                        .with_label_values(&[Limit::MethodBytesPerSec.name(), "refused"])
                        .inc();
                    self.count(e.status);
                    return e.response();
                }
            }
            let result = match MethodCall::parse(req.body()) {
                Ok(call) => self.methods.invoke(&id, module.as_deref(), call).await,
                Err(e) => Err(e),
            };
            let resp = match result {
                Ok(r) => httpd::json(
                    StatusCode::OK,
                    &json!({ "status": r.status, "payload": r.payload }),
                ),
                Err(e) => HubError::method(e).response(),
            };
            self.count(resp.status());
            return resp;
        }
        match tokio::task::spawn_blocking(move || self.route(&req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => e.response(),
            Err(e) => HubError::server(e).response(),
        }
    }

    fn route(&self, req: &Req) -> Result<Resp, HubError> {
        let result = Route::parse(req.method(), req.uri().path()).and_then(|route| match route {
            Route::List => self.list(req),
            Route::Get(id) => self.get(&id),
            Route::Put(id) => self.put(&id, req),
            Route::Bulk => self.bulk(req),
            Route::Delete(id) => self.delete(&id, req),
            Route::Stats => self.stats(),
            Route::TwinGet(id) => self
                .twins
                .get(&id)
                .map(|t| twin_response(&t))
                .map_err(HubError::twin),
            Route::TwinWrite { id, replace } => self
                .twins
                .write(&id, req.body(), if_match(req).as_deref(), replace)
                .map(|t| twin_response(&t))
                .map_err(HubError::twin),
            // Served by `handle` without a blocking-pool thread.
            Route::Method { .. } => Err(HubError::server("a method call is not routed here")),
            Route::C2dSend(id) => self.c2d_send(&id, req),
            Route::Query => self.query(req),
            Route::JobPut(id) => self
                .jobs
                .create(&id, req.body())
                .map(|j| job_response(&j))
                .map_err(HubError::job),
            Route::JobGet(id) => self
                .jobs
                .get(&id)
                .map(|j| job_response(&j))
                .map_err(HubError::job),
            Route::JobCancel(id) => self
                .jobs
                .cancel(&id)
                .map(|j| job_response(&j))
                .map_err(HubError::job),
            Route::ConfigList => {
                let top = query_param(req, "top")
                    .and_then(|t| t.parse::<usize>().ok())
                    .unwrap_or(crate::configurations::MAX_CONFIGURATIONS);
                self.configurations
                    .list(top)
                    .map(|c| httpd::json(StatusCode::OK, &c))
                    .map_err(HubError::config)
            }
            Route::ConfigGet(id) => self
                .configurations
                .get(&id)
                .map(|c| etagged(&c, &c.etag))
                .map_err(HubError::config),
            Route::ConfigPut(id) => self
                .configurations
                .put(&id, req.body(), if_match(req).as_deref())
                .map(|c| etagged(&c, &c.etag))
                .map_err(HubError::config),
            Route::ConfigDelete(id) => self
                .configurations
                .delete(&id, if_match(req).as_deref())
                .map(|_| httpd::empty(StatusCode::NO_CONTENT))
                .map_err(HubError::config),
            Route::ConfigTest => self
                .configurations
                .test_queries(req.body())
                .map(|v| httpd::json(StatusCode::OK, &v))
                .map_err(HubError::config),
            Route::JobQuery => {
                let (kind, status) = (query_param(req, "jobType"), query_param(req, "jobStatus"));
                self.jobs
                    .list(
                        kind.as_deref().filter(|k| !k.is_empty()),
                        status.as_deref().filter(|s| !s.is_empty()),
                    )
                    .map(|jobs| {
                        let mut r = httpd::json(StatusCode::OK, &jobs);
                        r.headers_mut().insert(
                            "x-ms-item-type",
                            hyper::header::HeaderValue::from_static("jobResponse"),
                        );
                        r
                    })
                    .map_err(HubError::job)
            }
            Route::ModuleList(id) => self.module_list(&id),
            Route::ModuleGet(id, m) => self.module_get(&id, &m),
            Route::ModulePut(id, m) => self.module_put(&id, &m, req),
            Route::ModuleDelete(id, m) => self.module_delete(&id, &m, req),
            Route::FeedbackGet => self.feedback_get(),
            Route::FeedbackDone { lock, complete } => self.feedback_done(&lock, complete),
            Route::RoutesGet => self
                .routes
                .status()
                .map(|v| httpd::json(StatusCode::OK, &v))
                .map_err(HubError::routes),
            Route::RoutesPut => self
                .routes
                .apply(req.body())
                .map(|v| httpd::json(StatusCode::OK, &v))
                .map_err(HubError::routes),
            Route::GroupsGet => crate::consumer_groups::stored(&self.store)
                .map(|groups| {
                    let all: Vec<&str> = std::iter::once(crate::consumer_groups::DEFAULT)
                        .chain(groups.iter().map(String::as_str))
                        .collect();
                    httpd::json(
                        StatusCode::OK,
                        &serde_json::json!({ "consumerGroups": all }),
                    )
                })
                .map_err(HubError::server),
            Route::GroupPut(name) => self.store.exclusive(|| {
                let created =
                    crate::consumer_groups::create(&self.store, &name).map_err(HubError::groups)?;
                if created {
                    self.routes
                        .republish("consumer group created")
                        .map_err(HubError::server)?;
                }
                let status = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                Ok(httpd::json(status, &serde_json::json!({ "name": name })))
            }),
            Route::CasList => crate::cas::stored(&self.store)
                .map(|all| {
                    let value: Vec<_> = all.iter().map(|c| c.description()).collect();
                    httpd::json(StatusCode::OK, &serde_json::json!({ "value": value }))
                })
                .map_err(HubError::server),
            Route::CaGet(name) => crate::cas::get(&self.store, &name)
                .map(|c| httpd::json(StatusCode::OK, &c.description()))
                .map_err(HubError::cas),
            Route::CaPut(name) => self.store.exclusive(|| {
                let was_trusted = crate::cas::get(&self.store, &name).is_ok_and(|c| c.is_verified);
                let (ca, created) =
                    crate::cas::put(&self.store, &name, req.body(), if_match(req).as_deref())
                        .map_err(HubError::cas)?;
                if was_trusted && !ca.is_verified {
                    self.routes
                        .republish("a verified CA's certificate replaced")
                        .map_err(HubError::server)?;
                }
                let status = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                Ok(httpd::json(status, &ca.description()))
            }),
            Route::CaDelete(name) => self.store.exclusive(|| {
                let was_trusted =
                    crate::cas::delete(&self.store, &name, if_match(req).as_deref())
                        .map_err(HubError::cas)?;
                if was_trusted {
                    self.routes
                        .republish("a verified CA removed")
                        .map_err(HubError::server)?;
                }
                Ok(httpd::empty(StatusCode::NO_CONTENT))
            }),
            Route::CaCode(name) => self.store.exclusive(|| {
                crate::cas::generate_code(&self.store, &name, if_match(req).as_deref())
                    .map(|c| httpd::json(StatusCode::OK, &c.description()))
                    .map_err(HubError::cas)
            }),
            Route::CaVerify(name) => self.store.exclusive(|| {
                let ca = crate::cas::verify(&self.store, &name, req.body(), if_match(req).as_deref())
                    .map_err(HubError::cas)?;
                self.routes
                    .republish("a CA verified")
                    .map_err(HubError::server)?;
                Ok(httpd::json(StatusCode::OK, &ca.description()))
            }),
            Route::GroupDelete(name) => self.store.exclusive(|| {
                crate::consumer_groups::delete(&self.store, &name).map_err(HubError::groups)?;
                self.routes
                    .republish("consumer group deleted")
                    .map_err(HubError::server)?;
                Ok(httpd::empty(StatusCode::NO_CONTENT))
            }),
        });
        self.count(result.as_ref().map_or_else(|e| e.status, |r| r.status()));
        // A write may have put lifecycle or twin events in the outbox.
        self.twins.events.written();
        result
    }

    fn count(&self, status: StatusCode) {
        self.metrics
            .requests
            .with_label_values(&[status.as_str()])
            .inc();
    }

    /// Checks the SAS token of a shared access policy (spec §1.2 server verification).
    fn authorize(&self, headers: &HeaderMap, path: &str, right: Right) -> Result<(), HubError> {
        let header = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| HubError::unauthorized("missing Authorization header"))?;
        let token = SasToken::parse(header).map_err(|e| {
            HubError::unauthorized(&format!("malformed SAS token ({})", e.error_code()))
        })?;
        let name = token.key_name().ok_or_else(|| {
            HubError::unauthorized("the token names no shared access policy (skn)")
        })?;
        let policy = self
            .store
            .policy(name)
            .map_err(HubError::server)?
            .ok_or_else(|| HubError::unauthorized("unknown shared access policy"))?;
        let target = format!("{}{}", self.hostname, path);
        if !roost_iothub::sas::authorizes(token.resource(), &target) {
            return Err(HubError::unauthorized(
                "the token's resource does not cover this hub",
            ));
        }
        let keys = policy_keys(&policy)?;
        token
            .verify(&[&keys[0], &keys[1]], unix_now())
            .map_err(|e| {
                HubError::unauthorized(&format!("SAS token rejected ({})", e.error_code()))
            })?;
        if !policy.allows(right) {
            return Err(HubError::unauthorized(&format!(
                "policy {name} lacks {right:?}"
            )));
        }
        Ok(())
    }

    fn list(&self, req: &Req) -> Result<Resp, HubError> {
        let top = match query_param(req, "top") {
            None => 1000,
            Some(t) => t
                .parse::<usize>()
                .map_err(|_| HubError::bad_request("top must be a number"))?
                .min(1000),
        };
        let devices = self.store.devices(top).map_err(HubError::server)?;
        Ok(httpd::json(StatusCode::OK, &devices))
    }

    fn get(&self, id: &str) -> Result<Resp, HubError> {
        let device = self
            .store
            .device(id)
            .map_err(HubError::server)?
            .ok_or_else(|| HubError::device_not_found(id))?;
        Ok(device_response(&device))
    }

    fn put(&self, id: &str, req: &Req) -> Result<Resp, HubError> {
        let body: DeviceWrite = serde_json::from_slice(req.body())
            .map_err(|e| HubError::bad_request(format!("invalid device JSON: {e}")))?;
        let if_match = if_match(req);
        self.store.exclusive(|| {
            let mut writes = self.store.writes();
            let device = self.write_device(&mut writes, id, &body, if_match.as_deref())?;
            writes.commit().map_err(HubError::server)?;
            tracing::info!(device = %device.device_id, status = %device.status, "device written");
            Ok(device_response(&device))
        })
    }

    /// Creates or updates one device inside `writes`, following IoT Hub's `If-Match` rules:
    /// none = create only, `*` = create or update, an etag = update that version only.
    fn write_device(
        &self,
        writes: &mut Writes<'_>,
        id: &str,
        body: &DeviceWrite,
        if_match: Option<&str>,
    ) -> Result<Device, HubError> {
        roost_model::DeviceId::parse(id)
            .map_err(|e| HubError::bad_request(format!("invalid device id: {e}")))?;
        if body.device_id.as_deref().is_some_and(|b| b != id) {
            return Err(HubError::bad_request(
                "deviceId in the body does not match the path",
            ));
        }
        let status = match body.status.as_deref() {
            None | Some("enabled") => "enabled",
            Some("disabled") => "disabled",
            Some(other) => {
                return Err(HubError::bad_request(format!(
                    "status must be enabled or disabled, not {other}"
                )))
            }
        };
        let empty = AuthenticationWrite::default();
        let auth = body.authentication.as_ref().unwrap_or(&empty);
        let existing = self.store.device(id).map_err(HubError::server)?;
        let authentication = auth
            .resolve(existing.as_ref().map(|d| &d.authentication))
            .map_err(HubError::bad_request)?;
        let is_new = existing.is_none();
        let now = iso_now();
        let device = match (existing, if_match) {
            (Some(_), None) => {
                return Err(HubError::new(
                    StatusCode::CONFLICT,
                    409001,
                    "DeviceAlreadyExists",
                    format!("Device {id} already exists"),
                ))
            }
            (Some(d), Some(tag)) if tag != "*" && tag != d.etag => {
                return Err(HubError::precondition_failed())
            }
            (None, Some(tag)) if tag != "*" => return Err(HubError::device_not_found(id)),
            (Some(mut d), Some(_)) => {
                if d.status != status {
                    d.status_updated_time = now;
                }
                d.status = status.to_string();
                d.status_reason = body.status_reason.clone();
                d.authentication = authentication;
                if let Some(c) = body.capabilities.clone() {
                    d.capabilities = c;
                }
                if let Some(p) = body.parent_scopes.clone() {
                    d.parent_scopes = p;
                }
                d.device_scope = device_scope(
                    id,
                    &d.generation_id,
                    &d.capabilities,
                    body,
                    d.device_scope.take(),
                );
                d.etag = self.store.next_etag().map_err(HubError::server)?;
                d
            }
            (None, _) => {
                let generation_id = generation_id();
                let capabilities = body
                    .capabilities
                    .clone()
                    .unwrap_or(Capabilities { iot_edge: false });
                Device {
                    device_scope: device_scope(id, &generation_id, &capabilities, body, None),
                    parent_scopes: body.parent_scopes.clone().unwrap_or_default(),
                    device_id: id.to_string(),
                    generation_id,
                    etag: self.store.next_etag().map_err(HubError::server)?,
                    connection_state: "Disconnected".into(),
                    status: status.to_string(),
                    status_reason: body.status_reason.clone(),
                    connection_state_updated_time: NEVER.into(),
                    status_updated_time: NEVER.into(),
                    last_activity_time: NEVER.into(),
                    cloud_to_device_message_count: 0,
                    authentication,
                    capabilities,
                }
            }
        };
        if is_new {
            let twin =
                crate::twins::create_in(writes, &self.store, id).map_err(HubError::server)?;
            let body = crate::twins::device_twin_json(&device, &twin);
            crate::twins::lifecycle_in(writes, id, "createDeviceIdentity", body);
            // A configuration may target it from the start (the reconciler takes the writer
            // lock first, so it sees the device once this batch is committed).
            self.twins.retarget.device(id);
        }
        writes.put(&device, true).map_err(HubError::server)?;
        Ok(device)
    }

    /// Creates the device `id` with `authentication`, or updates an existing one's
    /// authentication (keeping its status and twin), for the provisioning service. Answers
    /// whether it was created.
    pub fn provision_device(
        &self,
        id: &str,
        authentication: serde_json::Value,
        iot_edge: bool,
    ) -> Result<bool, HubError> {
        let status = self.store.device(id).map_err(HubError::server)?.map(|d| d.status);
        let body: DeviceWrite = serde_json::from_value(json!({
            "deviceId": id,
            "status": status.as_deref().unwrap_or("enabled"),
            "authentication": authentication,
            "capabilities": { "iotEdge": iot_edge },
        }))
        .map_err(|e| HubError::bad_request(format!("invalid device: {e}")))?;
        self.store.exclusive(|| {
            let mut writes = self.store.writes();
            let device = self.write_device(&mut writes, id, &body, Some("*"))?;
            writes.commit().map_err(HubError::server)?;
            tracing::info!(device = %device.device_id, "device provisioned");
            Ok(status.is_none())
        })
    }

    fn delete(&self, id: &str, req: &Req) -> Result<Resp, HubError> {
        let if_match = if_match(req);
        self.store.exclusive(|| {
            let mut writes = self.store.writes();
            self.delete_device(&mut writes, id, if_match.as_deref())?;
            writes.commit().map_err(HubError::server)?;
            tracing::info!(device = %id, "device deleted");
            Ok(httpd::empty(StatusCode::NO_CONTENT))
        })
    }

    fn delete_device(
        &self,
        writes: &mut Writes<'_>,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<(), HubError> {
        let existing = self
            .store
            .device(id)
            .map_err(HubError::server)?
            .ok_or_else(|| HubError::device_not_found(id))?;
        if let Some(tag) = if_match {
            if tag != "*" && tag != existing.etag {
                return Err(HubError::precondition_failed());
            }
        }
        let twin = self.store.twin_or_empty(id).map_err(HubError::server)?;
        let body = crate::twins::device_twin_json(&existing, &twin);
        crate::twins::lifecycle_in(writes, id, "deleteDeviceIdentity", body);
        writes.delete(id).map_err(HubError::server)?;
        Ok(())
    }

    /// `POST /devices`: up to 100 create/update/delete operations, committed together
    /// (spec §4: `[ExportImportDevice]` → `{isSuccessful, errors, warnings}`).
    fn bulk(&self, req: &Req) -> Result<Resp, HubError> {
        let items: Vec<BulkItem> = serde_json::from_slice(req.body())
            .map_err(|e| HubError::bad_request(format!("invalid bulk request: {e}")))?;
        if items.len() > MAX_BULK {
            return Err(HubError::bad_request(format!(
                "at most {MAX_BULK} devices per bulk request, got {}",
                items.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = items.iter().find(|i| !seen.insert(i.id.as_str())) {
            return Err(HubError::bad_request(format!(
                "device {} appears twice in one bulk request",
                dup.id
            )));
        }
        self.store.exclusive(|| {
            let mut writes = self.store.writes();
            let mut errors = Vec::new();
            for item in &items {
                let etag = item.e_tag.as_deref().map(unquote);
                // IoT Hub takes the modes in any case (`Create`, `CREATE`).
                let result = match item.import_mode.to_ascii_lowercase().as_str() {
                    "create" => self
                        .write_device(&mut writes, &item.id, &item.device, None)
                        .map(drop),
                    "update" => self
                        .write_device(&mut writes, &item.id, &item.device, Some("*"))
                        .map(drop),
                    "updateifmatchetag" => self
                        .write_device(
                            &mut writes,
                            &item.id,
                            &item.device,
                            Some(etag.unwrap_or("")),
                        )
                        .map(drop),
                    "delete" => self.delete_device(&mut writes, &item.id, None),
                    "deleteifmatchetag" => {
                        self.delete_device(&mut writes, &item.id, Some(etag.unwrap_or("")))
                    }
                    other => Err(HubError::bad_request(format!(
                        "importMode {other} is not supported"
                    ))),
                };
                if let Err(e) = result {
                    errors.push(json!({
                        "deviceId": item.id,
                        "errorCode": e.name,
                        "errorStatus": e.message,
                        "operation": item.import_mode,
                    }));
                }
            }
            writes.commit().map_err(HubError::server)?;
            let ok = errors.is_empty();
            tracing::info!(
                devices = items.len(),
                failed = errors.len(),
                "bulk registry operation"
            );
            let body = json!({ "isSuccessful": ok, "errors": errors, "warnings": [] });
            Ok(httpd::json(
                if ok {
                    StatusCode::OK
                } else {
                    StatusCode::BAD_REQUEST
                },
                &body,
            ))
        })
    }

    fn module_not_found(id: &str, m: &str) -> HubError {
        HubError::new(
            StatusCode::NOT_FOUND,
            404010,
            "ModuleNotFound",
            format!("Module {m} on device {id} not registered"),
        )
    }

    fn module_list(&self, id: &str) -> Result<Resp, HubError> {
        if self.store.device(id).map_err(HubError::server)?.is_none() {
            return Err(HubError::device_not_found(id));
        }
        let modules = self.store.modules_of(id).map_err(HubError::server)?;
        Ok(httpd::json(StatusCode::OK, &modules))
    }

    fn module_get(&self, id: &str, m: &str) -> Result<Resp, HubError> {
        let module = self
            .store
            .module(id, m)
            .map_err(HubError::server)?
            .ok_or_else(|| Self::module_not_found(id, m))?;
        Ok(etagged(&module, &module.etag))
    }

    /// `PUT /devices/{id}/modules/{m}`, with the device's `If-Match` rules; the module's keys
    /// are generated when not given (or given empty).
    fn module_put(&self, id: &str, m: &str, req: &Req) -> Result<Resp, HubError> {
        let body: ModuleWrite = serde_json::from_slice(req.body())
            .map_err(|e| HubError::bad_request(format!("invalid module JSON: {e}")))?;
        roost_model::DeviceId::parse(m)
            .map_err(|e| HubError::bad_request(format!("invalid module id: {e}")))?;
        if body.module_id.as_deref().is_some_and(|b| b != m)
            || body.device_id.as_deref().is_some_and(|b| b != id)
        {
            return Err(HubError::bad_request(
                "deviceId or moduleId in the body does not match the path",
            ));
        }
        let if_match = if_match(req);
        self.store.exclusive(|| {
            if self.store.device(id).map_err(HubError::server)?.is_none() {
                return Err(HubError::device_not_found(id));
            }
            let empty = AuthenticationWrite::default();
            let auth = body.authentication.as_ref().unwrap_or(&empty);
            let existing = self.store.module(id, m).map_err(HubError::server)?;
            let authentication = auth
                .resolve(existing.as_ref().map(|e| &e.authentication))
                .map_err(HubError::bad_request)?;
            let created = existing.is_none();
            let mut module = match (existing, if_match.as_deref()) {
                (Some(_), None) => {
                    return Err(HubError::new(
                        StatusCode::CONFLICT,
                        409301,
                        "ModuleAlreadyExistsOnDevice",
                        format!("Module {m} already exists on device {id}"),
                    ))
                }
                (Some(e), Some(tag)) if tag != "*" && tag != e.etag => {
                    return Err(HubError::precondition_failed())
                }
                (None, Some(tag)) if tag != "*" => return Err(Self::module_not_found(id, m)),
                (Some(e), Some(_)) => Module {
                    authentication,
                    ..e
                },
                (None, _) => Module {
                    module_id: m.to_string(),
                    device_id: id.to_string(),
                    managed_by: None,
                    generation_id: generation_id(),
                    etag: String::new(),
                    connection_state: "Disconnected".into(),
                    connection_state_updated_time: NEVER.into(),
                    last_activity_time: NEVER.into(),
                    cloud_to_device_message_count: 0,
                    authentication,
                },
            };
            if body.managed_by.is_some() {
                module.managed_by = body.managed_by.clone();
            }
            module.etag = self.store.next_etag().map_err(HubError::server)?;
            let mut writes = self.store.writes();
            if created {
                let twin = crate::twins::create_in(&mut writes, &self.store, &module.client_id())
                    .map_err(HubError::server)?;
                if let Some(device) = self.store.device(id).map_err(HubError::server)? {
                    let body = crate::twins::module_twin_json(&device, &module, &twin);
                    crate::twins::lifecycle_in(
                        &mut writes,
                        &module.client_id(),
                        "createModuleIdentity",
                        body,
                    );
                }
            }
            writes.put_module(&module).map_err(HubError::server)?;
            writes.commit().map_err(HubError::server)?;
            tracing::info!(device = %id, module = %m, "module written");
            let mut r = etagged(&module, &module.etag);
            if created {
                *r.status_mut() = StatusCode::CREATED;
            }
            Ok(r)
        })
    }

    fn module_delete(&self, id: &str, m: &str, req: &Req) -> Result<Resp, HubError> {
        let if_match = if_match(req);
        self.store.exclusive(|| {
            let existing = self
                .store
                .module(id, m)
                .map_err(HubError::server)?
                .ok_or_else(|| Self::module_not_found(id, m))?;
            if if_match
                .as_deref()
                .is_some_and(|tag| tag != "*" && tag != existing.etag)
            {
                return Err(HubError::precondition_failed());
            }
            let mut writes = self.store.writes();
            if let Some(device) = self.store.device(id).map_err(HubError::server)? {
                let twin = self
                    .store
                    .twin_or_empty(&existing.client_id())
                    .map_err(HubError::server)?;
                let body = crate::twins::module_twin_json(&device, &existing, &twin);
                crate::twins::lifecycle_in(
                    &mut writes,
                    &existing.client_id(),
                    "deleteModuleIdentity",
                    body,
                );
            }
            writes.delete_module(&existing.client_id());
            writes.commit().map_err(HubError::server)?;
            tracing::info!(device = %id, module = %m, "module deleted");
            Ok(httpd::empty(StatusCode::NO_CONTENT))
        })
    }

    /// `POST /devices/{id}/messages/deviceBound`: the body is the message, the headers its
    /// properties as the HTTPS device API carries them; 204 once it is queued (synced).
    fn c2d_send(&self, id: &str, req: &Req) -> Result<Resp, HubError> {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let ack = match header("iothub-ack") {
            None => Ack::None,
            Some(a) => Ack::parse(&a).ok_or_else(|| {
                HubError::bad_request(format!(
                    "iothub-ack must be none, positive, negative or full, not {a}"
                ))
            })?,
        };
        let expiry_ms = match header("iothub-expiry") {
            None => None,
            Some(e) => Some(roost_iothub::time::parse_iso_ms(&e).ok_or_else(|| {
                HubError::bad_request(format!("iothub-expiry is not an ISO-8601 time: {e}"))
            })?),
        };
        let mut properties = Vec::new();
        for (name, value) in req.headers() {
            if let Some(key) = name.as_str().strip_prefix("iothub-app-") {
                let value = value
                    .to_str()
                    .map_err(|_| HubError::bad_request(format!("{name} is not visible ASCII")))?;
                properties.push((key.to_string(), value.to_string()));
            }
        }
        let message = NewMessage {
            message_id: header("iothub-messageid"),
            correlation_id: header("iothub-correlationid"),
            user_id: header("iothub-userid"),
            content_type: header("content-type"),
            content_encoding: header("content-encoding"),
            ack,
            expiry_ms,
            properties,
            body: req.body().to_vec(),
        };
        match self.c2d.send(id, message) {
            Ok(message_id) => {
                tracing::debug!(device = %id, %message_id, "C2D message queued");
                Ok(httpd::empty(StatusCode::NO_CONTENT))
            }
            Err(C2dFailure::DeviceNotFound(id)) => Err(HubError::device_not_found(&id)),
            Err(e @ C2dFailure::QueueFull(_)) => Err(HubError::new(
                StatusCode::FORBIDDEN,
                403004,
                "DeviceMaximumQueueDepthExceeded",
                e.to_string(),
            )),
            Err(C2dFailure::BadRequest(m)) => Err(HubError::bad_request(m)),
            Err(C2dFailure::Store(e)) => Err(HubError::server(e)),
        }
    }

    /// `GET /messages/serviceBound/feedback`: up to 64 records and the lock token (`ETag`)
    /// that completes them; 204 when there are none.
    /// `POST /devices/query` with `{"query": ..}`; paged by `x-ms-max-item-count` and
    /// `x-ms-continuation`, which the response carries on every page but the last.
    fn query(&self, req: &Req) -> Result<Resp, HubError> {
        #[derive(serde::Deserialize)]
        struct Spec {
            query: String,
        }
        let spec: Spec = serde_json::from_slice(req.body()).map_err(|e| {
            HubError::bad_request(format!("the body must be {{\"query\": ..}}: {e}"))
        })?;
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let max_items = match header("x-ms-max-item-count") {
            None => None,
            Some(v) => Some(v.trim().parse::<usize>().map_err(|_| {
                HubError::bad_request("x-ms-max-item-count must be a positive number")
            })?),
        };
        let page = self
            .queries
            .run(&spec.query, header("x-ms-continuation"), max_items)
            .map_err(|e| match e {
                QueryFailure::Invalid(q) => HubError::bad_request(format!("invalid query: {q}")),
                QueryFailure::BadContinuation => HubError::bad_request(e.to_string()),
                QueryFailure::Store(e) => HubError::server(e),
            })?;
        let mut resp = httpd::json(StatusCode::OK, &page.items);
        let headers = resp.headers_mut();
        headers.insert(
            "x-ms-item-type",
            hyper::header::HeaderValue::from_static(page.item_type),
        );
        if let Some(token) = page.continuation {
            if let Ok(v) = hyper::header::HeaderValue::from_str(&token) {
                headers.insert("x-ms-continuation", v);
            }
        }
        self.metrics
            .queries
            .with_label_values(&[page.item_type])
            .inc();
        Ok(resp)
    }

    fn feedback_get(&self) -> Result<Resp, HubError> {
        match self.c2d.feedback().map_err(HubError::server)? {
            None => Ok(httpd::empty(StatusCode::NO_CONTENT)),
            Some((lock, records)) => {
                let mut r = httpd::json(StatusCode::OK, &records);
                let headers = r.headers_mut();
                headers.insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "application/vnd.microsoft.iothub.feedback.json",
                    ),
                );
                if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("\"{lock}\"")) {
                    headers.insert("etag", v);
                }
                Ok(r)
            }
        }
    }

    fn feedback_done(&self, lock: &str, complete: bool) -> Result<Resp, HubError> {
        let lock = unquote(lock);
        if !complete {
            // Abandoned: the records stay, for the next read.
            return Ok(httpd::empty(StatusCode::NO_CONTENT));
        }
        if !self.c2d.complete_feedback(lock).map_err(HubError::server)? {
            return Err(HubError::new(
                StatusCode::PRECONDITION_FAILED,
                412002,
                "DeviceMessageLockLost",
                format!("{lock} is not a feedback lock token"),
            ));
        }
        Ok(httpd::empty(StatusCode::NO_CONTENT))
    }

    fn stats(&self) -> Result<Resp, HubError> {
        let devices = self.store.devices(usize::MAX).map_err(HubError::server)?;
        let enabled = devices.iter().filter(|d| d.status == "enabled").count();
        Ok(httpd::json(
            StatusCode::OK,
            &json!({
                "totalDeviceCount": devices.len(),
                "enabledDeviceCount": enabled,
                "disabledDeviceCount": devices.len() - enabled,
            }),
        ))
    }
}

/// A twin, with its etag in the `ETag` header too.
fn job_response(job: &crate::jobs::Job) -> Resp {
    httpd::json(StatusCode::OK, job)
}

fn twin_response(twin: &serde_json::Value) -> Resp {
    let mut r = httpd::json(StatusCode::OK, twin);
    if let Some(etag) = twin.get("etag").and_then(|e| e.as_str()) {
        if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("\"{etag}\"")) {
            r.headers_mut().insert("etag", v);
        }
    }
    r
}

fn device_response(d: &Device) -> Resp {
    etagged(d, &d.etag)
}

/// `body` as JSON (200) with `etag` in the `ETag` header.
fn etagged(body: &impl serde::Serialize, etag: &str) -> Resp {
    let mut r = httpd::json(StatusCode::OK, body);
    if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("\"{etag}\"")) {
        r.headers_mut().insert("etag", v);
    }
    r
}

/// IoT Hub generation ids are 18-digit numbers; a new one per identity lifetime.
/// A device's scope as IoT Hub keeps it: an edge device has its own, made from its id and
/// generation; any other device has the one it was given (its parent edge device's), or keeps
/// the one it had.
fn device_scope(
    id: &str,
    generation_id: &str,
    capabilities: &Capabilities,
    body: &DeviceWrite,
    had: Option<String>,
) -> Option<String> {
    if capabilities.iot_edge {
        return Some(format!("ms-azure-iot-edge://{id}-{generation_id}"));
    }
    body.device_scope.clone().filter(|s| !s.is_empty()).or(had)
}

fn generation_id() -> String {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    format!("{:018}", u64::from_le_bytes(b) % 1_000_000_000_000_000_000)
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use bytes::Bytes;
    use hyper::Request;

    use roost_model::link::{DeviceCommand, TwinOp};

    use serde_json::Value;

    use super::*;

    fn api() -> (Api, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "roost-api-test-{}-{}",
            std::process::id(),
            tracking_id()
        ));
        let store = Store::open(&dir).expect("store opens");
        let metrics = Arc::new(ControlMetrics::new());
        let commands = Arc::new(crate::linkserver::Commands::default());
        let retarget = Arc::new(crate::configurations::Retarget::default());
        let twins = Arc::new(Twins {
            store: store.clone(),
            commands: commands.clone(),
            metrics: metrics.clone(),
            events: Arc::new(crate::events::HubEvents::new(
                store.clone(),
                commands,
                metrics.clone(),
                "localhost",
            )),
            retarget: retarget.clone(),
        });
        let methods = Arc::new(Methods::new(
            store.clone(),
            twins.commands.clone(),
            metrics.clone(),
        ));
        let c2d = Arc::new(C2d::new(
            store.clone(),
            twins.commands.clone(),
            metrics.clone(),
        ));
        let queries = Arc::new(Queries {
            store: store.clone(),
        });
        let api = Api {
            jobs: Arc::new(Jobs::new(
                store.clone(),
                queries.clone(),
                twins.clone(),
                methods.clone(),
                metrics.clone(),
            )),
            configurations: Arc::new(Configurations {
                store: store.clone(),
                twins: twins.clone(),
                queries: queries.clone(),
                retarget,
            }),
            routes: Arc::new(crate::routes::Routes {
                store: store.clone(),
                hub_name: "localhost".into(),
                limits: Vec::new(),
                policies: Vec::new(),
                epoch: tokio::sync::watch::channel(crate::routes::epoch(
                    &crate::routes::StoredRouting::default(),
                    Vec::new(),
                    Vec::new(),
                    Vec::new(),
                    Vec::new(),
                ))
                .0,
                verdicts: Arc::default(),
            }),
            queries,
            store,
            hostname: "localhost".into(),
            metrics,
            throttle: Throttle::new(&Quotas::default()),
            twins,
            methods,
            c2d,
        };
        (api, dir)
    }

    fn token(api: &Api, policy: &str, valid_for: i64) -> String {
        let p = api
            .store
            .policy(policy)
            .expect("store")
            .expect("default policy exists");
        let key = base64::engine::general_purpose::STANDARD
            .decode(&p.primary_key)
            .expect("base64 key");
        let expiry = (unix_now() as i64 + valid_for) as u64;
        roost_iothub::sas::sign(
            &roost_iothub::sas::encode_resource("localhost"),
            &key,
            expiry,
            Some(policy),
        )
    }

    fn request(method: &str, path: &str, token: Option<String>, body: &str) -> Req {
        let mut r = Request::builder()
            .method(method)
            .uri(format!("{path}?api-version=2021-04-12"));
        if let Some(t) = token {
            r = r.header("authorization", t);
        }
        r.body(Bytes::from(body.to_string())).expect("request")
    }

    /// What the server does with a request: admitted from its headers, then routed.
    fn call(api: &Api, req: &Req) -> Result<Resp, HubError> {
        let mut head = Request::new(());
        *head.method_mut() = req.method().clone();
        *head.uri_mut() = req.uri().clone();
        *head.headers_mut() = req.headers().clone();
        let (parts, ()) = head.into_parts();
        api.check(&parts)?;
        api.route(req)
    }

    fn status(api: &Api, req: &Req) -> u16 {
        match call(api, req) {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.status.as_u16(),
        }
    }

    const DEVICE: &str = r#"{"deviceId":"d1","authentication":{"type":"sas","symmetricKey":{}}}"#;

    #[test]
    fn each_policy_gets_exactly_its_rights() {
        let (api, dir) = api();
        // (policy, may read the registry, may write it)
        let cases = [
            ("iothubowner", true, true),
            ("registryReadWrite", true, true),
            ("registryRead", true, false),
            ("service", false, false),
            ("device", false, false),
        ];
        for (policy, read, write) in cases {
            let put = request(
                "PUT",
                "/devices/d1",
                Some(token(&api, policy, 3600)),
                DEVICE,
            );
            let expect_put = if write { 200 } else { 401 };
            assert_eq!(status(&api, &put), expect_put, "{policy} PUT");
            let get = request("GET", "/devices/d1", Some(token(&api, policy, 3600)), "");
            let expect_get = match (read, write) {
                (false, _) => 401,
                (true, true) => 200,
                (true, false) => 404,
            };
            assert_eq!(status(&api, &get), expect_get, "{policy} GET");
            if write {
                let del = request("DELETE", "/devices/d1", Some(token(&api, policy, 3600)), "");
                assert_eq!(status(&api, &del), 204, "{policy} DELETE");
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A twin's tags reach the engines' registry view: a tag change is a registry change with
    /// the tags (and a snapshot carries them); a desired-only change is not.
    #[test]
    fn tag_changes_are_registry_changes() {
        let (api, dir) = api();
        let owner = || Some(token(&api, "iothubowner", 3600));
        call(
            &api,
            &request("PUT", "/devices/t1", owner(), r#"{"deviceId":"t1"}"#),
        )
        .expect("device");
        let seq = api.store.registry_seq().expect("seq");
        call(
            &api,
            &request(
                "PATCH",
                "/twins/t1",
                owner(),
                r#"{"properties":{"desired":{"x":1}}}"#,
            ),
        )
        .expect("desired");
        // Routing reads desired and reported properties too: a registry change carries them.
        assert_eq!(api.store.registry_seq().expect("seq"), seq + 1);
        let changes = api
            .store
            .changes_between(seq, seq + 1)
            .expect("store")
            .expect("in the log");
        match &changes[..] {
            [roost_model::link::RegistryChange::Upsert(a)] => {
                let view: serde_json::Value = serde_json::from_str(&a.twin).expect("twin view");
                assert_eq!(view["properties"]["desired"]["x"], 1, "{view}");
                assert!(view["properties"]["desired"].get("$metadata").is_none());
            }
            other => panic!("{other:?}"),
        }
        let seq = seq + 1;
        call(
            &api,
            &request("PATCH", "/twins/t1", owner(), r#"{"tags":{"site":"oslo"}}"#),
        )
        .expect("tags");
        let changes = api
            .store
            .changes_between(seq, seq + 1)
            .expect("store")
            .expect("in the log");
        match &changes[..] {
            [roost_model::link::RegistryChange::Upsert(a)] => {
                assert_eq!(a.device_id, "t1");
                let view: serde_json::Value = serde_json::from_str(&a.twin).expect("twin view");
                assert_eq!(view["tags"], serde_json::json!({"site": "oslo"}));
                assert_eq!(view["properties"]["desired"]["x"], 1, "the properties stay");
                assert!(!a.primary_key.is_empty(), "the keys stay");
            }
            other => panic!("{other:?}"),
        }
        let (_, snapshot) = api.store.snapshot().expect("snapshot");
        let view = &snapshot
            .iter()
            .find(|d| d.device_id == "t1")
            .expect("t1")
            .twin;
        assert!(view.contains(r#""tags":{"site":"oslo"}"#), "{view}");
        // A device update keeps the tags in its registry change.
        let mut update = request(
            "PUT",
            "/devices/t1",
            owner(),
            r#"{"deviceId":"t1","status":"disabled"}"#,
        );
        update
            .headers_mut()
            .insert("if-match", "\"*\"".parse().expect("header"));
        call(&api, &update).expect("update");
        let changes = api
            .store
            .changes_between(seq + 1, seq + 2)
            .expect("store")
            .expect("in the log");
        assert!(
            matches!(&changes[..], [roost_model::link::RegistryChange::Upsert(a)] if a.twin.contains("oslo") && !a.enabled)
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    /// An edge device gets its own scope; a device under it keeps the scope it is given; a bulk
    /// import mode is taken in any case.
    #[test]
    fn edge_devices_have_scopes_and_import_modes_take_any_case() {
        let (api, dir) = api();
        let owner = || Some(token(&api, "iothubowner", 3600));
        let edge = json_of(
            &call(
                &api,
                &request(
                    "PUT",
                    "/devices/e1",
                    owner(),
                    r#"{"deviceId":"e1","capabilities":{"iotEdge":true}}"#,
                ),
            )
            .expect("edge"),
        );
        let scope = edge["deviceScope"]
            .as_str()
            .expect("an edge device's scope")
            .to_string();
        assert_eq!(
            scope,
            format!(
                "ms-azure-iot-edge://e1-{}",
                edge["generationId"].as_str().expect("generation")
            )
        );
        assert_eq!(edge["capabilities"]["iotEdge"], true);
        let child =
            format!(r#"{{"deviceId":"c1","deviceScope":"{scope}","parentScopes":["{scope}"]}}"#);
        let c =
            json_of(&call(&api, &request("PUT", "/devices/c1", owner(), &child)).expect("child"));
        assert_eq!(
            (c["deviceScope"].as_str(), c["parentScopes"][0].as_str()),
            (Some(scope.as_str()), Some(scope.as_str()))
        );
        let mut update = request(
            "PUT",
            "/devices/c1",
            owner(),
            r#"{"deviceId":"c1","status":"disabled"}"#,
        );
        update
            .headers_mut()
            .insert("if-match", "\"*\"".parse().expect("header"));
        let c = json_of(&call(&api, &update).expect("update"));
        assert_eq!(
            c["deviceScope"].as_str(),
            Some(scope.as_str()),
            "an update without a scope keeps it"
        );
        let plain = json_of(
            &call(
                &api,
                &request("PUT", "/devices/p1", owner(), r#"{"deviceId":"p1"}"#),
            )
            .expect("plain"),
        );
        assert!(plain.get("deviceScope").is_none());
        let bulk = r#"[{"id":"b1","importMode":"Create"},{"id":"b2","importMode":"CREATE"},{"id":"p1","importMode":"Delete"}]"#;
        let r = json_of(&call(&api, &request("POST", "/devices", owner(), bulk)).expect("bulk"));
        assert_eq!(r["isSuccessful"], true, "{r}");
        assert!(api.store.device("b2").expect("store").is_some());
        assert!(api.store.device("p1").expect("store").is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Configurations: the highest priority that matches is applied to each twin, the others
    /// target it; a tag change, a changed configuration and a deleted one are applied again;
    /// the system and custom metrics count twins; the error paths.
    #[test]
    fn configurations_set_desired_properties_by_priority() {
        let (api, dir) = api();
        let owner = || Some(token(&api, "iothubowner", 3600));
        for (id, tags) in [
            ("a", r#"{"env":"prod"}"#),
            ("b", r#"{"env":"prod","ring":"canary"}"#),
            ("c", r#"{"env":"dev"}"#),
        ] {
            let body = format!(r#"{{"deviceId":"{id}"}}"#);
            call(
                &api,
                &request("PUT", &format!("/devices/{id}"), owner(), &body),
            )
            .expect("device");
            call(
                &api,
                &request(
                    "PATCH",
                    &format!("/twins/{id}"),
                    owner(),
                    &format!(r#"{{"tags":{tags}}}"#),
                ),
            )
            .expect("tags");
        }
        let config = |id: &str, cond: &str, prio: i64, fw: &str| {
            json!({"id": id, "targetCondition": cond, "priority": prio,
                   "content": {"deviceContent": {"properties.desired.fw": fw}},
                   "metrics": {"queries": {"applied": format!("SELECT deviceId FROM devices WHERE configurations.[[{id}]].status = 'Applied'")}}})
            .to_string()
        };
        let put = |id: &str, body: &str, etag: Option<&str>| {
            let mut r = request("PUT", &format!("/configurations/{id}"), owner(), body);
            if let Some(e) = etag {
                r.headers_mut()
                    .insert("if-match", format!("\"{e}\"").parse().expect("header"));
            }
            call(&api, &r)
        };
        let base = json_of(
            &put("base", &config("base", "tags.env = 'prod'", 1, "1.0"), None).expect("base"),
        );
        put(
            "canary",
            &config("canary", "tags.ring = 'canary'", 10, "2.0"),
            None,
        )
        .expect("canary");
        let fw = |id: &str| {
            json_of(
                &call(&api, &request("GET", &format!("/twins/{id}"), owner(), "")).expect("twin"),
            )["properties"]["desired"]["fw"]
                .clone()
        };
        api.configurations.reconcile_pending().expect("reconcile");
        assert_eq!(
            (fw("a"), fw("b"), fw("c")),
            (json!("1.0"), json!("2.0"), Value::Null)
        );
        let twin_b = json_of(&call(&api, &request("GET", "/twins/b", owner(), "")).expect("twin"));
        assert_eq!(
            twin_b["configurations"],
            json!({"base": {"status": "Targeted"}, "canary": {"status": "Applied"}})
        );
        let got = json_of(
            &call(&api, &request("GET", "/configurations/base", owner(), "")).expect("get"),
        );
        assert_eq!(
            got["systemMetrics"]["results"],
            json!({"targetedCount": 2, "appliedCount": 1})
        );
        assert_eq!(got["metrics"]["results"]["applied"], 1);
        // A twin whose tags change is looked at again.
        call(
            &api,
            &request("PATCH", "/twins/c", owner(), r#"{"tags":{"env":"prod"}}"#),
        )
        .expect("retag");
        api.configurations.reconcile_pending().expect("reconcile");
        assert_eq!(fw("c"), json!("1.0"));
        // A changed configuration (here its priority: its content is fixed) is looked at again:
        // base now outranks canary on b.
        let etag = base["etag"].as_str().expect("etag");
        let e = put(
            "base",
            &config("base", "tags.env = 'prod'", 20, "1.0"),
            Some("stale"),
        )
        .expect_err("stale");
        assert_eq!(e.status, StatusCode::PRECONDITION_FAILED);
        let e = put(
            "base",
            &config("base", "tags.env = 'prod'", 20, "1.1"),
            Some(etag),
        )
        .expect_err("content");
        assert!(
            e.message.contains("content cannot be changed"),
            "{}",
            e.message
        );
        let base = json_of(
            &put(
                "base",
                &config("base", "tags.env = 'prod'", 20, "1.0"),
                Some(etag),
            )
            .expect("update"),
        );
        api.configurations.reconcile_pending().expect("reconcile");
        assert_eq!(
            (fw("a"), fw("b"), fw("c")),
            (json!("1.0"), json!("1.0"), json!("1.0"))
        );
        // Back below canary, then canary deleted: base is applied to b again.
        put(
            "base",
            &config("base", "tags.env = 'prod'", 1, "1.0"),
            base["etag"].as_str(),
        )
        .expect("update");
        api.configurations.reconcile_pending().expect("reconcile");
        assert_eq!(fw("b"), json!("2.0"));
        call(
            &api,
            &request("DELETE", "/configurations/canary", owner(), ""),
        )
        .expect("delete");
        api.configurations.reconcile_pending().expect("reconcile");
        assert_eq!(fw("b"), json!("1.0"));
        let listed =
            json_of(&call(&api, &request("GET", "/configurations", owner(), "")).expect("list"));
        assert_eq!(listed.as_array().expect("array").len(), 1);
        // The error paths.
        let e =
            put("base", &config("base", "tags.env = 'prod'", 1, "x"), None).expect_err("exists");
        assert_eq!(e.status, StatusCode::CONFLICT);
        let e = put("bad", &config("bad", "tags.env =", 1, "x"), None).expect_err("bad condition");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = put(
            "bad",
            r#"{"id":"bad","content":{"deviceContent":{"tags.x":1}}}"#,
            None,
        )
        .expect_err("bad content");
        assert!(e.message.contains("properties.desired."), "{}", e.message);
        let e =
            call(&api, &request("GET", "/configurations/nope", owner(), "")).expect_err("unknown");
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let t = json_of(&call(&api, &request("POST", "/configurations/testQueries", owner(), r#"{"targetCondition":"tags.x = 1","customMetricQueries":{"ok":"SELECT deviceId FROM devices","bad":"SELECT"}}"#)).expect("test"));
        assert_eq!(t["targetConditionError"], "");
        assert_eq!(t["customMetricQueryErrors"]["ok"], "");
        assert!(t["customMetricQueryErrors"]["bad"]
            .as_str()
            .expect("error")
            .contains("expected"));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Registry errors in the `ErrorCode:<Name>;…` form the Node SDK parses into typed errors
    /// (its `parseErrorBody` splits `Message` at `;` and the first part at `:`), others in
    /// the JSON form; the `iothub-errorcode` header on both.
    #[test]
    fn error_bodies_take_the_form_iot_hub_gives_them() {
        let not_found = HubError::device_not_found("d9").response();
        assert_eq!(not_found.status(), StatusCode::NOT_FOUND);
        assert_eq!(not_found.headers()["iothub-errorcode"], "DeviceNotFound");
        let body = json_of(&not_found);
        let message = body["Message"].as_str().expect("Message");
        let (code, text) = message.split_once(';').expect("ErrorCode:<Name>;<message>");
        assert_eq!(code.split(':').nth(1), Some("DeviceNotFound"));
        assert_eq!(text, "Device d9 not registered");
        assert!(body["ExceptionMessage"]
            .as_str()
            .expect("tracking")
            .starts_with("Tracking ID:"));
        for (e, name) in [
            (HubError::precondition_failed(), "PreconditionFailed"),
            (
                HubError::job(JobFailure::NotFound("j".into())),
                "JobNotFound",
            ),
            (
                HubError::job(JobFailure::Exists("j".into())),
                "JobAlreadyExists",
            ),
        ] {
            let m = json_of(&e.response())["Message"]
                .as_str()
                .expect("Message")
                .to_string();
            assert!(m.starts_with(&format!("ErrorCode:{name};")), "{m}");
        }
        let offline = HubError::method(MethodFailure::NotOnline).response();
        let inner: serde_json::Value =
            serde_json::from_str(json_of(&offline)["Message"].as_str().expect("Message"))
                .expect("JSON form");
        assert_eq!(inner["errorCode"], 404103);
        assert_eq!(offline.headers()["iothub-errorcode"], "DeviceNotOnline");
    }

    #[test]
    fn bad_tokens_are_401_with_an_iothub_error_body() {
        let (api, dir) = api();
        let expired = request(
            "GET",
            "/devices",
            Some(token(&api, "iothubowner", -3600)),
            "",
        );
        let missing = request("GET", "/devices", None, "");
        let mut forged = token(&api, "iothubowner", 3600);
        forged = forged.replace("skn=iothubowner", "skn=registryRead");
        let forged = request("GET", "/devices", Some(forged), "");
        for req in [expired, missing, forged] {
            let err = call(&api, &req).expect_err("refused");
            assert_eq!(err.status, StatusCode::UNAUTHORIZED);
            let resp = err.response();
            assert_eq!(
                resp.headers().get("iothub-errorcode").map(|v| v.as_bytes()),
                Some(&b"IotHubUnauthorized"[..])
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn etags_follow_iothub_if_match_rules() {
        let (api, dir) = api();
        let owner = || Some(token(&api, "iothubowner", 3600));
        let put = |if_match: Option<&str>| {
            let mut req = request("PUT", "/devices/d1", owner(), DEVICE);
            if let Some(m) = if_match {
                req.headers_mut()
                    .insert("if-match", m.parse().expect("header"));
            }
            call(&api, &req)
        };
        assert_eq!(
            put(Some("\"abc\"")).expect_err("missing device").status,
            StatusCode::NOT_FOUND
        );
        let created = put(None).expect("created");
        assert_eq!(
            created.status(),
            StatusCode::OK,
            "PUT create answers 200, not 201"
        );
        assert_eq!(put(None).expect_err("exists").status, StatusCode::CONFLICT);
        assert_eq!(
            put(Some("\"stale\"")).expect_err("stale etag").status,
            StatusCode::PRECONDITION_FAILED
        );
        let etag = created
            .headers()
            .get("etag")
            .expect("etag")
            .to_str()
            .expect("ascii")
            .to_string();
        assert_eq!(
            put(Some(&etag)).expect("matching etag").status(),
            StatusCode::OK
        );
        assert_eq!(
            put(Some("\"*\"")).expect("quoted wildcard").status(),
            StatusCode::OK
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    fn json_of(resp: &Resp) -> serde_json::Value {
        use http_body_util::BodyExt as _;
        let body = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(resp.body().clone().collect())
            .expect("a full body")
            .to_bytes();
        serde_json::from_slice(&body).expect("a JSON body")
    }

    /// `POST /devices/query` over twins and module twins: conditions on tags, reported
    /// properties and identity fields, projections, aggregates, `TOP`, and paging with
    /// `x-ms-continuation` absent on the last page.
    #[test]
    fn queries_are_answered_in_pages() {
        let (api, dir) = api();
        let owner = || Some(token(&api, "iothubowner", 3600));
        for i in 0..25 {
            let id = format!("q{i:02}");
            let body = format!(
                r#"{{"deviceId":"{id}","authentication":{{"type":"sas","symmetricKey":{{}}}}}}"#
            );
            call(
                &api,
                &request("PUT", &format!("/devices/{id}"), owner(), &body),
            )
            .expect("device");
            let site = if i % 3 == 0 { "oslo" } else { "bergen" };
            let patch = format!(r#"{{"tags":{{"site":"{site}","n":{i}}}}}"#);
            call(
                &api,
                &request("PATCH", &format!("/twins/{id}"), owner(), &patch),
            )
            .expect("tags");
        }
        call(
            &api,
            &request(
                "PUT",
                "/devices/q03/modules/m1",
                owner(),
                r#"{"moduleId":"m1","deviceId":"q03"}"#,
            ),
        )
        .expect("module");
        let run = |q: &str, max: Option<usize>, cont: Option<&str>| {
            let mut req = request(
                "POST",
                "/devices/query",
                owner(),
                &json!({ "query": q }).to_string(),
            );
            if let Some(m) = max {
                req.headers_mut().insert("x-ms-max-item-count", m.into());
            }
            if let Some(c) = cont {
                req.headers_mut()
                    .insert("x-ms-continuation", c.parse().expect("header"));
            }
            let resp = call(&api, &req)?;
            let header = |n: &str| {
                resp.headers()
                    .get(n)
                    .map(|v| v.to_str().expect("ascii").to_string())
            };
            Ok::<_, HubError>((
                json_of(&resp),
                header("x-ms-item-type"),
                header("x-ms-continuation"),
            ))
        };
        // Whole twins, one page.
        let (items, kind, cont) =
            run("SELECT * FROM devices WHERE tags.site = 'oslo'", None, None).expect("query");
        assert_eq!(items.as_array().expect("array").len(), 9);
        assert_eq!(items[0]["deviceId"], "q00");
        assert_eq!(items[0]["tags"]["n"], 0);
        assert!(items[0]["properties"]["desired"]["$version"].is_number());
        assert_eq!(kind.as_deref(), Some("twin"));
        assert_eq!(cont, None, "one page: no continuation");
        // Pages of 10: 10, 10, 5, the last without a continuation.
        let (mut seen, mut cont, mut pages) = (Vec::new(), None::<String>, 0);
        loop {
            let (items, _, next) =
                run("SELECT deviceId FROM devices", Some(10), cont.as_deref()).expect("page");
            pages += 1;
            seen.extend(
                items
                    .as_array()
                    .expect("array")
                    .iter()
                    .map(|i| i["deviceId"].as_str().expect("id").to_string()),
            );
            match next {
                Some(n) => cont = Some(n),
                None => break,
            }
        }
        assert_eq!((pages, seen.len()), (3, 25));
        assert_eq!(seen[24], "q24");
        // A page that ends exactly at the last match has no continuation.
        let (items, _, cont) = run(
            "SELECT deviceId FROM devices WHERE tags.n < 10",
            Some(10),
            None,
        )
        .expect("query");
        assert_eq!((items.as_array().expect("array").len(), cont), (10, None));
        // TOP across pages.
        let (items, _, cont) =
            run("SELECT TOP 12 deviceId FROM devices", Some(10), None).expect("query");
        assert_eq!(items.as_array().expect("array").len(), 10);
        let (items, _, cont) = run(
            "SELECT TOP 12 deviceId FROM devices",
            Some(10),
            cont.as_deref(),
        )
        .expect("query");
        assert_eq!((items.as_array().expect("array").len(), cont), (2, None));
        // Projections and identity fields; the primary-key path.
        let (items, kind, _) = run("SELECT deviceId, tags.n AS n, status FROM devices WHERE deviceId IN ['q07', 'q01', 'nope'] AND connectionState = 'Disconnected'", None, None).expect("query");
        assert_eq!(kind.as_deref(), Some("raw"));
        assert_eq!(
            items,
            json!([{"deviceId":"q01","n":1,"status":"enabled"},{"deviceId":"q07","n":7,"status":"enabled"}])
        );
        // Aggregates, paged by group.
        let (items, _, cont) = run(
            "SELECT tags.site AS site, COUNT() AS n FROM devices GROUP BY tags.site",
            Some(1),
            None,
        )
        .expect("query");
        assert_eq!(items, json!([{"site":"bergen","n":16}]));
        let (items, _, cont) = run(
            "SELECT tags.site AS site, COUNT() AS n FROM devices GROUP BY tags.site",
            Some(1),
            cont.as_deref(),
        )
        .expect("query");
        assert_eq!((items, cont), (json!([{"site":"oslo","n":9}]), None));
        // Module twins.
        let (items, _, _) = run(
            "SELECT * FROM devices.modules WHERE devices.deviceId = 'q03'",
            None,
            None,
        )
        .expect("query");
        assert_eq!(items[0]["moduleId"], "m1");
        assert_eq!(items.as_array().expect("array").len(), 1);
        assert_eq!(
            run(
                "SELECT * FROM devices.modules WHERE moduleId = 'zz'",
                None,
                None
            )
            .expect("query")
            .0,
            json!([])
        );
        // Regression: module rows by deviceId are paged in client-id order (`ma-1/y` sorts
        // before `ma/x`); a page ending at `ma/x` lost `ma-1/y`.
        for (d, m) in [("ma", "x"), ("ma-1", "y")] {
            let body = format!(r#"{{"deviceId":"{d}"}}"#);
            call(
                &api,
                &request("PUT", &format!("/devices/{d}"), owner(), &body),
            )
            .expect("device");
            let body = format!(r#"{{"moduleId":"{m}","deviceId":"{d}"}}"#);
            call(
                &api,
                &request("PUT", &format!("/devices/{d}/modules/{m}"), owner(), &body),
            )
            .expect("module");
        }
        let q = "SELECT * FROM devices.modules WHERE deviceId IN ['ma', 'ma-1']";
        let (first, _, cont) = run(q, Some(1), None).expect("page 1");
        let (second, _, last) = run(q, Some(1), cont.as_deref()).expect("page 2");
        assert_eq!(
            (
                first[0]["moduleId"].as_str(),
                second[0]["moduleId"].as_str(),
                last
            ),
            (Some("y"), Some("x"), None)
        );
        // Invalid queries and tokens are 400 with the reason.
        let e = run("SELECT * FROM devices WHERE", None, None).expect_err("invalid");
        assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, 400004));
        assert!(e.message.contains("expected a value"), "{}", e.message);
        let e = run("SELECT * FROM devices", None, Some("garbage")).expect_err("bad token");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e =
            call(&api, &request("POST", "/devices/query", owner(), "{}")).expect_err("no query");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(api.metrics.queries.with_label_values(&["raw"]).get(), 9);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Jobs over REST: a twin update on the devices a condition selects, a method job on
    /// offline devices (each fails with 404103), cancelling a scheduled job, the errors, the
    /// listing, and `devices.jobs`.
    #[test]
    fn jobs_run_on_the_devices_their_condition_selects() {
        let (api, dir) = api();
        let api = Arc::new(api);
        let owner = || Some(token(&api, "iothubowner", 3600));
        for (id, site) in [("j1", "oslo"), ("j2", "bergen"), ("j3", "oslo")] {
            let body = format!(
                r#"{{"deviceId":"{id}","authentication":{{"type":"sas","symmetricKey":{{}}}}}}"#
            );
            call(
                &api,
                &request("PUT", &format!("/devices/{id}"), owner(), &body),
            )
            .expect("device");
            let patch = format!(r#"{{"tags":{{"site":"{site}"}}}}"#);
            call(
                &api,
                &request("PATCH", &format!("/twins/{id}"), owner(), &patch),
            )
            .expect("tags");
        }
        let put = |id: &str, body: Value| {
            call(
                &api,
                &request("PUT", &format!("/jobs/v2/{id}"), owner(), &body.to_string()),
            )
        };
        let twin_job = json!({
            "jobId": "t1", "type": "scheduleUpdateTwin", "queryCondition": "tags.site = 'oslo'",
            "updateTwin": {"etag": "*", "properties": {"desired": {"fw": "2.0"}}},
            "maxExecutionTimeInSeconds": 60,
        });
        let created = json_of(&put("t1", twin_job.clone()).expect("job"));
        assert_eq!(created["status"], "queued");
        assert_eq!(created["type"], "scheduleUpdateTwin");
        let e = put("t1", twin_job).expect_err("twice");
        assert_eq!((e.status, e.code), (StatusCode::CONFLICT, 409104));
        let e = put(
            "bad",
            json!({"type": "scheduleUpdateTwin", "queryCondition": "tags.x =", "updateTwin": {}}),
        )
        .expect_err("bad condition");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("queryCondition"), "{}", e.message);
        let e = put("bad", json!({"type": "import"})).expect_err("bad type");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let method_job = json!({
            "type": "scheduleDeviceMethod", "queryCondition": "deviceId IN ['j1', 'j2']",
            "cloudToDeviceMethod": {"methodName": "reboot", "payload": {}, "responseTimeoutInSeconds": 5},
        });
        put("m1", method_job).expect("method job");
        let later = roost_iothub::time::iso_ms((unix_now() + 3600) * 1000);
        let scheduled = json_of(&put("s1", json!({"type": "scheduleUpdateTwin", "queryCondition": "*", "updateTwin": {"tags": {"x": 1}}, "startTime": later})).expect("scheduled"));
        assert_eq!(scheduled["status"], "scheduled");

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let get = |id: &str| {
            json_of(
                &call(
                    &api,
                    &request("GET", &format!("/jobs/v2/{id}"), owner(), ""),
                )
                .expect("get"),
            )
        };
        let jobs = api.jobs.clone();
        runtime.spawn(jobs.run());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while ["t1", "m1"]
            .iter()
            .any(|id| !matches!(get(id)["status"].as_str(), Some("completed" | "failed")))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "jobs did not finish: {} {}",
                get("t1"),
                get("m1")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let t1 = get("t1");
        assert_eq!(t1["status"], "completed", "{t1}");
        assert_eq!(
            t1["deviceJobStatistics"],
            json!({"deviceCount": 2, "failedCount": 0, "succeededCount": 2, "runningCount": 0, "pendingCount": 0})
        );
        assert!(t1["endTime"].is_string());
        let desired = |id: &str| {
            json_of(
                &call(&api, &request("GET", &format!("/twins/{id}"), owner(), "")).expect("twin"),
            )["properties"]["desired"]["fw"]
                .clone()
        };
        assert_eq!(
            (desired("j1"), desired("j2"), desired("j3")),
            (json!("2.0"), Value::Null, json!("2.0"))
        );
        let m1 = get("m1");
        assert_eq!(
            m1["status"], "completed",
            "a job completes even when devices fail: {m1}"
        );
        assert_eq!(m1["deviceJobStatistics"]["failedCount"], 2);
        // The scheduled job is cancelled before it starts; cancelling again changes nothing.
        let c = json_of(
            &call(&api, &request("POST", "/jobs/v2/s1/cancel", owner(), "")).expect("cancel"),
        );
        assert_eq!(c["status"], "cancelled");
        assert_eq!(get("s1")["status"], "cancelled");
        let e = call(&api, &request("GET", "/jobs/v2/nope", owner(), "")).expect_err("unknown");
        assert_eq!((e.status, e.code), (StatusCode::NOT_FOUND, 404002));
        // Listing by type and status.
        let list = |q: &str| {
            json_of(
                &call(
                    &api,
                    &request("GET", &format!("/jobs/v2/query?{q}&padding="), owner(), ""),
                )
                .expect("list"),
            )
        };
        let l = list("jobType=scheduleUpdateTwin");
        assert_eq!(l.as_array().expect("array").len(), 2);
        assert_eq!(list("jobStatus=cancelled")[0]["jobId"], "s1");
        // devices.jobs: a record per device the jobs touched.
        let mut q = request(
            "POST",
            "/devices/query",
            owner(),
            &json!({"query": "SELECT * FROM devices.jobs WHERE devices.jobs.deviceId = 'j1'"})
                .to_string(),
        );
        q.headers_mut().insert("x-ms-max-item-count", 10.into());
        let rows = json_of(&call(&api, &q).expect("query"));
        let rows = rows.as_array().expect("array");
        assert_eq!(rows.len(), 2, "{rows:?}");
        let m = rows
            .iter()
            .find(|r| r["jobId"] == "m1")
            .expect("the method job's record");
        assert_eq!(m["status"], "failed");
        assert!(
            m["error"]["description"]
                .as_str()
                .expect("why")
                .contains("404103"),
            "{m}"
        );
        assert_eq!(
            rows.iter().find(|r| r["jobId"] == "t1").expect("t1")["status"],
            "completed"
        );
        drop(runtime);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A job still running at its start time plus `maxExecutionTimeInSeconds` stops as failed,
    /// with the devices it did counted.
    #[test]
    fn a_job_past_its_max_execution_time_fails() {
        let (api, dir) = api();
        let api = Arc::new(api);
        let owner = || Some(token(&api, "iothubowner", 3600));
        let bulk: Vec<Value> = (0..100)
            .map(|i| json!({"id": format!("x{i:03}"), "importMode": "create"}))
            .collect();
        call(
            &api,
            &request("POST", "/devices", owner(), &Value::Array(bulk).to_string()),
        )
        .expect("bulk");
        let job = json!({"type": "scheduleUpdateTwin", "queryCondition": "*", "updateTwin": {"tags": {"t": 1}},
                         "maxExecutionTimeInSeconds": 1});
        call(
            &api,
            &request("PUT", "/jobs/v2/slow", owner(), &job.to_string()),
        )
        .expect("job");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.spawn(api.jobs.clone().run());
        let get =
            || json_of(&call(&api, &request("GET", "/jobs/v2/slow", owner(), "")).expect("get"));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !matches!(get()["status"].as_str(), Some("completed" | "failed")) {
            assert!(std::time::Instant::now() < deadline, "{}", get());
            std::thread::sleep(Duration::from_millis(50));
        }
        let j = get();
        assert_eq!(
            j["status"], "failed",
            "100 devices at 50 a second take 2 s: {j}"
        );
        assert!(j["failureReason"]
            .as_str()
            .expect("why")
            .contains("maxExecutionTimeInSeconds"));
        let stats = &j["deviceJobStatistics"];
        let done = stats["succeededCount"].as_u64().expect("count");
        assert!(done > 0 && done < 100, "{stats}");
        assert_eq!(stats["deviceCount"], 100);
        assert_eq!(stats["pendingCount"].as_u64(), Some(100 - done));
        drop(runtime);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn twins_are_read_patched_and_replaced_as_iot_hub_does() {
        let (api, dir) = api();
        let owner = || Some(token(&api, "iothubowner", 3600));
        call(&api, &request("PUT", "/devices/d1", owner(), DEVICE)).expect("device created");
        let twin = json_of(&call(&api, &request("GET", "/twins/d1", owner(), "")).expect("get"));
        assert_eq!(twin["deviceId"], "d1");
        assert_eq!(twin["version"], 1);
        assert_eq!(twin["properties"]["desired"]["$version"], 1);
        assert_eq!(twin["properties"]["reported"]["$version"], 1);
        assert_eq!(twin["authenticationType"], "sas");
        assert_eq!(twin["connectionState"], "Disconnected");
        assert!(twin["properties"]["desired"]["$metadata"]["$lastUpdated"].is_string());
        let etag = twin["etag"].as_str().expect("etag").to_string();

        let patch = |body: &str, if_match: Option<&str>| {
            let mut req = request("PATCH", "/twins/d1", owner(), body);
            if let Some(m) = if_match {
                req.headers_mut()
                    .insert("if-match", m.parse().expect("header"));
            }
            call(&api, &req)
        };
        let body = r#"{"tags":{"site":"oslo"},"properties":{"desired":{"rate":5,"mode":{"a":1}},"reported":{"ignored":true}},"etag":"*"}"#;
        let t = json_of(&patch(body, Some(&format!("\"{etag}\""))).expect("patch"));
        assert_eq!(t["version"], 2);
        assert_eq!(t["tags"]["site"], "oslo");
        assert_eq!(t["properties"]["desired"]["rate"], 5);
        assert_eq!(t["properties"]["desired"]["$version"], 2);
        assert_eq!(
            t["properties"]["desired"]["$metadata"]["rate"]["$lastUpdatedVersion"],
            2
        );
        assert!(
            t["properties"]["reported"].get("ignored").is_none(),
            "reported is not writable"
        );
        assert_ne!(t["etag"], etag.as_str(), "a change makes a new etag");
        // The old etag no longer matches; `*` always does.
        assert_eq!(
            patch(r#"{"tags":{"x":1}}"#, Some(&format!("\"{etag}\"")))
                .expect_err("stale")
                .status,
            StatusCode::PRECONDITION_FAILED
        );
        // null deletes a member.
        let t = json_of(
            &patch(r#"{"properties":{"desired":{"mode":null}}}"#, Some("\"*\"")).expect("delete"),
        );
        assert!(t["properties"]["desired"].get("mode").is_none());
        assert_eq!(t["properties"]["desired"]["$version"], 3);
        // Limits: 400 with an IoT Hub error body, nothing changed.
        let big = format!(
            r#"{{"properties":{{"desired":{{"blob":"{}"}}}}}}"#,
            "x".repeat(4000)
        )
        .repeat(1);
        let many: String = (0..12)
            .map(|i| format!(r#""k{i}":"{}""#, "y".repeat(3000)))
            .collect::<Vec<_>>()
            .join(",");
        let too_large = format!(r#"{{"properties":{{"desired":{{{many}}}}}}}"#);
        let too_deep = r#"{"properties":{"desired":{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}}}"#;
        for bad in [
            too_large.as_str(),
            too_deep,
            r#"{"tags":{"a.b":1}}"#,
            "[1]",
            "{",
        ] {
            let err = patch(bad, None).expect_err("refused");
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad:.60}");
            assert_eq!(err.code, 400004);
        }
        patch(&big, None).expect("a 4000-byte string fits");
        // PUT replaces tags and desired; the version moves on.
        let mut put = request(
            "PUT",
            "/twins/d1",
            owner(),
            r#"{"properties":{"desired":{"only":true}}}"#,
        );
        put.headers_mut()
            .insert("if-match", "\"*\"".parse().expect("header"));
        let t = json_of(&call(&api, &put).expect("replace"));
        assert_eq!(t["tags"], serde_json::json!({}));
        assert_eq!(t["properties"]["desired"]["only"], true);
        assert!(t["properties"]["desired"].get("rate").is_none());
        assert_eq!(t["properties"]["desired"]["$version"], 5);
        // Without ServiceConnect, no twin.
        let read_only = request(
            "GET",
            "/twins/d1",
            Some(token(&api, "registryRead", 3600)),
            "",
        );
        assert_eq!(status(&api, &read_only), 401);
        assert_eq!(
            status(&api, &request("GET", "/twins/nobody", owner(), "")),
            404
        );
        // A deleted device's twin goes with it; a new device of that id starts afresh.
        call(&api, &request("DELETE", "/devices/d1", owner(), "")).expect("deleted");
        call(&api, &request("PUT", "/devices/d1", owner(), DEVICE)).expect("created again");
        let t = json_of(&call(&api, &request("GET", "/twins/d1", owner(), "")).expect("get"));
        assert_eq!(t["version"], 1);
        assert_eq!(t["properties"]["desired"]["$version"], 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_devices_twin_requests_are_answered_with_mqtt_statuses() {
        let (api, dir) = api();
        let owner = || Some(token(&api, "iothubowner", 3600));
        call(&api, &request("PUT", "/devices/d1", owner(), DEVICE)).expect("device created");
        let answer = |device: &str, module: Option<&str>, op: TwinOp| match api
            .twins
            .device_request(device, module, "r1".into(), &op)
        {
            DeviceCommand::TwinResponse {
                rid,
                status,
                version,
                body,
            } => {
                assert_eq!(rid, "r1");
                (status, version, String::from_utf8(body).expect("utf-8"))
            }
            other => panic!("{other:?}"),
        };
        let (status, version, body) = answer("d1", None, TwinOp::Get);
        assert_eq!((status, version), (200, None));
        let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(doc["desired"]["$version"], 1);
        assert_eq!(doc["reported"]["$version"], 1);
        assert!(doc.get("tags").is_none());
        let patch = |b: &str| TwinOp::PatchReported {
            body: b.as_bytes().to_vec(),
        };
        assert_eq!(
            answer("d1", None, patch(r#"{"fw":"1.2","temp":{"c":20}}"#)),
            (204, Some(2), String::new())
        );
        assert_eq!(answer("d1", None, patch(r#"{"temp":null}"#)).1, Some(3));
        let (status, _, body) = answer("d1", None, patch("not json"));
        assert_eq!(status, 400);
        assert!(body.contains("400004"), "{body}");
        assert_eq!(
            answer(
                "d1",
                None,
                patch(r#"{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}"#)
            )
            .0,
            400
        );
        assert_eq!(answer("ghost", None, TwinOp::Get).0, 404);
        assert_eq!(answer("d1", Some("m1"), TwinOp::Get).0, 404);
        let (_, _, body) = answer("d1", None, TwinOp::Get);
        let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(doc["reported"]["fw"], "1.2");
        assert!(doc["reported"].get("temp").is_none());
        assert_eq!(doc["reported"]["$version"], 3);
        // The service sees what the device reported.
        let t = json_of(&call(&api, &request("GET", "/twins/d1", owner(), "")).expect("get"));
        assert_eq!(t["properties"]["reported"]["fw"], "1.2");
        assert_eq!(t["version"], 3);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn empty_keys_in_a_create_are_generated_as_the_node_sdk_expects() {
        let (api, dir) = api();
        let owner = Some(token(&api, "iothubowner", 3600));
        let body = r#"{"deviceId":"n1","authentication":{"type":"sas","symmetricKey":{"primaryKey":"","secondaryKey":""}}}"#;
        let d = json_of(&call(&api, &request("PUT", "/devices/n1", owner, body)).expect("created"));
        for k in ["primaryKey", "secondaryKey"] {
            let key = d["authentication"]["symmetricKey"][k]
                .as_str()
                .expect("a key");
            assert!(crate::device::valid_key(key), "{k}: {key}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_corrupt_policy_key_is_a_server_error_never_an_empty_key() {
        let policy = crate::policies::Policy {
            name: "broken".into(),
            primary_key: "not base64!".into(),
            secondary_key: base64::engine::general_purpose::STANDARD.encode([1u8; 32]),
            rights: vec![Right::RegistryRead],
        };
        let err = policy_keys(&policy).expect_err("corrupt key");
        assert_eq!(err.status, StatusCode::INTERNAL_SERVER_ERROR);
        let good = crate::policies::Policy {
            primary_key: base64::engine::general_purpose::STANDARD.encode([2u8; 32]),
            ..policy
        };
        let keys = policy_keys(&good).expect("valid keys");
        assert_eq!(keys[0], vec![2u8; 32]);
        assert_eq!(keys[1], vec![1u8; 32]);
    }

    /// The service API's half of the generated authorization test (issue 7): policies ×
    /// routes × tokens, decided by `check` (from the headers, before any body) and by an
    /// oracle from the spec (§1.2 step 7, §1.3).
    #[test]
    fn every_rest_request_is_admitted_as_the_spec_says() {
        let (api, dir) = api();
        let policies = [
            "iothubowner",
            "service",
            "device",
            "registryRead",
            "registryReadWrite",
        ];
        // (method, path, the right it needs) ; None: no such route (404 whatever the token).
        use Right::*;
        let routes: [(&str, &str, Option<Right>); 26] = [
            ("GET", "/devices", Some(RegistryRead)),
            ("GET", "/devices/d1", Some(RegistryRead)),
            ("PUT", "/devices/d1", Some(RegistryWrite)),
            ("POST", "/devices", Some(RegistryWrite)),
            ("DELETE", "/devices/d1", Some(RegistryWrite)),
            ("GET", "/statistics/devices", Some(RegistryRead)),
            ("GET", "/twins/d1", Some(ServiceConnect)),
            ("PATCH", "/twins/d1", Some(ServiceConnect)),
            ("PUT", "/twins/d1", Some(ServiceConnect)),
            ("POST", "/twins/d1/methods", Some(ServiceConnect)),
            ("POST", "/twins/d1/modules/m1/methods", Some(ServiceConnect)),
            (
                "POST",
                "/devices/d1/messages/deviceBound",
                Some(ServiceConnect),
            ),
            (
                "GET",
                "/messages/serviceBound/feedback",
                Some(ServiceConnect),
            ),
            (
                "DELETE",
                "/messages/serviceBound/feedback/1",
                Some(ServiceConnect),
            ),
            ("POST", "/devices/query", Some(ServiceConnect)),
            ("PUT", "/jobs/v2/j1", Some(RegistryWrite)),
            ("GET", "/jobs/v2/j1", Some(RegistryRead)),
            ("POST", "/jobs/v2/j1/cancel", Some(RegistryWrite)),
            ("GET", "/jobs/v2/query", Some(RegistryRead)),
            ("PUT", "/configurations/c1", Some(RegistryWrite)),
            ("GET", "/configurations/c1", Some(RegistryRead)),
            ("GET", "/configurations", Some(RegistryRead)),
            ("DELETE", "/configurations/c1", Some(RegistryWrite)),
            ("POST", "/configurations/testQueries", Some(RegistryRead)),
            ("PATCH", "/devices/d1", None),
            ("DELETE", "/twins/d1", None),
        ];
        // Spec §1.3's default policies.
        let may = |policy: &str, right: Right| match policy {
            "iothubowner" => true,
            "registryReadWrite" => matches!(right, RegistryRead | RegistryWrite),
            "registryRead" => right == RegistryRead,
            "service" => right == ServiceConnect,
            _ => false,
        };
        // (resource as signed, covers every path of this hub?)
        let scopes = [
            ("localhost", true),
            ("LOCALHOST/", true),
            ("localhost/devices", false), // covers /devices/…, not /statistics
            ("otherhub", false),
            ("localhost.evil", false),
            ("", false),
        ];
        let (mut cases, mut accepted) = (0u32, 0u32);
        for signer in policies {
            let key = {
                let p = api.store.policy(signer).expect("store").expect("policy");
                base64::engine::general_purpose::STANDARD
                    .decode(&p.primary_key)
                    .expect("key")
            };
            for claimed in policies.iter().copied().chain(["nobody"]) {
                for (scope, covers_all) in scopes {
                    for expiry in [3600i64, -60, -3600] {
                        for (method, path, route) in routes {
                            let token = roost_iothub::sas::sign(
                                &roost_iothub::sas::encode_resource(scope),
                                &key,
                                (unix_now() as i64 + expiry) as u64,
                                Some(claimed),
                            );
                            let covers = covers_all
                                || (scope == "localhost/devices" && path.starts_with("/devices"));
                            let expect = match route {
                                None => 404,
                                Some(right) => {
                                    let ok = claimed == signer
                                        && covers
                                        && expiry > -300
                                        && may(claimed, right);
                                    if ok {
                                        200
                                    } else {
                                        401
                                    }
                                }
                            };
                            let req = request(method, path, Some(token), "");
                            let mut head = Request::new(());
                            *head.method_mut() = req.method().clone();
                            *head.uri_mut() = req.uri().clone();
                            *head.headers_mut() = req.headers().clone();
                            let (parts, ()) = head.into_parts();
                            let got = match api.check(&parts) {
                                Ok(_) => 200,
                                Err(e) => e.status.as_u16(),
                            };
                            cases += 1;
                            accepted += u32::from(got == 200);
                            assert_eq!(
                                got, expect,
                                "{method} {path} signed by {signer} claiming {claimed}, sr={scope:?}, expiry {expiry}"
                            );
                        }
                    }
                }
            }
        }
        println!("service API authorization: {cases} cases, {accepted} admitted: 0 false accepts, 0 false refusals");
        assert!(cases >= 2_000);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Regression: `c2d_sends_per_min` had no bucket in [`Throttle`], so cloud-to-device sends
    /// went unmetered whatever the limit. Every route's quota must have one: with each limit
    /// at 1 and no shaping backlog, a route's second call is refused with 429001.
    #[test]
    fn every_metered_route_is_refused_past_its_quota() {
        let routes = [
            ("GET", "/devices/d1", Limit::RegistryOpsPerMin),
            (
                "POST",
                "/devices/d1/messages/deviceBound",
                Limit::C2dSendsPerMin,
            ),
            ("GET", "/twins/d1", Limit::TwinReadsPerSec),
            ("GET", "/twins/d1/modules/m1", Limit::TwinReadsPerSec),
            ("PATCH", "/twins/d1", Limit::TwinUpdatesPerSec),
            ("PUT", "/twins/d1/modules/m1", Limit::TwinUpdatesPerSec),
            ("POST", "/devices/query", Limit::QueriesPerMin),
            ("PUT", "/jobs/v2/j1", Limit::JobsOpsPerMin),
            ("GET", "/jobs/v2/query", Limit::JobsOpsPerMin),
            ("POST", "/jobs/v2/j1/cancel", Limit::JobsOpsPerMin),
        ];
        for (method, path, limit) in routes {
            let mut quotas = Quotas::default();
            for l in Limit::ALL {
                if l != Limit::D2cMaxBytes {
                    quotas.set(l, Some(1));
                }
            }
            quotas.set(Limit::ThrottleBacklogMs, Some(0));
            let throttle = Throttle::new(&quotas);
            let route = Route::parse(&method.parse().expect("method"), path).expect("route");
            assert_eq!(route.quota(), Some(limit), "{method} {path}");
            assert!(matches!(throttle.take(limit), Ok(None)), "{method} {path}");
            let refused = throttle
                .take(limit)
                .expect_err("the second call is over the quota");
            assert_eq!(
                (refused.status, refused.code, refused.name),
                (StatusCode::TOO_MANY_REQUESTS, 429001, "ThrottlingException"),
                "{method} {path}"
            );
        }
        // A method call is metered by `handle` in 4 KB units of its body, not by its route.
        let route = Route::parse(&Method::POST, "/twins/d1/methods").expect("route");
        assert_eq!(route.quota(), None);
        let mut quotas = Quotas::default();
        quotas.set(Limit::MethodBytesPerSec, Some(8192));
        quotas.set(Limit::ThrottleBacklogMs, Some(0));
        let throttle = Throttle::new(&quotas);
        assert!(matches!(
            throttle.take_n(Limit::MethodBytesPerSec, 8192.0),
            Ok(None)
        ));
        assert!(throttle.take_n(Limit::MethodBytesPerSec, 4096.0).is_err());
    }
}
