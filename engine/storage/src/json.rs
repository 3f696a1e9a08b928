//! The consumer API's record JSON, written straight into the response buffer.
//!
//! Why not serde: building a `serde_json::Map` per record cost about three times as much engine
//! CPU as ingesting the message did (docs/benchmarks.md); this writes each field once, with no
//! allocation per property.

use std::fmt::Write as _;

use crate::record::{RecordView, BUILTIN};
use base64::Engine as _;

/// A JSON array of records being built, e.g. `{"records":[` … `]`, up to a size.
pub struct RecordsJson {
    buf: String,
    count: usize,
    max_bytes: usize,
    /// Only records of this `iothub-message-source` (`None`: all).
    source: Option<String>,
}

/// What one consumer-API response holds at most: 4 MiB of JSON (about sixteen of IoT Hub's
/// largest messages, or thousands of small ones).
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

impl RecordsJson {
    /// Starts `{"records":[`, to hold at most [`MAX_RESPONSE_BYTES`].
    pub fn new() -> Self {
        Self::with_limit(MAX_RESPONSE_BYTES)
    }

    /// Starts `{"records":[`; once the JSON reaches `max_bytes` it is [`Self::full`].
    pub fn with_limit(max_bytes: usize) -> Self {
        Self {
            buf: String::from("{\"records\":["),
            count: 0,
            max_bytes,
            source: None,
        }
    }

    /// Takes only records whose `iothub-message-source` is `source` (`Telemetry`,
    /// `twinChangeEvents`, `deviceLifecycleEvents`, `deviceConnectionStateEvents`; any case).
    pub fn only_source(mut self, source: &str) -> Self {
        self.source = Some(source.to_string());
        self
    }

    /// Whether `r` is a record this response takes: one routed to the built-in endpoint (and
    /// of the source asked for).
    pub fn wants(&self, r: &RecordView<'_>) -> bool {
        r.endpoint(BUILTIN).is_some()
            && self
                .source
                .as_deref()
                .is_none_or(|s| s.eq_ignore_ascii_case(r.message().source.as_str()))
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether no further record should be added: the size limit is reached. One record is
    /// always taken, however large, so a reader moves on.
    pub fn full(&self) -> bool {
        self.count > 0 && self.buf.len() >= self.max_bytes
    }

    /// Appends one record object; a record whose fields cannot be written (an enqueued time
    /// past the year 9999) is refused with what is wrong, and nothing of it is written.
    pub fn push(
        &mut self,
        partition: usize,
        offset: u64,
        r: &RecordView<'_>,
    ) -> Result<(), &'static str> {
        let mark = self.buf.len();
        if self.count > 0 {
            self.buf.push(',');
        }
        let written = record_json(&mut self.buf, partition, offset, r, r.endpoint(BUILTIN));
        match written {
            Ok(()) => self.count += 1,
            Err(_) => self.buf.truncate(mark),
        }
        written
    }

    /// Closes the array and appends `,"key":<raw JSON value>` and the closing brace.
    pub fn finish(mut self, key: &str, raw_value: &str) -> String {
        self.buf.push_str("],");
        write_str(&mut self.buf, key);
        self.buf.push(':');
        self.buf.push_str(raw_value);
        self.buf.push('}');
        self.buf
    }
}

impl Default for RecordsJson {
    fn default() -> Self {
        Self::new()
    }
}

/// Appends one record object as the consumer API and the webhook and file endpoints show it:
/// the message with the enrichments of the record's endpoint `endpoint` (an index from
/// [`RecordView::endpoint`]; `None`: none), written after the message's own application
/// properties (IoT Hub adds them on egress). A record whose fields cannot be written (an
/// enqueued time past the year 9999) is refused with what is wrong, and nothing is written.
pub fn record_json(
    out: &mut String,
    partition: usize,
    offset: u64,
    r: &RecordView<'_>,
    endpoint: Option<usize>,
) -> Result<(), &'static str> {
    let m = r.message();
    let enqueued = roost_iothub::time::try_iso_ms(m.enqueued_ms.to_native())
        .ok_or("enqueued time past the year 9999")?;
    let stamps = endpoint.into_iter().flat_map(|i| r.stamps(i));
    write_record(out, partition, offset, m, stamps, &enqueued);
    Ok(())
}

