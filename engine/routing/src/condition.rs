//! Route conditions in IoT Hub's routing query syntax (wire spec §6), compiled once per epoch
//! and evaluated in Rust for each message, with no Lua on the path.
//!
//! The grammar, operators, functions and three-valued logic are `roost-query`'s; what routing
//! adds is what a name means. Compilation resolves every path to one of four kinds and
//! canonicalises its first segment, so evaluation is a `match` on a short lowercase string:
//! - `$body.a.b[0]`: the message body as JSON — only when the content type is
//!   `application/json` and the encoding UTF-8, UTF-16 or UTF-32; decoded at most once per
//!   message, whichever condition or plugin asks first;
//! - `$twin.tags.…`, `$twin.properties.desired.…`, `$twin.properties.reported.…`: the
//!   sender's twin (the module's for a module) from the engine's registry view;
//! - `$contentType`, `$connectionDeviceId`, … : system properties; another `$name` is looked up
//!   in the system properties, then in the application properties;
//! - a bare name: an application property, case-insensitively.

use std::borrow::Cow;
use std::cell::OnceCell;

use roost_model::{Message, Source};
use roost_query::{Document, Expr, Segment};
use serde_json::Value;

/// A compiled condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    expr: Expr,
    text: String,
    reads_twin: bool,
}

/// Why a condition does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConditionError {
    #[error("invalid condition {text:?}: {message} (at offset {at})")]
    Syntax {
        text: String,
        at: usize,
        message: String,
    },
    #[error("invalid condition {text:?}: {message}")]
    Name { text: String, message: String },
}

/// The system properties a condition can name (lowercase, without `$`), and `$enqueuedtime`.
const SYSTEM: [&str; 10] = [
    "contenttype",
    "contentencoding",
    "connectiondeviceid",
    "connectionmoduleid",
    "enqueuedtime",
    "messageid",
    "correlationid",
    "userid",
    "dt-dataschema",
    "dt-subject",
];

