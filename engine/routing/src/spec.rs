//! Running a plugin's `spec.lua` cases in a real VM, the way an epoch runs the plugin.
//!
//! `spec.lua` is data: a list of cases, each
//! ```lua
//! { name = "masks the password",
//!   config = { paths = { "password" } },               -- the plugin's config for this case
//!   message = { body = { user = "a", password = "x" }, -- a table: a JSON body; a string: as is
//!               props = { level = "high" }, content_type = "…", content_encoding = "…",
//!               device_id = "d1", module_id = "m1", source = "telemetry" },
//!   tags = { site = "north" },                         -- the sender's twin tags
//!   properties = { reported = { fw = "1.2" } },        -- and properties (both optional)
//!   expect = { verdict = "continue",                   -- or "drop", "reject"
//!              code = "400",                           -- a rejection's code
//!              props = { level = "high" },             -- every property after the plugin
//!              json = { user = "a", password = "***" },-- the body as JSON, or body = "text"
//!   } }
//! ```

use serde_json::{Map, Value};

use crate::condition::body_json;
use crate::config::ConfigError;
use crate::convert;
use crate::sandbox::{Limits, Vm};
use crate::table::{Routing, Verdict};

/// One case's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    pub name: String,
    /// `None`: passed; otherwise what differed.
    pub failure: Option<String>,
}

/// Runs every case of `plugin`'s `spec.lua`. `files` are the plugin's files by name
/// (`handler.lua`, `schema.lua`, `spec.lua`).
pub fn run(plugin: &str, files: &[(String, String)]) -> Result<Vec<CaseResult>, ConfigError> {
    let spec_file = format!("plugins/{plugin}/spec.lua");
    let src = files
        .iter()
        .find(|(n, _)| n == "spec.lua")
        .map(|(_, s)| s.as_str())
        .ok_or_else(|| ConfigError {
            file: spec_file.clone(),
            line: None,
            message: "not found".into(),
        })?;
    let cases = data(&spec_file, src)?;
    let Value::Array(cases) = cases else {
        return Err(ConfigError {
            file: spec_file,
            line: None,
            message: "spec.lua returns a list of cases".into(),
        });
    };
    let sources: Vec<(String, String)> = files
        .iter()
        .map(|(n, s)| (format!("{plugin}/{n}"), s.clone()))
        .collect();
    let mut out = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let name = case
            .get("name")
            .and_then(Value::as_str)
            .map_or_else(|| format!("case {}", i + 1), str::to_string);
        let failure = run_case(plugin, &sources, case).err();
        out.push(CaseResult { name, failure });
    }
    Ok(out)
}

/// Evaluates a data-only Lua file (nothing in scope) to JSON.
pub fn data(file: &str, src: &str) -> Result<Value, ConfigError> {
    let fail = |message: String| ConfigError {
        file: file.to_string(),
        line: None,
        message,
    };
    let vm = Vm::new(Limits::default()).map_err(|e| fail(e.to_string()))?;
    vm.arm();
    let env = vm.lua.create_table().map_err(|e| fail(e.to_string()))?;
    let v: mlua::Value = vm
        .lua
        .load(src)
        .set_name(format!("@{file}"))
        .set_environment(env)
        .eval()
        .map_err(|e| fail(crate::sandbox::error_text(&e)))?;
    convert::to_json(&v).map_err(|e| fail(format!("data only: {e}")))
}

