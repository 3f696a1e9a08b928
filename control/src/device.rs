//! The device identity as the service API speaks it (spec §4.1), and its registry projection.

use base64::Engine as _;
use roost_model::link::{DeviceAuth, X509Auth};
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
            x509: self.authentication.x509(),
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
    pub x509_thumbprint: Option<X509Thumbprint>,
}

/// A thumbprint as IoT Hub takes it: the hex SHA-1 (40 digits) or SHA-256 (64) of the
/// certificate's DER, either case.
pub fn valid_thumbprint(t: &str) -> bool {
    matches!(t.len(), 40 | 64) && t.bytes().all(|b| b.is_ascii_hexdigit())
}

impl AuthenticationWrite {
    /// The authentication a PUT asks for, given what the identity had (`existing`, on an
    /// update): `sas` with the keys given, else those it had, else new ones; `selfSigned` with
    /// a primary thumbprint and optionally a secondary one; `certificateAuthority` (a
    /// certificate chaining to a verified CA, its common name the identity's). Nothing said:
    /// what it had, or `sas` with new keys. `Err`: why it is refused (400).
    pub fn resolve(&self, existing: Option<&Authentication>) -> Result<Authentication, String> {
        let kind = match (self.kind.as_deref(), existing) {
            (Some(k), _) => k,
            (None, Some(e)) if self.symmetric_key.is_none() && self.x509_thumbprint.is_none() => {
                return Ok(e.clone())
            }
            (None, Some(e)) => e.kind.as_str(),
            (None, None) => "sas",
        };
        match kind {
            "sas" => {
                let mut keys = self.symmetric_key.clone().unwrap_or_default();
                for k in [&mut keys.primary_key, &mut keys.secondary_key] {
                    // An empty key is no key: the Node SDK's `Registry.create({deviceId})`
                    // sends `{"primaryKey":"","secondaryKey":""}` and IoT Hub generates both.
                    if k.as_deref() == Some("") {
                        *k = None;
                    }
                    if k.as_deref().is_some_and(|k| !valid_key(k)) {
                        return Err("symmetric keys must be base64 of 16 to 64 bytes".into());
                    }
                }
                // Keys left out of an update are kept, not regenerated.
                let had = existing
                    .filter(|e| e.kind == "sas")
                    .map(|e| e.symmetric_key.clone())
                    .unwrap_or_default();
                let pick = |given: Option<String>, had: Option<String>| {
                    given
                        .or(had)
                        .unwrap_or_else(roost_iothub::sas::generate_key)
                };
                Ok(Authentication {
                    kind: "sas".into(),
                    symmetric_key: SymmetricKey {
                        primary_key: Some(pick(keys.primary_key, had.primary_key)),
                        secondary_key: Some(pick(keys.secondary_key, had.secondary_key)),
                    },
                    x509_thumbprint: X509Thumbprint::default(),
                })
            }
            "selfSigned" => {
                let t = self.x509_thumbprint.clone().unwrap_or_default();
                let given = |t: Option<String>| t.filter(|t| !t.is_empty());
                let (primary, secondary) =
                    (given(t.primary_thumbprint), given(t.secondary_thumbprint));
                let Some(primary) = primary else {
                    return Err(
                        "a selfSigned identity needs x509Thumbprint.primaryThumbprint".into(),
                    );
                };
                if ![Some(&primary), secondary.as_ref()]
                    .into_iter()
                    .flatten()
                    .all(|t| valid_thumbprint(t))
                {
                    return Err("a thumbprint is the hex SHA-1 (40 digits) or SHA-256 (64 digits) of the certificate".into());
                }
                Ok(Authentication {
                    kind: "selfSigned".into(),
                    symmetric_key: SymmetricKey::default(),
                    x509_thumbprint: X509Thumbprint {
                        primary_thumbprint: Some(primary),
                        secondary_thumbprint: secondary,
                    },
                })
            }
            "certificateAuthority" => Ok(Authentication {
                kind: "certificateAuthority".into(),
                symmetric_key: SymmetricKey::default(),
                x509_thumbprint: X509Thumbprint::default(),
            }),
            other => Err(format!(
                "authentication type {other} is not one of sas, selfSigned, certificateAuthority"
            )),
        }
    }
}

impl Authentication {
    /// What the data plane needs of it.
    pub fn x509(&self) -> X509Auth {
        match self.kind.as_str() {
            "selfSigned" => X509Auth::SelfSigned {
                thumbprints: [
                    &self.x509_thumbprint.primary_thumbprint,
                    &self.x509_thumbprint.secondary_thumbprint,
                ]
                .into_iter()
                .flatten()
                .map(|t| t.to_ascii_lowercase())
                .collect(),
            },
            "certificateAuthority" => X509Auth::CertificateAuthority,
            _ => X509Auth::None,
        }
    }
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
            x509: self.authentication.x509(),
        }
    }
}

/// Checks a client-supplied key: base64 of 16 to 64 bytes (IoT Hub's rule).
pub fn valid_key(k: &str) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(k)
        .is_ok_and(|b| (16..=64).contains(&b.len()))
}