impl Condition {
    pub fn compile(text: &str) -> Result<Condition, ConditionError> {
        let mut expr = roost_query::condition(text).map_err(|e| ConditionError::Syntax {
            text: text.to_string(),
            at: e.at,
            message: e.message,
        })?;
        resolve(&mut expr).map_err(|message| ConditionError::Name {
            text: text.to_string(),
            message,
        })?;
        Ok(Condition {
            reads_twin: reads_twin(&expr),
            expr,
            text: text.to_string(),
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the condition reads `$twin` (so the caller must find the sender's twin view).
    pub fn reads_twin(&self) -> bool {
        self.reads_twin
    }

    /// Whether the condition is `true` for the message (undefined and `null` are false).
    // hot path: no allocation unless a name reads a string property or builds a value.
    pub fn matches(&self, subject: &Subject<'_>) -> bool {
        roost_query::is_true(&self.expr, subject)
    }
}

/// Checks every path of `e` and rewrites its first segment to the canonical form `lookup`
/// matches on.
fn resolve(e: &mut Expr) -> Result<(), String> {
    match e {
        Expr::Path(p) => resolve_path(p),
        Expr::Lit(_) | Expr::Undefined => Ok(()),
        Expr::Not(x) | Expr::Neg(x) => resolve(x),
        Expr::Bin(_, a, b) => {
            resolve(a)?;
            resolve(b)
        }
        Expr::In { value, list, .. } => {
            resolve(value)?;
            list.iter_mut().try_for_each(resolve)
        }
        Expr::List(items) | Expr::Call(_, items) => items.iter_mut().try_for_each(resolve),
    }
}

fn reads_twin(e: &Expr) -> bool {
    match e {
        Expr::Path(p) => matches!(p.first(), Some(Segment::Key(k)) if k == "$twin"),
        Expr::Lit(_) | Expr::Undefined => false,
        Expr::Not(x) | Expr::Neg(x) => reads_twin(x),
        Expr::Bin(_, a, b) => reads_twin(a) || reads_twin(b),
        Expr::In { value, list, .. } => reads_twin(value) || list.iter().any(reads_twin),
        Expr::List(items) | Expr::Call(_, items) => items.iter().any(reads_twin),
    }
}

fn resolve_path(p: &mut [Segment]) -> Result<(), String> {
    let Some(Segment::Key(first)) = p.first() else {
        return Err("a name must come first".into());
    };
    let first = first.clone();
    let lower = first.to_ascii_lowercase();
    let rest_len = p.len() - 1;
    let canonical = match lower.as_str() {
        "$body" if rest_len == 0 => {
            return Err(
                "$body alone cannot be used; name a part of it, as in $body.temperature".into(),
            )
        }
        "$body" => lower,
        "$twin" => {
            let section = match p.get(1) {
                Some(Segment::Key(k)) => k.to_ascii_lowercase(),
                _ => String::new(),
            };
            match section.as_str() {
                "tags" => {
                    p[1] = Segment::Key("tags".into());
                    lower
                }
                "properties" => {
                    let part = match p.get(2) {
                        Some(Segment::Key(k)) => k.to_ascii_lowercase(),
                        _ => String::new(),
                    };
                    if part != "desired" && part != "reported" {
                        return Err(format!(
                            "{first}.properties must be followed by .desired or .reported"
                        ));
                    }
                    p[1] = Segment::Key("properties".into());
                    p[2] = Segment::Key(part);
                    lower
                }
                _ => return Err(format!("{first} must be followed by .tags or .properties")),
            }
        }
        name if name.starts_with('$') => {
            if rest_len > 0 {
                return Err(format!("{first} is a property and has no parts"));
            }
            lower
        }
        _ => {
            if rest_len > 0 {
                return Err(format!(
                    "application property {first} has no parts (the message body is $body)"
                ));
            }
            lower
        }
    };
    if canonical.contains(|c: char| c.is_whitespace() || "()<>@,;:\\\"/?={}".contains(c)) {
        return Err(format!("{first} is not a property name"));
    }
    p[0] = Segment::Key(canonical);
    Ok(())
}

/// A message as conditions (and the Lua host) read it: the message, what routing sees of the
/// sender's twin, and the JSON of each decoded at most once.
pub struct Subject<'m> {
    pub message: &'m Message,
    /// The sender's twin as the registry view carries it (`DeviceAuth::twin`: JSON text of
    /// `{"tags":…,"properties":{"desired":…,"reported":…}}`; empty: nothing).
    pub twin_text: &'m str,
    body: &'m OnceCell<Option<Value>>,
    twin: OnceCell<Option<Value>>,
}

impl<'m> Subject<'m> {
    /// `body` caches the decoded body; it belongs to whoever owns the message, so a plugin's
    /// decode serves the conditions after it.
    pub fn new(message: &'m Message, twin: &'m str, body: &'m OnceCell<Option<Value>>) -> Self {
        Subject {
            message,
            twin_text: twin,
            body,
            twin: OnceCell::new(),
        }
    }

    /// The body as JSON, when the message says it is JSON (`None` otherwise, or when it does
    /// not parse).
    pub fn body(&self) -> Option<&Value> {
        self.body.get_or_init(|| body_json(self.message)).as_ref()
    }

    fn twin(&self) -> Option<&Value> {
        self.twin
            .get_or_init(|| serde_json::from_str(self.twin_text).ok())
            .as_ref()
    }

    fn system(&self, name: &str) -> Option<Cow<'_, Value>> {
        let s = &self.message.system;
        let text = match name {
            "contenttype" => s.content_type.as_deref(),
            "contentencoding" => s.content_encoding.as_deref(),
            "connectiondeviceid" => Some(s.connection_device_id.as_str()),
            "connectionmoduleid" => s.connection_module_id.as_deref(),
            "messageid" => s.message_id.as_deref(),
            "correlationid" => s.correlation_id.as_deref(),
            "userid" => s.user_id.as_deref(),
            "dt-dataschema" => s.data_schema.as_deref(),
            "dt-subject" => s.subject.as_deref(),
            "enqueuedtime" => {
                return Some(Cow::Owned(Value::String(iso8601(self.message.enqueued_ms))))
            }
            _ => None,
        }?;
        Some(Cow::Owned(Value::String(text.to_string())))
    }

    fn app(&self, lower: &str) -> Option<Cow<'_, Value>> {
        self.message
            .app
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(lower))
            .map(|(_, v)| Cow::Owned(Value::String(v.clone())))
    }
}

impl Document for Subject<'_> {
    fn lookup(&self, path: &[Segment]) -> Option<Cow<'_, Value>> {
        let Some(Segment::Key(first)) = path.first() else {
            return None;
        };
        match first.as_str() {
            "$body" => self.body()?.lookup(&path[1..]),
            "$twin" => self.twin()?.lookup(&path[1..]),
            name if name.starts_with('$') => {
                let name = &name[1..];
                if SYSTEM.contains(&name) {
                    self.system(name)
                } else {
                    self.app(name)
                }
            }
            name => self.app(name),
        }
    }
}

