//! Connection strings (spec §1.1): `k=v;k=v`, each pair split at its first `=` only, since
//! base64 keys end in `=`.
//!
//! Key names are case-sensitive and unknown keys are rejected, as the Python SDK does, so a
//! typo such as `DeviceID` fails here rather than as an authentication error later.

use std::fmt;

use roost_model::{DeviceId, IdError, ModuleId};

use crate::sas;

/// Why a connection string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnStrError {
    /// A `;`-separated pair has no `=`.
    #[error("connection string part without '='")]
    MissingEquals,
    /// A pair has nothing before its `=`.
    #[error("connection string part with an empty name")]
    EmptyKey,
    /// A key appears twice.
    #[error("connection string has {0:?} twice")]
    DuplicateKey(String),
    /// A key this kind of connection string does not take.
    #[error("connection string has the unknown key {0:?}")]
    UnknownKey(String),
    /// A required key is absent or empty.
    #[error("connection string has no {0}")]
    MissingKey(&'static str),
    /// `DeviceId` is not a valid device id.
    #[error("connection string DeviceId is invalid: {0}")]
    BadDeviceId(IdError),
    /// `ModuleId` is not a valid module id.
    #[error("connection string ModuleId is invalid: {0}")]
    BadModuleId(IdError),
    /// `SharedAccessKey` is not base64.
    #[error("connection string SharedAccessKey is not base64")]
    BadKey,
    /// The string authenticates with X.509 (`x509=true`) or a ready-made token
    /// (`SharedAccessSignature`); roost's tools sign with a shared access key only.
    #[error("connection string uses {0} authentication, which is not supported here")]
    UnsupportedAuth(&'static str),
}

impl ConnStrError {
    /// A stable, bounded label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            ConnStrError::MissingEquals => "missing_equals",
            ConnStrError::EmptyKey => "empty_key",
            ConnStrError::DuplicateKey(_) => "duplicate_key",
            ConnStrError::UnknownKey(_) => "unknown_key",
            ConnStrError::MissingKey(_) => "missing_key",
            ConnStrError::BadDeviceId(_) => "bad_device_id",
            ConnStrError::BadModuleId(_) => "bad_module_id",
            ConnStrError::BadKey => "bad_key",
            ConnStrError::UnsupportedAuth(_) => "unsupported_auth",
        }
    }
}

/// Splits `k=v;k=v` into pairs, in order, each at its first `=`. Empty parts (a trailing `;`)
/// are skipped; a repeated key is an error.
pub fn parse(s: &str) -> Result<Vec<(String, String)>, ConnStrError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for part in s.split(';').filter(|part| !part.is_empty()) {
        let (key, value) = part.split_once('=').ok_or(ConnStrError::MissingEquals)?;
        if key.is_empty() {
            return Err(ConnStrError::EmptyKey);
        }
        if pairs.iter().any(|(seen, _)| seen == key) {
            return Err(ConnStrError::DuplicateKey(key.to_owned()));
        }
        pairs.push((key.to_owned(), value.to_owned()));
    }
    Ok(pairs)
}

/// The pairs of one connection string, taken out by name as they are used.
struct Pairs(Vec<(String, String)>);

impl Pairs {
    /// Removes `key`; an empty value counts as absent.
    fn take(&mut self, key: &str) -> Option<String> {
        let i = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.swap_remove(i).1).filter(|value| !value.is_empty())
    }

    fn require(&mut self, key: &'static str) -> Result<String, ConnStrError> {
        self.take(key).ok_or(ConnStrError::MissingKey(key))
    }

    /// Fails on the first key nobody took.
    fn finish(self) -> Result<(), ConnStrError> {
        match self.0.into_iter().next() {
            Some((key, _)) => Err(ConnStrError::UnknownKey(key)),
            None => Ok(()),
        }
    }
}

/// A device or module connection string:
/// `HostName=h;DeviceId=d[;ModuleId=m];SharedAccessKey=k[;GatewayHostName=g]`.
///
/// `Display` writes the canonical form, key included, for showing to the user who asked for
/// it; `Debug` hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceConnectionString {
    /// The hub's host name; also what the SAS `sr` and MQTT username start with.
    pub host_name: String,
    /// The device.
    pub device_id: DeviceId,
    /// The module, for a module identity.
    pub module_id: Option<ModuleId>,
    /// The identity's key, base64 as written.
    pub shared_access_key: String,
    /// The host to connect to when it is not `host_name` (an Edge gateway).
    pub gateway_host_name: Option<String>,
}

