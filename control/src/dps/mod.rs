//! The Device Provisioning Service (wire spec §7), served by control on its own host name and
//! ports: a device that knows only the service's host, an ID scope and a key or certificate
//! registers, is checked against the enrollments (`enrollments.rs`), created in the hub's
//! registry (with the enrollment's initial twin) and told which hub it was assigned to — this
//! one. [`Provisioning`] is the protocol-free core; `http.rs` serves it over HTTPS (with the
//! service API for enrollments on the same port), `mqtt.rs` over MQTT.
//!
//! A `custom` allocation policy runs the `on_provision` hook of the plugin `routes.lua` names
//! for provisioning (the routing's plugin host, its sandbox and limits).
//!
//! Not here yet: AMQP and WebSocket transports for devices, TPM attestation.

pub mod amqp;
pub mod enrollments;
pub mod http;
pub mod mqtt;
pub mod websocket;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roost_iothub::sas::SasToken;
use roost_iothub::x509::{ClientCert, TrustedCas};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api::Api;
use crate::store::{Store, StoreError};
use enrollments::{EnrollmentGroup, IndividualEnrollment, RegistrationState, StoredRegistration};

/// Where the provisioning service listens and the host name it answers to.
#[derive(Debug, Clone)]
pub struct DpsConfig {
    /// The service's host name: its service API's tokens are scoped to it.
    pub hostname: String,
    /// HTTPS: the device registration API and the service API for enrollments.
    pub https: Option<SocketAddr>,
    /// MQTT over TLS: device registration.
    pub mqtt: Option<SocketAddr>,
    /// AMQP over TLS: device registration.
    pub amqp: Option<SocketAddr>,
}

/// The service's identity, made on first start and kept in control's store: its ID scope and
/// the keys of its `provisioningserviceowner` policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceIdentity {
    pub id_scope: String,
    pub policy_name: String,
    pub primary_key: String,
    pub secondary_key: String,
}

impl ServiceIdentity {
    /// The stored identity, or a new one (stored) on first start.
    pub fn ensure(store: &Store) -> Result<Self, StoreError> {
        if let Some(raw) = store.dps("meta/identity")? {
            return serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt(e.to_string()));
        }
        let mut bytes = [0u8; 4];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| StoreError::Corrupt("no randomness for an ID scope".into()))?;
        let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
        let identity = Self {
            id_scope: format!("0ne00{}", &hex[..6]),
            policy_name: "provisioningserviceowner".into(),
            primary_key: roost_iothub::sas::generate_key(),
            secondary_key: roost_iothub::sas::generate_key(),
        };
        let json = serde_json::to_vec(&identity).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        store.put_dps("meta/identity", Some(&json))?;
        Ok(identity)
    }
}

/// What a device proves its registration with.
pub enum Credential<'a> {
    /// A SAS token scoped to `{idScope}/registrations/{registrationId}`, signed with the
    /// enrollment's key or the key its group derives.
    Token(&'a str),
    /// The client certificate of the TLS handshake (its common name the registration id).
    Certificate(&'a ClientCert),
}

/// A connection's proof, kept for each of its requests (MQTT, AMQP): a token, or the TLS
/// client certificate.
#[derive(Clone)]
enum Proof {
    Token(String),
    Certificate(ClientCert),
}

/// What an MQTT or AMQP connection proved: a registration of a scope, and how.
#[derive(Clone)]
struct Registrant {
    scope: String,
    registration: String,
    proof: Proof,
}

impl Registrant {
    /// Runs `f` with the registrant's scope, registration and credential off the async
    /// threads (the enrollments are in the store).
    async fn blocking<T: Send + 'static>(
        &self,
        dps: &Arc<Provisioning>,
        f: impl FnOnce(&Provisioning, &str, &str, &Credential<'_>) -> Result<T, DpsError> + Send + 'static,
    ) -> Result<T, DpsError> {
        let (dps, r) = (dps.clone(), self.clone());
        tokio::task::spawn_blocking(move || {
            let credential = match &r.proof {
                Proof::Token(t) => Credential::Token(t),
                Proof::Certificate(c) => Credential::Certificate(c),
            };
            f(&dps, &r.scope, &r.registration, &credential)
        })
        .await
        .unwrap_or_else(|_| Err(DpsError::server("the request failed")))
    }
}

/// An operation's answer status: 202, and how long to wait, while it is assigning; 200 once
/// decided.
fn answer_status(body: &Value) -> (u16, Option<u32>) {
    match body.get("status").and_then(Value::as_str) {
        Some("assigning") => (202, Some(RETRY_AFTER)),
        _ => (200, None),
    }
}

/// A refusal or failure, with the HTTP status and DPS error code it is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpsError {
    pub status: u16,
    pub code: u32,
    pub message: String,
    /// The `roost_dps_registrations_total` outcome.
    pub reason: &'static str,
}