/// The body of `m` as JSON, if its content type is `application/json` (parameters allowed) and
/// its encoding UTF-8, UTF-16 or UTF-32 (wire spec §6).
pub fn body_json(m: &Message) -> Option<Value> {
    let ct = m.system.content_type.as_deref()?;
    let mime = ct.split(';').next().unwrap_or_default().trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return None;
    }
    let enc = m
        .system
        .content_encoding
        .as_deref()?
        .trim()
        .to_ascii_lowercase();
    let text: Cow<'_, str> = match enc.as_str() {
        "utf-8" | "utf8" => Cow::Borrowed(std::str::from_utf8(strip_bom8(&m.body)).ok()?),
        "utf-16" | "utf16" => Cow::Owned(utf16(&m.body)?),
        "utf-32" | "utf32" => Cow::Owned(utf32(&m.body)?),
        _ => return None,
    };
    serde_json::from_str(&text).ok()
}

fn strip_bom8(b: &[u8]) -> &[u8] {
    b.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(b)
}

/// UTF-16 with a byte-order mark, else little-endian (what .NET's `Encoding.Unicode` writes).
fn utf16(b: &[u8]) -> Option<String> {
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let (big, b) = match b {
        [0xFE, 0xFF, rest @ ..] => (true, rest),
        [0xFF, 0xFE, rest @ ..] => (false, rest),
        _ => (false, b),
    };
    let units = b.chunks_exact(2).map(|c| {
        let pair = [c[0], c[1]];
        if big {
            u16::from_be_bytes(pair)
        } else {
            u16::from_le_bytes(pair)
        }
    });
    char::decode_utf16(units)
        .collect::<Result<String, _>>()
        .ok()
}

/// UTF-32 with a byte-order mark, else little-endian.
fn utf32(b: &[u8]) -> Option<String> {
    if !b.len().is_multiple_of(4) {
        return None;
    }
    let (big, b) = match b {
        [0, 0, 0xFE, 0xFF, rest @ ..] => (true, rest),
        [0xFF, 0xFE, 0, 0, rest @ ..] => (false, rest),
        _ => (false, b),
    };
    b.chunks_exact(4)
        .map(|c| {
            let q = [c[0], c[1], c[2], c[3]];
            char::from_u32(if big {
                u32::from_be_bytes(q)
            } else {
                u32::from_le_bytes(q)
            })
        })
        .collect()
}

/// Milliseconds since the Unix epoch as IoT Hub writes an enqueued time:
/// `2026-12-07T15:04:05.123Z`.
pub fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// The routing source a message comes from, by the names `routes.lua` uses.
pub fn source_name(s: Source) -> &'static str {
    match s {
        Source::Telemetry => "telemetry",
        Source::TwinChangeEvents => "twin_change",
        Source::DeviceLifecycleEvents => "lifecycle",
        Source::DeviceConnectionStateEvents => "connection_state",
        Source::FileUploadNotifications => "file_upload",
    }
}

#[cfg(test)]
mod tests {
    use roost_model::SystemProperties;

    use super::*;

    fn msg(ct: Option<&str>, enc: Option<&str>, body: &[u8]) -> Message {
        Message {
            source: Source::Telemetry,
            enqueued_ms: 1_765_119_845_123,
            system: SystemProperties {
                content_type: ct.map(Into::into),
                content_encoding: enc.map(Into::into),
                message_id: Some("m-1".into()),
                connection_device_id: "dev-1".into(),
                data_schema: Some("dtmi:com:x;1".into()),
                ..Default::default()
            },
            app: vec![
                ("Level".into(), "critical".into()),
                ("temp".into(), "31".into()),
            ],
            body: body.to_vec(),
        }
    }

    fn check(src: &str, m: &Message, tags: &str) -> bool {
        let c = Condition::compile(src).unwrap_or_else(|e| panic!("{e}"));
        let cache = OnceCell::new();
        c.matches(&Subject::new(m, tags, &cache))
    }

    const TAGS: &str = r#"{"tags":{"building":"43","site":{"name":"north"},"floors":[1,2]},"properties":{"desired":{"mode":"eco","$version":3},"reported":{"fw":{"version":"1.2"},"$version":7}}}"#;

