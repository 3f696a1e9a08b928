//! Authenticating a client against the registry projection with a SAS token (spec §1.2,
//! §2.1) or a client certificate (§1.4). [`authenticate_sas`] and [`authenticate_x509`] are
//! protocol-neutral: a claimed identity and its proof. Each protocol adapter turns what its
//! client sends into that claim; [`mqtt_credentials`] does it for an MQTT CONNECT (username,
//! client id, password, and the certificate the TLS handshake carried).

use roost_iothub::sas::SasToken;
use roost_iothub::username::Username;
use roost_iothub::x509::{ChainError, ClientCert, TrustedCas};
use roost_model::link::{DeviceAuth, X509Auth};
use roost_registry::Projection;

/// Who a connection authenticated as.
#[derive(Debug, Clone)]
pub struct Identity {
    pub device_id: String,
    pub module_id: Option<String>,
    pub generation_id: String,
    pub model_id: Option<String>,
    /// Unix seconds after which the credential (token or certificate) is no longer valid.
    pub token_expiry: u64,
    pub method: AuthMethod,
    /// The CA a `certificateAuthority` identity's chain led to (`x509::ca_id`): its sessions
    /// end when the hub stops trusting it.
    pub ca: Option<String>,
}

/// How an identity proved itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Sas,
    /// A certificate whose thumbprint the registry holds.
    SelfSigned,
    /// A certificate chaining to a CA the hub verified.
    CertificateAuthority,
}

impl AuthMethod {
    /// `iothub-connection-auth-method`, as IoT Hub stamps it on a message.
    pub fn stamp(self) -> &'static str {
        match self {
            AuthMethod::Sas => r#"{"scope":"device","type":"sas","issuer":"iothub"}"#,
            AuthMethod::SelfSigned => {
                r#"{"scope":"device","type":"x509Certificate","issuer":"iothub"}"#
            }
            AuthMethod::CertificateAuthority => {
                r#"{"scope":"device","type":"x509CA","issuer":"iothub"}"#
            }
        }
    }
}

/// `device` or `device/module`: an identity's client id, how the directory, the connection
/// table and the registry projection know it.
pub fn client_id_of(device: &str, module: Option<&str>) -> String {
    match module {
        Some(m) => format!("{device}/{m}"),
        None => device.to_string(),
    }
}

impl Identity {
    /// `device` or `device/module`: how the directory and the connection table know it.
    pub fn client_id(&self) -> String {
        client_id_of(&self.device_id, self.module_id.as_deref())
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
    /// A certificate whose thumbprint is neither of the identity's.
    ThumbprintMismatch,
    /// A certificate outside its validity period.
    CertificateExpired,
    /// A certificate for an identity that authenticates with SAS keys.
    NotX509Identity,
    /// A `certificateAuthority` identity whose certificate does not chain to a CA the hub
    /// verified.
    CaNotVerified,
    /// A `certificateAuthority` identity whose certificate's common name is not its id
    /// (`device` or `device/module`).
    CommonNameMismatch,
    /// A client certificate that cannot be read.
    BadCertificate,
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
            Refusal::ThumbprintMismatch => "thumbprint_mismatch",
            Refusal::CertificateExpired => "certificate_expired",
            Refusal::NotX509Identity => "not_x509_identity",
            Refusal::CaNotVerified => "ca_not_verified",
            Refusal::CommonNameMismatch => "common_name_mismatch",
            Refusal::BadCertificate => "bad_certificate",
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
        client_id_of(&self.device_id, self.module_id.as_deref())
    }
}

/// The claim an MQTT CONNECT makes: the username names the identity (spec §2.1), the client id
/// must be that identity, the password is the SAS token.
pub fn mqtt_credentials<'a>(
    client_id: &str,
    username: Option<&str>,
    password: Option<&'a [u8]>,
) -> Result<SasClaim<'a>, Refusal> {
    let (device_id, module_id, model_id) = mqtt_identity(client_id, username)?;
    let password = password.ok_or(Refusal::NoPassword)?;
    let token = std::str::from_utf8(password).map_err(|_| Refusal::BadToken("not_utf8"))?;
    Ok(SasClaim {
        device_id,
        module_id,
        model_id,
        token,
    })
}

