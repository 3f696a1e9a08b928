//! SAS tokens (spec §1.2): parse, verify, authorize and sign.
//!
//! A server checks a token in this order, following IoT Hub's own verification steps:
//!
//! 1. [`SasToken::parse`] the MQTT password or HTTP `Authorization` value (steps 1–3).
//! 2. Pick the keys to try: the policy named by [`SasToken::key_name`], or, when there is none,
//!    the identity from [`SasToken::device_scope`] (step 6).
//! 3. [`SasToken::verify`] with those keys and the current time (steps 4–5).
//! 4. [`SasToken::authorizes`] the resource the client wants to reach (step 7).
//!
//! The signature covers the `sr` text *exactly as the client wrote it*: the SDKs encode `sr` in
//! three different ways, so re-encoding or decoding it before hashing would reject some of them.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use roost_model::{DeviceId, ModuleId};

use crate::encoding;

/// The only token type IoT Hub accepts.
const PREFIX: &str = "SharedAccessSignature";

/// The longest token [`SasToken::parse`] looks at. Real tokens are under 400 bytes; the limit
/// bounds the work an unauthenticated client can make us do.
pub const MAX_TOKEN_LEN: usize = 4096;

/// How far past its `se` a token is still accepted, to tolerate clock skew (spec §1.2 step 4).
pub const EXPIRY_SKEW_SECS: u64 = 300;

/// The field names a token may carry, in the order [`SasToken::parse`] stores them.
const FIELDS: [&str; 4] = ["sr", "sig", "se", "skn"];

/// Why a SAS token was rejected, or a key could not be used.
///
/// No variant carries the signature or a key, so errors are safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("SAS token is {0} bytes, longer than the {MAX_TOKEN_LEN} allowed")]
    TooLong(usize),
    /// The token is not `SharedAccessSignature` followed by exactly one field list.
    #[error("not a SharedAccessSignature token")]
    NotSharedAccessSignature,
    /// A field has no `=`.
    #[error("SAS token field without '='")]
    MalformedField,
    /// A required field (`sr`, `sig` or `se`) is absent or empty.
    #[error("SAS token has no {0:?} field")]
    MissingField(&'static str),
    /// A field appears twice.
    #[error("SAS token has the {0:?} field twice")]
    DuplicateField(&'static str),
    /// A field value is not valid UTF-8 once URL-decoded.
    #[error("SAS token field is not valid UTF-8 once URL-decoded")]
    BadEncoding,
    /// The `sig` value is not base64.
    #[error("SAS token signature is not base64")]
    BadSignatureEncoding,
    /// The `se` value is not a non-negative integer that fits 64 bits.
    #[error("SAS token expiry is not a Unix time in seconds")]
    BadExpiry,
    /// The token expired more than [`EXPIRY_SKEW_SECS`] ago.
    #[error("SAS token expired at {expiry}")]
    Expired {
        /// The token's `se`, in Unix seconds.
        expiry: u64,
    },
    /// No key produced the token's signature.
    #[error("SAS token signature does not match")]
    SignatureMismatch,
    /// The decoded `sr` is not `{host}[/devices/{d}[/modules/{m}]]` with valid ids.
    #[error("SAS token resource is not a hub, device or module")]
    BadResource,
    /// A shared access key is not base64.
    #[error("shared access key is not base64")]
    BadKey,
}

impl SasError {
    /// A stable, bounded label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            SasError::TooLong(_) => "too_long",
            SasError::NotSharedAccessSignature => "not_shared_access_signature",
            SasError::MalformedField => "malformed_field",
            SasError::MissingField(_) => "missing_field",
            SasError::DuplicateField(_) => "duplicate_field",
            SasError::BadEncoding => "bad_encoding",
            SasError::BadSignatureEncoding => "bad_signature_encoding",
            SasError::BadExpiry => "bad_expiry",
            SasError::Expired { .. } => "expired",
            SasError::SignatureMismatch => "signature_mismatch",
            SasError::BadResource => "bad_resource",
            SasError::BadKey => "bad_key",
        }
    }
}