impl DpsError {
    fn unauthorized(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 401,
            code: 401002,
            message: message.into(),
            reason,
        }
    }

    fn bad_request(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            code: 400004,
            message: message.into(),
            reason,
        }
    }

    fn server(e: impl std::fmt::Display) -> Self {
        Self {
            status: 500,
            code: 500000,
            message: e.to_string(),
            reason: "internal_error",
        }
    }

    /// The JSON error body DPS answers with.
    pub fn body(&self) -> Value {
        json!({
            "errorCode": self.code,
            "trackingId": crate::api::tracking_id(),
            "message": self.message,
            "timestampUtc": crate::api::iso_now(),
        })
    }
}

/// The enrollment a registration matched, and what the device's identity in the hub is.
struct Enrolled {
    /// `individual` or `group`, and its id.
    enrollment: (&'static str, String),
    /// `symmetricKey` or `x509`.
    attestation: &'static str,
    settings: enrollments::Settings,
    /// The device id an individual enrollment names.
    device_id: Option<String>,
    /// The group it came through.
    group: Option<String>,
    /// `authentication` for the hub's device PUT.
    authentication: Value,
}

impl Enrolled {
    fn individual(e: IndividualEnrollment, authentication: Value) -> Self {
        Self {
            enrollment: ("individual", e.registration_id),
            attestation: attestation_of(&e.attestation),
            settings: e.settings,
            device_id: e.device_id,
            group: None,
            authentication,
        }
    }

    fn group(g: EnrollmentGroup, authentication: Value) -> Self {
        Self {
            enrollment: ("group", g.enrollment_group_id.clone()),
            attestation: attestation_of(&g.attestation),
            settings: g.settings,
            device_id: None,
            group: Some(g.enrollment_group_id),
            authentication,
        }
    }
}

fn attestation_of(a: &enrollments::Attestation) -> &'static str {
    match a.kind.as_str() {
        "x509" => "x509",
        _ => "symmetricKey",
    }
}

/// A registration in progress or done: its answer, for the status polls.
struct Operation {
    registration_id: String,
    answer: Value,
    at: Instant,
}

/// Operations are answered for this long after they finish.
const OPERATION_TTL: Duration = Duration::from_secs(600);
/// At most this many operations are remembered; past it the oldest goes.
const MAX_OPERATIONS: usize = 10_000;
/// What a 202 tells a device to wait before it asks for the operation's status, seconds.
pub const RETRY_AFTER: u32 = 1;

/// The provisioning service's core: authenticate a registration, assign it, answer its status.
pub struct Provisioning {
    pub store: Arc<Store>,
    pub api: Arc<Api>,
    pub identity: ServiceIdentity,
    pub config: DpsConfig,
    /// The one hub devices are assigned to (this hub's host name).
    pub hub: String,
    operations: Mutex<HashMap<String, Operation>>,
    pub metrics: Arc<crate::metrics::ControlMetrics>,
}

/// `{idScope}/registrations/{registrationId}`: the scope of a registration's token.
pub fn registration_resource(id_scope: &str, registration_id: &str) -> String {
    format!("{id_scope}/registrations/{registration_id}")
}

/// Connections one provisioning listener serves at once; past it a new one is closed at accept.
const MAX_CONNECTIONS: usize = 4096;