fn write_record<'s>(
    out: &mut String,
    partition: usize,
    offset: u64,
    m: &'s roost_model::ArchivedMessage,
    stamps: impl Iterator<Item = (&'s str, &'s str)>,
    enqueued: &str,
) {
    let _ = write!(
        out,
        "{{\"partition\":{partition},\"offset\":{offset},\"enqueuedTime\":"
    );
    write_str(out, enqueued);
    match std::str::from_utf8(m.body.as_slice()) {
        Ok(text) => {
            out.push_str(",\"body\":");
            write_str(out, text);
            out.push_str(",\"bodyEncoding\":\"utf-8\"");
        }
        Err(_) => {
            out.push_str(",\"body\":\"");
            base64::engine::general_purpose::STANDARD.encode_string(m.body.as_slice(), out);
            out.push_str("\",\"bodyEncoding\":\"base64\"");
        }
    }
    out.push_str(",\"systemProperties\":{");
    let s = &m.system;
    let mut first = true;
    let mut put = |k: &str, v: Option<&str>| {
        let Some(v) = v else { return };
        if !first {
            out.push(',');
        }
        first = false;
        write_str(out, k);
        out.push(':');
        write_str(out, v);
    };
    put("message-id", s.message_id.as_deref());
    put("correlation-id", s.correlation_id.as_deref());
    put("user-id", s.user_id.as_deref());
    put("content-type", s.content_type.as_deref());
    put("content-encoding", s.content_encoding.as_deref());
    put("absolute-expiry-time", s.expiry.as_deref());
    put("iothub-outputname", s.output_name.as_deref());
    put("iothub-interface-id", s.interface_id.as_deref());
    put("iothub-creation-time-utc", s.creation_time.as_deref());
    put("dt-subject", s.subject.as_deref());
    put(
        "iothub-connection-device-id",
        Some(s.connection_device_id.as_str()),
    );
    put(
        "iothub-connection-module-id",
        s.connection_module_id.as_deref(),
    );
    put(
        "iothub-connection-auth-generation-id",
        Some(s.auth_generation_id.as_str()),
    );
    put(
        "iothub-connection-auth-method",
        Some(s.auth_method.as_str()),
    );
    put("dt-dataschema", s.data_schema.as_deref());
    put("iothub-enqueuedtime", Some(enqueued));
    put("iothub-message-source", Some(m.source.as_str()));
    out.push_str("},\"properties\":{");
    let own = m.app.iter().map(|kv| (kv.0.as_str(), kv.1.as_str()));
    for (i, (k, v)) in own.chain(stamps).enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(out, k);
        out.push(':');
        write_str(out, v);
    }
    out.push_str("}}");
}

