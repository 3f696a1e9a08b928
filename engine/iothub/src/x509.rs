//! A device's client certificate as IoT Hub judges it (spec §1.4): its thumbprints — the
//! SHA-1 and SHA-256 of its DER, which a `selfSigned` identity's registry entry names in hex,
//! compared case-insensitively — its validity period, and its subject's common name (a
//! `certificateAuthority` identity's certificate names the device, or `device/module`); and
//! for `certificateAuthority` identities, the chain from it to one of the CAs the hub trusts
//! ([`TrustedCas`], built by rustls-webpki within its budgets on signatures and path-building
//! calls, over at most [`MAX_PRESENTED`] certificates).
//!
//! This reads certificates only. That the client holds the leaf's private key is the TLS
//! handshake's to prove (the client signs the handshake with it); which identity it stands
//! for is the registry's; which CAs are trusted is control's (proof of possession).

use ring::digest;

/// What the hub keeps of a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// Lowercase hex SHA-1 of the DER (40 digits).
    pub sha1: String,
    /// Lowercase hex SHA-256 of the DER (64 digits).
    pub sha256: String,
    /// The validity period, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// The subject's first common name, if it has one.
    pub common_name: Option<String>,
    /// The certificates presented, DER: this one first, then the intermediates the client
    /// sent after it (at most [`MAX_PRESENTED`] in all).
    pub chain: Vec<Vec<u8>>,
}

/// Most certificates a client's chain may hold (the leaf and its intermediates); webpki
/// itself builds paths through at most six intermediates.
pub const MAX_PRESENTED: usize = 8;

/// Why a certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the client certificate cannot be read: {0}")]
pub struct CertError(String);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ClientCert {
    /// The certificates a client presented, leaf first.
    pub fn from_chain<C: AsRef<[u8]>>(presented: &[C]) -> Result<Self, CertError> {
        let Some(leaf) = presented.first() else {
            return Err(CertError("no certificate".into()));
        };
        if presented.len() > MAX_PRESENTED {
            return Err(CertError(format!(
                "{} certificates presented; at most {MAX_PRESENTED}",
                presented.len()
            )));
        }
        let mut cert = Self::from_der(leaf.as_ref())?;
        cert.chain
            .extend(presented[1..].iter().map(|c| c.as_ref().to_vec()));
        Ok(cert)
    }

    pub fn from_der(der: &[u8]) -> Result<Self, CertError> {
        let (rest, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| CertError(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CertError("bytes after the certificate".into()));
        }
        let validity = cert.validity();
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        Ok(ClientCert {
            sha1: hex(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref()),
            sha256: hex(digest::digest(&digest::SHA256, der).as_ref()),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            common_name,
            chain: vec![der.to_vec()],
        })
    }

    /// Whether `thumbprint` (hex, either case, SHA-1 or SHA-256) names this certificate.
    pub fn has_thumbprint(&self, thumbprint: &str) -> bool {
        thumbprint.eq_ignore_ascii_case(&self.sha1) || thumbprint.eq_ignore_ascii_case(&self.sha256)
    }

    /// Whether the certificate is valid at `now` (Unix seconds).
    pub fn valid_at(&self, now: i64) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// Why a chain does not lead to a trusted CA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A certificate on the path is outside its validity period.
    #[error("a certificate on the chain has expired or is not yet valid")]
    Expired,
    /// No path to a trusted CA (unknown issuer, bad signature, a CA not verified, a budget
    /// spent): webpki's reason.
    #[error("{0}")]
    Untrusted(String),
}

/// The CAs a config epoch names as verified, ready to build client chains against: their
/// names at control and ids ([`ca_id`], which sessions authenticated through one remember),
/// and beside them, in the same order, the trust anchors webpki takes as they are.
#[derive(Default)]
pub struct TrustedCas {
    /// (name, id) of each anchor.
    cas: Vec<(String, String)>,
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
}

impl std::fmt::Debug for TrustedCas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.cas.iter().map(|(name, _)| name))
            .finish()
    }
}

/// The SHA-256 of a certificate's DER, lowercase hex: how a trusted CA is named to sessions.
pub fn ca_id(der: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, der).as_ref())
}

impl TrustedCas {
    /// No CA trusted.
    pub const EMPTY: TrustedCas = TrustedCas {
        cas: Vec::new(),
        anchors: Vec::new(),
    };

    /// The CAs `(name, DER)`; one that cannot be a trust anchor is left out and returned with
    /// its reason.
    pub fn new<'a>(
        cas: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> (Self, Vec<(String, CertError)>) {
        let mut out = Self::default();
        let mut bad = Vec::new();
        for (name, der) in cas {
            let cert = rustls_pki_types::CertificateDer::from(der);
            match webpki::anchor_from_trusted_cert(&cert) {
                Ok(anchor) => {
                    out.cas.push((name.to_string(), ca_id(der)));
                    out.anchors.push(anchor.to_owned());
                }
                Err(e) => bad.push((name.to_string(), CertError(format!("{e:?}")))),
            }
        }
        (out, bad)
    }