/// The claim of an MQTT CONNECT without a password from a client that presented `cert` in
/// the TLS handshake (spec §1.4: username and client id as with SAS).
pub fn mqtt_x509_claim<'a>(
    client_id: &str,
    username: Option<&str>,
    cert: &'a ClientCert,
) -> Result<X509Claim<'a>, Refusal> {
    let (device_id, module_id, model_id) = mqtt_identity(client_id, username)?;
    Ok(X509Claim {
        device_id,
        module_id,
        model_id,
        cert,
    })
}

/// The identity a CONNECT's username names (device, module, model id), which the client id must
/// be.
fn mqtt_identity(
    client_id: &str,
    username: Option<&str>,
) -> Result<(String, Option<String>, Option<String>), Refusal> {
    let username = username.ok_or(Refusal::BadUsername)?;
    let user = Username::parse(username).map_err(|_| Refusal::BadUsername)?;
    let device = user.device.as_str();
    let module = user.module.as_ref().map(|m| m.as_str());
    if client_id != client_id_of(device, module) {
        return Err(Refusal::ClientIdMismatch);
    }
    Ok((
        device.to_string(),
        module.map(str::to_string),
        user.model_id,
    ))
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
    let (entry, device_entry) = entries(registry, device, module)?;
    let keys: Vec<&[u8]> = [entry.primary_key.as_slice(), entry.secondary_key.as_slice()]
        .into_iter()
        .filter(|k| !k.is_empty())
        .collect();
    token.verify(&keys, now_unix).map_err(|e| match e {
        roost_iothub::sas::SasError::Expired { .. } => Refusal::TokenExpired,
        _ => Refusal::SignatureMismatch,
    })?;
    let proven = Proven {
        model_id: &claim.model_id,
        expiry: token.expiry(),
        method: AuthMethod::Sas,
        ca: None,
    };
    admitted(entry, device_entry, module, proven)
}

/// The registry entries of an identity: its own, and its device's (the same for a device). A
/// module is its own identity (`device/module` in the projection) with its own credentials;
/// its device's never stand in for them.
fn entries<'r>(
    registry: &'r Projection,
    device: &str,
    module: Option<&str>,
) -> Result<(&'r DeviceAuth, &'r DeviceAuth), Refusal> {
    let device_entry = registry.device(device).ok_or(Refusal::UnknownDevice)?;
    let entry = match module {
        Some(m) => registry
            .device(&client_id_of(device, Some(m)))
            .ok_or(Refusal::UnknownModule)?,
        None => device_entry,
    };
    Ok((entry, device_entry))
}

/// What a checked credential says of the session it opens.
struct Proven<'a> {
    model_id: &'a Option<String>,
    /// Unix seconds when the credential ends.
    expiry: u64,
    method: AuthMethod,
    ca: Option<String>,
}

/// The identity whose credential was proven, if it is enabled (a module of a disabled device
/// is disabled with it).
fn admitted(
    entry: &DeviceAuth,
    device_entry: &DeviceAuth,
    module: Option<&str>,
    proven: Proven<'_>,
) -> Result<Identity, Refusal> {
    if !entry.enabled || !device_entry.enabled {
        return Err(Refusal::DeviceDisabled);
    }
    Ok(Identity {
        device_id: device_entry.device_id.clone(),
        module_id: module.map(str::to_string),
        generation_id: entry.generation_id.clone(),
        model_id: proven.model_id.clone(),
        token_expiry: proven.expiry,
        method: proven.method,
        ca: proven.ca,
    })
}

/// Who a client claims to be, and the certificate it presented: the TLS handshake proved
/// that it holds the certificate's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Claim<'a> {
    pub device_id: String,
    pub module_id: Option<String>,
    pub model_id: Option<String>,
    pub cert: &'a ClientCert,
}

