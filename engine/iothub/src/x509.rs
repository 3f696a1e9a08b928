//! A device's client certificate as IoT Hub judges it (spec §1.4): its thumbprints — the
//! SHA-1 and SHA-256 of its DER, which a `selfSigned` identity's registry entry names in hex,
//! compared case-insensitively — its validity period, and its subject's common name (a
//! `certificateAuthority` identity's certificate names the device, or `device/module`).
//!
//! This reads the certificate only. That its holder has its private key is the TLS
//! handshake's to prove (the client signs the handshake with it); which identity it stands
//! for is the registry's.

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
}

/// Why a certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the client certificate cannot be read: {0}")]
pub struct CertError(String);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ClientCert {
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
}
