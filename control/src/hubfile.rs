//! `<data>/hub.json`: what a user or a script needs to reach this hub (DESIGN.md §9). Control
//! writes its part, the engine merges its ports in; every other subcommand reads it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Map, Value};

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("hub.json")
}

/// Merges `patch` (nested objects merged key by key) into hub.json, atomically.
pub fn merge(data_dir: &Path, patch: Value) -> anyhow::Result<()> {
    let p = path(data_dir);
    let mut current = match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or(Value::Object(Map::new())),
        Err(_) => Value::Object(Map::new()),
    };
    merge_value(&mut current, patch);
    let tmp = data_dir.join(".hub.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&current)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))?;
    Ok(())
}

fn merge_value(into: &mut Value, patch: Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge_value(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

/// The parts of hub.json the CLI uses.
#[derive(Debug, Clone)]
pub struct HubInfo {
    pub hostname: String,
    pub ca: PathBuf,
    pub service_connection_string: String,
    pub service_url: String,
    pub ops_url: Option<String>,
}

pub fn read(data_dir: &Path) -> anyhow::Result<HubInfo> {
    let p = path(data_dir);
    let bytes = std::fs::read(&p).with_context(|| {
        format!(
            "no hub at {} (is `roost up` running with this --data-dir?)",
            p.display()
        )
    })?;
    let v: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not valid JSON", p.display()))?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    Ok(HubInfo {
        hostname: s("hostname").context("hub.json lacks hostname")?,
        ca: s("ca").context("hub.json lacks ca")?.into(),
        service_connection_string: s("service_connection_string")
            .context("hub.json lacks service_connection_string")?,
        service_url: s("service_url").context("hub.json lacks service_url")?,
        ops_url: s("ops_url"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_keeps_the_other_process_keys() {
        let mut v = json!({"hostname": "h", "ports": {"service": 1}});
        merge_value(&mut v, json!({"ports": {"mqtt": 2}, "ops_url": "u"}));
        assert_eq!(
            v,
            json!({"hostname": "h", "ports": {"service": 1, "mqtt": 2}, "ops_url": "u"})
        );
    }
}