/// Which of an identity's keys signed a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUsed {
    /// The first key passed to [`SasToken::verify`].
    Primary,
    /// The second key passed to [`SasToken::verify`].
    Secondary,
}

/// What a token's decoded `sr` names: a whole hub, a device, or a module of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The hub host name, as written in `sr`.
    pub host: String,
    /// The device, when `sr` names one.
    pub device: Option<DeviceId>,
    /// The module, when `sr` names one; only ever set together with `device`.
    pub module: Option<ModuleId>,
}

impl Scope {
    /// Parses a decoded resource `{host}[/devices/{d}[/modules/{m}]]`; trailing `/` are ignored
    /// and the literal segments `devices` and `modules` match case-insensitively.
    pub fn parse(resource: &str) -> Result<Scope, SasError> {
        let mut parts = resource.trim_end_matches('/').split('/');
        let host = parts
            .next()
            .filter(|host| !host.is_empty())
            .ok_or(SasError::BadResource)?;
        let device = match id_segment(&mut parts, "devices")? {
            Some(id) => Some(DeviceId::parse(id).map_err(|_| SasError::BadResource)?),
            None => None,
        };
        let module = match (&device, id_segment(&mut parts, "modules")?) {
            (Some(_), Some(id)) => Some(ModuleId::parse(id).map_err(|_| SasError::BadResource)?),
            (None, Some(_)) => return Err(SasError::BadResource),
            (_, None) => None,
        };
        if parts.next().is_some() {
            return Err(SasError::BadResource);
        }
        Ok(Scope {
            host: host.to_owned(),
            device,
            module,
        })
    }
}

/// Reads `{literal}/{id}` from `parts`; `None` when `parts` is exhausted.
fn id_segment<'a>(
    parts: &mut impl Iterator<Item = &'a str>,
    literal: &str,
) -> Result<Option<&'a str>, SasError> {
    match (parts.next(), parts.next()) {
        (None, _) => Ok(None),
        (Some(name), Some(id)) if name.eq_ignore_ascii_case(literal) => Ok(Some(id)),
        _ => Err(SasError::BadResource),
    }
}

/// A parsed `SharedAccessSignature` token. It owns its parts, and its `Debug` output never
/// shows the signature.
#[derive(Clone)]
pub struct SasToken {
    raw_resource: String,
    resource: String,
    signature: Vec<u8>,
    raw_expiry: String,
    expiry: u64,
    key_name: Option<String>,
}

