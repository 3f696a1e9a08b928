//! Property bags (spec §2.5): the `k=v&k=v` tail of telemetry and C2D topics, with keys and
//! values URL-encoded. `$.`-prefixed keys are system properties; the rest belong to the
//! application.
//!
//! Keys are matched *after* decoding, so Python's and Node's `%24.mid` and a raw `$.mid` mean
//! the same thing. Encoding always writes `%24.mid`, which the C SDK needs on C2D.

use std::borrow::Cow;

use crate::encoding;

/// The longest bag [`decode_bag`] accepts, in bytes as written.
pub const MAX_BAG_LEN: usize = 8 * 1024;

/// The most properties [`decode_bag`] accepts, system and application together.
pub const MAX_PROPERTIES: usize = 128;

/// Why a property bag was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BagError {
    /// The bag is longer than [`MAX_BAG_LEN`] bytes.
    #[error("property bag is {0} bytes, more than the {MAX_BAG_LEN} allowed")]
    TooLong(usize),
    /// The bag has more than [`MAX_PROPERTIES`] properties.
    #[error("property bag has {0} properties, more than the {MAX_PROPERTIES} allowed")]
    TooMany(usize),
    /// A property has an empty name (`=v`).
    #[error("property bag has a property with an empty name")]
    EmptyKey,
    /// A key or value is not valid UTF-8 once URL-decoded.
    #[error("property bag key or value is not valid UTF-8 once URL-decoded")]
    BadEncoding,
}

impl BagError {
    /// A stable, bounded label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            BagError::TooLong(_) => "too_long",
            BagError::TooMany(_) => "too_many",
            BagError::EmptyKey => "empty_key",
            BagError::BadEncoding => "bad_encoding",
        }
    }
}

/// The system properties a bag can carry, decoded. Field names follow
/// `roost_model::SystemProperties`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemProps {
    /// `$.mid`
    pub message_id: Option<String>,
    /// `$.cid`
    pub correlation_id: Option<String>,
    /// `$.uid`
    pub user_id: Option<String>,
    /// `$.ct`, e.g. `application/json`.
    pub content_type: Option<String>,
    /// `$.ce`, e.g. `utf-8`.
    pub content_encoding: Option<String>,
    /// `$.exp`, ISO-8601 as written.
    pub expiry: Option<String>,
    /// `$.on`: a module's output name (D2C only).
    pub output_name: Option<String>,
    /// `$.ifid`: interface id (D2C only).
    pub interface_id: Option<String>,
    /// `$.ctime`: creation time (C SDK).
    pub creation_time: Option<String>,
    /// `$.sub`: component name (C SDK), which becomes `dt-subject`.
    pub subject: Option<String>,
    /// `$.to`: `/devices/{d}/messages/deviceBound` (C2D only).
    pub to: Option<String>,
}

impl SystemProps {
    /// The field a decoded system key fills, if it is one.
    fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        Some(match key {
            "$.mid" => &mut self.message_id,
            "$.cid" => &mut self.correlation_id,
            "$.uid" => &mut self.user_id,
            "$.ct" => &mut self.content_type,
            "$.ce" => &mut self.content_encoding,
            "$.exp" => &mut self.expiry,
            "$.on" => &mut self.output_name,
            "$.ifid" => &mut self.interface_id,
            "$.ctime" => &mut self.creation_time,
            "$.sub" => &mut self.subject,
            "$.to" => &mut self.to,
            _ => return None,
        })
    }

    /// Every field with its decoded key, in the order [`encode_bag`] writes them.
    fn fields(&self) -> [(&'static str, &Option<String>); 11] {
        [
            ("$.mid", &self.message_id),
            ("$.cid", &self.correlation_id),
            ("$.uid", &self.user_id),
            ("$.ct", &self.content_type),
            ("$.ce", &self.content_encoding),
            ("$.exp", &self.expiry),
            ("$.on", &self.output_name),
            ("$.ifid", &self.interface_id),
            ("$.ctime", &self.creation_time),
            ("$.sub", &self.subject),
            ("$.to", &self.to),
        ]
    }
}

/// A decoded property bag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PropertyBag {
    /// The `$.` properties IoT Hub knows.
    pub system: SystemProps,
    /// Everything else, in the order written, including unknown `$.` keys and repeats.
    pub app: Vec<(String, String)>,
}