impl DeviceConnectionString {
    /// Parses a device or module connection string.
    pub fn parse(s: &str) -> Result<DeviceConnectionString, ConnStrError> {
        let mut pairs = Pairs(parse(s)?);
        if pairs.take("SharedAccessSignature").is_some() {
            return Err(ConnStrError::UnsupportedAuth("SharedAccessSignature"));
        }
        let x509 = pairs.take("x509");
        if x509.is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Err(ConnStrError::UnsupportedAuth("x509"));
        }
        let host_name = pairs.require("HostName")?;
        let device_id =
            DeviceId::parse(&pairs.require("DeviceId")?).map_err(ConnStrError::BadDeviceId)?;
        let module_id = match pairs.take("ModuleId") {
            Some(id) => Some(ModuleId::parse(&id).map_err(ConnStrError::BadModuleId)?),
            None => None,
        };
        let shared_access_key = pairs.require("SharedAccessKey")?;
        sas::decode_key(&shared_access_key).map_err(|_| ConnStrError::BadKey)?;
        let gateway_host_name = pairs.take("GatewayHostName");
        pairs.finish()?;
        Ok(DeviceConnectionString {
            host_name,
            device_id,
            module_id,
            shared_access_key,
            gateway_host_name,
        })
    }

    /// The SAS resource for this identity, unencoded: `{host}/devices/{d}[/modules/{m}]`.
    pub fn resource(&self) -> String {
        match &self.module_id {
            Some(module) => format!(
                "{}/devices/{}/modules/{module}",
                self.host_name, self.device_id
            ),
            None => format!("{}/devices/{}", self.host_name, self.device_id),
        }
    }
}

impl fmt::Display for DeviceConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostName={};DeviceId={}", self.host_name, self.device_id)?;
        if let Some(module) = &self.module_id {
            write!(f, ";ModuleId={module}")?;
        }
        write!(f, ";SharedAccessKey={}", self.shared_access_key)?;
        if let Some(gateway) = &self.gateway_host_name {
            write!(f, ";GatewayHostName={gateway}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DeviceConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceConnectionString")
            .field("host_name", &self.host_name)
            .field("device_id", &self.device_id)
            .field("module_id", &self.module_id)
            .field("shared_access_key", &"<redacted>")
            .field("gateway_host_name", &self.gateway_host_name)
            .finish()
    }
}

/// A service (policy) connection string:
/// `HostName=h;SharedAccessKeyName=policy;SharedAccessKey=k`.
///
/// `Display` writes the canonical form, key included; `Debug` hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceConnectionString {
    /// The hub's host name; also the SAS `sr` of service tokens.
    pub host_name: String,
    /// The shared access policy, e.g. `iothubowner`; the token's `skn`.
    pub key_name: String,
    /// The policy's key, base64 as written.
    pub key: String,
}

impl ServiceConnectionString {
    /// Parses a service connection string.
    pub fn parse(s: &str) -> Result<ServiceConnectionString, ConnStrError> {
        let mut pairs = Pairs(parse(s)?);
        let host_name = pairs.require("HostName")?;
        let key_name = pairs.require("SharedAccessKeyName")?;
        let key = pairs.require("SharedAccessKey")?;
        sas::decode_key(&key).map_err(|_| ConnStrError::BadKey)?;
        pairs.finish()?;
        Ok(ServiceConnectionString {
            host_name,
            key_name,
            key,
        })
    }
}

impl fmt::Display for ServiceConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
            self.host_name, self.key_name, self.key
        )
    }
}

impl fmt::Debug for ServiceConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceConnectionString")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .field("key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn device(s: &str) -> DeviceConnectionString {
        DeviceConnectionString::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    #[test]
    fn pairs_split_at_the_first_equals_only() {
        let pairs = parse(&format!("HostName=h.example;SharedAccessKey={KEY};")).expect("parses");
        assert_eq!(
            pairs,
            vec![
                ("HostName".to_owned(), "h.example".to_owned()),
                ("SharedAccessKey".to_owned(), KEY.to_owned()),
            ]
        );
        assert_eq!(parse(""), Ok(vec![]));
        assert_eq!(parse("a=b;c"), Err(ConnStrError::MissingEquals));
        assert_eq!(parse("=b"), Err(ConnStrError::EmptyKey));
        assert_eq!(
            parse("a=b;a=c"),
            Err(ConnStrError::DuplicateKey("a".into()))
        );
    }