impl SasToken {
    /// Parses `SharedAccessSignature sr=..&sig=..&se=..[&skn=..]`.
    ///
    /// Field names are case-insensitive and may come in any order; unknown fields are ignored.
    /// `sr` is kept as written (it is what was signed) and the other values are URL-decoded.
    /// An empty `skn`, which old C builds send, counts as absent.
    pub fn parse(token: &str) -> Result<SasToken, SasError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(SasError::TooLong(token.len()));
        }
        let mut words = token.split_whitespace();
        let (Some(PREFIX), Some(fields), None) = (words.next(), words.next(), words.next()) else {
            return Err(SasError::NotSharedAccessSignature);
        };

        let mut values: [Option<&str>; 4] = [None; 4];
        for field in fields.split('&').filter(|field| !field.is_empty()) {
            let (name, value) = field.split_once('=').ok_or(SasError::MalformedField)?;
            let Some(i) = FIELDS
                .iter()
                .position(|known| known.eq_ignore_ascii_case(name))
            else {
                continue;
            };
            if values[i].replace(value).is_some() {
                return Err(SasError::DuplicateField(FIELDS[i]));
            }
        }
        let [sr, sig, se, skn] = values;

        let raw_resource = required(sr, "sr")?;
        let resource = decode(raw_resource)?;
        let sig = decode(required(sig, "sig")?)?;
        let signature = STANDARD
            .decode(sig.as_bytes())
            .map_err(|_| SasError::BadSignatureEncoding)?;
        let raw_expiry = required(se, "se")?;
        let expiry = parse_expiry(&decode(raw_expiry)?)?;
        let key_name = match skn {
            Some(skn) => Some(decode(skn)?).filter(|name| !name.is_empty()),
            None => None,
        };

        Ok(SasToken {
            raw_resource: raw_resource.to_owned(),
            resource,
            signature,
            raw_expiry: raw_expiry.to_owned(),
            expiry,
            key_name,
        })
    }

    /// `sr` exactly as received; this is what the signature covers.
    pub fn raw_resource(&self) -> &str {
        &self.raw_resource
    }

    /// `sr` URL-decoded; this is what names the identity and what is authorized.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// `se`: when the token expires, in Unix seconds.
    pub fn expiry(&self) -> u64 {
        self.expiry
    }

    /// `skn`: the shared access policy whose key signed the token, if any.
    pub fn key_name(&self) -> Option<&str> {
        self.key_name.as_deref()
    }

    /// Whether `key` (decoded bytes, not base64) produced the signature, compared in constant
    /// time. This does not look at the expiry; [`SasToken::verify`] does both.
    pub fn verify_signature(&self, key: &[u8]) -> bool {
        let key = hmac::Key::new(hmac::HMAC_SHA256, key);
        let message = string_to_sign(&self.raw_resource, &self.raw_expiry);
        hmac::verify(&key, message.as_bytes(), &self.signature).is_ok()
    }

    /// Fails if the token expired more than [`EXPIRY_SKEW_SECS`] before `now_unix`.
    pub fn check_expiry(&self, now_unix: u64) -> Result<(), SasError> {
        if self.expiry.saturating_add(EXPIRY_SKEW_SECS) < now_unix {
            return Err(SasError::Expired {
                expiry: self.expiry,
            });
        }
        Ok(())
    }

    /// Checks the expiry, then the signature against `keys[0]` (primary) and `keys[1]`
    /// (secondary). Keys are decoded bytes; any keys after the second are not tried.
    pub fn verify(&self, keys: &[&[u8]], now_unix: u64) -> Result<KeyUsed, SasError> {
        self.check_expiry(now_unix)?;
        keys.iter()
            .zip([KeyUsed::Primary, KeyUsed::Secondary])
            .find(|(key, _)| self.verify_signature(key))
            .map(|(_, used)| used)
            .ok_or(SasError::SignatureMismatch)
    }

    /// The hub, device or module the decoded `sr` names.
    pub fn device_scope(&self) -> Result<Scope, SasError> {
        Scope::parse(&self.resource)
    }

    /// Whether this token's decoded `sr` covers `target`; see [`authorizes`].
    pub fn authorizes(&self, target: &str) -> bool {
        authorizes(&self.resource, target)
    }
}

impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasToken")
            .field("resource", &self.raw_resource)
            .field("expiry", &self.expiry)
            .field("key_name", &self.key_name)
            .field("signature", &"<redacted>")
            .finish()
    }
}

fn required<'a>(value: Option<&'a str>, name: &'static str) -> Result<&'a str, SasError> {
    value
        .filter(|value| !value.is_empty())
        .ok_or(SasError::MissingField(name))
}

fn decode(value: &str) -> Result<String, SasError> {
    encoding::decode(value)
        .map(|decoded| decoded.into_owned())
        .map_err(|_| SasError::BadEncoding)
}

fn parse_expiry(se: &str) -> Result<u64, SasError> {
    // u64::from_str would also take a leading '+'; IoT Hub expects bare digits.
    if se.is_empty() || !se.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SasError::BadExpiry);
    }
    se.parse().map_err(|_| SasError::BadExpiry)
}

fn string_to_sign(raw_resource: &str, raw_expiry: &str) -> String {
    format!("{raw_resource}\n{raw_expiry}")
}

