//! Device twins at control, the twins' store of record: kept beside the devices (column family
//! `twins`, created with the device and deleted with it), read and written by the service API
//! (`GET/PATCH/PUT /twins/{id}`) and by devices through their engine (twin GET and reported
//! PATCH over the control link). A desired change is sent towards the device's engine at once;
//! an offline device gets it with its next GET. The twin rules (merge, versions, `$metadata`,
//! limits) are `roost-twin`'s; this module adds the etag, the identity fields a twin shows, and
//! the order of writes.
//!
//! Module twins are the same, under the client id `device/module`. What it is not: queries.

use std::collections::BTreeMap;
use std::sync::Arc;

use roost_model::link::{DeviceCommand, TwinOp};
use roost_twin::{Twin, TwinError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::api::now_ms;
use crate::device::{Device, Module};
use crate::events::{EventSource, HubEvent, HubEvents};
use crate::linkserver::Commands;
use crate::metrics::ControlMetrics;
use crate::store::{Store, StoreError, Writes};

/// A twin as stored: the document, its etag, and where the automatic device configurations
/// stand on it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredTwin {
    pub etag: String,
    pub twin: Twin,
    /// By configuration id: `Targeted` (its condition matches) or `Applied` (it has the highest
    /// priority of those that match, and its content was written to the desired properties).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub configurations: BTreeMap<String, ConfigState>,
}

impl StoredTwin {
    pub fn new(etag: String, twin: Twin) -> Self {
        StoredTwin {
            etag,
            twin,
            configurations: BTreeMap::new(),
        }
    }
}

/// A configuration's standing on one twin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigState {
    pub status: String,
    /// The configuration's etag when its content was applied (a changed configuration is
    /// applied again).
    #[serde(default)]
    pub applied_etag: String,
}

/// Why a twin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TwinFailure {
    #[error("device {0} is not registered")]
    DeviceNotFound(String),
    #[error("module twins come with module identities; {0} has none")]
    ModuleNotFound(String),
    #[error("the twin's etag does not match If-Match")]
    PreconditionFailed,
    #[error("invalid twin JSON: {0}")]
    BadJson(String),
    #[error(transparent)]
    Invalid(#[from] TwinError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TwinFailure {
    /// The status a device's MQTT twin request is answered with.
    fn mqtt_status(&self) -> (u16, u32) {
        match self {
            TwinFailure::DeviceNotFound(_) => (404, 404001),
            TwinFailure::ModuleNotFound(_) => (404, 404010),
            TwinFailure::PreconditionFailed => (412, 412001),
            TwinFailure::BadJson(_) | TwinFailure::Invalid(_) => (400, 400004),
            TwinFailure::Store(_) => (500, 500001),
        }
    }
}

/// A new device's twin, with a fresh etag.
pub fn new_twin(store: &Store) -> Result<StoredTwin, StoreError> {
    Ok(StoredTwin::new(store.next_etag()?, Twin::new(now_ms())))
}

/// Creates `device_id`'s twin in `writes` (a device being created); returns it.
pub fn create_in(
    writes: &mut Writes<'_>,
    store: &Store,
    device_id: &str,
) -> Result<StoredTwin, StoreError> {
    let twin = new_twin(store)?;
    writes.put_twin(device_id, &twin)?;
    Ok(twin)
}

/// A `deviceLifecycleEvents` record (`createDeviceIdentity`, `deleteDeviceIdentity`,
/// `createModuleIdentity`, `deleteModuleIdentity`) for `client_id`, in `writes`; its body is
/// the identity's twin, as IoT Hub's is.
pub fn lifecycle_in(writes: &mut Writes<'_>, client_id: &str, op: &str, twin: Value) {
    HubEvent::new(EventSource::Lifecycle, client_id, op, twin).write_in(writes);
}

/// The twin JSON of a device (lifecycle events).
pub fn device_twin_json(device: &Device, twin: &StoredTwin) -> Value {
    service_json(device_identity(device), twin)
}

/// The twin JSON of a module (lifecycle events).
pub fn module_twin_json(device: &Device, module: &Module, twin: &StoredTwin) -> Value {
    service_json(module_identity(device, module), twin)
}

/// The twin of a service write, as IoT Hub takes one: `$metadata` and `$version` in the desired
/// section (a twin read, changed and sent back) are the hub's and are ignored, as are every
/// read-only field and the reported section.
fn service_body(body: &Value) -> Value {
    let mut body = body.clone();
    if let Some(desired) = body
        .pointer_mut("/properties/desired")
        .and_then(Value::as_object_mut)
    {
        desired.remove("$metadata");
        desired.remove("$version");
    }
    body
}