fn run_case(plugin: &str, sources: &[(String, String)], case: &Value) -> Result<(), String> {
    let config = case
        .get("config")
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    let routes = format!(
        "return {{ plugins = {{ {{ use = {}, config = {}, sources = {{ {} }} }} }} }}",
        lua_literal(&Value::String(plugin.into())),
        lua_literal(&config),
        lua_literal(&Value::String(
            case.pointer("/message/source")
                .and_then(Value::as_str)
                .unwrap_or("telemetry")
                .into()
        )),
    );
    let mut routing = Routing::load_with_defaults("spec-routes.lua", &routes, sources, "spec-hub")
        .map_err(|e| format!("load: {e}"))?;
    let mut msg = message(case.get("message").unwrap_or(&Value::Null))?;
    let outcome = routing.route(&mut msg, &twin(case));
    let expect = case
        .get("expect")
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    let (verdict, code) = match &outcome.verdict {
        Verdict::Route => ("continue", None),
        Verdict::Drop(_) => ("drop", None),
        Verdict::Reject { code, .. } => ("reject", Some(code.clone())),
    };
    let want = expect
        .get("verdict")
        .and_then(Value::as_str)
        .unwrap_or("continue");
    if want != verdict {
        let errors: u64 = routing.stats().plugins.iter().flat_map(|p| p.errors).sum();
        return Err(format!(
            "verdict {verdict}, expected {want} ({errors} plugin errors)"
        ));
    }
    if let Some(c) = expect.get("code") {
        let c = c.as_str().map_or_else(|| c.to_string(), str::to_string);
        if code.as_deref() != Some(c.as_str()) {
            return Err(format!("code {code:?}, expected {c:?}"));
        }
    }
    if let Some(Value::Object(props)) = expect.get("props") {
        let mut got: Vec<(String, String)> = msg.app.clone();
        got.sort();
        let mut want: Vec<(String, String)> = props
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), str::to_string),
                )
            })
            .collect();
        want.sort();
        if got != want {
            return Err(format!("props {got:?}, expected {want:?}"));
        }
    }
    if let Some(body) = expect.get("body").and_then(Value::as_str) {
        if msg.body != body.as_bytes() {
            return Err(format!(
                "body {:?}, expected {body:?}",
                String::from_utf8_lossy(&msg.body)
            ));
        }
    }
    if let Some(json) = expect.get("json") {
        let got = body_json(&msg);
        if got.as_ref() != Some(json) {
            return Err(format!(
                "json {}, expected {json}",
                got.map_or("(not JSON)".into(), |v| v.to_string())
            ));
        }
    }
    Ok(())
}

/// The twin view (`DeviceAuth::twin`) of a case's `tags` and `properties` (both optional).
pub fn twin(case: &Value) -> String {
    serde_json::json!({
        "tags": case.get("tags").cloned().unwrap_or(Value::Object(Map::new())),
        "properties": case.get("properties").cloned().unwrap_or(Value::Object(Map::new())),
    })
    .to_string()
}

pub fn message(m: &Value) -> Result<roost_model::Message, String> {
    let text = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
    let (body, json) = match m.get("body") {
        None | Some(Value::Null) => (Vec::new(), false),
        Some(Value::String(s)) => (s.as_bytes().to_vec(), false),
        Some(v) => (serde_json::to_vec(v).map_err(|e| e.to_string())?, true),
    };
    let app = match m.get("props") {
        Some(Value::Object(p)) => p
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), str::to_string),
                )
            })
            .collect(),
        _ => Vec::new(),
    };
    let source = match text("source").as_deref() {
        None | Some("telemetry") => roost_model::Source::Telemetry,
        Some("twin_change") => roost_model::Source::TwinChangeEvents,
        Some("lifecycle") => roost_model::Source::DeviceLifecycleEvents,
        Some("connection_state") => roost_model::Source::DeviceConnectionStateEvents,
        Some("file_upload") => roost_model::Source::FileUploadNotifications,
        Some(other) => return Err(format!("unknown source {other:?}")),
    };
    Ok(roost_model::Message {
        source,
        enqueued_ms: 1_700_000_000_000,
        system: roost_model::SystemProperties {
            content_type: text("content_type").or_else(|| json.then(|| "application/json".into())),
            content_encoding: text("content_encoding").or_else(|| json.then(|| "utf-8".into())),
            connection_device_id: text("device_id").unwrap_or_else(|| "spec-device".into()),
            connection_module_id: text("module_id"),
            message_id: text("message_id"),
            ..Default::default()
        },
        app,
        body,
    })
}

/// A JSON value as a Lua literal.
pub fn lua_literal(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut out = String::from("\"");
            for b in s.bytes() {
                match b {
                    b'"' => out.push_str("\\\""),
                    b'\\' => out.push_str("\\\\"),
                    0x20..=0x7e => out.push(b as char),
                    other => out.push_str(&format!("\\{other:03}")),
                }
            }
            out.push('"');
            out
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(lua_literal).collect();
            format!("{{ {} }}", items.join(", "))
        }
        Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| {
                    format!(
                        "[{}] = {}",
                        lua_literal(&Value::String(k.clone())),
                        lua_literal(v)
                    )
                })
                .collect();
            format!("{{ {} }}", items.join(", "))
        }
    }
}