    #[test]
    fn device_string_round_trips_through_display() {
        let s = format!("HostName=hub.example.net;DeviceId=dev-1;SharedAccessKey={KEY}");
        let cs = device(&s);
        assert_eq!(cs.host_name, "hub.example.net");
        assert_eq!(cs.device_id.as_str(), "dev-1");
        assert_eq!(cs.module_id, None);
        assert_eq!(cs.shared_access_key, KEY);
        assert_eq!(cs.gateway_host_name, None);
        assert_eq!(cs.resource(), "hub.example.net/devices/dev-1");
        assert_eq!(cs.to_string(), s);
    }

    #[test]
    fn module_string_in_any_order_prints_canonically() {
        let cs = device(&format!(
            "GatewayHostName=edge;SharedAccessKey={KEY};ModuleId=m-1;DeviceId=d1;HostName=hub"
        ));
        assert_eq!(cs.module_id.as_ref().map(ModuleId::as_str), Some("m-1"));
        assert_eq!(cs.resource(), "hub/devices/d1/modules/m-1");
        assert_eq!(
            cs.to_string(),
            format!(
                "HostName=hub;DeviceId=d1;ModuleId=m-1;SharedAccessKey={KEY};GatewayHostName=edge"
            )
        );
        assert_eq!(device(&cs.to_string()), cs);
    }

    #[test]
    fn device_string_errors() {
        let err = |s: String| DeviceConnectionString::parse(&s).map(|_| ());
        assert_eq!(
            err(format!("DeviceId=d;SharedAccessKey={KEY}")),
            Err(ConnStrError::MissingKey("HostName"))
        );
        assert_eq!(
            err("HostName=h;DeviceId=d".into()),
            Err(ConnStrError::MissingKey("SharedAccessKey"))
        );
        assert_eq!(
            err(format!("HostName=h;DeviceId=;SharedAccessKey={KEY}")),
            Err(ConnStrError::MissingKey("DeviceId"))
        );
        assert_eq!(
            err(format!("HostName=h;DeviceId=a b;SharedAccessKey={KEY}")),
            Err(ConnStrError::BadDeviceId(IdError::Character(' ')))
        );
        assert_eq!(
            err(format!(
                "HostName=h;DeviceId=d;ModuleId=m/1;SharedAccessKey={KEY}"
            )),
            Err(ConnStrError::BadModuleId(IdError::Character('/')))
        );
        assert_eq!(
            err("HostName=h;DeviceId=d;SharedAccessKey=not base64".into()),
            Err(ConnStrError::BadKey)
        );
        assert_eq!(
            err(format!(
                "HostName=h;DeviceID=d;DeviceId=d;SharedAccessKey={KEY}"
            )),
            Err(ConnStrError::UnknownKey("DeviceID".into()))
        );
        assert_eq!(
            err("HostName=h;DeviceId=d;x509=true".into()),
            Err(ConnStrError::UnsupportedAuth("x509"))
        );
        assert_eq!(
            err("HostName=h;DeviceId=d;SharedAccessSignature=SharedAccessSignature sr=h".into()),
            Err(ConnStrError::UnsupportedAuth("SharedAccessSignature"))
        );
    }

    #[test]
    fn service_string_round_trips_and_errors() {
        let s = format!("HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}");
        let cs = ServiceConnectionString::parse(&s).expect("parses");
        assert_eq!(
            (cs.host_name.as_str(), cs.key_name.as_str(), cs.key.as_str()),
            ("localhost", "iothubowner", KEY)
        );
        assert_eq!(cs.to_string(), s);
        assert_eq!(
            ServiceConnectionString::parse(&format!("HostName=h;SharedAccessKey={KEY}")),
            Err(ConnStrError::MissingKey("SharedAccessKeyName"))
        );
        assert_eq!(
            ServiceConnectionString::parse(&format!("{s};DeviceId=d")),
            Err(ConnStrError::UnknownKey("DeviceId".into()))
        );
    }

    #[test]
    fn debug_hides_keys() {
        let cs = device(&format!("HostName=h;DeviceId=d;SharedAccessKey={KEY}"));
        assert!(!format!("{cs:?}").contains(KEY));
        let svc = ServiceConnectionString::parse(&format!(
            "HostName=h;SharedAccessKeyName=p;SharedAccessKey={KEY}"
        ))
        .expect("parses");
        assert!(!format!("{svc:?}").contains(KEY));
        assert!(format!("{svc:?}").contains("<redacted>"));
    }
}
