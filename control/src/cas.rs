//! The CA certificates registered with the hub, for `certificateAuthority` devices (spec §1.4).
//! roost's own REST call; IoT Hub registers them through ARM (`Microsoft.Devices/IotHubs/
//! certificates`), whose shapes these answers keep: a certificate description with
//! `properties.subject`, `expiry`, `thumbprint` (SHA-1, uppercase hex), `isVerified`,
//! `created`, `updated`, `certificate`, and `verificationCode` after one is generated.
//!
//! A CA is trusted only once verified by proof of possession: `generateVerificationCode`
//! gives a random code, and `verify` takes a certificate whose common name is that code,
//! signed by the CA's key. Verified CAs travel to the engines in the config epoch; removing
//! one (or replacing its certificate) ends the sessions of devices that authenticated
//! through it.
//!
//! - `GET /roost/certificates` → `{"value": [description…]}`
//! - `GET|DELETE /roost/certificates/{name}`
//! - `PUT /roost/certificates/{name}` with `{"properties": {"certificate": "<PEM or base64
//!   DER>"}}` (201 created, 200 replaced; an optional `If-Match` must name the current etag)
//! - `POST /roost/certificates/{name}/generateVerificationCode`
//! - `POST /roost/certificates/{name}/verify` with `{"certificate": "<PEM>"}`

use base64::Engine as _;
use roost_model::link::CaEntry;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::store::{Store, StoreError};

/// At most this many CA certificates (IoT Hub allows 25 per hub).
pub const MAX_CAS: usize = 25;
/// Largest request body: a certificate in PEM.
pub const MAX_BODY: usize = 64 * 1024;

/// Why a call is refused.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0}")]
    Invalid(String),
    #[error("no certificate {0:?}")]
    NotFound(String),
    #[error("the etag does not match the certificate's")]
    EtagMismatch,
    #[error("verification failed: {0}")]
    VerificationFailed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One CA certificate as control stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCa {
    pub name: String,
    /// The certificate, DER, base64.
    pub der: String,
    pub subject: String,
    /// SHA-1 of the DER, uppercase hex.
    pub thumbprint: String,
    /// Unix seconds.
    pub not_after: i64,
    pub is_verified: bool,
    pub verification_code: Option<String>,
    pub created: i64,
    pub updated: i64,
    pub etag: u64,
}

impl StoredCa {
    fn der(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.der)
            .unwrap_or_default()
    }

    /// The description IoT Hub's ARM API answers; with the verification code when one is
    /// pending.
    pub fn description(&self) -> Value {
        let pem = pem(&self.der);
        let mut properties = json!({
            "subject": self.subject,
            "expiry": rfc2822(self.not_after),
            "thumbprint": self.thumbprint,
            "isVerified": self.is_verified,
            "created": rfc2822(self.created),
            "updated": rfc2822(self.updated),
            "certificate": pem,
        });
        if let Some(code) = &self.verification_code {
            properties["verificationCode"] = json!(code);
        }
        json!({
            "id": format!("/roost/certificates/{}", self.name),
            "name": self.name,
            "etag": self.etag.to_string(),
            "type": "Microsoft.Devices/IotHubs/Certificates",
            "properties": properties,
        })
    }
}

fn pem(der_b64: &str) -> String {
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in der_b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn rfc2822(unix: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(unix)
        .ok()
        .and_then(|t| t.to_rfc2822().ok())
        .unwrap_or_default()
}

fn now() -> i64 {
    crate::api::unix_now() as i64
}

/// ARM's rule for certificate names: 1 to 64 letters, digits, '-', '.' and '_'.
pub fn validate_name(name: &str) -> Result<(), CaError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    match ok {
        true => Ok(()),
        false => Err(CaError::Invalid(format!(
            "certificate name {:?}: 1 to 64 letters, digits, '-', '.' and '_'",
            name.chars().take(80).collect::<String>()
        ))),
    }
}

/// A certificate given as PEM or as base64 DER: its DER.
pub fn der_of(text: &str) -> Result<Vec<u8>, CaError> {
    let text = text.trim();
    if text.starts_with("-----BEGIN") {
        let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes())
            .map_err(|e| CaError::Invalid(format!("the certificate's PEM cannot be read: {e}")))?;
        if pem.label != "CERTIFICATE" {
            return Err(CaError::Invalid(format!(
                "a PEM {:?} block, not a CERTIFICATE",
                pem.label
            )));
        }
        return Ok(pem.contents);
    }
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|_| CaError::Invalid("the certificate is neither PEM nor base64 DER".into()))
}

/// Reads a CA certificate: subject, SHA-1 thumbprint, expiry.
fn describe(der: &[u8]) -> Result<(String, String, i64), CaError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CaError::Invalid(format!("the certificate cannot be read: {e}")))?;
    if !rest.is_empty() {
        return Err(CaError::Invalid("bytes after the certificate".into()));
    }
    let thumbprint: String = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    Ok((
        cert.subject().to_string(),
        thumbprint,
        cert.validity().not_after.timestamp(),
    ))
}