    #[test]
    fn the_specs_examples() {
        let json = msg(
            Some("application/json"),
            Some("utf-8"),
            br#"{"temperature": 31.5, "weather": {"humidity": 80, "tags": ["a", "b"]}, "on": true}"#,
        );
        for (src, want) in [
            ("$body.temperature > 30", true),
            ("$body.Temperature > 30", false),
            (
                "$body.weather.humidity >= 80 AND $body.weather.tags[1] = 'b'",
                true,
            ),
            ("$body.on", true),
            ("$body.missing = 1 OR $body.on", true),
            (
                "$body.temperature > 30 AND $twin.tags.building = '43'",
                true,
            ),
            (
                "$twin.tags.site.name = 'north' AND $twin.tags.floors[0] = 1",
                true,
            ),
            ("$twin.tags.nope = 'x'", false),
            ("$twin.properties.desired.mode = 'eco'", true),
            ("$twin.Properties.Reported.fw.version = '1.2'", true),
            ("$twin.properties.reported.$version = 7", true),
            ("$twin.properties.reported.mode = 'eco'", false),
            ("$twin.properties.desired.Mode = 'eco'", false),
            ("level = 'critical'", true),
            ("LEVEL = 'critical' AND $level = 'critical'", true),
            ("temp = '31'", true),
            ("temp = 31", false),
            ("$contentType = 'application/json'", true),
            (
                "$contentEncoding = 'utf-8' AND $connectionDeviceId = 'dev-1'",
                true,
            ),
            ("IS_DEFINED($connectionModuleId)", false),
            (
                "$messageId = 'm-1' AND NOT IS_DEFINED($correlationId)",
                true,
            ),
            ("$dt-dataschema = 'dtmi:com:x;1'", true),
            (
                "STARTS_WITH($enqueuedTime, '2025-12-07T15:04:05.123Z')",
                true,
            ),
            ("true", true),
            ("false", false),
            ("1 = 1", true),
            ("nothing = 'x'", false),
            ("nothing != 'x'", false),
            ("NOT IS_DEFINED(nothing)", true),
            (
                "$body.temperature * 2 > 60 AND UPPER(level) = 'CRITICAL'",
                true,
            ),
            ("level IN ['warning', 'critical']", true),
            ("CONTAINS(level, 'crit') AND LENGTH(level) = 8", true),
        ] {
            assert_eq!(check(src, &json, TAGS), want, "{src}");
        }
    }

    #[test]
    fn body_is_read_only_when_the_message_says_it_is_json() {
        let body = br#"{"temperature": 31.5}"#;
        for (ct, enc, want) in [
            (Some("application/json"), Some("utf-8"), true),
            (Some("Application/JSON; charset=utf-8"), Some("UTF-8"), true),
            (Some("application/json"), None, false),
            (Some("text/plain"), Some("utf-8"), false),
            (None, Some("utf-8"), false),
            (Some("application/json"), Some("latin1"), false),
        ] {
            let m = msg(ct, enc, body);
            assert_eq!(
                check("$body.temperature > 30", &m, ""),
                want,
                "{ct:?} {enc:?}"
            );
        }
        let utf16: Vec<u8> = [0xFF, 0xFE]
            .into_iter()
            .chain(r#"{"t": 5}"#.encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        assert!(check(
            "$body.t = 5",
            &msg(Some("application/json"), Some("utf-16"), &utf16),
            ""
        ));
        let utf32be: Vec<u8> =
            r#"{"t": 5}"#.chars().flat_map(|c| (c as u32).to_be_bytes()).collect();
        let mut with_bom = vec![0, 0, 0xFE, 0xFF];
        with_bom.extend(utf32be);
        assert!(check(
            "$body.t = 5",
            &msg(Some("application/json"), Some("utf-32"), &with_bom),
            ""
        ));
        let broken = msg(Some("application/json"), Some("utf-8"), b"{not json");
        assert!(!check("$body.t = 5", &broken, ""));
        assert!(check("NOT IS_DEFINED($body.t)", &broken, ""));
    }

    #[test]
    fn invalid_conditions_say_why() {
        for (src, want) in [
            ("$body > 1", "invalid condition \"$body > 1\": $body alone cannot be used; name a part of it, as in $body.temperature"),
            ("$twin.properties.x = 1", "invalid condition \"$twin.properties.x = 1\": $twin.properties must be followed by .desired or .reported"),
            ("$twin.x = 1", "invalid condition \"$twin.x = 1\": $twin must be followed by .tags or .properties"),
            ("level.x = 1", "invalid condition \"level.x = 1\": application property level has no parts (the message body is $body)"),
            ("$contentType.x = 1", "invalid condition \"$contentType.x = 1\": $contentType is a property and has no parts"),
            ("level = ", "invalid condition \"level = \": expected a value, a property path or '(', found the end of the query (at offset 8)"),
            ("level = 'x' AND", "invalid condition \"level = 'x' AND\": expected a value, a property path or '(', found the end of the query (at offset 15)"),
            ("COUNT() > 1", "invalid condition \"COUNT() > 1\": aggregates are allowed only in SELECT (at offset 0)"),
            ("NOPE(level)", "invalid condition \"NOPE(level)\": unknown function NOPE (at offset 0)"),
        ] {
            let e = Condition::compile(src).expect_err(src);
            assert_eq!(e.to_string(), want, "{src}");
        }
    }

    #[test]
    fn enqueued_time_is_iso8601() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_007), "2000-02-29T00:00:00.007Z");
        assert_eq!(iso8601(1_765_119_845_123), "2025-12-07T15:04:05.123Z");
    }
}
