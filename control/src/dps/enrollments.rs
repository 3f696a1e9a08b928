//! Enrollments: who may register with the provisioning service and what it makes of them, in
//! the shapes of the DPS service API (`IndividualEnrollment`, `EnrollmentGroup`,
//! `AttestationMechanism`, `DeviceRegistrationState`) as the Node `azure-iot-provisioning-
//! service` client sends and reads them.
//!
//! Stored in control's `dps` column family: `e/{registrationId}` an individual enrollment,
//! `g/{enrollmentGroupId}` a group, `r/{registrationId}` the registration state of a device
//! that registered. Certificates are kept as given; answers carry their `info` instead.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::store::{Store, StoreError};

/// Why an enrollment call is refused.
#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("the etag does not match")]
    EtagMismatch,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The symmetric keys of an enrollment (base64).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeys {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
}

/// One certificate of an X.509 attestation: stored with its PEM, answered with its `info`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateWithInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificates {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<CertificateWithInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<CertificateWithInfo>,
}

/// CAs by name: for roost, CAs registered and verified with the hub (`/roost/certificates`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaReferences {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Attestation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificates: Option<Certificates>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificates: Option<Certificates>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_references: Option<CaReferences>,
}

/// How a device proves it is enrolled: `symmetricKey` or `x509` (TPM is not offered).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attestation {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeys>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509Attestation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Value>,
}

/// What an enrollment of either kind says beyond its attestation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    #[serde(default = "yes")]
    pub update_hub_assignment: bool,
    #[serde(default = "yes")]
    pub migrate_device_data: bool,
}

fn yes() -> bool {
    true
}

impl Default for ReprovisionPolicy {
    fn default() -> Self {
        Self {
            update_hub_assignment: true,
            migrate_device_data: true,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndividualEnrollment {
    pub registration_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub attestation: Attestation,
    #[serde(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    pub enrollment_group_id: String,
    pub attestation: Attestation,
    #[serde(flatten)]
    pub settings: Settings,
}

/// A device's registration as the service reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationState {
    pub registration_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

/// A registration state with the group it came through (not part of the answer).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredRegistration {
    pub state: RegistrationState,
    #[serde(default)]
    pub group: Option<String>,
}

/// At most this many groups are tried for a symmetric-key registration that no individual
/// enrollment names.
pub const MAX_GROUPS: usize = 1000;

/// DPS's rule for registration ids: 1 to 128 lowercase letters, digits and `-._:`.
pub fn validate_registration_id(id: &str) -> Result<(), EnrollmentError> {
    let ok = (1..=128).contains(&id.len())
        && id.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_' | b':')
        });
    match ok {
        true => Ok(()),
        false => Err(EnrollmentError::Invalid(format!(
            "registration id {:?}: 1 to 128 lowercase letters, digits, '-', '.', '_' and ':'",
            id.chars().take(140).collect::<String>()
        ))),
    }
}

/// Group ids: 1 to 128 letters, digits and `-._:`.
pub fn validate_group_id(id: &str) -> Result<(), EnrollmentError> {
    let ok = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'));
    match ok {
        true => Ok(()),
        false => Err(EnrollmentError::Invalid(format!(
            "enrollment group id {:?}: 1 to 128 letters, digits, '-', '.', '_' and ':'",
            id.chars().take(140).collect::<String>()
        ))),
    }
}

/// The device key a group's symmetric key derives for `registration_id`:
/// `base64(HMAC-SHA256(base64decode(group key), registration_id))`.
pub fn derive_key(group_key: &str, registration_id: &str) -> Result<String, EnrollmentError> {
    let key = roost_iothub::sas::decode_key(group_key)
        .map_err(|_| EnrollmentError::Invalid("the group key is not base64".into()))?;
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        registration_id.as_bytes(),
    );
    Ok(base64::engine::general_purpose::STANDARD.encode(mac.as_ref()))
}

/// The certificate (PEM or base64 DER) as DER.
pub fn certificate_der(c: &CertificateWithInfo) -> Option<Vec<u8>> {
    crate::cas::der_of(c.certificate.as_deref()?).ok()
}

