//! CONNECT authentication against the registry projection (spec §1.2, §2.1).

use roost_iothub::sas::SasToken;
use roost_iothub::username::Username;
use roost_mqtt::{Connect, ConnectReturnCode};
use roost_registry::Projection;

/// Who a connection authenticated as.
#[derive(Debug, Clone)]
pub struct Identity {
    pub device_id: String,
    pub module_id: Option<String>,
    pub generation_id: String,
    pub model_id: Option<String>,
    /// Unix seconds after which the token is no longer valid.
    pub token_expiry: u64,
}

/// Why a CONNECT was refused. Each variant's [`Refusal::reason`] is a metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    UnsupportedProtocol,
    BadUsername,
    ClientIdMismatch,
    NoPassword,
    BadToken(&'static str),
    WrongAudience,
    PolicyToken,
    UnknownDevice,
    SignatureMismatch,
    TokenExpired,
    DeviceDisabled,
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::UnsupportedProtocol => "unsupported_protocol",
            Refusal::BadUsername => "bad_username",
            Refusal::ClientIdMismatch => "client_id_mismatch",
            Refusal::NoPassword => "no_password",
            Refusal::BadToken(_) => "bad_token",
            Refusal::WrongAudience => "wrong_audience",
            Refusal::PolicyToken => "policy_token",
            Refusal::UnknownDevice => "unknown_device",
            Refusal::SignatureMismatch => "signature_mismatch",
            Refusal::TokenExpired => "token_expired",
            Refusal::DeviceDisabled => "device_disabled",
        }
    }

    /// The CONNACK code: the Python SDK maps 4 and 5 to CredentialError; IoT Hub uses 5 for
    /// identities it will not let in, including a username that names another client.
    pub fn connack_code(&self) -> ConnectReturnCode {
        match self {
            Refusal::UnsupportedProtocol => ConnectReturnCode::UnacceptableProtocolVersion,
            _ => ConnectReturnCode::NotAuthorized,
        }
    }
}

