//! Claims-based security (spec §2): the `$cbs` put-token request and its answer, and the
//! check of a shared access policy's token with either SAS algorithm — IoT Hub's (HMAC keyed
//! with the base64-decoded key) or the Event Hubs SDKs' (keyed with the key string's own
//! UTF-8 bytes, spec §0 rule 9).

use roost_amqp::{Body, Message, Properties, Value};
use roost_iothub::sas::{SasError, SasToken};

/// A right a policy grants (spec §1.3 of the wire spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
    DeviceConnect,
}

impl Right {
    pub fn parse(name: &str) -> Option<Right> {
        Some(match name {
            "RegistryRead" => Right::RegistryRead,
            "RegistryWrite" => Right::RegistryWrite,
            "ServiceConnect" => Right::ServiceConnect,
            "DeviceConnect" => Right::DeviceConnect,
            _ => return None,
        })
    }
}

/// A shared access policy's keys (base64 text, as in connection strings) and rights.
#[derive(Clone)]
pub struct PolicyKeys {
    pub name: String,
    pub primary: String,
    pub secondary: String,
    pub rights: Vec<Right>,
}

impl std::fmt::Debug for PolicyKeys {
    /// Never the keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyKeys")
            .field("name", &self.name)
            .field("rights", &self.rights)
            .finish_non_exhaustive()
    }
}

/// Who may connect: the hub's host name, the event hub's name and the policies.
#[derive(Debug, Clone)]
pub struct Authority {
    pub hostname: String,
    pub entity: String,
    pub policies: Vec<PolicyKeys>,
}

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub policy: String,
    pub rights: Vec<Right>,
    /// The decoded `sr` without scheme and port: `{host}[/{path}]`, which the addresses a link
    /// names must fall under.
    pub scope: String,
    /// Unix seconds.
    pub expires: u64,
}

impl Grant {
    /// Whether the grant covers `path` (`{entity}/…` on this hub) with `right`.
    pub fn covers(&self, host: &str, path: &str, right: Right) -> bool {
        self.rights.contains(&right)
            && roost_iothub::sas::authorizes(&self.scope, &format!("{host}/{path}"))
    }
}

/// Why a put-token is refused, with the status it is answered with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CbsError {
    #[error("not a put-token request: {0}")]
    Request(&'static str),
    #[error("{0}")]
    Token(SasError),
    #[error("the token names no shared access policy (skn); device tokens are not taken here")]
    NoPolicy,
    #[error("no shared access policy {0:?}")]
    UnknownPolicy(String),
    #[error("the signature does not match policy {0:?}")]
    BadSignature(String),
    #[error("the token is for {0:?}, not this hub")]
    WrongAudience(String),
}

impl CbsError {
    /// The `status-code` the answer carries.
    pub fn status(&self) -> i32 {
        match self {
            CbsError::Request(_) => 400,
            _ => 401,
        }
    }

    pub fn error_code(&self) -> &'static str {
        match self {
            CbsError::Request(_) => "bad_request",
            CbsError::Token(SasError::Expired { .. }) => "expired",
            CbsError::Token(_) => "bad_token",
            CbsError::NoPolicy => "no_policy",
            CbsError::UnknownPolicy(_) => "unknown_policy",
            CbsError::BadSignature(_) => "bad_signature",
            CbsError::WrongAudience(_) => "wrong_audience",
        }
    }
}

/// A put-token request.
#[derive(Debug, Clone, PartialEq)]
pub struct PutToken {
    /// The request's message-id, in its own AMQP type (the answer's correlation-id).
    pub message_id: Value,
    /// The audience the client names (often not the token's `sr`: authorization uses `sr`).
    pub name: String,
    pub token: String,
}