pub struct Twins {
    pub store: Arc<Store>,
    pub commands: Arc<Commands>,
    pub metrics: Arc<ControlMetrics>,
    /// Where twin changes are told (`twinChangeEvents`), and device lifecycle by the API.
    pub events: Arc<HubEvents>,
    /// Twins whose tags changed, for the configurations to look at again.
    pub retarget: Arc<crate::configurations::Retarget>,
}

/// The body of a `twinChangeEvents` record: the new twin version and the changed parts, each
/// section with its new `$version`.
fn change_body(version: u64, tags: Option<&Value>, section: Option<(&str, Value, u64)>) -> Value {
    let mut body = json!({ "version": version });
    if let Some(t) = tags {
        body["tags"] = t.clone();
    }
    if let Some((name, mut members, v)) = section {
        if let Some(m) = members.as_object_mut() {
            m.insert("$version".into(), json!(v));
        }
        let mut properties = Map::new();
        properties.insert(name.to_string(), members);
        body["properties"] = Value::Object(properties);
    }
    body
}

impl Twins {
    /// The identity fields of `client_id` (`device` or `device/module`) and its twin; one
    /// without a twin (registered before twins existed) gets an empty one, stored so its etag
    /// holds.
    fn load(&self, client_id: &str) -> Result<(Map<String, Value>, StoredTwin), TwinFailure> {
        let (device_id, module_id) = match client_id.split_once('/') {
            Some((d, m)) => (d, Some(m)),
            None => (client_id, None),
        };
        let device = self
            .store
            .device(device_id)?
            .ok_or_else(|| TwinFailure::DeviceNotFound(device_id.to_string()))?;
        let identity = match module_id {
            None => device_identity(&device),
            Some(m) => {
                let module = self
                    .store
                    .module(device_id, m)?
                    .ok_or_else(|| TwinFailure::ModuleNotFound(client_id.to_string()))?;
                module_identity(&device, &module)
            }
        };
        let twin = match self.store.twin(client_id)? {
            Some(t) => t,
            None => {
                let t = new_twin(&self.store)?;
                self.store.put_twin(client_id, &t)?;
                t
            }
        };
        Ok((identity, twin))
    }

    /// `GET /twins/{id}`.
    pub fn get(&self, device_id: &str) -> Result<Value, TwinFailure> {
        let result = self
            .store
            .exclusive(|| self.load(device_id))
            .map(|(d, t)| service_json(d, &t));
        self.count("get", "service", &result);
        result
    }

    /// Stores a changed twin with the `twinChangeEvents` record of the change, in one batch,
    /// and, when what routing reads of it changed (tags or properties: the engines' view
    /// carries them for `$twin…` conditions and enrichments), the identity's registry change
    /// too. With `retarget`, the configurations look at the twin again.
    fn store_change(
        &self,
        client_id: &str,
        stored: &StoredTwin,
        event: &HubEvent,
        retarget: bool,
    ) -> Result<(), StoreError> {
        let view = stored.twin.routing_view();
        let before = self.store.twin_view(client_id)?;
        let mut writes = self.store.writes();
        writes.put_twin(client_id, stored)?;
        event.write_in(&mut writes);
        if view != before {
            if let Some(mut auth) = self.auth_of(client_id)? {
                auth.twin = view;
                writes.upsert_auth(auth);
            }
        }
        writes.commit()?;
        self.events.written();
        if retarget {
            self.retarget.device(client_id);
        }
        Ok(())
    }

    /// The registry entry of `client_id` (`device` or `device/module`), without its twin view.
    fn auth_of(
        &self,
        client_id: &str,
    ) -> Result<Option<roost_model::link::DeviceAuth>, StoreError> {
        Ok(match client_id.split_once('/') {
            None => self.store.device(client_id)?.map(|d| d.auth()),
            Some((d, m)) => self.store.module(d, m)?.map(|m| m.auth()),
        })
    }

    /// A twin as the service sees it and as stored (for the configurations' reconciler).
    pub fn load_both(&self, client_id: &str) -> Result<(Value, StoredTwin), TwinFailure> {
        self.store.exclusive(|| {
            let (identity, stored) = self.load(client_id)?;
            Ok((service_json(identity, &stored), stored))
        })
    }

