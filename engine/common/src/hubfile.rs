//! `<data>/hub.json`: what a user or a script needs to reach this hub (DESIGN.md §9). Control
//! writes its part, the engine merges its ports in; the CLI and `roost-bench` read it.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Why hub.json could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum HubFileError {
    #[error("no hub at {path} (is `roost up` running with this --data-dir?)")]
    Missing { path: PathBuf },
    #[error("{path} is not a JSON object ({detail}); fix or remove it")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path} lacks {key}{hint}")]
    MissingKey {
        path: PathBuf,
        key: &'static str,
        hint: &'static str,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("hub.json")
}

fn load(p: &Path) -> Result<Option<Map<String, Value>>, HubFileError> {
    let bytes = match std::fs::read(p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(HubFileError::Io {
                path: p.to_path_buf(),
                source,
            })
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(HubFileError::Corrupt {
            path: p.to_path_buf(),
            detail: "not an object".into(),
        }),
        Err(e) => Err(HubFileError::Corrupt {
            path: p.to_path_buf(),
            detail: e.to_string(),
        }),
    }
}

/// Merges `patch` (nested objects merged key by key) into hub.json, atomically. A hub.json that
/// is not JSON is reported, never overwritten: it may hold what a user edited by hand.
pub fn merge(data_dir: &Path, patch: Value) -> Result<(), HubFileError> {
    let p = path(data_dir);
    let mut current = Value::Object(load(&p)?.unwrap_or_default());
    merge_value(&mut current, patch);
    let tmp = data_dir.join(".hub.json.tmp");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HubFileError::Io { path, source }
    };
    let bytes = serde_json::to_vec_pretty(&current).map_err(|e| HubFileError::Corrupt {
        path: p.clone(),
        detail: e.to_string(),
    })?;
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &p).map_err(io(&p))?;
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

/// The parts of hub.json the CLI and the load generator use.
#[derive(Debug, Clone)]
pub struct HubInfo {
    pub hostname: String,
    pub ca: PathBuf,
    pub service_connection_string: String,
    pub service_url: String,
    /// The engine's ops port; absent until an engine has started.
    pub ops_url: Option<String>,
    pub mqtt_port: Option<u16>,
    pub plain_mqtt_port: Option<u16>,
}

pub fn read(data_dir: &Path) -> Result<HubInfo, HubFileError> {
    let p = path(data_dir);
    let v = load(&p)?.ok_or_else(|| HubFileError::Missing { path: p.clone() })?;
    let s = |key: &'static str| {
        v.get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| HubFileError::MissingKey {
                path: p.clone(),
                key,
                hint: "",
            })
    };
    let port = |k: &str| {
        v.get("ports")
            .and_then(|ports| ports.get(k))
            .and_then(Value::as_u64)
            .and_then(|n| u16::try_from(n).ok())
    };
    Ok(HubInfo {
        hostname: s("hostname")?,
        ca: s("ca")?.into(),
        service_connection_string: s("service_connection_string")?,
        service_url: s("service_url")?,
        ops_url: s("ops_url").ok(),
        mqtt_port: port("mqtt"),
        plain_mqtt_port: port("plain_mqtt"),
    })
}

impl HubInfo {
    /// The engine's ops URL, or why there is none yet.
    pub fn ops_url(&self, data_dir: &Path) -> Result<&str, HubFileError> {
        self.ops_url.as_deref().ok_or(HubFileError::MissingKey {
            path: path(data_dir),
            key: "ops_url",
            hint: ": is the engine running?",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("roost-hubfile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    #[test]
    fn merge_keeps_the_other_process_keys() {
        let mut v = json!({"hostname": "h", "ports": {"service": 1}});
        merge_value(&mut v, json!({"ports": {"mqtt": 2}, "ops_url": "u"}));
        assert_eq!(
            v,
            json!({"hostname": "h", "ports": {"service": 1, "mqtt": 2}, "ops_url": "u"})
        );
    }

    #[test]
    fn a_corrupt_hub_json_is_reported_and_left_alone() {
        let d = scratch("corrupt");
        std::fs::write(path(&d), b"{ not json").expect("write");
        let err = merge(&d, json!({"hostname": "h"})).expect_err("corrupt file must be an error");
        assert!(matches!(err, HubFileError::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read(path(&d)).expect("read"), b"{ not json");
        assert!(matches!(read(&d), Err(HubFileError::Corrupt { .. })));
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn read_after_merge_sees_both_halves() {
        let d = scratch("roundtrip");
        assert!(matches!(read(&d), Err(HubFileError::Missing { .. })));
        merge(
            &d,
            json!({"hostname": "h", "ca": "/ca.pem", "service_connection_string": "cs",
                   "service_url": "https://127.0.0.1:1"}),
        )
        .expect("control half");
        merge(&d, json!({"ports": {"mqtt": 8883}, "ops_url": "http://o"})).expect("engine half");
        let hub = read(&d).expect("read");
        assert_eq!(hub.hostname, "h");
        assert_eq!(hub.mqtt_port, Some(8883));
        assert_eq!(hub.plain_mqtt_port, None);
        assert_eq!(hub.ops_url(&d).expect("ops"), "http://o");
        std::fs::remove_dir_all(&d).ok();
    }
}