    /// The ids of the CAs trusted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.cas.iter().map(|(_, id)| id.as_str())
    }

    /// Builds a path from `cert` (and the intermediates it came with) to a trusted CA, for
    /// client authentication at `now_unix`; answers the CA's id.
    pub fn verify(&self, cert: &ClientCert, now_unix: u64) -> Result<&str, ChainError> {
        let Some((leaf, rest)) = cert.chain.split_first() else {
            return Err(ChainError::Untrusted("no certificate".into()));
        };
        let leaf = rustls_pki_types::CertificateDer::from(leaf.as_slice());
        let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| {
            ChainError::Untrusted(format!("the certificate cannot be verified: {e:?}"))
        })?;
        let intermediates: Vec<rustls_pki_types::CertificateDer<'_>> = rest
            .iter()
            .map(|c| rustls_pki_types::CertificateDer::from(c.as_slice()))
            .collect();
        let time = rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            now_unix,
        ));
        let path = ee
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &self.anchors,
                &intermediates,
                time,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| match e {
                webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
                    ChainError::Expired
                }
                e => ChainError::Untrusted(format!("no chain to a trusted CA: {e:?}")),
            })?;
        let spki = &path.anchor().subject_public_key_info;
        Ok(self
            .anchors
            .iter()
            .position(|a| a.subject_public_key_info == *spki)
            .map_or("", |i| self.cas[i].1.as_str()))
    }
}