    /// Records where configurations stand on `client_id`'s twin: the hub's bookkeeping, not a
    /// change of the twin (no new etag or version).
    pub fn set_configurations(
        &self,
        client_id: &str,
        states: BTreeMap<String, ConfigState>,
    ) -> Result<(), TwinFailure> {
        self.store.exclusive(|| {
            let (_, mut stored) = self.load(client_id)?;
            if stored.configurations != states {
                stored.configurations = states;
                self.store.put_twin(client_id, &stored)?;
            }
            Ok(())
        })
    }

    /// `PATCH /twins/{id}` (`replace` false) or `PUT` (`replace` true) with `If-Match`
    /// (`None` or `*`: whatever the twin's etag). A desired change goes to the device.
    pub fn write(
        &self,
        device_id: &str,
        body: &[u8],
        if_match: Option<&str>,
        replace: bool,
    ) -> Result<Value, TwinFailure> {
        let result = self.store.exclusive(|| {
            let body: Value =
                serde_json::from_slice(body).map_err(|e| TwinFailure::BadJson(e.to_string()))?;
            if !body.is_object() {
                return Err(TwinFailure::BadJson("a twin must be a JSON object".into()));
            }
            let body = service_body(&body);
            let (device, mut stored) = self.load(device_id)?;
            let before_tags = stored.twin.tags.clone();
            if if_match.is_some_and(|tag| tag != "*" && tag != stored.etag) {
                return Err(TwinFailure::PreconditionFailed);
            }
            let now = now_ms();
            let desired = if replace {
                Some(stored.twin.service_replace(&body, now)?)
            } else {
                let before = stored.twin.version;
                let delta = stored.twin.service_patch(&body, now)?;
                if stored.twin.version == before {
                    // Nothing changed: IoT Hub answers with the twin as it is.
                    return Ok(service_json(device, &stored));
                }
                delta
            };
            stored.etag = self.store.next_etag()?;
            let desired_version = stored.twin.desired.version();
            let (op, tags, section) = if replace {
                let desired = stored.twin.desired.to_json(false);
                (
                    "replaceTwin",
                    Some(Value::Object(stored.twin.tags.clone())),
                    Some(("desired", desired, desired_version)),
                )
            } else {
                let section = desired.clone().map(|d| ("desired", d, desired_version));
                ("updateTwin", body.get("tags").cloned(), section)
            };
            let event = HubEvent::new(
                EventSource::TwinChange,
                device_id,
                op,
                change_body(stored.twin.version, tags.as_ref(), section),
            );
            let tags_changed = before_tags != stored.twin.tags;
            self.store_change(device_id, &stored, &event, tags_changed)?;
            // Sent inside the writer lock, so devices get desired changes in version order.
            if let Some(body) = desired {
                self.push_desired(device_id, stored.twin.desired.version(), &body);
            }
            Ok(service_json(device, &stored))
        });
        self.count(
            if replace { "replace" } else { "patch" },
            "service",
            &result,
        );
        result
    }

    fn push_desired(&self, client_id: &str, version: u64, body: &Value) {
        let command = DeviceCommand::DesiredPatch {
            version,
            body: body.to_string().into_bytes(),
        };
        let outcome = if self.commands.post(client_id, command) {
            "sent"
        } else {
            "not_connected"
        };
        self.metrics
            .desired_pushes
            .with_label_values(&[outcome])
            .inc();
    }

    /// A device's twin request, answered as IoT Hub answers it over MQTT (spec §2.2): GET →
    /// 200 with desired and reported and their `$version`s; reported PATCH → 204 with the new
    /// reported `$version`; an error → its status and an IoT Hub error body.
    pub fn device_request(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        rid: String,
        op: &TwinOp,
    ) -> DeviceCommand {
        let client_id = match module_id {
            Some(m) => format!("{device_id}/{m}"),
            None => device_id.to_string(),
        };
        let result = self.store.exclusive(|| {
            let (_, mut stored) = self.load(&client_id)?;
            match op {
                TwinOp::Get => Ok((200, None, stored.twin.device_view().to_string())),
                TwinOp::PatchReported { body } => {
                    let patch: Value = serde_json::from_slice(body)
                        .map_err(|e| TwinFailure::BadJson(e.to_string()))?;
                    let before = stored.twin.version;
                    let version = stored.twin.device_patch_reported(&patch, now_ms())?;
                    if stored.twin.version != before {
                        stored.etag = self.store.next_etag()?;
                        let event = HubEvent::new(
                            EventSource::TwinChange,
                            &client_id,
                            "updateTwin",
                            change_body(
                                stored.twin.version,
                                None,
                                Some(("reported", patch.clone(), version)),
                            ),
                        );
                        // A configuration's condition may be on reported properties.
                        self.store_change(&client_id, &stored, &event, true)?;
                    }
                    Ok((204, Some(version), String::new()))
                }
            }
        });
        let op_name = op.kind();
        let (status, version, body) = match result {
            Ok(answer) => answer,
            Err(e) => {
                if let TwinFailure::Store(e) = &e {
                    tracing::warn!(error = %e, device = %device_id, "twin request failed in the store");
                }
                let (status, code) = e.mqtt_status();
                let body = json!({ "errorCode": code, "message": e.to_string() }).to_string();
                (status, None, body)
            }
        };
        self.metrics
            .twin_ops
            .with_label_values(&[op_name, "device", &status.to_string()])
            .inc();
        DeviceCommand::TwinResponse {
            rid,
            status,
            version,
            body: body.into_bytes(),
        }
    }

