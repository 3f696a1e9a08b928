//! The MQTT CONNECT username (spec §2.1): `{host}/{d}[/{m}]/?api-version=..&DeviceClientType=..`.
//!
//! Each SDK writes it differently (Python and Node add a `/` before `?`, the old docs use
//! `/api-version=` with no `?`, or no query at all), so the path is cut at the first `?`, or
//! at `/api-version=` when there is none, and only then split on `/`.

use roost_model::{DeviceId, IdError, ModuleId};

use crate::encoding;

/// Why a CONNECT username is not an IoT Hub username.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    /// The path is not `{host}/{device}` or `{host}/{device}/{module}`.
    #[error("username is not host/device[/module]")]
    BadPath,
    /// The device part is not a valid device id.
    #[error("username device id is invalid: {0}")]
    BadDeviceId(IdError),
    /// The module part is not a valid module id.
    #[error("username module id is invalid: {0}")]
    BadModuleId(IdError),
    /// A query value is not valid UTF-8 once URL-decoded.
    #[error("username query value is not valid UTF-8 once URL-decoded")]
    BadEncoding,
}

impl UsernameError {
    /// A stable, bounded label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            UsernameError::BadPath => "bad_path",
            UsernameError::BadDeviceId(_) => "bad_device_id",
            UsernameError::BadModuleId(_) => "bad_module_id",
            UsernameError::BadEncoding => "bad_encoding",
        }
    }
}

/// A parsed CONNECT username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username {
    /// The hub's HostName, even when the client connects through a gateway.
    pub host: String,
    /// The device connecting.
    pub device: DeviceId,
    /// The module connecting, for a module identity.
    pub module: Option<ModuleId>,
    /// `api-version`, URL-decoded.
    pub api_version: Option<String>,
    /// `DeviceClientType`, URL-decoded, e.g. `azure-iot-device-iothub-py/2.14.0(...)`.
    pub client_type: Option<String>,
    /// `model-id` (a `dtmi:` IoT Plug and Play model), URL-decoded.
    pub model_id: Option<String>,
}

impl Username {
    /// Parses a CONNECT username. Query parameter names match case-insensitively; unknown
    /// parameters are ignored, and of a repeated one the first counts.
    pub fn parse(username: &str) -> Result<Username, UsernameError> {
        let (path, query) = match username.split_once('?') {
            Some((path, query)) => (path, query),
            None => match username.find("/api-version=") {
                Some(i) => (&username[..i], &username[i + 1..]),
                None => (username, ""),
            },
        };

        let path = path.strip_suffix('/').unwrap_or(path);
        let mut parts = path.split('/');
        let (Some(host), Some(device), module, None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(UsernameError::BadPath);
        };
        if host.is_empty() {
            return Err(UsernameError::BadPath);
        }
        let device = DeviceId::parse(device).map_err(UsernameError::BadDeviceId)?;
        let module = match module {
            Some(module) => Some(ModuleId::parse(module).map_err(UsernameError::BadModuleId)?),
            None => None,
        };

        let mut username = Username {
            host: host.to_owned(),
            device,
            module,
            api_version: None,
            client_type: None,
            model_id: None,
        };
        for param in query.split('&').filter(|param| !param.is_empty()) {
            let (name, value) = param.split_once('=').unwrap_or((param, ""));
            let slot = if name.eq_ignore_ascii_case("api-version") {
                &mut username.api_version
            } else if name.eq_ignore_ascii_case("DeviceClientType") {
                &mut username.client_type
            } else if name.eq_ignore_ascii_case("model-id") {
                &mut username.model_id
            } else {
                continue;
            };
            if slot.is_none() {
                let value = encoding::decode(value).map_err(|_| UsernameError::BadEncoding)?;
                *slot = Some(value.into_owned());
            }
        }
        Ok(username)
    }