/// The `info` DPS answers for a certificate.
fn info(der: &[u8]) -> Option<Value> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let hex = |alg| -> String {
        ring::digest::digest(alg, der)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect()
    };
    let v = cert.validity();
    Some(json!({
        "subjectName": cert.subject().to_string(),
        "sha1Thumbprint": hex(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY),
        "sha256Thumbprint": hex(&ring::digest::SHA256),
        "issuerName": cert.issuer().to_string(),
        "notBeforeUtc": v.not_before.to_rfc2822().unwrap_or_default(),
        "notAfterUtc": v.not_after.to_rfc2822().unwrap_or_default(),
        "serialNumber": cert.raw_serial_as_string().replace(':', "").to_ascii_uppercase(),
        "version": cert.version().0 + 1,
    }))
}

fn check_certs(certs: &mut Certificates, what: &str) -> Result<(), EnrollmentError> {
    let Some(primary) = &certs.primary else {
        return Err(EnrollmentError::Invalid(format!(
            "{what}.primary.certificate is required"
        )));
    };
    for c in [Some(primary), certs.secondary.as_ref()].into_iter().flatten() {
        let der = certificate_der(c).ok_or_else(|| {
            EnrollmentError::Invalid(format!("{what}: a certificate that is neither PEM nor base64 DER"))
        })?;
        if info(&der).is_none() {
            return Err(EnrollmentError::Invalid(format!(
                "{what}: the certificate cannot be read"
            )));
        }
    }
    Ok(())
}

/// Checks an attestation for an individual enrollment (`individual`) or a group, filling
/// symmetric keys left out.
fn check_attestation(a: &mut Attestation, individual: bool) -> Result<(), EnrollmentError> {
    match a.kind.as_str() {
        "symmetricKey" => {
            let keys = a.symmetric_key.get_or_insert_with(SymmetricKeys::default);
            for k in [&mut keys.primary_key, &mut keys.secondary_key] {
                match k {
                    None => *k = Some(roost_iothub::sas::generate_key()),
                    Some(given) => {
                        let n = roost_iothub::sas::decode_key(given)
                            .map_err(|_| {
                                EnrollmentError::Invalid("a symmetric key is not base64".into())
                            })?
                            .len();
                        if !(16..=64).contains(&n) {
                            return Err(EnrollmentError::Invalid(
                                "a symmetric key must be 16 to 64 bytes".into(),
                            ));
                        }
                    }
                }
            }
            a.x509 = None;
            a.tpm = None;
        }
        "x509" => {
            let x = a.x509.as_mut().ok_or_else(|| {
                EnrollmentError::Invalid("an x509 attestation needs its x509 section".into())
            })?;
            match (individual, &mut x.client_certificates, &mut x.signing_certificates, &x.ca_references) {
                (true, Some(c), _, _) => check_certs(c, "x509.clientCertificates")?,
                (true, None, _, Some(_)) => {
                    // A CA reference for one device: its certificate must chain to the CA.
                }
                (false, _, Some(s), _) => check_certs(s, "x509.signingCertificates")?,
                (false, _, None, Some(r)) if r.primary.is_some() => {}
                _ => {
                    return Err(EnrollmentError::Invalid(match individual {
                        true => "an individual x509 enrollment needs clientCertificates.primary or caReferences.primary".into(),
                        false => "an x509 enrollment group needs signingCertificates.primary or caReferences.primary".into(),
                    }))
                }
            }
            a.symmetric_key = None;
            a.tpm = None;
        }
        "tpm" => {
            return Err(EnrollmentError::Invalid(
                "TPM attestation is not offered by this service; use symmetricKey or x509".into(),
            ))
        }
        other => {
            return Err(EnrollmentError::Invalid(format!(
                "attestation.type must be symmetricKey or x509, not {other:?}"
            )))
        }
    }
    Ok(())
}