/// Writes `s` as a JSON string literal.
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // hot path: eight bytes at a time while none of them needs escaping (most bodies and
        // property values), then byte by byte within a word that does.
        if let Some(word) = bytes.get(i..i + 8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            if !word_needs_escape(u64::from_le_bytes(w)) {
                i += 8;
                continue;
            }
        }
        let end = (i + 8).min(bytes.len());
        while i < end {
            let b = bytes[i];
            if b < 0x20 || b == b'"' || b == b'\\' {
                out.push_str(&s[start..i]);
                match b {
                    b'"' => out.push_str("\\\""),
                    b'\\' => out.push_str("\\\\"),
                    b'\n' => out.push_str("\\n"),
                    b'\r' => out.push_str("\\r"),
                    b'\t' => out.push_str("\\t"),
                    0x08 => out.push_str("\\b"),
                    0x0c => out.push_str("\\f"),
                    _ => {
                        let _ = write!(out, "\\u{b:04x}");
                    }
                }
                start = i + 1;
            }
            i += 1;
        }
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Whether any of the eight bytes of `w` is a control character, `"` or `\`
/// (the "has a byte less than n" and "has a zero byte" word tricks).
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    let quote = zero_byte(w ^ (ONES * u64::from(b'"')));
    let backslash = zero_byte(w ^ (ONES * u64::from(b'\\')));
    (control | quote | backslash) != 0
}

#[cfg(test)]
mod tests {
    use roost_model::{Message, Source, SystemProperties};
    use serde_json::Value;

    use super::*;

    #[test]
    fn strings_escape_exactly_like_serde_json_at_every_position() {
        // Every escapable byte, and a few that are not, at every offset within and across the
        // eight-byte words the fast path skips.
        let specials = [
            '"', '\\', '\n', '\r', '\t', '\u{0}', '\u{8}', '\u{c}', '\u{1f}', '\u{7f}', 'é', '😀',
            ' ', '!', '#', '[', ']',
        ];
        for len in 0..24 {
            for at in 0..len {
                for c in specials {
                    let mut s: String = "abcdefghijklmnopqrstuvwxyz".chars().take(len).collect();
                    s.replace_range(
                        s.char_indices()
                            .nth(at)
                            .map(|(i, ch)| i..i + ch.len_utf8())
                            .unwrap_or(0..0),
                        &c.to_string(),
                    );
                    let mut out = String::new();
                    write_str(&mut out, &s);
                    assert_eq!(out, serde_json::to_string(&s).unwrap_or_default(), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn only_records_routed_to_events_are_taken_with_their_stamps_for_it() {
        let msg = Message {
            source: Source::Telemetry,
            enqueued_ms: 1_800_000_000_123,
            system: SystemProperties::default(),
            app: vec![("own".into(), "1".into())],
            body: b"x".to_vec(),
        };
        let routed = |endpoints: &[&str]| roost_model::Routed {
            message: msg.clone(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            stamps: vec![
                roost_model::Stamp {
                    key: "site".into(),
                    value: "north".into(),
                    endpoints: 0b01,
                },
                roost_model::Stamp {
                    key: "other".into(),
                    value: "x".into(),
                    endpoints: 0b10,
                },
            ],
        };
        let mut json = RecordsJson::new();
        for (i, r) in [
            routed(&["events", "alerts"]),
            routed(&["alerts", "events"]),
            routed(&["alerts"]),
        ]
        .iter()
        .enumerate()
        {
            let bytes = r
                .archive_into(rkyv::util::AlignedVec::new())
                .expect("archive");
            let view = RecordView::Routed(roost_model::Routed::view(&bytes).expect("view"));
            if json.wants(&view) {
                json.push(0, i as u64, &view).expect("pushed");
            }
        }
        let v: Value = serde_json::from_str(&json.finish("next", "3")).expect("valid JSON");
        let records = v["records"].as_array().expect("records");
        assert_eq!(
            records.len(),
            2,
            "the record routed to alerts alone is not the built-in endpoint's"
        );
        assert_eq!(
            records[0]["properties"],
            serde_json::json!({"own": "1", "site": "north"})
        );
        assert_eq!(
            records[1]["properties"],
            serde_json::json!({"own": "1", "other": "x"})
        );
    }

    #[test]
    fn a_timestamp_past_the_year_9999_is_refused_not_panicked_on() {
        let msg = Message {
            source: Source::Telemetry,
            enqueued_ms: u64::MAX,
            system: SystemProperties::default(),
            app: vec![],
            body: b"x".to_vec(),
        };
        let bytes = msg
            .archive_into(rkyv::util::AlignedVec::new())
            .expect("archive");
        let mut json = RecordsJson::new();
        let err = json
            .push(
                0,
                0,
                &RecordView::Bare(Message::view(&bytes).expect("view")),
            )
            .expect_err("refused");
        assert!(err.contains("9999"), "{err}");
        assert_eq!(json.count(), 0);
        let v: serde_json::Value =
            serde_json::from_str(&json.finish("next", "0")).expect("still valid JSON");
        assert_eq!(v["records"], serde_json::json!([]));
    }

    #[test]
    fn records_are_valid_json_with_every_field() {
        let tricky = "quote \" backslash \\ newline \n tab \t bell \u{7} é 😀";
        let msg = Message {
            source: Source::Telemetry,
            enqueued_ms: 1_800_000_000_123,
            system: SystemProperties {
                message_id: Some(tricky.into()),
                content_type: Some("application/json".into()),
                connection_device_id: "dev-1".into(),
                auth_generation_id: "g".into(),
                auth_method: r#"{"scope":"device"}"#.into(),
                ..Default::default()
            },
            app: vec![(tricky.into(), "v".into()), ("empty".into(), String::new())],
            body: b"{\"t\":1}".to_vec(),
        };
        let binary = Message {
            body: vec![0xff, 0x00, 0x80],
            app: vec![],
            ..msg.clone()
        };
        let mut json = RecordsJson::new();
        for (i, m) in [&msg, &binary].into_iter().enumerate() {
            let bytes = m
                .archive_into(rkyv::util::AlignedVec::new())
                .expect("archive");
            json.push(
                3,
                10 + i as u64,
                &RecordView::Bare(Message::view(&bytes).expect("view")),
            )
            .expect("pushed");
        }
        assert_eq!(json.count(), 2);
        let v: Value = serde_json::from_str(&json.finish("next", "12")).expect("valid JSON");
        assert_eq!(v["next"], 12);
        let r = &v["records"][0];
        assert_eq!(r["partition"], 3);
        assert_eq!(r["offset"], 10);
        assert_eq!(r["enqueuedTime"], "2027-01-15T08:00:00.123Z");
        assert_eq!(r["body"], "{\"t\":1}");
        assert_eq!(r["bodyEncoding"], "utf-8");
        assert_eq!(r["systemProperties"]["message-id"], tricky);
        assert_eq!(
            r["systemProperties"]["iothub-connection-auth-method"],
            r#"{"scope":"device"}"#
        );
        assert_eq!(
            r["systemProperties"]["iothub-enqueuedtime"],
            "2027-01-15T08:00:00.123Z"
        );
        assert_eq!(r["systemProperties"]["iothub-message-source"], "Telemetry");
        assert!(
            r["systemProperties"].get("correlation-id").is_none(),
            "absent properties are omitted"
        );
        assert_eq!(r["properties"][tricky], "v");
        assert_eq!(r["properties"]["empty"], "");
        let b = &v["records"][1];
        assert_eq!(b["body"], "/wCA");
        assert_eq!(b["bodyEncoding"], "base64");
        assert_eq!(b["properties"], serde_json::json!({}));
    }
}