/// Decodes a D2C bag (the part of the topic after `messages/events/`).
///
/// Keys and values are percent-decoded with `+` left as `+`. `k=` and a bare `k` both give the
/// empty string. Of a repeated system key the last one counts. The size limits are checked
/// before anything is allocated.
pub fn decode_bag(bag: &str) -> Result<PropertyBag, BagError> {
    if bag.len() > MAX_BAG_LEN {
        return Err(BagError::TooLong(bag.len()));
    }
    let pairs = || bag.split('&').filter(|pair| !pair.is_empty());
    let count = pairs().count();
    if count > MAX_PROPERTIES {
        return Err(BagError::TooMany(count));
    }

    let mut decoded = PropertyBag::default();
    for pair in pairs() {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key)?;
        if key.is_empty() {
            return Err(BagError::EmptyKey);
        }
        let value = decode(value)?.into_owned();
        match decoded.system.slot(&key) {
            Some(slot) => *slot = Some(value),
            None => decoded.app.push((key.into_owned(), value)),
        }
    }
    Ok(decoded)
}

fn decode(s: &str) -> Result<Cow<'_, str>, BagError> {
    encoding::decode(s).map_err(|_| BagError::BadEncoding)
}

/// Encodes a bag as the hub writes one for C2D: system properties first (keys as `%24.mid`
/// and so on), then application properties in order; keys and values percent-encoded like
/// Python's `quote(.., safe="")`; an empty value written as `k=`.
pub fn encode_bag(bag: &PropertyBag) -> String {
    let system = bag
        .system
        .fields()
        .into_iter()
        .filter_map(|(key, value)| Some((key, value.as_deref()?)));
    let app = bag
        .app
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()));
    let mut out = String::new();
    for (key, value) in system.chain(app) {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(&encoding::encode(key));
        out.push('=');
        out.push_str(&encoding::encode(value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::{parse_publish_topic, DeviceTopic};
    use crate::vectors;

    fn decode_ok(bag: &str) -> PropertyBag {
        decode_bag(bag).unwrap_or_else(|e| panic!("{bag:?} should decode: {e}"))
    }

    fn app(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_d2c_vector_decodes_as_expected() {
        let entries = vectors::entries("d2c_topics");
        assert!(entries.len() >= 3);
        for entry in &entries {
            let topic = vectors::text(entry, "topic");
            let Ok(DeviceTopic::Telemetry { bag, .. }) = parse_publish_topic(topic) else {
                panic!("{topic} is a telemetry topic");
            };
            let decoded = decode_ok(bag);
            let expect = &entry["expect"];
            let system = &decoded.system;
            assert_eq!(
                system.message_id.as_deref(),
                expect["message-id"].as_str(),
                "{topic}"
            );
            assert_eq!(
                system.correlation_id.as_deref(),
                expect["correlation-id"].as_str(),
                "{topic}"
            );
            assert_eq!(
                system.content_type.as_deref(),
                expect["content-type"].as_str(),
                "{topic}"
            );
            assert_eq!(
                system.content_encoding.as_deref(),
                expect["content-encoding"].as_str(),
                "{topic}"
            );

            let mut got: Vec<(String, String)> = decoded.app.clone();
            got.sort();
            let mut want: Vec<(String, String)> = expect["app"]
                .as_object()
                .expect("expect.app is an object")
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().expect("app values are strings").to_owned(),
                    )
                })
                .collect();
            want.sort();
            assert_eq!(got, want, "{topic}");
        }
    }

    #[test]
    fn raw_and_encoded_system_keys_are_the_same() {
        let encoded = decode_ok("%24.mid=1&%24.ct=application%2fjson");
        let raw = decode_ok("$.mid=1&$.ct=application/json");
        assert_eq!(encoded, raw);
        assert_eq!(raw.system.message_id.as_deref(), Some("1"));
        assert_eq!(raw.system.content_type.as_deref(), Some("application/json"));
        assert!(raw.app.is_empty());
    }

    #[test]
    fn every_system_key_is_recognised() {
        let bag = decode_ok(
            "$.mid=a&$.cid=b&$.uid=c&$.ct=d&$.ce=e&$.exp=f&$.on=g&$.ifid=h&$.ctime=i&$.sub=j&$.to=k",
        );
        let s = &bag.system;
        let got = [
            &s.message_id,
            &s.correlation_id,
            &s.user_id,
            &s.content_type,
            &s.content_encoding,
            &s.expiry,
            &s.output_name,
            &s.interface_id,
            &s.creation_time,
            &s.subject,
            &s.to,
        ];
        let want = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"];
        for (got, want) in got.iter().zip(want) {
            assert_eq!(got.as_deref(), Some(want));
        }
        assert!(bag.app.is_empty());
    }

    #[test]
    fn empty_and_bare_values_unknown_system_keys_and_plus() {
        let bag = decode_ok("k=&bare&%24.diagid=x&a+b=c+d&&iothub-ack=full");
        assert_eq!(
            bag.app,
            app(&[
                ("k", ""),
                ("bare", ""),
                ("$.diagid", "x"),
                ("a+b", "c+d"),
                ("iothub-ack", "full")
            ])
        );
        assert_eq!(decode_ok(""), PropertyBag::default());
    }

    #[test]
    fn repeated_system_key_keeps_the_last_and_app_keeps_all() {
        let bag = decode_ok("$.mid=1&$.mid=2&a=1&a=2");
        assert_eq!(bag.system.message_id.as_deref(), Some("2"));
        assert_eq!(bag.app, app(&[("a", "1"), ("a", "2")]));
    }

    #[test]
    fn bad_bags_are_rejected() {
        assert_eq!(decode_bag("=v"), Err(BagError::EmptyKey));
        assert_eq!(decode_bag("%FF=v"), Err(BagError::BadEncoding));
        assert_eq!(decode_bag("k=%C3"), Err(BagError::BadEncoding));
    }

    #[test]
    fn limits_are_inclusive_and_checked() {
        let at_limit = vec!["k=v"; MAX_PROPERTIES].join("&");
        assert_eq!(decode_ok(&at_limit).app.len(), MAX_PROPERTIES);
        let over = vec!["k=v"; MAX_PROPERTIES + 1].join("&");
        assert_eq!(
            decode_bag(&over),
            Err(BagError::TooMany(MAX_PROPERTIES + 1))
        );

        let long = format!("k={}", "v".repeat(MAX_BAG_LEN - 2));
        assert_eq!(decode_ok(&long).app[0].1.len(), MAX_BAG_LEN - 2);
        let longer = format!("{long}v");
        assert_eq!(decode_bag(&longer), Err(BagError::TooLong(MAX_BAG_LEN + 1)));
    }

    #[test]
    fn encode_writes_c2d_style_keys() {
        let bag = PropertyBag {
            system: SystemProps {
                message_id: Some("69ea".into()),
                expiry: Some("0".into()),
                to: Some("/devices/d1/messages/deviceBound".into()),
                correlation_id: Some("c".into()),
                ..SystemProps::default()
            },
            app: app(&[("iothub-ack", "full"), ("property1", "value1")]),
        };
        assert_eq!(
            encode_bag(&bag),
            "%24.mid=69ea&%24.cid=c&%24.exp=0&%24.to=%2Fdevices%2Fd1%2Fmessages%2FdeviceBound\
             &iothub-ack=full&property1=value1"
        );
        assert_eq!(encode_bag(&PropertyBag::default()), "");
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let full = PropertyBag {
            system: SystemProps {
                message_id: Some("m 1".into()),
                correlation_id: Some("c&d=e".into()),
                user_id: Some("u+1".into()),
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                expiry: Some("2030-01-01T00:00:00Z".into()),
                output_name: Some("out".into()),
                interface_id: Some("dtmi:a;1".into()),
                creation_time: Some("t".into()),
                subject: Some("thermostat1".into()),
                to: Some("/devices/d/messages/deviceBound".into()),
            },
            app: app(&[
                ("a/b", "c&d=e"),
                ("température", "23 °C"),
                ("empty", ""),
                ("%", "100%"),
                ("$.x", "y"),
            ]),
        };
        let cases = [
            full,
            PropertyBag::default(),
            PropertyBag {
                system: SystemProps::default(),
                app: app(&[("k", "v"), ("k", "w")]),
            },
        ];
        for bag in cases {
            let encoded = encode_bag(&bag);
            assert_eq!(decode_bag(&encoded), Ok(bag.clone()), "{encoded}");
        }
    }

    #[test]
    fn encoded_bag_survives_the_telemetry_topic() {
        let bag = PropertyBag {
            system: SystemProps {
                message_id: Some("x/y".into()),
                ..SystemProps::default()
            },
            app: app(&[("k", "v")]),
        };
        let topic = crate::topic::telemetry_topic("d1", None, &encode_bag(&bag));
        let Ok(DeviceTopic::Telemetry { bag: raw, .. }) = parse_publish_topic(&topic) else {
            panic!("{topic} is a telemetry topic");
        };
        assert_eq!(decode_bag(raw), Ok(bag));
    }
}