/// Checks the settings against the one hub this service assigns to (`hub`).
fn check_settings(s: &mut Settings, hub: &str) -> Result<(), EnrollmentError> {
    match s.provisioning_status.as_deref() {
        None => s.provisioning_status = Some("enabled".into()),
        Some("enabled" | "disabled") => {}
        Some(other) => {
            return Err(EnrollmentError::Invalid(format!(
                "provisioningStatus must be enabled or disabled, not {other:?}"
            )))
        }
    }
    match s.allocation_policy.as_deref() {
        None => s.allocation_policy = Some("hashed".into()),
        Some("hashed" | "geoLatency" | "static" | "custom") => {}
        Some(other) => {
            return Err(EnrollmentError::Invalid(format!(
                "allocationPolicy must be hashed, geoLatency, static or custom, not {other:?}"
            )))
        }
    }
    let linked = |h: &str| h.eq_ignore_ascii_case(hub);
    if let Some(h) = &s.iot_hub_host_name {
        if !linked(h) {
            return Err(EnrollmentError::Invalid(format!(
                "{h:?} is not a hub linked to this service (its hub is {hub:?})"
            )));
        }
    }
    if let Some(hubs) = &s.iot_hubs {
        if let Some(h) = hubs.iter().find(|h| !linked(h)) {
            return Err(EnrollmentError::Invalid(format!(
                "{h:?} is not a hub linked to this service (its hub is {hub:?})"
            )));
        }
    }
    if let Some(twin) = &s.initial_twin {
        let ok = twin.is_object()
            && twin.get("tags").is_none_or(Value::is_object)
            && twin
                .get("properties")
                .is_none_or(|p| p.is_object() && p.get("desired").is_none_or(Value::is_object));
        if !ok {
            return Err(EnrollmentError::Invalid(
                "initialTwin must be {\"tags\": {…}, \"properties\": {\"desired\": {…}}}".into(),
            ));
        }
    }
    if s.reprovision_policy.is_none() {
        s.reprovision_policy = Some(ReprovisionPolicy::default());
    }
    Ok(())
}

fn now() -> String {
    crate::api::iso_now()
}

fn load<T: serde::de::DeserializeOwned>(store: &Store, key: &str) -> Result<Option<T>, StoreError> {
    match store.dps(key)? {
        None => Ok(None),
        Some(raw) => serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(e.to_string())),
    }
}

fn save<T: Serialize>(store: &Store, key: &str, value: &T) -> Result<(), StoreError> {
    let json = serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store.put_dps(key, Some(&json))
}

/// The etag rules of a write: none or `*` writes whatever is there; another must match.
fn etag_allows(current: Option<&Settings>, if_match: Option<&str>) -> Result<(), EnrollmentError> {
    match (current.and_then(|s| s.etag.as_deref()), if_match.map(|e| e.trim_matches('"'))) {
        (_, None | Some("*")) => Ok(()),
        (Some(have), Some(want)) if have.trim_matches('"') == want => Ok(()),
        _ => Err(EnrollmentError::EtagMismatch),
    }
}

fn stamp(settings: &mut Settings, previous: Option<&Settings>, store: &Store) -> Result<(), StoreError> {
    let at = now();
    settings.created_date_time_utc = Some(
        previous
            .and_then(|p| p.created_date_time_utc.clone())
            .unwrap_or_else(|| at.clone()),
    );
    settings.last_updated_date_time_utc = Some(at);
    settings.etag = Some(store.next_etag()?);
    Ok(())
}

pub fn individual(store: &Store, id: &str) -> Result<Option<IndividualEnrollment>, StoreError> {
    load(store, &format!("e/{id}"))
}

pub fn group(store: &Store, id: &str) -> Result<Option<EnrollmentGroup>, StoreError> {
    load(store, &format!("g/{id}"))
}

pub fn registration(store: &Store, id: &str) -> Result<Option<StoredRegistration>, StoreError> {
    load(store, &format!("r/{id}"))
}

/// Every enrollment group (at most [`MAX_GROUPS`]); one stored in a shape this version does
/// not read is left out.
pub fn groups(store: &Store) -> Result<Vec<EnrollmentGroup>, StoreError> {
    Ok(store
        .dps_page("g/", None, MAX_GROUPS)?
        .into_iter()
        .filter_map(|(_, raw)| serde_json::from_slice(&raw).ok())
        .collect())
}

pub fn save_registration(store: &Store, r: &StoredRegistration) -> Result<(), StoreError> {
    save(store, &format!("r/{}", r.state.registration_id), r)
}