/// Checks a CONNECT's username, client id and SAS token against the registry.
///
/// The signature is checked before the device's status, so a disabled device is only reported
/// as disabled to a client that holds its key.
pub fn authenticate(
    c: &Connect,
    registry: &Projection,
    hostname: &str,
    now_unix: u64,
) -> Result<Identity, Refusal> {
    let username = c.username.as_ref().ok_or(Refusal::BadUsername)?;
    let user = Username::parse(username.as_str()).map_err(|_| Refusal::BadUsername)?;
    let device = user.device.as_str();
    let module = user.module.as_ref().map(|m| m.as_str());
    let expected_client = match module {
        Some(m) => format!("{device}/{m}"),
        None => device.to_string(),
    };
    if c.client_id.as_str() != expected_client {
        return Err(Refusal::ClientIdMismatch);
    }
    let password = c.password.as_ref().ok_or(Refusal::NoPassword)?;
    let password = std::str::from_utf8(password).map_err(|_| Refusal::BadToken("not_utf8"))?;
    let token = SasToken::parse(password).map_err(|e| Refusal::BadToken(e.error_code()))?;
    if token.key_name().is_some() {
        return Err(Refusal::PolicyToken);
    }
    let target = format!("{hostname}/devices/{expected_client}");
    if !roost_iothub::sas::authorizes(token.resource(), &target) {
        return Err(Refusal::WrongAudience);
    }
    let entry = registry.device(device).ok_or(Refusal::UnknownDevice)?;
    let keys: Vec<&[u8]> = [entry.primary_key.as_slice(), entry.secondary_key.as_slice()]
        .into_iter()
        .filter(|k| !k.is_empty())
        .collect();
    token.verify(&keys, now_unix).map_err(|e| match e {
        roost_iothub::sas::SasError::Expired { .. } => Refusal::TokenExpired,
        _ => Refusal::SignatureMismatch,
    })?;
    if !entry.enabled {
        return Err(Refusal::DeviceDisabled);
    }
    Ok(Identity {
        device_id: device.to_string(),
        module_id: module.map(str::to_string),
        generation_id: entry.generation_id.clone(),
        model_id: user.model_id.clone(),
        token_expiry: token.expiry(),
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use roost_iothub::sas;
    use roost_model::link::DeviceAuth;
    use roost_mqtt::Str;

    use super::*;

    const NOW: u64 = 1_800_000_000;
    const PY_USER: &str = "localhost/dev-1/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0";

    fn registry(enabled: bool) -> Projection {
        Projection::new(
            1,
            [DeviceAuth {
                device_id: "dev-1".into(),
                enabled,
                primary_key: vec![7; 32],
                secondary_key: vec![9; 32],
                generation_id: "638000000000000001".into(),
            }],
        )
    }

    fn connect(client_id: &str, username: Option<&str>, password: Option<String>) -> Connect {
        Connect {
            protocol_name: Str::from("MQTT"),
            protocol_level: 4,
            clean_session: false,
            keep_alive: 60,
            client_id: Str::from(client_id),
            will: None,
            username: username.map(Str::from),
            password: password.map(Bytes::from),
        }
    }

    fn token(resource: &str, key: &[u8], expiry: u64) -> String {
        sas::sign(&sas::encode_resource(resource), key, expiry, None)
    }

    #[test]
    fn primary_and_secondary_keys_authenticate() {
        for key in [[7u8; 32], [9u8; 32]] {
            let c = connect(
                "dev-1",
                Some(PY_USER),
                Some(token("localhost/devices/dev-1", &key, NOW + 3600)),
            );
            let id = authenticate(&c, &registry(true), "localhost", NOW).expect("accepted");
            assert_eq!(id.device_id, "dev-1");
            assert_eq!(id.generation_id, "638000000000000001");
        }
    }

    #[test]
    fn refusals_carry_their_reason() {
        let good = token("localhost/devices/dev-1", &[7; 32], NOW + 3600);
        let cases = [
            (
                connect(
                    "dev-1",
                    Some(PY_USER),
                    Some(token("localhost/devices/dev-1", &[1; 32], NOW + 3600)),
                ),
                true,
                "signature_mismatch",
            ),
            (
                connect(
                    "dev-1",
                    Some(PY_USER),
                    Some(token("localhost/devices/dev-1", &[7; 32], NOW - 3600)),
                ),
                true,
                "token_expired",
            ),
            (
                connect("dev-1", Some(PY_USER), Some(good.clone())),
                false,
                "device_disabled",
            ),
            (
                connect(
                    "dev-2",
                    Some("localhost/dev-2/?api-version=2019-10-01"),
                    Some(token("localhost/devices/dev-2", &[7; 32], NOW + 3600)),
                ),
                true,
                "unknown_device",
            ),
            (
                connect("other", Some(PY_USER), Some(good.clone())),
                true,
                "client_id_mismatch",
            ),
            (
                connect("dev-1", None, Some(good.clone())),
                true,
                "bad_username",
            ),
            (connect("dev-1", Some(PY_USER), None), true, "no_password"),
            (
                connect("dev-1", Some(PY_USER), Some("garbage".into())),
                true,
                "bad_token",
            ),
            (
                connect(
                    "dev-1",
                    Some(PY_USER),
                    Some(token("otherhub/devices/dev-1", &[7; 32], NOW + 3600)),
                ),
                true,
                "wrong_audience",
            ),
        ];
        for (c, enabled, reason) in cases {
            let err = authenticate(&c, &registry(enabled), "localhost", NOW).expect_err(reason);
            assert_eq!(err.reason(), reason);
            assert_eq!(
                err.connack_code(),
                ConnectReturnCode::NotAuthorized,
                "{reason}"
            );
        }
    }

    #[test]
    fn a_disabled_device_with_a_wrong_key_is_reported_as_a_bad_signature() {
        let c = connect(
            "dev-1",
            Some(PY_USER),
            Some(token("localhost/devices/dev-1", &[1; 32], NOW + 3600)),
        );
        assert_eq!(
            authenticate(&c, &registry(false), "localhost", NOW).expect_err("refused"),
            Refusal::SignatureMismatch
        );
    }
}
