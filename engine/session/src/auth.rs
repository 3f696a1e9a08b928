//! Authenticating a client against the registry projection with a SAS token (spec §1.2,
//! §2.1). [`authenticate_sas`] is protocol-neutral: a claimed identity and a token. Each
//! protocol adapter turns what its client sends into that claim; [`mqtt_credentials`] does it
//! for an MQTT CONNECT (username, client id, password).

use roost_iothub::sas::SasToken;
use roost_iothub::username::Username;
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

impl Identity {
    /// `device` or `device/module`: how the directory and the connection table know it.
    pub fn client_id(&self) -> String {
        match &self.module_id {
            Some(m) => format!("{}/{m}", self.device_id),
            None => self.device_id.clone(),
        }
    }
}

/// Why a CONNECT was refused. Each variant's [`Refusal::reason`] is a metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    BadUsername,
    ClientIdMismatch,
    NoPassword,
    BadToken(&'static str),
    WrongAudience,
    PolicyToken,
    UnknownDevice,
    /// A module the registry does not hold. Modules have their own identities and keys; until
    /// the registry holds modules, none authenticates (a device's key never makes one).
    UnknownModule,
    SignatureMismatch,
    TokenExpired,
    DeviceDisabled,
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadUsername => "bad_username",
            Refusal::ClientIdMismatch => "client_id_mismatch",
            Refusal::NoPassword => "no_password",
            Refusal::BadToken(_) => "bad_token",
            Refusal::WrongAudience => "wrong_audience",
            Refusal::PolicyToken => "policy_token",
            Refusal::UnknownDevice => "unknown_device",
            Refusal::UnknownModule => "unknown_module",
            Refusal::SignatureMismatch => "signature_mismatch",
            Refusal::TokenExpired => "token_expired",
            Refusal::DeviceDisabled => "device_disabled",
        }
    }
}

/// Who a client claims to be, and the SAS token it offers as proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasClaim<'a> {
    pub device_id: String,
    pub module_id: Option<String>,
    /// The model id the client announced (IoT Plug and Play), if any.
    pub model_id: Option<String>,
    pub token: &'a str,
}

impl SasClaim<'_> {
    /// `device` or `device/module`: the identity's client id, and its key in the directory.
    pub fn client_id(&self) -> String {
        match &self.module_id {
            Some(m) => format!("{}/{m}", self.device_id),
            None => self.device_id.clone(),
        }
    }
}

/// The claim an MQTT CONNECT makes: the username names the identity (spec §2.1), the client id
/// must be that identity, the password is the SAS token.
pub fn mqtt_credentials<'a>(
    client_id: &str,
    username: Option<&str>,
    password: Option<&'a [u8]>,
) -> Result<SasClaim<'a>, Refusal> {
    let username = username.ok_or(Refusal::BadUsername)?;
    let user = Username::parse(username).map_err(|_| Refusal::BadUsername)?;
    let password = password.ok_or(Refusal::NoPassword)?;
    let token = std::str::from_utf8(password).map_err(|_| Refusal::BadToken("not_utf8"))?;
    let claim = SasClaim {
        device_id: user.device.as_str().to_string(),
        module_id: user.module.as_ref().map(|m| m.as_str().to_string()),
        model_id: user.model_id,
        token,
    };
    if client_id != claim.client_id() {
        return Err(Refusal::ClientIdMismatch);
    }
    Ok(claim)
}

/// Checks a claimed identity's SAS token against the registry: the token must be a device
/// token (no policy name) whose `sr` names exactly this identity (not the hub, not the device
/// of a module), signed with one of the identity's keys and unexpired, and the device must be
/// enabled.
///
/// The signature is checked before the device's status, so a disabled device is only reported
/// as disabled to a client that holds its key.
pub fn authenticate_sas(
    claim: &SasClaim<'_>,
    registry: &Projection,
    hostname: &str,
    now_unix: u64,
) -> Result<Identity, Refusal> {
    let device = claim.device_id.as_str();
    let module = claim.module_id.as_deref();
    let password = claim.token;
    let token = SasToken::parse(password).map_err(|e| Refusal::BadToken(e.error_code()))?;
    if token.key_name().is_some() {
        return Err(Refusal::PolicyToken);
    }
    // The resource a device or module token is for (spec §1.2): `{host}/devices/{d}` or
    // `{host}/devices/{d}/modules/{m}` — the client id `d/m` is not a resource path.
    let target = match module {
        Some(m) => format!("{hostname}/devices/{device}/modules/{m}"),
        None => format!("{hostname}/devices/{device}"),
    };
    if !roost_iothub::sas::names_identity(token.resource(), &target) {
        return Err(Refusal::WrongAudience);
    }
    let device_entry = registry.device(device).ok_or(Refusal::UnknownDevice)?;
    // A module is its own identity (`device/module` in the projection) with its own keys;
    // its device's keys never stand in for them.
    let entry = match module {
        Some(m) => registry
            .device(&format!("{device}/{m}"))
            .ok_or(Refusal::UnknownModule)?,
        None => device_entry,
    };
    let keys: Vec<&[u8]> = [entry.primary_key.as_slice(), entry.secondary_key.as_slice()]
        .into_iter()
        .filter(|k| !k.is_empty())
        .collect();
    token.verify(&keys, now_unix).map_err(|e| match e {
        roost_iothub::sas::SasError::Expired { .. } => Refusal::TokenExpired,
        _ => Refusal::SignatureMismatch,
    })?;
    // A module of a disabled device is disabled with it.
    if !entry.enabled || !device_entry.enabled {
        return Err(Refusal::DeviceDisabled);
    }
    Ok(Identity {
        device_id: device.to_string(),
        module_id: module.map(str::to_string),
        generation_id: entry.generation_id.clone(),
        model_id: claim.model_id.clone(),
        token_expiry: token.expiry(),
    })
}