/// Creates or replaces an individual enrollment (`PUT /enrollments/{id}`); answers it and
/// whether it was created. Callers hold the store's exclusive section.
pub fn put_individual(
    store: &Store,
    id: &str,
    body: &[u8],
    if_match: Option<&str>,
    hub: &str,
) -> Result<(IndividualEnrollment, bool), EnrollmentError> {
    validate_registration_id(id)?;
    let mut e: IndividualEnrollment = serde_json::from_slice(body)
        .map_err(|e| EnrollmentError::Invalid(format!("invalid individual enrollment: {e}")))?;
    if e.registration_id != id {
        return Err(EnrollmentError::Invalid(
            "registrationId in the body does not match the path".into(),
        ));
    }
    if let Some(d) = &e.device_id {
        roost_model::DeviceId::parse(d)
            .map_err(|err| EnrollmentError::Invalid(format!("invalid deviceId: {err}")))?;
    }
    let previous = individual(store, id)?;
    etag_allows(previous.as_ref().map(|p| &p.settings), if_match.or(e.settings.etag.as_deref()))?;
    check_attestation(&mut e.attestation, true)?;
    check_settings(&mut e.settings, hub)?;
    stamp(&mut e.settings, previous.as_ref().map(|p| &p.settings), store)?;
    save(store, &format!("e/{id}"), &e)?;
    Ok((e, previous.is_none()))
}

/// Creates or replaces an enrollment group (`PUT /enrollmentGroups/{id}`).
pub fn put_group(
    store: &Store,
    id: &str,
    body: &[u8],
    if_match: Option<&str>,
    hub: &str,
) -> Result<(EnrollmentGroup, bool), EnrollmentError> {
    validate_group_id(id)?;
    let mut g: EnrollmentGroup = serde_json::from_slice(body)
        .map_err(|e| EnrollmentError::Invalid(format!("invalid enrollment group: {e}")))?;
    if g.enrollment_group_id != id {
        return Err(EnrollmentError::Invalid(
            "enrollmentGroupId in the body does not match the path".into(),
        ));
    }
    let previous = group(store, id)?;
    if previous.is_none() && store.dps_page("g/", None, MAX_GROUPS)?.len() >= MAX_GROUPS {
        return Err(EnrollmentError::Invalid(format!(
            "at most {MAX_GROUPS} enrollment groups"
        )));
    }
    etag_allows(previous.as_ref().map(|p| &p.settings), if_match.or(g.settings.etag.as_deref()))?;
    check_attestation(&mut g.attestation, false)?;
    check_settings(&mut g.settings, hub)?;
    stamp(&mut g.settings, previous.as_ref().map(|p| &p.settings), store)?;
    save(store, &format!("g/{id}"), &g)?;
    Ok((g, previous.is_none()))
}

/// Deletes `e/…`, `g/…` or `r/…` (`kind`) `id`, if `if_match` allows.
pub fn delete(store: &Store, kind: char, id: &str, if_match: Option<&str>) -> Result<(), EnrollmentError> {
    let key = format!("{kind}/{id}");
    let etag = match kind {
        'e' => load::<IndividualEnrollment>(store, &key)?.map(|e| e.settings.etag),
        'g' => load::<EnrollmentGroup>(store, &key)?.map(|g| g.settings.etag),
        _ => load::<StoredRegistration>(store, &key)?.map(|r| r.state.etag),
    };
    let Some(etag) = etag else {
        return Err(EnrollmentError::NotFound(id.chars().take(128).collect()));
    };
    let current = Settings {
        etag,
        ..Settings::default()
    };
    etag_allows(Some(&current), if_match)?;
    store.put_dps(&key, None)?;
    Ok(())
}

/// A page of `kind`'s records after `after`, and the key to continue from when there are more.
pub fn page(
    store: &Store,
    kind: char,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<Value>, Option<String>), StoreError> {
    let prefix = format!("{kind}/");
    let after = after.map(|a| format!("{prefix}{a}"));
    let rows = store.dps_page(&prefix, after.as_deref(), limit + 1)?;
    let more = rows.len() > limit;
    let mut out = Vec::new();
    let mut last = None;
    for (key, raw) in rows.into_iter().take(limit) {
        let v: Value = serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        out.push(match kind {
            'r' => v.get("state").cloned().unwrap_or(Value::Null),
            _ => answer_value(v),
        });
        last = Some(key[prefix.len()..].to_string());
    }
    Ok((out, if more { last } else { None }))
}

/// An enrollment as JSON for an answer: certificates by their `info`, never their PEM.
pub fn answer_value(mut v: Value) -> Value {
    if let Some(x) = v.pointer_mut("/attestation/x509") {
        for section in ["clientCertificates", "signingCertificates"] {
            for which in ["primary", "secondary"] {
                if let Some(c) = x.get_mut(section).and_then(|s| s.get_mut(which)) {
                    let der = c
                        .get("certificate")
                        .and_then(Value::as_str)
                        .and_then(|t| crate::cas::der_of(t).ok());
                    *c = json!({ "info": der.and_then(|d| info(&d)) });
                }
            }
        }
    }
    v
}