/// Accepts TLS connections on `listener` (at most [`MAX_CONNECTIONS`] at once, 10 s for the
/// handshake) and serves each with `serve`, given the client certificate it presented.
async fn accept_tls<F, Fut>(listener: tokio::net::TcpListener, tls: tokio_rustls::TlsAcceptor, serve: F)
where
    F: Fn(
            tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
            Option<Result<ClientCert, roost_iothub::x509::CertError>>,
        ) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let serve = Arc::new(serve);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (serve, tls) = (serve.clone(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = socket.set_nodelay(true);
            let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), tls.accept(socket)).await else {
                return;
            };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .filter(|c| !c.is_empty())
                .map(ClientCert::from_chain);
            serve(stream, cert).await;
        });
    }
}

use crate::api::unix_now;

/// Whether `token` is signed with one of `keys` (base64; one that is not base64 signs
/// nothing) and unexpired at `now`.
fn signed_with(token: &SasToken, keys: [Option<&str>; 2], now: u64) -> bool {
    let keys: Vec<Vec<u8>> = keys
        .into_iter()
        .flatten()
        .filter_map(|k| roost_iothub::sas::decode_key(k).ok())
        .collect();
    let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    token.verify(&refs, now).is_ok()
}

impl Provisioning {
    pub fn new(
        store: Arc<Store>,
        api: Arc<Api>,
        identity: ServiceIdentity,
        config: DpsConfig,
        hub: String,
        metrics: Arc<crate::metrics::ControlMetrics>,
    ) -> Self {
        Self {
            store,
            api,
            identity,
            config,
            hub,
            operations: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Checks that `credential` proves `registration_id` is enrolled in `id_scope`.
    fn authenticate(
        &self,
        id_scope: &str,
        registration_id: &str,
        credential: &Credential<'_>,
    ) -> Result<Enrolled, DpsError> {
        if id_scope != self.identity.id_scope {
            return Err(DpsError::unauthorized("unknown_scope", "no provisioning service has this ID scope"));
        }
        enrollments::validate_registration_id(registration_id)
            .map_err(|e| DpsError::bad_request("bad_registration_id", e.to_string()))?;
        let individual = enrollments::individual(&self.store, registration_id).map_err(DpsError::server)?;
        match credential {
            Credential::Token(token) => self.by_token(id_scope, registration_id, token, individual),
            Credential::Certificate(cert) => self.by_certificate(registration_id, cert, individual),
        }
    }

    fn by_token(
        &self,
        id_scope: &str,
        registration_id: &str,
        token: &str,
        individual: Option<IndividualEnrollment>,
    ) -> Result<Enrolled, DpsError> {
        let token = SasToken::parse(token)
            .map_err(|e| DpsError::unauthorized("bad_token", format!("the token cannot be read: {e}")))?;
        if token.resource() != registration_resource(id_scope, registration_id) {
            return Err(DpsError::unauthorized(
                "wrong_audience",
                "the token is not scoped to this registration",
            ));
        }
        if token.key_name().is_some_and(|k| k != "registration") {
            return Err(DpsError::unauthorized("bad_token", "a registration token's skn is registration"));
        }
        let now = unix_now();
        token
            .check_expiry(now)
            .map_err(|_| DpsError::unauthorized("token_expired", "the token has expired"))?;
        let sas = |primary: Option<String>, secondary: Option<String>| {
            let (p, s) = (primary.unwrap_or_default(), secondary.unwrap_or_default());
            json!({"type": "sas", "symmetricKey": {"primaryKey": p, "secondaryKey": s}})
        };
        if let Some(e) = individual {
            let Some(keys) = e.attestation.symmetric_key.clone().filter(|_| e.attestation.kind == "symmetricKey") else {
                return Err(DpsError::unauthorized("wrong_attestation", "this registration is enrolled with a certificate"));
            };
            if !signed_with(&token, [keys.primary_key.as_deref(), keys.secondary_key.as_deref()], now) {
                return Err(DpsError::unauthorized("signature_mismatch", "the token is not signed with the enrollment's key"));
            }
            return Ok(Enrolled::individual(e, sas(keys.primary_key, keys.secondary_key)));
        }
        for g in self.groups()? {
            let Some(keys) = g.attestation.symmetric_key.clone().filter(|_| g.attestation.kind == "symmetricKey") else {
                continue;
            };
            let derive = |k: &Option<String>| k.as_deref().and_then(|k| enrollments::derive_key(k, registration_id).ok());
            let (primary, secondary) = (derive(&keys.primary_key), derive(&keys.secondary_key));
            if signed_with(&token, [primary.as_deref(), secondary.as_deref()], now) {
                return Ok(Enrolled::group(g, sas(primary, secondary)));
            }
        }
        Err(DpsError::unauthorized("not_enrolled", "no enrollment's key signed this token"))
    }

    fn by_certificate(
        &self,
        registration_id: &str,
        cert: &ClientCert,
        individual: Option<IndividualEnrollment>,
    ) -> Result<Enrolled, DpsError> {
        if cert.common_name.as_deref() != Some(registration_id) {
            return Err(DpsError::unauthorized(
                "common_name_mismatch",
                "the certificate's common name is not the registration id",
            ));
        }
        let now = unix_now();
        if !cert.valid_at(now as i64) {
            return Err(DpsError::unauthorized("certificate_expired", "the certificate has expired"));
        }
        let authentication = json!({
            "type": "selfSigned",
            "x509Thumbprint": { "primaryThumbprint": cert.sha256.to_ascii_uppercase() },
        });
        // The hub's verified CAs, read once for every enrollment that references one.
        let hub_cas = std::cell::OnceCell::new();
        let chains = |x: &enrollments::X509Attestation, signing: &Option<enrollments::Certificates>| -> bool {
            let mut anchors: Vec<(String, Vec<u8>)> = Vec::new();
            if let Some(c) = signing {
                for w in [&c.primary, &c.secondary].into_iter().flatten() {
                    if let Some(der) = enrollments::certificate_der(w) {
                        anchors.push(("signing".into(), der));
                    }
                }
            }
            if let Some(r) = &x.ca_references {
                let trusted: &Vec<roost_model::link::CaEntry> =
                    hub_cas.get_or_init(|| crate::cas::trusted(&self.store).unwrap_or_default());
                for name in [&r.primary, &r.secondary].into_iter().flatten() {
                    if let Some(ca) = trusted.iter().find(|c| &c.name == name) {
                        anchors.push((ca.name.clone(), ca.der.clone()));
                    }
                }
            }
            let (cas, _) = TrustedCas::new(anchors.iter().map(|(n, d)| (n.as_str(), d.as_slice())));
            cas.verify(cert, now).is_ok()
        };
        if let Some(e) = individual {
            let Some(x) = e.attestation.x509.clone().filter(|_| e.attestation.kind == "x509") else {
                return Err(DpsError::unauthorized("wrong_attestation", "this registration is enrolled with a symmetric key"));
            };
            let by_thumbprint = x.client_certificates.as_ref().is_some_and(|c| {
                [&c.primary, &c.secondary].into_iter().flatten().any(|w| {
                    enrollments::certificate_der(w).is_some_and(|der| roost_iothub::x509::ca_id(&der) == cert.sha256)
                })
            });
            if !by_thumbprint && !chains(&x, &None) {
                return Err(DpsError::unauthorized("thumbprint_mismatch", "the certificate is not the enrollment's"));
            }
            return Ok(Enrolled::individual(e, authentication));
        }
        for g in self.groups()? {
            let Some(x) = g.attestation.x509.clone().filter(|_| g.attestation.kind == "x509") else { continue };
            if chains(&x, &x.signing_certificates) {
                return Ok(Enrolled::group(g, authentication));
            }
        }
        Err(DpsError::unauthorized("not_enrolled", "no enrollment group's certificate signed this certificate"))
    }

    /// The enrollment groups (at most [`enrollments::MAX_GROUPS`]), each tried in turn by a
    /// registration no individual enrollment names.
    fn groups(&self) -> Result<Vec<EnrollmentGroup>, DpsError> {
        enrollments::groups(&self.store).map_err(DpsError::server)
    }

    /// Whether `credential` proves `registration_id` is enrolled (an MQTT CONNECT's check).
    pub fn check(&self, id_scope: &str, registration_id: &str, credential: &Credential<'_>) -> Result<(), DpsError> {
        self.authenticate(id_scope, registration_id, credential).map(|_| ())
    }

    /// A device's registration (`iotdps-register`): authenticated, then assigned at once —
    /// the device created or updated in the hub's registry with its initial twin — and
    /// answered as an operation in progress (`assigning`, 202), whose status the device then
    /// asks for. Blocking (store writes): call it off the async threads.
    pub fn register(
        &self,
        id_scope: &str,
        registration_id: &str,
        credential: &Credential<'_>,
        payload: Option<Value>,
    ) -> Result<Value, DpsError> {
        let enrolled = match self.authenticate(id_scope, registration_id, credential) {
            Ok(e) => e,
            Err(e) => {
                self.count(e.reason, "none");
                return Err(e);
            }
        };
        let policy = enrolled.settings.allocation_policy.clone().unwrap_or_else(|| "hashed".into());
        let operation_id = new_operation_id();
        let state = self.assign(registration_id, &enrolled, payload);
        let status = state.status.clone();
        self.count(if status == "assigned" { "assigned" } else { "failed" }, allocation_label(&policy));
        let answer = json!({
            "operationId": operation_id,
            "status": status,
            "registrationState": state,
        });
        let mut ops = self.operations.lock().unwrap_or_else(|p| p.into_inner());
        ops.retain(|_, o| o.at.elapsed() < OPERATION_TTL);
        if ops.len() >= MAX_OPERATIONS {
            if let Some(oldest) = ops.iter().min_by_key(|(_, o)| o.at).map(|(k, _)| k.clone()) {
                ops.remove(&oldest);
            }
        }
        ops.insert(
            operation_id.clone(),
            Operation { registration_id: registration_id.to_string(), answer, at: Instant::now() },
        );
        Ok(json!({ "operationId": operation_id, "status": "assigning" }))
    }

    /// The status of `operation_id` (`iotdps-get-operationstatus`), for the registration that
    /// started it, proven again.
    pub fn operation(
        &self,
        id_scope: &str,
        registration_id: &str,
        operation_id: &str,
        credential: &Credential<'_>,
    ) -> Result<Value, DpsError> {
        self.authenticate(id_scope, registration_id, credential)?;
        let ops = self.operations.lock().unwrap_or_else(|p| p.into_inner());
        match ops.get(operation_id) {
            Some(o) if o.registration_id == registration_id && o.at.elapsed() < OPERATION_TTL => Ok(o.answer.clone()),
            _ => Err(DpsError {
                status: 404,
                code: 404201,
                message: "no such operation for this registration".into(),
                reason: "unknown_operation",
            }),
        }
    }

    fn count(&self, outcome: &str, allocation: &str) {
        self.metrics.dps_registrations.with_label_values(&[outcome, allocation]).inc();
    }

    /// Assigns a registration: creates or updates its device in the hub and records its
    /// registration state.
    fn assign(&self, registration_id: &str, enrolled: &Enrolled, payload: Option<Value>) -> RegistrationState {
        let settings = &enrolled.settings;
        let mut device_id = enrolled.device_id.clone().unwrap_or_else(|| registration_id.to_string());
        let previous = enrollments::registration(&self.store, registration_id).ok().flatten();
        let now = crate::api::iso_now();
        let mut state = RegistrationState {
            registration_id: registration_id.to_string(),
            created_date_time_utc: Some(
                previous.as_ref().and_then(|p| p.state.created_date_time_utc.clone()).unwrap_or_else(|| now.clone()),
            ),
            last_updated_date_time_utc: Some(now),
            ..RegistrationState::default()
        };
        let outcome = (|| -> Result<&'static str, String> {
            if settings.provisioning_status.as_deref() == Some("disabled") {
                return Err("the enrollment is disabled".into());
            }
            let mut initial_twin = settings.initial_twin.clone();
            if settings.allocation_policy.as_deref() == Some("custom") {
                let request = json!({
                    "registrationId": registration_id,
                    "deviceId": device_id,
                    "payload": payload,
                    "enrollment": { "type": enrolled.enrollment.0, "id": enrolled.enrollment.1 },
                    "attestation": enrolled.attestation,
                    "hub": self.hub,
                    "linkedHubs": [self.hub],
                });
                let allocation = self.allocate(&request)?;
                if let Some(h) = allocation.get("iotHubHostName").and_then(Value::as_str) {
                    if !h.eq_ignore_ascii_case(&self.hub) {
                        return Err(format!("the allocation names {h:?}, not a hub linked to this service"));
                    }
                }
                if let Some(d) = allocation.get("deviceId").and_then(Value::as_str) {
                    roost_model::DeviceId::parse(d).map_err(|e| format!("the allocation's deviceId: {e}"))?;
                    device_id = d.to_string();
                }
                if let Some(t) = allocation.get("initialTwin").filter(|t| t.is_object()) {
                    initial_twin = Some(t.clone());
                }
                state.payload = allocation.get("payload").cloned().filter(|p| !p.is_null());
            }
            let iot_edge = settings
                .capabilities
                .as_ref()
                .and_then(|c| c.get("iotEdge"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let created = self
                .api
                .provision_device(&device_id, enrolled.authentication.clone(), iot_edge)
                .map_err(|e| e.to_string())?;
            let migrate = settings.reprovision_policy.unwrap_or_default().migrate_device_data;
            let substatus = match (created, migrate) {
                (true, _) => "initialAssignment",
                (false, true) => "deviceDataMigrated",
                (false, false) => "deviceDataReset",
            };
            if let Some(twin) = &initial_twin {
                if created || !migrate {
                    let collection = |v: Option<&Value>| strip_metadata(v.cloned().unwrap_or_else(|| json!({})));
                    let patch = json!({
                        "tags": collection(twin.get("tags")),
                        "properties": { "desired": collection(twin.pointer("/properties/desired")) },
                    });
                    let body = serde_json::to_vec(&patch).map_err(|e| e.to_string())?;
                    self.api.twins.write(&device_id, &body, Some("*"), !created).map_err(|e| format!("{e:?}"))?;
                }
            }
            Ok(substatus)
        })();
        state.device_id = Some(device_id);
        match outcome {
            Ok(substatus) => {
                state.status = "assigned".into();
                state.substatus = Some(substatus.into());
                state.assigned_hub = Some(self.hub.clone());
            }
            Err(message) => {
                tracing::info!(registration = %registration_id, %message, "registration failed");
                state.status = if settings.provisioning_status.as_deref() == Some("disabled") { "disabled".into() } else { "failed".into() };
                state.error_code = Some(400209);
                state.error_message = Some(message);
                state.payload = None;
            }
        }
        state.etag = self.store.next_etag().ok();
        let stored = StoredRegistration {
            state: state.clone(),
            group: enrolled.group.clone(),
        };
        if let Err(e) = enrollments::save_registration(&self.store, &stored) {
            tracing::warn!(error = %e, "a registration state could not be stored");
        }
        state
    }

    /// A `custom` allocation: the `on_provision` hook of the plugin routes.lua names for
    /// provisioning, loaded from the routing in force (each call its own load: state does
    /// not outlive a registration). `nil` refuses the registration.
    fn allocate(&self, request: &Value) -> Result<Value, String> {
        let routing = crate::routes::stored(&self.store).map_err(|e| e.to_string())?;
        let hub_name = self.hub.split('.').next().unwrap_or(&self.hub);
        let mut loaded = roost_routing::Routing::load_with_defaults("routes.lua", &routing.routes, &routing.plugins, hub_name)
            .map_err(|e| format!("the routing in force does not load: {e}"))?;
        match loaded.provision(request) {
            Ok(Some(allocation)) if allocation.is_object() => Ok(allocation),
            Ok(Some(_)) => Err("on_provision answered a list, not an allocation".into()),
            Ok(None) => Err("the provisioning plugin refused the registration".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A twin collection as the service API takes it: without the fields a `TwinCollection` of
/// the DPS service API may carry beside the properties (`version`, `count`, `metadata`,
/// `$metadata`, `$version`).
fn strip_metadata(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.retain(|k, _| !matches!(k.as_str(), "version" | "count" | "metadata" | "$metadata" | "$version"));
    }
    v
}

fn allocation_label(policy: &str) -> &'static str {
    match policy {
        "static" => "static",
        "custom" => "custom",
        "geoLatency" => "geoLatency",
        _ => "hashed",
    }
}

fn new_operation_id() -> String {
    let mut bytes = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("5.{hex}")
}