/// Every CA certificate, in name order.
pub fn stored(store: &Store) -> Result<Vec<StoredCa>, StoreError> {
    match store.cas()? {
        None => Ok(Vec::new()),
        Some(raw) => serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt(e.to_string())),
    }
}

fn save(store: &Store, cas: &[StoredCa]) -> Result<(), StoreError> {
    let json = serde_json::to_vec(cas).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store.put_cas(&json)
}

/// The verified CAs, as the config epoch carries them.
pub fn trusted(store: &Store) -> Result<Vec<CaEntry>, StoreError> {
    Ok(stored(store)?
        .into_iter()
        .filter(|c| c.is_verified)
        .map(|c| CaEntry {
            der: c.der(),
            name: c.name,
        })
        .collect())
}

pub fn get(store: &Store, name: &str) -> Result<StoredCa, CaError> {
    stored(store)?
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| CaError::NotFound(name.chars().take(64).collect()))
}

fn check_etag(current: &StoredCa, if_match: Option<&str>) -> Result<(), CaError> {
    match if_match.map(|e| e.trim().trim_matches('"')) {
        None | Some("*") => Ok(()),
        Some(e) if e == current.etag.to_string() => Ok(()),
        Some(_) => Err(CaError::EtagMismatch),
    }
}

/// What `PUT` takes: ARM's `{"properties": {"certificate": …}}`.
#[derive(Deserialize)]
struct PutBody {
    properties: PutProperties,
}

#[derive(Deserialize)]
struct PutProperties {
    certificate: String,
    #[serde(default, rename = "isVerified")]
    is_verified: bool,
}

/// Registers or replaces `name`. A new certificate is unverified until proven; the same
/// certificate again keeps its state. Answers the description and whether it was created.
/// Callers hold the store's exclusive section.
pub fn put(
    store: &Store,
    name: &str,
    body: &[u8],
    if_match: Option<&str>,
) -> Result<(StoredCa, bool), CaError> {
    validate_name(name)?;
    let req: PutBody = serde_json::from_slice(body).map_err(|e| {
        CaError::Invalid(format!(
            "the body must be {{\"properties\": {{\"certificate\": \"<PEM>\"}}}}: {e}"
        ))
    })?;
    if req.properties.is_verified {
        return Err(CaError::Invalid(
            "a CA is verified by proof of possession (generateVerificationCode, then verify), not on upload".into(),
        ));
    }
    let der = der_of(&req.properties.certificate)?;
    let (subject, thumbprint, not_after) = describe(&der)?;
    let mut all = stored(store)?;
    let at = now();
    let der = base64::engine::general_purpose::STANDARD.encode(&der);
    let created = match all.iter_mut().find(|c| c.name == name) {
        Some(existing) => {
            check_etag(existing, if_match)?;
            if existing.der != der {
                existing.der = der;
                existing.subject = subject;
                existing.thumbprint = thumbprint;
                existing.not_after = not_after;
                existing.is_verified = false;
                existing.verification_code = None;
            }
            existing.updated = at;
            existing.etag += 1;
            false
        }
        None => {
            if all.len() >= MAX_CAS {
                return Err(CaError::Invalid(format!(
                    "at most {MAX_CAS} CA certificates"
                )));
            }
            all.push(StoredCa {
                name: name.to_string(),
                der,
                subject,
                thumbprint,
                not_after,
                is_verified: false,
                verification_code: None,
                created: at,
                updated: at,
                etag: 1,
            });
            all.sort_by(|a, b| a.name.cmp(&b.name));
            true
        }
    };
    save(store, &all)?;
    Ok((get(store, name)?, created))
}

/// Removes `name`; answers whether it was verified (the engines' trust changes).
pub fn delete(store: &Store, name: &str, if_match: Option<&str>) -> Result<bool, CaError> {
    let mut all = stored(store)?;
    let Some(i) = all.iter().position(|c| c.name == name) else {
        return Err(CaError::NotFound(name.chars().take(64).collect()));
    };
    check_etag(&all[i], if_match)?;
    let removed = all.remove(i);
    save(store, &all)?;
    Ok(removed.is_verified)
}

/// Changes the CA `name` with `change` (when `if_match` allows), stamps it updated with a new
/// etag, stores the list and answers the CA as changed. Nothing is stored when `change` fails.
fn update(
    store: &Store,
    name: &str,
    if_match: Option<&str>,
    change: impl FnOnce(&mut StoredCa) -> Result<(), CaError>,
) -> Result<StoredCa, CaError> {
    let mut all = stored(store)?;
    let ca = all
        .iter_mut()
        .find(|c| c.name == name)
        .ok_or_else(|| CaError::NotFound(name.chars().take(64).collect()))?;
    check_etag(ca, if_match)?;
    change(ca)?;
    ca.updated = now();
    ca.etag += 1;
    let out = ca.clone();
    save(store, &all)?;
    Ok(out)
}