/// An enrollment or group as its answer.
pub fn answer<T: Serialize>(e: &T) -> Value {
    answer_value(serde_json::to_value(e).unwrap_or(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Vectors {
        group_key: String,
        id_scope: String,
        derived: Vec<Derived>,
        tokens: Vec<Token>,
    }
    #[derive(Deserialize)]
    struct Derived {
        registration_id: String,
        device_key: String,
    }
    #[derive(Deserialize)]
    struct Token {
        registration_id: String,
        token: String,
    }

    /// Derived keys and registration tokens as the SDKs' own code makes them
    /// (testdata/dps_vectors.json).
    #[test]
    fn derived_keys_and_tokens_match_the_sdks() {
        let v: Vectors =
            serde_json::from_str(include_str!("../../testdata/dps_vectors.json")).expect("vectors");
        for d in &v.derived {
            assert_eq!(derive_key(&v.group_key, &d.registration_id).expect("derives"), d.device_key);
        }
        for t in &v.tokens {
            let key = derive_key(&v.group_key, &t.registration_id).expect("derives");
            let token = roost_iothub::sas::SasToken::parse(&t.token).expect("parses");
            assert_eq!(token.resource(), format!("{}/registrations/{}", v.id_scope, t.registration_id));
            let key = roost_iothub::sas::decode_key(&key).expect("key");
            assert!(token.verify(&[&key], 1_800_000_000).is_ok(), "{}", t.token);
            let other = roost_iothub::sas::decode_key(&derive_key(&v.group_key, "other").expect("derives")).expect("key");
            assert!(token.verify(&[&other], 1_800_000_000).is_err());
        }
    }

    #[test]
    fn enrollments_are_checked_and_filled() {
        let dir = std::env::temp_dir().join(format!("roost-dps-enr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).expect("store");
        let hub = "hub.local";
        let body = |v: Value| serde_json::to_vec(&v).expect("json");
        let (e, created) = put_individual(
            &store,
            "dev-1",
            &body(json!({"registrationId": "dev-1", "attestation": {"type": "symmetricKey"}})),
            None,
            hub,
        )
        .expect("created");
        assert!(created);
        let keys = e.attestation.symmetric_key.clone().expect("keys");
        assert!(keys.primary_key.is_some() && keys.secondary_key.is_some(), "keys generated");
        assert_eq!(e.settings.provisioning_status.as_deref(), Some("enabled"));
        assert_eq!(e.settings.allocation_policy.as_deref(), Some("hashed"));
        let etag = e.settings.etag.clone().expect("etag");
        // A stale etag is refused; the current one replaces it.
        let again = body(json!({"registrationId": "dev-1", "attestation": {"type": "symmetricKey"}}));
        assert!(matches!(put_individual(&store, "dev-1", &again, Some("stale"), hub), Err(EnrollmentError::EtagMismatch)));
        let (_, created) = put_individual(&store, "dev-1", &again, Some(&etag), hub).expect("replaced");
        assert!(!created);
        for bad in [
            json!({"registrationId": "Dev-1", "attestation": {"type": "symmetricKey"}}),
            json!({"registrationId": "dev-2", "attestation": {"type": "tpm"}}),
            json!({"registrationId": "dev-2", "attestation": {"type": "x509"}}),
            json!({"registrationId": "dev-2", "attestation": {"type": "symmetricKey"}, "iotHubHostName": "other.hub"}),
            json!({"registrationId": "dev-2", "attestation": {"type": "symmetricKey"}, "initialTwin": {"tags": 1}}),
        ] {
            let id = bad["registrationId"].as_str().expect("id").to_string();
            assert!(put_individual(&store, &id, &body(bad), None, hub).is_err());
        }
        let (g, _) = put_group(
            &store,
            "fleet",
            &body(json!({"enrollmentGroupId": "fleet", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": roost_iothub::sas::generate_key()}}})),
            None,
            hub,
        )
        .expect("group");
        assert!(g.attestation.symmetric_key.expect("keys").secondary_key.is_some());
        let (items, more) = page(&store, 'e', None, 10).expect("page");
        assert_eq!((items.len(), more), (1, None));
        delete(&store, 'g', "fleet", None).expect("deleted");
        assert!(matches!(delete(&store, 'g', "fleet", None), Err(EnrollmentError::NotFound(_))));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