/// Signs a token the way the Python device SDK writes it: `sr` is `resource_as_written`
/// verbatim (encode it first with [`encode_resource`] to match Python), `sig` is the base64
/// HMAC percent-encoded, fields in the order `sr`, `sig`, `se`, `skn`. `key` is decoded bytes.
pub fn sign(resource_as_written: &str, key: &[u8], expiry: u64, key_name: Option<&str>) -> String {
    let se = expiry.to_string();
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let tag = hmac::sign(&key, string_to_sign(resource_as_written, &se).as_bytes());
    let sig = encoding::encode(&STANDARD.encode(tag.as_ref()));
    let mut token = format!("{PREFIX} sr={resource_as_written}&sig={sig}&se={se}");
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&encoding::encode(name));
    }
    token
}

/// Encodes a resource as Python's `quote(resource, safe="")` does: everything but
/// `A-Z a-z 0-9 - . _ ~` is percent-encoded, so `/` becomes `%2F`.
pub fn encode_resource(resource: &str) -> String {
    encoding::encode(resource)
}

/// Whether a token whose decoded `sr` is `scope_resource` may act on `target` (`host+path`,
/// spec §1.2 step 7): `scope_resource`, with trailing `/` trimmed, must be a case-insensitive,
/// segment-wise prefix of `target`. So `hub/devices/d1` covers `hub/devices/d1/modules/m` but
/// `hub/devices/d` does not cover `hub/devices/d1`.
pub fn authorizes(scope_resource: &str, target: &str) -> bool {
    let scope = scope_resource.trim_end_matches('/');
    if scope.is_empty() {
        return false;
    }
    let mut target = target.split('/');
    scope.split('/').all(|segment| {
        target
            .next()
            .is_some_and(|t| t.eq_ignore_ascii_case(segment))
    })
}

/// Whether a device or module token whose decoded `sr` is `scope_resource` names exactly
/// `identity_resource` (`{host}/devices/{d}[/modules/{m}]`, spec §1.2 step 6): the same
/// segments (the case-insensitive comparison of [`authorizes`]), with trailing `/` trimmed. A
/// token without a policy name is the identity its `sr` names and nothing else: `{host}` alone,
/// or a device's `sr` offered by one of its modules, is not that identity.
pub fn names_identity(scope_resource: &str, identity_resource: &str) -> bool {
    let scope = scope_resource.trim_end_matches('/');
    authorizes(scope, identity_resource)
        && scope.split('/').count() == identity_resource.trim_end_matches('/').split('/').count()
}

/// Decodes a base64 shared access key (as stored or written in a connection string) into the
/// bytes [`SasToken::verify`] and [`sign`] take.
pub fn decode_key(key_base64: &str) -> Result<Vec<u8>, SasError> {
    STANDARD.decode(key_base64).map_err(|_| SasError::BadKey)
}