/// A fresh verification code for `name` (random, 48 hex digits, uppercase as IoT Hub's).
pub fn generate_code(
    store: &Store,
    name: &str,
    if_match: Option<&str>,
) -> Result<StoredCa, CaError> {
    let mut bytes = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| CaError::Invalid("no randomness for a verification code".into()))?;
    update(store, name, if_match, |ca| {
        ca.verification_code = Some(bytes.iter().map(|b| format!("{b:02X}")).collect());
        Ok(())
    })
}

#[derive(Deserialize)]
struct VerifyBody {
    certificate: String,
}

/// Marks `name` verified if the body's certificate proves possession of its key: its common
/// name the pending verification code, signed by the CA. Success spends the code; a failure
/// leaves it pending.
pub fn verify(
    store: &Store,
    name: &str,
    body: &[u8],
    if_match: Option<&str>,
) -> Result<StoredCa, CaError> {
    let req: VerifyBody = serde_json::from_slice(body).map_err(|e| {
        CaError::Invalid(format!(
            "the body must be {{\"certificate\": \"<PEM>\"}}: {e}"
        ))
    })?;
    let proof = der_of(&req.certificate)?;
    update(store, name, if_match, |ca| {
        let Some(code) = ca.verification_code.clone() else {
            return Err(CaError::VerificationFailed(
                "no verification code is pending: generate one first".into(),
            ));
        };
        roost_iothub::x509::verify_possession(&ca.der(), &proof, &code, now() as u64)
            .map_err(|e| CaError::VerificationFailed(e.to_string()))?;
        ca.is_verified = true;
        ca.verification_code = None;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs;

    fn body(pem: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({ "properties": { "certificate": pem } })).expect("json")
    }

    #[test]
    fn a_ca_is_trusted_only_after_proof_of_possession() {
        let dir = std::env::temp_dir().join(format!("roost-cas-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).expect("store");
        let (ca_pem, ca_key) = certs::fleet_ca("fleet", 30).expect("ca");
        let (other_pem, other_key) = certs::fleet_ca("other", 30).expect("ca");

        let (ca, created) = put(&store, "fleet", &body(&ca_pem), None).expect("put");
        assert!(created && !ca.is_verified);
        assert_eq!(ca.subject, "CN=fleet");
        assert_eq!(ca.thumbprint.len(), 40);
        assert!(trusted(&store).expect("trusted").is_empty(), "not before it is proven");
        let shown = ca.description();
        assert_eq!(shown["properties"]["isVerified"], false);
        assert_eq!(der_of(shown["properties"]["certificate"].as_str().expect("pem")).expect("der"), ca.der());

        // Verification needs a pending code, a certificate naming it, the CA's signature.
        let proof = |code: &str, pem: &str, key: &str| {
            let cert = certs::verification_cert(code, pem, key).expect("proof");
            serde_json::to_vec(&json!({ "certificate": cert })).expect("json")
        };
        assert!(matches!(
            verify(&store, "fleet", &proof("X", &ca_pem, &ca_key), None),
            Err(CaError::VerificationFailed(_))
        ));
        let code = generate_code(&store, "fleet", None).expect("code").verification_code.expect("set");
        assert_eq!(code.len(), 48);
        for wrong in [proof("X", &ca_pem, &ca_key), proof(&code, &other_pem, &other_key)] {
            assert!(matches!(
                verify(&store, "fleet", &wrong, None),
                Err(CaError::VerificationFailed(_))
            ));
        }
        let stale = get(&store, "fleet").expect("get").etag - 1;
        assert!(matches!(
            verify(&store, "fleet", &proof(&code, &ca_pem, &ca_key), Some(&stale.to_string())),
            Err(CaError::EtagMismatch)
        ));
        let verified = verify(&store, "fleet", &proof(&code, &ca_pem, &ca_key), None).expect("verified");
        assert!(verified.is_verified && verified.verification_code.is_none());
        let t = trusted(&store).expect("trusted");
        assert_eq!((t.len(), t[0].name.as_str()), (1, "fleet"));

        // The same certificate again keeps its trust; another one must be proven anew.
        assert!(put(&store, "fleet", &body(&ca_pem), None).expect("same").0.is_verified);
        assert!(!put(&store, "fleet", &body(&other_pem), None).expect("other").0.is_verified);
        assert!(trusted(&store).expect("trusted").is_empty());

        for bad in ["", "a/b", &"x".repeat(65)] {
            assert!(matches!(put(&store, bad, &body(&ca_pem), None), Err(CaError::Invalid(_))));
        }
        let claims_verified = serde_json::to_vec(
            &json!({ "properties": { "certificate": ca_pem, "isVerified": true } }),
        )
        .expect("json");
        assert!(matches!(put(&store, "x", &claims_verified, None), Err(CaError::Invalid(_))));
        assert!(matches!(put(&store, "x", &body("junk"), None), Err(CaError::Invalid(_))));
        assert!(!delete(&store, "fleet", None).expect("deleted"));
        assert!(matches!(delete(&store, "fleet", None), Err(CaError::NotFound(_))));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