/// Proof of possession of a CA's key (IoT Hub's CA verification): `cert` must be signed by
/// the CA `ca`'s key, valid at `now_unix`, and its common name must be `code`. The signature
/// alone is checked — not a path — so a version 1 certificate, as `openssl x509 -req` makes
/// one, does as well as any.
pub fn verify_possession(
    ca: &[u8],
    cert: &[u8],
    code: &str,
    now_unix: u64,
) -> Result<(), ChainError> {
    let untrusted = |m: String| ChainError::Untrusted(m);
    let (_, ca) = x509_parser::parse_x509_certificate(ca)
        .map_err(|e| untrusted(format!("the CA cannot be read: {e}")))?;
    let (_, proof) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| untrusted(format!("the certificate cannot be read: {e}")))?;
    let cn = proof
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok());
    if cn != Some(code) {
        return Err(untrusted(
            "its common name is not the verification code".into(),
        ));
    }
    proof
        .verify_signature(Some(ca.public_key()))
        .map_err(|_| untrusted("it is not signed by the CA's key".into()))?;
    let validity = proof.validity();
    let now = now_unix as i64;
    if now < validity.not_before.timestamp() || now > validity.not_after.timestamp() {
        return Err(ChainError::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate and its thumbprints as `openssl x509 -fingerprint -sha1` / `-sha256`
    /// print them (generated once: `openssl req -x509 -newkey ec -pkeyopt
    /// ec_paramgen_curve:P-256 -nodes -subj /CN=dev-x509 -days 3650`).
    const PEM: &str = include_str!("../testdata/dev-x509.pem");
    const SHA1: &str = include_str!("../testdata/dev-x509.sha1");
    const SHA256: &str = include_str!("../testdata/dev-x509.sha256");

    fn der() -> Vec<u8> {
        use base64::Engine as _;
        let body: String = PEM.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .expect("base64")
    }

    fn colonless(s: &str) -> String {
        let v = s.trim().rsplit('=').next().unwrap_or_default();
        v.replace(':', "")
    }

    #[test]
    fn thumbprints_are_those_openssl_prints_and_match_in_either_case() {
        let c = ClientCert::from_der(&der()).expect("parses");
        let (sha1, sha256) = (colonless(SHA1), colonless(SHA256));
        assert!(c.has_thumbprint(&sha1) && c.has_thumbprint(&sha1.to_ascii_lowercase()));
        assert!(c.has_thumbprint(&sha256) && c.has_thumbprint(&sha256.to_ascii_lowercase()));
        assert!(!c.has_thumbprint(&sha256[..40]));
        assert_eq!(c.common_name.as_deref(), Some("dev-x509"));
        assert!(c.valid_at(c.not_before) && !c.valid_at(c.not_after + 1));
    }

    #[test]
    fn what_is_not_one_certificate_is_refused() {
        let d = der();
        assert!(ClientCert::from_der(&d[..d.len() - 1]).is_err());
        let mut more = d.clone();
        more.push(0);
        assert!(ClientCert::from_der(&more).is_err());
        assert!(ClientCert::from_der(b"").is_err());
    }

    mod chains {
        use super::super::*;
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair,
        };

        const NOW: u64 = 1_800_000_000;

        fn params(cn: &str, ca: bool) -> CertificateParams {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.distinguished_name.push(DnType::CommonName, cn);
            if ca {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            } else {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            p
        }

        struct Ca {
            params: CertificateParams,
            key: KeyPair,
            der: Vec<u8>,
        }

        fn root(cn: &str) -> Ca {
            let params = params(cn, true);
            let key = KeyPair::generate().expect("key");
            let der = params.self_signed(&key).expect("signed").der().to_vec();
            Ca { params, key, der }
        }

        fn issue(cn: &str, ca: bool, by: &Ca) -> Ca {
            let params = params(cn, ca);
            let key = KeyPair::generate().expect("key");
            let issuer = Issuer::from_params(&by.params, &by.key);
            let der = params.signed_by(&key, &issuer).expect("signed").der().to_vec();
            Ca { params, key, der }
        }

        #[test]
        fn a_chain_leads_to_the_trusted_ca_it_was_issued_under() {
            let (fleet, other) = (root("fleet"), root("other"));
            let inter = issue("fleet-intermediate", true, &fleet);
            let direct = issue("dev-1", false, &fleet);
            let via = issue("dev-2/mod", false, &inter);
            let (cas, bad) = TrustedCas::new([("other", &other.der[..]), ("fleet", &fleet.der[..])]);
            assert!(bad.is_empty());
            let id = ca_id(&fleet.der);
            let cert = ClientCert::from_chain(&[&direct.der]).expect("reads");
            assert_eq!(cas.verify(&cert, NOW), Ok(id.as_str()));
            let cert = ClientCert::from_chain(&[&via.der, &inter.der]).expect("reads");
            assert_eq!(cert.common_name.as_deref(), Some("dev-2/mod"));
            assert_eq!(cas.verify(&cert, NOW), Ok(id.as_str()));
            // Without its intermediate, or under CAs that did not issue it: no path.
            let alone = ClientCert::from_chain(&[&via.der]).expect("reads");
            assert!(matches!(cas.verify(&alone, NOW), Err(ChainError::Untrusted(_))));
            let (others, _) = TrustedCas::new([("other", &other.der[..])]);
            assert!(matches!(others.verify(&cert, NOW), Err(ChainError::Untrusted(_))));
            assert!(TrustedCas::default().verify(&cert, NOW).is_err());
            // A self-signed certificate is not a chain to anything.
            let own = root("dev-1");
            let cert = ClientCert::from_chain(&[&own.der]).expect("reads");
            assert!(cas.verify(&cert, NOW).is_err());
        }

        #[test]
        fn an_expired_leaf_is_expired_not_untrusted() {
            let fleet = root("fleet");
            let mut p = params("dev-1", false);
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
            let key = KeyPair::generate().expect("key");
            let issuer = Issuer::from_params(&fleet.params, &fleet.key);
            let der = p.signed_by(&key, &issuer).expect("signed").der().to_vec();
            let (cas, _) = TrustedCas::new([("fleet", &fleet.der[..])]);
            let cert = ClientCert::from_chain(&[&der]).expect("reads");
            assert_eq!(cas.verify(&cert, NOW), Err(ChainError::Expired));
        }

        /// The crafted chain of path-building attacks: every intermediate has the same name
        /// and key, so each is a candidate issuer of every other; the trusted CA has that
        /// name but another key, so no path succeeds. webpki's loop detection and budgets
        /// (100 signatures, 200,000 path-building calls) end the search with a refusal; more
        /// certificates than [`MAX_PRESENTED`] are refused before it starts.
        #[test]
        fn a_crafted_chain_is_refused_within_the_budget() {
            let shared_key = KeyPair::generate().expect("key");
            let shared = params("loop", true);
            let decoy = Ca {
                params: shared.clone(),
                key: KeyPair::from_pem(&shared_key.serialize_pem()).expect("key"),
                der: Vec::new(),
            };
            let mut presented = vec![issue("dev-1", false, &decoy).der];
            for serial in 0..(MAX_PRESENTED as u64 - 1) {
                let mut p = shared.clone();
                p.serial_number = Some(rcgen::SerialNumber::from(serial + 1));
                let issuer = Issuer::from_params(&shared, &shared_key);
                presented.push(p.signed_by(&shared_key, &issuer).expect("signed").der().to_vec());
            }
            let anchor = root("loop");
            let (cas, _) = TrustedCas::new([("loop", &anchor.der[..])]);
            let cert = ClientCert::from_chain(&presented).expect("reads");
            assert!(
                matches!(cas.verify(&cert, NOW), Err(ChainError::Untrusted(_))),
                "a crafted chain was not refused"
            );
            presented.push(presented[1].clone());
            assert!(ClientCert::from_chain(&presented).is_err());
        }

        #[test]
        fn possession_is_a_certificate_naming_the_code_signed_by_the_ca_key() {
            let (fleet, other) = (root("fleet"), root("other"));
            let proof = issue("3C5D9E0A", false, &fleet);
            assert_eq!(verify_possession(&fleet.der, &proof.der, "3C5D9E0A", NOW), Ok(()));
            assert!(verify_possession(&fleet.der, &proof.der, "3C5D9E0B", NOW).is_err());
            assert!(verify_possession(&other.der, &proof.der, "3C5D9E0A", NOW).is_err());
            let forged = issue("3C5D9E0A", false, &other);
            assert!(verify_possession(&fleet.der, &forged.der, "3C5D9E0A", NOW).is_err());
            assert!(verify_possession(&fleet.der, b"junk", "3C5D9E0A", NOW).is_err());
        }
    }
}