/// Reads a `$cbs` request: operation `put-token`, a SAS token type, the token as an
/// amqp-value string.
pub fn read_put_token(m: &Message) -> Result<PutToken, CbsError> {
    let prop = |k: &str| m.application_property(k).and_then(Value::as_str);
    if prop("operation") != Some("put-token") {
        return Err(CbsError::Request("operation is not put-token"));
    }
    match prop("type") {
        Some("servicebus.windows.net:sastoken" | "azure-devices.net:sastoken") => {}
        _ => return Err(CbsError::Request("type is not a SAS token type")),
    }
    let token = match &m.body {
        Body::Value(v) => v.as_str().map(str::to_string),
        Body::Data(_) => m.data().and_then(|b| String::from_utf8(b.to_vec()).ok()),
        _ => None,
    }
    .ok_or(CbsError::Request("no token in the body"))?;
    Ok(PutToken {
        message_id: m
            .properties
            .as_ref()
            .map_or(Value::Null, |p| p.message_id.clone()),
        name: prop("name").unwrap_or_default().to_string(),
        token,
    })
}

/// `sb://host:port/path` → `host/path` (lowercase host, no port).
fn scope_of(resource: &str) -> String {
    let rest = resource.split_once("://").map_or(resource, |(_, r)| r);
    let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    let host = host
        .rsplit_once(':')
        .map_or(host, |(h, _)| h)
        .to_ascii_lowercase();
    let path = path.trim_matches('/');
    match path.is_empty() {
        true => host,
        false => format!("{host}/{path}"),
    }
}

impl Authority {
    /// Checks a policy token: the policy exists, one of its keys signed it (either algorithm),
    /// it has not expired, and its `sr` names this hub.
    pub fn check(&self, token: &str, now_unix: u64) -> Result<Grant, CbsError> {
        let t = SasToken::parse(token).map_err(CbsError::Token)?;
        let name = t.key_name().ok_or(CbsError::NoPolicy)?;
        let policy = self
            .policies
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| CbsError::UnknownPolicy(name.chars().take(64).collect()))?;
        let signed = [&policy.primary, &policy.secondary].iter().any(|key| {
            t.verify_signature(key.as_bytes())
                || roost_iothub::sas::decode_key(key).is_ok_and(|k| t.verify_signature(&k))
        });
        if !signed {
            return Err(CbsError::BadSignature(policy.name.clone()));
        }
        t.check_expiry(now_unix).map_err(CbsError::Token)?;
        let scope = scope_of(t.resource());
        let host = scope.split('/').next().unwrap_or_default();
        if !host.eq_ignore_ascii_case(self.hostname.split(':').next().unwrap_or_default()) {
            return Err(CbsError::WrongAudience(
                t.resource().chars().take(200).collect(),
            ));
        }
        Ok(Grant {
            policy: policy.name.clone(),
            rights: policy.rights.clone(),
            scope,
            expires: t.expiry(),
        })
    }
}