    /// The MQTT client id this username goes with: `{d}` or `{d}/{m}`.
    pub fn client_id(&self) -> String {
        match &self.module {
            Some(module) => format!("{}/{module}", self.device),
            None => self.device.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Username {
        Username::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    #[test]
    fn python_username() {
        let u = parse(
            "hub.example.net/dev-1/?api-version=2019-10-01&DeviceClientType=\
             azure-iot-device-iothub-py%2F2.14.0%28native%3B%20Linux%3B%20x86_64%29",
        );
        assert_eq!(u.host, "hub.example.net");
        assert_eq!(u.device.as_str(), "dev-1");
        assert_eq!(u.module, None);
        assert_eq!(u.api_version.as_deref(), Some("2019-10-01"));
        assert_eq!(
            u.client_type.as_deref(),
            Some("azure-iot-device-iothub-py/2.14.0(native; Linux; x86_64)")
        );
        assert_eq!(u.model_id, None);
        assert_eq!(u.client_id(), "dev-1");
    }

    #[test]
    fn python_module_with_model_id() {
        let u = parse(
            "localhost/d1/m-1/?api-version=2020-09-30&DeviceClientType=py&\
             model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1",
        );
        assert_eq!(u.module.as_ref().map(ModuleId::as_str), Some("m-1"));
        assert_eq!(u.api_version.as_deref(), Some("2020-09-30"));
        assert_eq!(u.model_id.as_deref(), Some("dtmi:com:example:Thermostat;1"));
        assert_eq!(u.client_id(), "d1/m-1");
    }

    #[test]
    fn node_username_with_model_id_before_client_type() {
        let u = parse(
            "localhost/dev1/?api-version=2021-04-12&model-id=dtmi%3Aa%3Ab%3B1\
             &DeviceClientType=azure-iot-device%2F1.18.4%20(node%20v20.0.0%3B%20Linux)",
        );
        assert_eq!(u.device.as_str(), "dev1");
        assert_eq!(u.api_version.as_deref(), Some("2021-04-12"));
        assert_eq!(u.model_id.as_deref(), Some("dtmi:a:b;1"));
        assert_eq!(
            u.client_type.as_deref(),
            Some("azure-iot-device/1.18.4 (node v20.0.0; Linux)")
        );
    }

    #[test]
    fn c_username_with_lowercase_hex() {
        let u = parse(
            "myhub.azure-devices.net/d1/m1/?api-version=2020-09-30\
             &DeviceClientType=iothubclient%2f1.15.0%20(native%3b%20Linux%3b%20x86_64)",
        );
        assert_eq!(u.host, "myhub.azure-devices.net");
        assert_eq!(u.module.as_ref().map(ModuleId::as_str), Some("m1"));
        assert_eq!(
            u.client_type.as_deref(),
            Some("iothubclient/1.15.0 (native; Linux; x86_64)")
        );
    }

    #[test]
    fn old_docs_usernames() {
        let u = parse("myhub.azure-devices.net/d1/api-version=2016-11-14");
        assert_eq!(u.device.as_str(), "d1");
        assert_eq!(u.module, None);
        assert_eq!(u.api_version.as_deref(), Some("2016-11-14"));

        let bare = parse("myhub.azure-devices.net/d1");
        assert_eq!((bare.device.as_str(), bare.api_version), ("d1", None));

        let trailing = parse("localhost/d1/");
        assert_eq!(trailing.device.as_str(), "d1");
    }

    #[test]
    fn device_ids_with_allowed_punctuation_survive() {
        // '=' and '?' are legal in ids but the first '?' always starts the query.
        let u = parse("localhost/a=b$c/?api-version=1");
        assert_eq!(u.device.as_str(), "a=b$c");
    }

    #[test]
    fn unknown_params_are_ignored_and_the_first_repeat_wins() {
        let u = parse("h/d/?foo=bar&API-VERSION=1&api-version=2&flag");
        assert_eq!(u.api_version.as_deref(), Some("1"));
    }

    #[test]
    fn malformed_usernames_are_rejected() {
        for bad in [
            "",
            "host",
            "host/",
            "/d1",
            "h/d/m/extra",
            "h//m",
            "h/d/m/x/?a=b",
        ] {
            assert!(Username::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Username::parse("host"), Err(UsernameError::BadPath));
        assert_eq!(
            Username::parse("h//m").map(|_| ()),
            Err(UsernameError::BadDeviceId(IdError::Length(0)))
        );
        assert_eq!(
            Username::parse("h/d/m x").map(|_| ()),
            Err(UsernameError::BadModuleId(IdError::Character(' ')))
        );
        assert_eq!(
            Username::parse("h/d/?DeviceClientType=%FF").map(|_| ()),
            Err(UsernameError::BadEncoding)
        );
    }
}