/// A new shared access key: 32 random bytes from the system generator, base64-encoded.
///
/// # Panics
///
/// If the operating system's random generator fails. A key must never come from a weaker
/// source, and a system that cannot produce randomness cannot safely run a hub.
pub fn generate_key() -> String {
    let mut key = [0u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .expect("the system random generator failed");
    STANDARD.encode(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vectors;

    /// Before every vector token's expiry (1900000000).
    const NOW: u64 = 1_800_000_000;
    const EXPIRY: u64 = 1_900_000_000;

    fn parse(token: &str) -> SasToken {
        SasToken::parse(token).unwrap_or_else(|e| panic!("{token:?} should parse: {e}"))
    }

    fn python_dev1() -> String {
        let entry = &vectors::entries("device_tokens")[0];
        assert_eq!(vectors::text(entry, "resource"), "localhost/devices/dev-1");
        vectors::text(entry, "token").to_owned()
    }

    #[test]
    fn every_vector_token_verifies_or_is_rejected_as_marked() {
        let key = vectors::key();
        let mut tokens = vectors::entries("device_tokens");
        tokens.extend(vectors::entries("service_tokens"));
        assert!(tokens.len() >= 9);
        for entry in &tokens {
            let token = parse(vectors::text(entry, "token"));
            assert_eq!(
                token.resource(),
                vectors::text(entry, "resource"),
                "{entry}"
            );
            assert_eq!(token.expiry(), entry["expiry"].as_u64().expect("expiry"));
            assert_eq!(token.key_name(), entry["policy"].as_str(), "{entry}");
            let result = token.verify(&[&key], NOW);
            if entry["valid"].as_bool() == Some(true) {
                assert_eq!(result, Ok(KeyUsed::Primary), "{entry}");
            } else {
                assert_eq!(result, Err(SasError::SignatureMismatch), "{entry}");
            }
        }
    }

    #[test]
    fn secondary_key_is_tried_after_primary() {
        let key = vectors::key();
        let token = parse(&python_dev1());
        assert_eq!(token.verify(&[b"wrong", &key], NOW), Ok(KeyUsed::Secondary));
        assert_eq!(
            token.verify(&[b"wrong", b"also wrong"], NOW),
            Err(SasError::SignatureMismatch)
        );
        assert_eq!(token.verify(&[], NOW), Err(SasError::SignatureMismatch));
        // Only two keys are ever tried.
        assert_eq!(
            token.verify(&[b"a", b"b", &key], NOW),
            Err(SasError::SignatureMismatch)
        );
    }

    #[test]
    fn tampered_expiry_does_not_verify() {
        let key = vectors::key();
        let token = python_dev1().replace("se=1900000000", "se=1900000001");
        let token = parse(&token);
        assert_eq!(token.expiry(), 1_900_000_001);
        assert_eq!(token.verify(&[&key], NOW), Err(SasError::SignatureMismatch));
    }

    #[test]
    fn signature_covers_raw_resource_not_its_decoded_form() {
        let key = vectors::key();
        // Python signed the encoded form; the same resource written raw must not verify.
        let raw = python_dev1().replace(
            "sr=localhost%2Fdevices%2Fdev-1",
            "sr=localhost/devices/dev-1",
        );
        let raw = parse(&raw);
        assert_eq!(raw.resource(), "localhost/devices/dev-1");
        assert_eq!(raw.verify(&[&key], NOW), Err(SasError::SignatureMismatch));

        // And the other way round for a C-style token signed over the raw form.
        let c_entry = vectors::entries("device_tokens")
            .into_iter()
            .find(|e| vectors::text(e, "token").contains("sr=localhost/devices/dev-1&"))
            .expect("a C-style vector");
        let c_text = vectors::text(&c_entry, "token");
        assert_eq!(parse(c_text).verify(&[&key], NOW), Ok(KeyUsed::Primary));
        let encoded = c_text.replace(
            "sr=localhost/devices/dev-1",
            "sr=localhost%2Fdevices%2Fdev-1",
        );
        assert_eq!(
            parse(&encoded).verify(&[&key], NOW),
            Err(SasError::SignatureMismatch)
        );
    }

    #[test]
    fn tampered_resource_does_not_verify() {
        let key = vectors::key();
        let token = python_dev1().replace("dev-1", "dev-2");
        assert_eq!(
            parse(&token).verify(&[&key], NOW),
            Err(SasError::SignatureMismatch)
        );
    }

    #[test]
    fn expiry_allows_five_minutes_of_skew_and_is_checked_first() {
        let key = vectors::key();
        let token = parse(&python_dev1());
        assert_eq!(token.verify(&[&key], EXPIRY + 300), Ok(KeyUsed::Primary));
        assert_eq!(
            token.verify(&[&key], EXPIRY + 301),
            Err(SasError::Expired { expiry: EXPIRY })
        );
        // An expired token is reported as expired even when the key is wrong too.
        assert_eq!(
            token.verify(&[b"wrong"], EXPIRY + 301),
            Err(SasError::Expired { expiry: EXPIRY })
        );
        assert_eq!(token.check_expiry(NOW), Ok(()));
    }

    #[test]
    fn sign_parse_verify_round_trip() {
        let key = decode_key(&generate_key()).expect("generated key is base64");
        let resource = "hub.example.net/devices/d1/modules/m-1";
        let written = encode_resource(resource);
        assert_eq!(written, "hub.example.net%2Fdevices%2Fd1%2Fmodules%2Fm-1");

        let token = parse(&sign(&written, &key, EXPIRY, None));
        assert_eq!(token.raw_resource(), written);
        assert_eq!(token.resource(), resource);
        assert_eq!(token.key_name(), None);
        assert_eq!(token.verify(&[&key], NOW), Ok(KeyUsed::Primary));

        let raw = parse(&sign(resource, &key, EXPIRY, Some("iothubowner")));
        assert_eq!(raw.raw_resource(), resource);
        assert_eq!(raw.key_name(), Some("iothubowner"));
        assert_eq!(raw.verify(&[&key], NOW), Ok(KeyUsed::Primary));
    }

    #[test]
    fn sign_reproduces_the_python_vector_byte_for_byte() {
        let key = vectors::key();
        let expected = python_dev1();
        assert_eq!(
            sign(
                &encode_resource("localhost/devices/dev-1"),
                &key,
                EXPIRY,
                None
            ),
            expected
        );
        let service = &vectors::entries("service_tokens")[0];
        assert_eq!(
            sign("localhost", &key, EXPIRY, Some("iothubowner")),
            vectors::text(service, "token")
        );
    }

    #[test]
    fn node_field_order_uppercase_names_and_empty_skn_are_accepted() {
        let key = vectors::key();
        let sr = "localhost%2Fdevices%2Fdev-1";
        let sig = "ZcpvMOLGejtl65%2BFLHfEeBojHwH9JX8VSWrAaG6wYMo%3D";
        let variants = [
            format!("SharedAccessSignature sr={sr}&sig={sig}&skn=&se=1900000000"),
            format!("SharedAccessSignature se=1900000000&sig={sig}&sr={sr}"),
            format!("SharedAccessSignature SR={sr}&Sig={sig}&SE=1900000000"),
            format!("SharedAccessSignature sr={sr}&sig={sig}&se=1900000000&skn="),
        ];
        for variant in &variants {
            let token = parse(variant);
            assert_eq!(token.key_name(), None, "{variant}");
            assert_eq!(
                token.verify(&[&key], NOW),
                Ok(KeyUsed::Primary),
                "{variant}"
            );
        }

        let node_policy = parse(&format!(
            "SharedAccessSignature sr=localhost&sig={sig}&skn=device&se=1900000000"
        ));
        assert_eq!(node_policy.key_name(), Some("device"));
    }

    #[test]
    fn signature_with_unescaped_plus_and_slash_is_accepted() {
        // Python's service SDK leaves '/' raw in sig; a careless client may leave '+' too.
        let key = vectors::key();
        let encoded = "sig=rD3hdNxaRuF0i7ckEeeMx8T3Wg%2Fxh8c8byBXFn%2B0imw%3D";
        let module = vectors::entries("device_tokens")
            .into_iter()
            .map(|e| vectors::text(&e, "token").to_owned())
            .find(|t| t.contains(encoded))
            .expect("the Python module vector");
        let token = module.replace(encoded, "sig=rD3hdNxaRuF0i7ckEeeMx8T3Wg/xh8c8byBXFn+0imw=");
        assert_ne!(token, module);
        assert_eq!(parse(&token).verify(&[&key], NOW), Ok(KeyUsed::Primary));
    }

    #[test]
    fn malformed_tokens_are_rejected_with_their_own_error() {
        let sig = "ZcpvMOLGejtl65%2BFLHfEeBojHwH9JX8VSWrAaG6wYMo%3D";
        let cases: Vec<(String, SasError)> = vec![
            ("Bearer abc".into(), SasError::NotSharedAccessSignature),
            (
                "SharedAccessSignature".into(),
                SasError::NotSharedAccessSignature,
            ),
            (
                "sharedaccesssignature sr=a&sig=b&se=1".into(),
                SasError::NotSharedAccessSignature,
            ),
            (
                format!("SharedAccessSignature sr=a&sig={sig}&se=1 extra"),
                SasError::NotSharedAccessSignature,
            ),
            (
                format!("SharedAccessSignature sr=a&sig={sig}&se"),
                SasError::MalformedField,
            ),
            (
                format!("SharedAccessSignature sig={sig}&se=1"),
                SasError::MissingField("sr"),
            ),
            (
                format!("SharedAccessSignature sr=&sig={sig}&se=1"),
                SasError::MissingField("sr"),
            ),
            (
                "SharedAccessSignature sr=a&se=1".into(),
                SasError::MissingField("sig"),
            ),
            (
                format!("SharedAccessSignature sr=a&sig={sig}"),
                SasError::MissingField("se"),
            ),
            (
                format!("SharedAccessSignature sr=a&sr=b&sig={sig}&se=1"),
                SasError::DuplicateField("sr"),
            ),
            (
                format!("SharedAccessSignature sr=a&sig={sig}&se=1&SE=2"),
                SasError::DuplicateField("se"),
            ),
            (
                format!("SharedAccessSignature sr=a%FF&sig={sig}&se=1"),
                SasError::BadEncoding,
            ),
            (
                "SharedAccessSignature sr=a&sig=not*base64&se=1".into(),
                SasError::BadSignatureEncoding,
            ),
            (
                format!("SharedAccessSignature sr=a&sig={sig}&se=soon"),
                SasError::BadExpiry,
            ),
            (
                format!("SharedAccessSignature sr=a&sig={sig}&se=-1"),
                SasError::BadExpiry,
            ),
            (
                format!("SharedAccessSignature sr=a&sig={sig}&se=+1"),
                SasError::BadExpiry,
            ),
            (
                format!("SharedAccessSignature sr=a&sig={sig}&se=99999999999999999999"),
                SasError::BadExpiry,
            ),
        ];
        for (token, expected) in cases {
            assert_eq!(
                SasToken::parse(&token).map(|_| ()),
                Err(expected),
                "{token}"
            );
        }
        let long = format!(
            "SharedAccessSignature sr={}&sig={sig}&se=1",
            "a".repeat(MAX_TOKEN_LEN)
        );
        assert_eq!(
            SasToken::parse(&long).map(|_| ()),
            Err(SasError::TooLong(long.len()))
        );
    }

    #[test]
    fn unknown_fields_and_empty_fields_are_ignored() {
        let key = vectors::key();
        let token = python_dev1().replace("&se=", "&&foo=bar&se=");
        assert_eq!(parse(&token).verify(&[&key], NOW), Ok(KeyUsed::Primary));
    }

    #[test]
    fn debug_and_errors_never_show_the_signature() {
        let token = parse(&python_dev1());
        let debug = format!("{token:?}");
        assert!(debug.contains("localhost%2Fdevices%2Fdev-1"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
        assert!(!debug.contains("ZcpvMOLG"), "{debug}");
        // No byte dump of the decoded signature either.
        let bytes = format!("{:?}", &token.signature[..4]);
        assert!(!debug.contains(bytes.trim_end_matches(']')), "{debug}");
    }

    #[test]
    fn device_scope_names_hub_device_or_module() {
        let scope = |resource: &str| Scope::parse(resource);
        let device = scope("localhost/devices/dev-1").expect("device scope");
        assert_eq!(device.host, "localhost");
        assert_eq!(device.device.as_ref().map(DeviceId::as_str), Some("dev-1"));
        assert_eq!(device.module, None);

        let module = scope("hub.example.net/Devices/d1/MODULES/m-1/").expect("module scope");
        assert_eq!(module.device.as_ref().map(DeviceId::as_str), Some("d1"));
        assert_eq!(module.module.as_ref().map(ModuleId::as_str), Some("m-1"));

        let hub = scope("localhost/").expect("hub scope");
        assert_eq!(
            (hub.host.as_str(), hub.device, hub.module),
            ("localhost", None, None)
        );

        for bad in [
            "",
            "/devices/d1",
            "localhost/devices",
            "localhost/devices/",
            "localhost/devices/dev 2",
            "localhost/devices/d1/modules",
            "localhost/devices/d1/modules/m/extra",
            "localhost/modules/m",
            "scope/registrations/reg-1",
        ] {
            assert_eq!(scope(bad), Err(SasError::BadResource), "{bad:?}");
        }

        let token = parse(&python_dev1());
        assert_eq!(token.device_scope(), Ok(device));
    }

    #[test]
    fn names_identity_is_the_whole_resource() {
        assert!(names_identity(
            "localhost/devices/d1",
            "localhost/devices/d1"
        ));
        assert!(names_identity(
            "LocalHost/devices/d1/",
            "localhost/devices/d1"
        ));
        assert!(names_identity(
            "localhost/devices/d1/modules/m",
            "localhost/devices/d1/modules/m"
        ));
        assert!(!names_identity("localhost", "localhost/devices/d1"));
        assert!(!names_identity("localhost/", "localhost/devices/d1"));
        assert!(!names_identity("localhost/devices", "localhost/devices/d1"));
        assert!(!names_identity(
            "localhost/devices/d1",
            "localhost/devices/d1/modules/m"
        ));
        assert!(!names_identity(
            "localhost/devices/d1/x",
            "localhost/devices/d1"
        ));
        assert!(!names_identity(
            "localhost/devices/d",
            "localhost/devices/d1"
        ));
        assert!(!names_identity("", "localhost/devices/d1"));
    }

    #[test]
    fn authorizes_is_a_case_insensitive_segment_prefix() {
        assert!(authorizes("localhost/devices/d1", "localhost/devices/d1"));
        assert!(authorizes(
            "localhost/devices/d1",
            "localhost/devices/d1/modules/m"
        ));
        assert!(authorizes("localhost/devices/d1/", "localhost/devices/d1"));
        assert!(authorizes("LocalHost/Devices/D1", "localhost/devices/d1"));
        assert!(authorizes(
            "localhost",
            "localhost/devices/anything/modules/m"
        ));
        assert!(authorizes("localhost", "localhost"));
        assert!(!authorizes("localhost/devices/d", "localhost/devices/d1"));
        assert!(!authorizes("localhost/devices/d1", "localhost/devices/d2"));
        assert!(!authorizes(
            "localhost/devices/d1/modules/m",
            "localhost/devices/d1"
        ));
        assert!(!authorizes("localhost", "otherhost/devices/d1"));
        assert!(!authorizes("", "localhost"));
        assert!(!authorizes("/", "localhost"));
        assert!(parse(&python_dev1()).authorizes("localhost/devices/dev-1/modules/m"));
    }

    #[test]
    fn generated_keys_are_32_random_bytes() {
        let a = generate_key();
        let b = generate_key();
        assert_eq!(decode_key(&a).map(|k| k.len()), Ok(32));
        assert_ne!(a, b);
        assert_eq!(decode_key("not base64!"), Err(SasError::BadKey));
    }

    #[test]
    fn error_codes_are_distinct() {
        let errors = [
            SasError::TooLong(1),
            SasError::NotSharedAccessSignature,
            SasError::MalformedField,
            SasError::MissingField("sr"),
            SasError::DuplicateField("sr"),
            SasError::BadEncoding,
            SasError::BadSignatureEncoding,
            SasError::BadExpiry,
            SasError::Expired { expiry: 0 },
            SasError::SignatureMismatch,
            SasError::BadResource,
            SasError::BadKey,
        ];
        let mut codes: Vec<_> = errors.iter().map(SasError::error_code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), errors.len());
    }
}
