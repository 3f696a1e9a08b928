//! The device identity as the service API speaks it (spec §4.1), and its registry projection.

use base64::Engine as _;
use roost_model::link::DeviceAuth;
use serde::{Deserialize, Serialize};

/// "Never", as IoT Hub writes it.
pub const NEVER: &str = "0001-01-01T00:00:00Z";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub device_id: String,
    pub generation_id: String,
    pub etag: String,
    pub connection_state: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    pub connection_state_updated_time: String,
    pub status_updated_time: String,
    pub last_activity_time: String,
    pub cloud_to_device_message_count: u64,
    pub authentication: Authentication,
    pub capabilities: Capabilities,
    /// An edge device's own scope (`ms-azure-iot-edge://{id}-{generationId}`, made by the
    /// hub), or, for a device under an edge device, its parent's scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_scope: Option<String>,
    /// The scopes of an edge device's parents (nested edge).
    #[serde(default)]
    pub parent_scopes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    #[serde(rename = "type")]
    pub kind: String,
    pub symmetric_key: SymmetricKey,
    pub x509_thumbprint: X509Thumbprint,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKey {
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct X509Thumbprint {
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    pub iot_edge: bool,
}

/// A module identity (spec §4.1): its own keys, connection state and twin, under a device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Module {
    pub module_id: String,
    pub device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
    pub generation_id: String,
    pub etag: String,
    pub connection_state: String,
    pub connection_state_updated_time: String,
    pub last_activity_time: String,
    pub cloud_to_device_message_count: u64,
    pub authentication: Authentication,
}

impl Module {
    /// `device/module`: its client id, and its key in the store and the registry projection.
    pub fn client_id(&self) -> String {
        format!("{}/{}", self.device_id, self.module_id)
    }

    /// The part of the identity the data plane needs; the module is enabled while its
    /// device is (the engine checks both).
    pub fn auth(&self) -> DeviceAuth {
        DeviceAuth {
            device_id: self.client_id(),
            enabled: true,
            primary_key: decode_key(&self.authentication.symmetric_key.primary_key),
            secondary_key: decode_key(&self.authentication.symmetric_key.secondary_key),
            generation_id: self.generation_id.clone(),
            twin: String::new(),
        }
    }
}

/// What a client may set in a module PUT.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleWrite {
    pub module_id: Option<String>,
    pub device_id: Option<String>,
    pub managed_by: Option<String>,
    pub authentication: Option<AuthenticationWrite>,
}

/// What a client may set in a PUT; everything else is the hub's.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceWrite {
    pub device_id: Option<String>,
    pub status: Option<String>,
    pub status_reason: Option<String>,
    pub authentication: Option<AuthenticationWrite>,
    pub capabilities: Option<Capabilities>,
    pub device_scope: Option<String>,
    pub parent_scopes: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthenticationWrite {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub symmetric_key: Option<SymmetricKey>,
}

fn decode_key(k: &Option<String>) -> Vec<u8> {
    k.as_deref()
        .and_then(|k| base64::engine::general_purpose::STANDARD.decode(k).ok())
        .unwrap_or_default()
}

impl Device {
    /// The part of the identity the data plane needs.
    pub fn auth(&self) -> DeviceAuth {
        DeviceAuth {
            device_id: self.device_id.clone(),
            enabled: self.status == "enabled",
            primary_key: decode_key(&self.authentication.symmetric_key.primary_key),
            secondary_key: decode_key(&self.authentication.symmetric_key.secondary_key),
            generation_id: self.generation_id.clone(),
            twin: String::new(),
        }
    }
}

/// Checks a client-supplied key: base64 of 16 to 64 bytes (IoT Hub's rule).
pub fn valid_key(k: &str) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(k)
        .is_ok_and(|b| (16..=64).contains(&b.len()))
}
