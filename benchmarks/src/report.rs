//! The result of a run: an ordered list of named figures, printed as a two-column table for
//! people and as one JSON object (one line) for scripts.

use hdrhistogram::Histogram;
use serde_json::{Map, Value};

use crate::target::{Kind, Target};

#[derive(Default)]
pub struct Report {
    fields: Vec<(String, Value)>,
}

impl Report {
    /// A report that opens with what ran against what: `mode`, `label` (when given), `target`,
    /// `addr` and `tls`, in that order, so every mode's report starts the same way.
    pub fn with_header(mode: &str, label: Option<&str>, target: &Target) -> Report {
        let mut rep = Report::default();
        rep.put("mode", mode);
        if let Some(l) = label {
            rep.put("label", l);
        }
        let kind = match target.kind {
            Kind::Roost { .. } => "roost",
            Kind::Mqtt => "mqtt",
        };
        rep.put("target", kind);
        rep.put("addr", target.addr.to_string());
        rep.put("tls", target.transport.is_tls());
        if matches!(target.transport, crate::net::Transport::TlsWebSocket { .. }) {
            rep.put("websocket", true);
        }
        rep
    }

    pub fn put(&mut self, key: &str, value: impl Into<Value>) {
        self.fields.push((key.to_string(), value.into()));
    }

    /// A rate or ratio, rounded to 3 decimals (absent when not finite).
    pub fn num(&mut self, key: &str, v: f64) {
        if v.is_finite() {
            self.put(key, (v * 1000.0).round() / 1000.0);
        } else {
            self.put(key, Value::Null);
        }
    }

    /// `{prefix}_p50_us`, `_p99_us`, `_p999_us`, `_max_us` and `_count` of a µs histogram; null
    /// percentiles when it is empty.
    pub fn latency(&mut self, prefix: &str, h: &Histogram<u64>) {
        let q = |q: f64| {
            if h.is_empty() {
                Value::Null
            } else {
                Value::from(h.value_at_quantile(q))
            }
        };
        self.put(&format!("{prefix}_p50_us"), q(0.5));
        self.put(&format!("{prefix}_p99_us"), q(0.99));
        self.put(&format!("{prefix}_p999_us"), q(0.999));
        self.put(
            &format!("{prefix}_max_us"),
            if h.is_empty() {
                Value::Null
            } else {
                Value::from(h.max())
            },
        );
        self.put(&format!("{prefix}_count"), h.len());
    }

    pub fn json(&self) -> String {
        let map: Map<String, Value> = self.fields.iter().cloned().collect();
        Value::Object(map).to_string()
    }

    pub fn table(&self) -> String {
        let width = self.fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in &self.fields {
            let v = match v {
                Value::Null => "-".to_string(),
                Value::String(s) => s.clone(),
                Value::Number(n) => match (n.as_u64(), n.as_f64()) {
                    (Some(u), _) => group(u),
                    (None, Some(f)) if f.abs() >= 100.0 => group(f.round() as u64),
                    (None, Some(f)) => format!("{f}"),
                    _ => n.to_string(),
                },
                other => other.to_string(),
            };
            out.push_str(&format!("  {k:<width$}  {v}\n"));
        }
        out
    }
}

/// 1234567 → "1,234,567".
fn group(n: u64) -> String {
    let digits = n.to_string();
    let parts: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .filter_map(|c| std::str::from_utf8(c).ok())
        .collect();
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1_234_567), "1,234,567");
    }

    #[test]
    fn json_and_table_carry_the_same_figures() {
        let mut r = Report::default();
        r.put("mode", "publish");
        r.put("published", 1_500_000u64);
        r.num("in_msgs_per_s", 123_456.789_4);
        r.num("bad", f64::NAN);
        let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000, 3).expect("histogram");
        for v in [100u64, 200, 300] {
            h.record(v).expect("record");
        }
        r.latency("e2e", &h);
        let v: Value = serde_json::from_str(&r.json()).expect("one JSON object");
        assert_eq!(v["published"], 1_500_000);
        assert_eq!(v["in_msgs_per_s"], 123_456.789);
        assert_eq!(v["bad"], Value::Null);
        assert_eq!(v["e2e_p50_us"], 200);
        assert_eq!(v["e2e_count"], 3);
        assert!(!r.json().contains('\n'));
        let t = r.table();
        assert!(t.contains("published") && t.contains("1,500,000"), "{t}");
        assert!(t.contains("123,457"), "{t}");
    }

    #[test]
    fn header_opens_every_report_in_one_order() {
        let addr: std::net::SocketAddr = "127.0.0.1:1883".parse().expect("addr");
        let t = Target {
            kind: Kind::Mqtt,
            addr,
            transport: crate::net::Transport::Plain,
            sources: crate::net::Sources::for_target(addr),
            prefix: "b-".into(),
            run: 1,
            max_frame: 1 << 20,
        };
        let keys = |r: &Report| r.fields.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        let r = Report::with_header("idle", Some("a/mosquitto"), &t);
        assert_eq!(keys(&r), ["mode", "label", "target", "addr", "tls"]);
        let v: Value = serde_json::from_str(&r.json()).expect("json");
        assert_eq!(v["mode"], "idle");
        assert_eq!(v["label"], "a/mosquitto");
        assert_eq!(v["target"], "mqtt");
        assert_eq!(v["addr"], "127.0.0.1:1883");
        assert_eq!(v["tls"], false);
        let r = Report::with_header("publish", None, &t);
        assert_eq!(keys(&r), ["mode", "target", "addr", "tls"]);
    }

    #[test]
    fn empty_histogram_gives_nulls() {
        let mut r = Report::default();
        r.latency(
            "puback",
            &Histogram::<u64>::new_with_bounds(1, 1000, 3).expect("histogram"),
        );
        let v: Value = serde_json::from_str(&r.json()).expect("json");
        assert_eq!(v["puback_p99_us"], Value::Null);
        assert_eq!(v["puback_count"], 0);
    }
}