#[cfg(test)]
mod tests {
    use roost_iothub::sas;
    use roost_model::link::DeviceAuth;

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
                twin: String::new(),
            }],
        )
    }

    struct Connect {
        client_id: String,
        username: Option<String>,
        password: Option<String>,
    }

    fn connect(client_id: &str, username: Option<&str>, password: Option<String>) -> Connect {
        Connect {
            client_id: client_id.into(),
            username: username.map(str::to_string),
            password,
        }
    }

    /// What the MQTT adapter does with a CONNECT.
    fn authenticate(
        c: &Connect,
        registry: &Projection,
        hostname: &str,
        now: u64,
    ) -> Result<Identity, Refusal> {
        let claim = mqtt_credentials(
            &c.client_id,
            c.username.as_deref(),
            c.password.as_deref().map(str::as_bytes),
        )?;
        authenticate_sas(&claim, registry, hostname, now)
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

    #[test]
    fn a_token_must_name_exactly_the_identity() {
        let module_user = "localhost/dev-1/mod-a/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0";
        // (client id, username, the token's resource, signed with dev-1's key; the refusal)
        let cases = [
            // Hub-scoped (`sr` = host, no `skn`), or the devices collection.
            ("dev-1", PY_USER, "localhost", "wrong_audience"),
            ("dev-1", PY_USER, "localhost/devices", "wrong_audience"),
            // A module's token offered for its device, the device's for a module, another
            // module's for this one.
            (
                "dev-1",
                PY_USER,
                "localhost/devices/dev-1/modules/mod-a",
                "wrong_audience",
            ),
            (
                "dev-1/mod-a",
                module_user,
                "localhost/devices/dev-1",
                "wrong_audience",
            ),
            (
                "dev-1/mod-a",
                module_user,
                "localhost/devices/dev-1/modules/mod-b",
                "wrong_audience",
            ),
            // The module's own resource, signed with its device's key, for a module the
            // registry does not hold.
            (
                "dev-1/mod-a",
                module_user,
                "localhost/devices/dev-1/modules/mod-a",
                "unknown_module",
            ),
            (
                "dev-1",
                module_user,
                "localhost/devices/dev-1/modules/mod-a",
                "client_id_mismatch",
            ),
        ];
        for (i, (client_id, user, resource, reason)) in cases.into_iter().enumerate() {
            let c = connect(
                client_id,
                Some(user),
                Some(token(resource, &[7; 32], NOW + 3600)),
            );
            let err = authenticate(&c, &registry(true), "localhost", NOW).expect_err(reason);
            assert_eq!(err.reason(), reason, "case {i}");
        }
    }

    #[test]
    fn a_module_authenticates_with_its_own_keys_only() {
        let module_user = "localhost/dev-1/mod-a/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0";
        let registry = |device_enabled: bool| {
            Projection::new(
                1,
                [
                    DeviceAuth::with_keys("dev-1", device_enabled, &[7; 32], &[9; 32]),
                    DeviceAuth::with_keys("dev-1/mod-a", true, &[5; 32], &[6; 32]),
                ],
            )
        };
        let resource = "localhost/devices/dev-1/modules/mod-a";
        let with_key = |key: &[u8]| {
            connect(
                "dev-1/mod-a",
                Some(module_user),
                Some(token(resource, key, NOW + 3600)),
            )
        };
        for key in [[5u8; 32], [6u8; 32]] {
            let id = authenticate(&with_key(&key), &registry(true), "localhost", NOW)
                .expect("the module's own key");
            assert_eq!(id.device_id, "dev-1");
            assert_eq!(id.module_id.as_deref(), Some("mod-a"));
            assert_eq!(id.client_id(), "dev-1/mod-a");
        }
        let err = authenticate(&with_key(&[7; 32]), &registry(true), "localhost", NOW)
            .expect_err("the device's key");
        assert_eq!(err.reason(), "signature_mismatch");
        let err = authenticate(&with_key(&[5; 32]), &registry(false), "localhost", NOW)
            .expect_err("device disabled");
        assert_eq!(err.reason(), "device_disabled");
    }
}