/// Checks a claimed identity's client certificate against the registry (spec §1.4): a
/// `selfSigned` identity's certificate must have one of its thumbprints (SHA-1 or SHA-256,
/// either case); a `certificateAuthority` identity's must chain to one of the CAs the hub
/// verified (`cas`) and name the identity in its common name. Either way it must be within
/// its validity period, and the session lasts until it expires. As with tokens, the
/// credential is checked before the device's status.
pub fn authenticate_x509(
    claim: &X509Claim<'_>,
    registry: &Projection,
    cas: &TrustedCas,
    now_unix: u64,
) -> Result<Identity, Refusal> {
    let module = claim.module_id.as_deref();
    let (entry, device_entry) = entries(registry, &claim.device_id, module)?;
    let (method, ca) = match &entry.x509 {
        X509Auth::SelfSigned { thumbprints } => {
            if !thumbprints.iter().any(|t| claim.cert.has_thumbprint(t)) {
                return Err(Refusal::ThumbprintMismatch);
            }
            (AuthMethod::SelfSigned, None)
        }
        X509Auth::CertificateAuthority => {
            let ca = cas.verify(claim.cert, now_unix).map_err(|e| match e {
                ChainError::Expired => Refusal::CertificateExpired,
                ChainError::Untrusted(_) => Refusal::CaNotVerified,
            })?;
            let own = client_id_of(&claim.device_id, module);
            if claim.cert.common_name.as_deref() != Some(own.as_str()) {
                return Err(Refusal::CommonNameMismatch);
            }
            (AuthMethod::CertificateAuthority, Some(ca.to_string()))
        }
        X509Auth::None => return Err(Refusal::NotX509Identity),
    };
    if !claim.cert.valid_at(now_unix as i64) {
        return Err(Refusal::CertificateExpired);
    }
    let proven = Proven {
        model_id: &claim.model_id,
        expiry: u64::try_from(claim.cert.not_after).unwrap_or(0),
        method,
        ca,
    };
    admitted(entry, device_entry, module, proven)
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
                x509: Default::default(),
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

    fn cert() -> ClientCert {
        ClientCert {
            sha1: "f71dc870d6f2b0cb39a3adb6a4f96bc0ef35451e".into(),
            sha256: "28d185d0a746f985b2e6db4bb12fbfbf1f0138317b94afd1d46ca313822e134d".into(),
            not_before: NOW as i64 - 60,
            not_after: NOW as i64 + 3600,
            common_name: Some("dev-x".into()),
            chain: Vec::new(),
        }
    }

    const NO_CAS: &TrustedCas = &TrustedCas::EMPTY;

    fn x509_registry(x509: X509Auth, enabled: bool) -> Projection {
        let mut d = DeviceAuth::with_keys("dev-x", enabled, &[], &[]);
        d.x509 = x509;
        let sas = DeviceAuth::with_keys("dev-1", true, &[7; 32], &[9; 32]);
        Projection::new(1, [d, sas])
    }

    #[test]
    fn a_certificate_authenticates_a_self_signed_identity_by_either_thumbprint() {
        let c = cert();
        let claim = mqtt_x509_claim("dev-x", Some("localhost/dev-x/?api-version=2019-10-01"), &c)
            .expect("claim");
        for t in [c.sha1.to_ascii_uppercase(), c.sha256.clone()] {
            let reg = x509_registry(
                X509Auth::SelfSigned {
                    thumbprints: vec!["00".repeat(20), t.to_ascii_lowercase()],
                },
                true,
            );
            let id = authenticate_x509(&claim, &reg, NO_CAS, NOW).expect("authenticated");
            assert_eq!(id.method, AuthMethod::SelfSigned);
            assert_eq!(
                id.token_expiry,
                NOW + 3600,
                "the session ends when the certificate does"
            );
        }
        let refused = |x509, enabled, now| {
            authenticate_x509(&claim, &x509_registry(x509, enabled), NO_CAS, now).err()
        };
        let other = X509Auth::SelfSigned {
            thumbprints: vec!["ab".repeat(32)],
        };
        let own = X509Auth::SelfSigned {
            thumbprints: vec![c.sha256.clone()],
        };
        assert_eq!(refused(other, true, NOW), Some(Refusal::ThumbprintMismatch));
        assert_eq!(
            refused(own.clone(), true, NOW + 3601),
            Some(Refusal::CertificateExpired)
        );
        assert_eq!(
            refused(own.clone(), true, NOW - 61),
            Some(Refusal::CertificateExpired)
        );
        assert_eq!(refused(own, false, NOW), Some(Refusal::DeviceDisabled));
        assert_eq!(
            refused(X509Auth::CertificateAuthority, true, NOW),
            Some(Refusal::CaNotVerified)
        );
        // A SAS identity is not authenticated by a certificate, and an unknown one is unknown.
        let sas = mqtt_x509_claim("dev-1", Some("localhost/dev-1/?api-version=2019-10-01"), &c)
            .expect("claim");
        let reg = x509_registry(X509Auth::None, true);
        assert_eq!(
            authenticate_x509(&sas, &reg, NO_CAS, NOW).err(),
            Some(Refusal::NotX509Identity)
        );
        let nobody = mqtt_x509_claim("dev-9", Some("localhost/dev-9/?api-version=2019-10-01"), &c)
            .expect("claim");
        assert_eq!(
            authenticate_x509(&nobody, &reg, NO_CAS, NOW).err(),
            Some(Refusal::UnknownDevice)
        );
        // The client id must still be the identity the username names.
        assert_eq!(
            mqtt_x509_claim("dev-1", Some("localhost/dev-x/?api-version=2019-10-01"), &c).err(),
            Some(Refusal::ClientIdMismatch)
        );
    }

    /// A `certificateAuthority` identity: a chain to a verified CA whose leaf names it (the
    /// device, or `device/module`); the session remembers the CA.
    #[test]
    fn a_ca_identity_needs_a_chain_to_a_verified_ca_and_its_own_name() {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "fleet");
        let ca_key = KeyPair::generate().expect("key");
        let ca_der = ca_params.self_signed(&ca_key).expect("ca").der().to_vec();
        let issue = |cn: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.distinguished_name.push(DnType::CommonName, cn);
            let key = KeyPair::generate().expect("key");
            let issuer = Issuer::from_params(&ca_params, &ca_key);
            let der = p.signed_by(&key, &issuer).expect("leaf").der().to_vec();
            ClientCert::from_der(&der).expect("reads")
        };
        let (cas, _) = TrustedCas::new([("fleet", &ca_der[..])]);
        let mut module = DeviceAuth::with_keys("dev-x/mod-a", true, &[], &[]);
        module.x509 = X509Auth::CertificateAuthority;
        let mut reg = x509_registry(X509Auth::CertificateAuthority, true);
        reg = reg.with_changes(&[roost_model::link::RegistryChange::Upsert(module)]);
        let claim = |cert| X509Claim {
            device_id: "dev-x".into(),
            module_id: None,
            model_id: None,
            cert,
        };
        let own = issue("dev-x");
        let id = authenticate_x509(&claim(&own), &reg, &cas, NOW).expect("authenticated");
        assert_eq!(id.method, AuthMethod::CertificateAuthority);
        assert_eq!(id.ca.as_deref(), Some(roost_iothub::x509::ca_id(&ca_der).as_str()));
        let other = issue("dev-y");
        assert_eq!(
            authenticate_x509(&claim(&other), &reg, &cas, NOW).err(),
            Some(Refusal::CommonNameMismatch)
        );
        assert_eq!(
            authenticate_x509(&claim(&own), &reg, NO_CAS, NOW).err(),
            Some(Refusal::CaNotVerified),
            "a CA no longer trusted"
        );
        let for_module = issue("dev-x/mod-a");
        let module_claim = X509Claim {
            module_id: Some("mod-a".into()),
            ..claim(&for_module)
        };
        let id = authenticate_x509(&module_claim, &reg, &cas, NOW).expect("the module");
        assert_eq!(id.client_id(), "dev-x/mod-a");
        let device_cert_for_module = X509Claim {
            module_id: Some("mod-a".into()),
            ..claim(&own)
        };
        assert_eq!(
            authenticate_x509(&device_cert_for_module, &reg, &cas, NOW).err(),
            Some(Refusal::CommonNameMismatch)
        );
    }
}