/// The answer to a `$cbs` or `$management` request: correlation-id = the request's
/// message-id in its own type, `status-code` an AMQP int and `status-description` (spec §0
/// rule 5), and `body`.
pub fn response(message_id: &Value, status: i32, description: &str, body: Body) -> Message {
    Message {
        properties: Some(Properties {
            correlation_id: message_id.clone(),
            ..Properties::default()
        }),
        application_properties: vec![
            (Value::string("status-code"), Value::Int(status)),
            (
                Value::string("status-description"),
                Value::string(description),
            ),
        ],
        body,
        ..Message::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0wMTIzNDU2Nzg=";

    fn authority() -> Authority {
        Authority {
            hostname: "localhost".into(),
            entity: "myhub".into(),
            policies: vec![
                PolicyKeys {
                    name: "iothubowner".into(),
                    primary: KEY.into(),
                    secondary: "b3RoZXI=".into(),
                    rights: vec![Right::ServiceConnect, Right::RegistryRead],
                },
                PolicyKeys {
                    name: "device".into(),
                    primary: "ZGV2aWNl".into(),
                    secondary: "ZGV2aWNl".into(),
                    rights: vec![Right::DeviceConnect],
                },
            ],
        }
    }

    #[test]
    fn event_hubs_and_iot_hub_tokens_are_both_checked() {
        let a = authority();
        // The Event Hubs SDKs: sr URL-encoded, keyed with the key string itself.
        let sr =
            roost_iothub::sas::encode_resource("sb://localhost:5671/myhub/consumergroups/$default");
        let eh = roost_iothub::sas::sign(&sr, KEY.as_bytes(), 2_000_000_000, Some("iothubowner"));
        let g = a.check(&eh, 1_900_000_000).expect("event hubs token");
        assert_eq!(g.scope, "localhost/myhub/consumergroups/$default");
        assert!(g.covers(
            "localhost",
            "myhub/ConsumerGroups/$Default/Partitions/0",
            Right::ServiceConnect
        ));
        assert!(!g.covers(
            "localhost",
            "other/ConsumerGroups/$Default/Partitions/0",
            Right::ServiceConnect
        ));
        // uamqp: sr the raw host, keyed with the decoded key.
        let key = roost_iothub::sas::decode_key(KEY).expect("key");
        let hub = roost_iothub::sas::sign("localhost", &key, 2_000_000_000, Some("iothubowner"));
        let g = a.check(&hub, 1_900_000_000).expect("iot hub token");
        assert!(g.covers(
            "localhost",
            "myhub/ConsumerGroups/$Default/Partitions/1",
            Right::ServiceConnect
        ));

        assert!(matches!(
            a.check(&eh, 2_100_000_000),
            Err(CbsError::Token(SasError::Expired { .. }))
        ));
        let forged = roost_iothub::sas::sign(&sr, b"wrong", 2_000_000_000, Some("iothubowner"));
        assert_eq!(
            a.check(&forged, 0),
            Err(CbsError::BadSignature("iothubowner".into()))
        );
        let unknown = roost_iothub::sas::sign(&sr, KEY.as_bytes(), 2_000_000_000, Some("nobody"));
        assert_eq!(
            a.check(&unknown, 0),
            Err(CbsError::UnknownPolicy("nobody".into()))
        );
        let device = roost_iothub::sas::sign("localhost%2Fdevices%2Fd1", &key, 2_000_000_000, None);
        assert_eq!(a.check(&device, 0), Err(CbsError::NoPolicy));
        let elsewhere = roost_iothub::sas::sign(
            "sb%3A%2F%2Fother.net%2Fmyhub",
            KEY.as_bytes(),
            2_000_000_000,
            Some("iothubowner"),
        );
        assert!(matches!(
            a.check(&elsewhere, 0),
            Err(CbsError::WrongAudience(_))
        ));
        // The device policy's token is valid but grants no ServiceConnect.
        let dev = roost_iothub::sas::sign(&sr, b"ZGV2aWNl", 2_000_000_000, Some("device"));
        let g = a.check(&dev, 0).expect("valid");
        assert!(!g.covers(
            "localhost",
            "myhub/ConsumerGroups/$Default/Partitions/0",
            Right::ServiceConnect
        ));
        assert!(!format!("{:?}", a).contains(KEY), "keys never in Debug");
    }

    #[test]
    fn requests_are_read_and_answers_keep_the_id_type() {
        let m = Message {
            properties: Some(Properties {
                message_id: Value::Uuid([1; 16]),
                ..Properties::default()
            }),
            application_properties: vec![
                (Value::string("operation"), Value::string("put-token")),
                (
                    Value::string("type"),
                    Value::string("servicebus.windows.net:sastoken"),
                ),
                (Value::string("name"), Value::string("sb://localhost/myhub")),
            ],
            body: Body::Value(Value::string("SharedAccessSignature sr=x&sig=y&se=1")),
            ..Message::default()
        };
        let p = read_put_token(&m).expect("put-token");
        assert_eq!(
            (p.name.as_str(), p.message_id.clone()),
            ("sb://localhost/myhub", Value::Uuid([1; 16]))
        );
        let r = response(&p.message_id, 200, "OK", Body::Empty);
        assert_eq!(
            r.properties.as_ref().map(|p| &p.correlation_id),
            Some(&Value::Uuid([1; 16]))
        );
        assert_eq!(
            r.application_property("status-code"),
            Some(&Value::Int(200))
        );
        let mut wrong = m.clone();
        wrong.application_properties[0].1 = Value::string("get-token");
        assert_eq!(
            read_put_token(&wrong),
            Err(CbsError::Request("operation is not put-token"))
        );
    }
}