    fn count(&self, op: &str, origin: &str, result: &Result<Value, TwinFailure>) {
        let status = match result {
            Ok(_) => 200,
            Err(TwinFailure::DeviceNotFound(_) | TwinFailure::ModuleNotFound(_)) => 404,
            Err(TwinFailure::PreconditionFailed) => 412,
            Err(TwinFailure::BadJson(_) | TwinFailure::Invalid(_)) => 400,
            Err(TwinFailure::Store(_)) => 500,
        };
        self.metrics
            .twin_ops
            .with_label_values(&[op, origin, &status.to_string()])
            .inc();
    }
}

/// The identity fields a device's twin shows (spec §4.2).
pub(crate) fn device_identity(device: &Device) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("deviceId".into(), json!(device.device_id));
    out.insert("deviceEtag".into(), json!(device.etag));
    out.insert("status".into(), json!(device.status));
    out.insert("statusUpdateTime".into(), json!(device.status_updated_time));
    out.insert("connectionState".into(), json!(device.connection_state));
    out.insert("lastActivityTime".into(), json!(device.last_activity_time));
    out.insert(
        "cloudToDeviceMessageCount".into(),
        json!(device.cloud_to_device_message_count),
    );
    out.insert(
        "authenticationType".into(),
        json!(device.authentication.kind),
    );
    out.insert(
        "x509Thumbprint".into(),
        json!({
            "primaryThumbprint": device.authentication.x509_thumbprint.primary_thumbprint,
            "secondaryThumbprint": device.authentication.x509_thumbprint.secondary_thumbprint,
        }),
    );
    out.insert(
        "capabilities".into(),
        json!({ "iotEdge": device.capabilities.iot_edge }),
    );
    out
}

/// The identity fields a module's twin shows: the module's own, its device's status.
pub(crate) fn module_identity(device: &Device, module: &Module) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("deviceId".into(), json!(module.device_id));
    out.insert("moduleId".into(), json!(module.module_id));
    out.insert("deviceEtag".into(), json!(module.etag));
    out.insert("status".into(), json!(device.status));
    out.insert("statusUpdateTime".into(), json!(device.status_updated_time));
    out.insert("connectionState".into(), json!(module.connection_state));
    out.insert("lastActivityTime".into(), json!(module.last_activity_time));
    out.insert(
        "cloudToDeviceMessageCount".into(),
        json!(module.cloud_to_device_message_count),
    );
    out.insert(
        "authenticationType".into(),
        json!(module.authentication.kind),
    );
    out.insert(
        "x509Thumbprint".into(),
        json!({
            "primaryThumbprint": module.authentication.x509_thumbprint.primary_thumbprint,
            "secondaryThumbprint": module.authentication.x509_thumbprint.secondary_thumbprint,
        }),
    );
    out
}

/// A twin as the service API shows it (spec §4.2): the identity fields, the etag, then tags,
/// properties (with `$metadata` and `$version`) and the twin `version`.
pub fn service_json(mut identity: Map<String, Value>, stored: &StoredTwin) -> Value {
    identity.insert("etag".into(), json!(stored.etag));
    identity.extend(stored.twin.service_view());
    if !stored.configurations.is_empty() {
        let shown: Map<String, Value> = stored
            .configurations
            .iter()
            .map(|(id, s)| (id.clone(), json!({ "status": s.status })))
            .collect();
        identity.insert("configurations".into(), Value::Object(shown));
    }
    Value::Object(identity)
}
