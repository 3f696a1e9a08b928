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
    parse(&bytes, p).map(Some)
}

/// The JSON object a hub.json at `p` holds in `bytes`, or why it is not one.
pub fn parse(bytes: &[u8], p: &Path) -> Result<Map<String, Value>, HubFileError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(m)) => Ok(m),
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
    write_private(&tmp, &bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &p).map_err(io(&p))?;
    Ok(())
}

/// Writes `bytes` to a new file `path` that only its owner may read (0600): hub.json holds the
/// owner policy's connection string and the ops token.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// Creates `dir` (and its parents) if absent and makes it private to its owner (0700): the data
/// folder and the folders in it hold keys, the registry and the events log.
pub fn private_dir(dir: &Path) -> Result<(), HubFileError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| HubFileError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

/// The bearer token the ops ports (engine and control: metrics, the consumer API) require,
/// from `<data>/ops.token`; the first process of the hub to start makes it (32 random bytes),
/// and it goes into hub.json as `ops_token` for the CLI and scripts.
pub fn ops_token(data_dir: &Path) -> Result<String, HubFileError> {
    let p = data_dir.join("ops.token");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HubFileError::Io { path, source }
    };
    let token = match std::fs::read_to_string(&p) {
        Ok(t) => t.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Written whole under another name, then linked into place: a process starting at
            // the same moment either wins the link or reads the complete winner.
            let mine = roost_iothub::sas::generate_key();
            let tmp = data_dir.join(format!(".ops.token.{}", std::process::id()));
            write_private(&tmp, mine.as_bytes()).map_err(io(&tmp))?;
            let linked = std::fs::hard_link(&tmp, &p);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => mine,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    std::fs::read_to_string(&p)
                        .map_err(io(&p))?
                        .trim()
                        .to_string()
                }
                Err(e) => return Err(io(&p)(e)),
            }
        }
        Err(e) => return Err(io(&p)(e)),
    };
    if token.is_empty() {
        return Err(HubFileError::Corrupt {
            path: p,
            detail: "empty; remove it and restart the hub".into(),
        });
    }
    merge(data_dir, serde_json::json!({ "ops_token": token }))?;
    Ok(token)
}

/// Whether a request's `Authorization` header value presents `token` as a bearer token. The
/// comparison takes the same time wherever the first difference is.
pub fn bearer_matches(header: Option<&str>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
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
    /// Port 443's listener (WebSockets, the HTTPS device API, the service API).
    pub https_port: Option<u16>,
    /// The bearer token of the ops ports.
    pub ops_token: Option<String>,
    /// The provisioning service, when control serves it.
    pub dps: Option<DpsInfo>,
}

/// hub.json's `dps`: how to reach the provisioning service.
#[derive(Debug, Clone)]
pub struct DpsInfo {
    pub hostname: String,
    pub id_scope: String,
    pub service_connection_string: String,
    /// `https://addr:port` of its HTTPS API, if served.
    pub url: Option<String>,
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
        https_port: port("https"),
        ops_token: s("ops_token").ok(),
        dps: v.get("dps").and_then(|d| {
            let s = |k: &str| d.get(k).and_then(Value::as_str).map(str::to_string);
            Some(DpsInfo {
                hostname: s("hostname")?,
                id_scope: s("id_scope")?,
                service_connection_string: s("service_connection_string")?,
                url: s("url"),
            })
        }),
    })
}

impl HubInfo {
    /// The header an ops-port request carries.
    pub fn ops_auth(&self) -> Vec<(&'static str, String)> {
        self.ops_token
            .iter()
            .map(|t| ("authorization", format!("Bearer {t}")))
            .collect()
    }

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
    fn the_ops_token_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = scratch("token");
        let first = ops_token(&d).expect("made");
        assert_eq!(
            ops_token(&d).expect("read"),
            first,
            "the same token on every start"
        );
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&d.join("ops.token")), 0o600);
        assert_eq!(mode(&path(&d)), 0o600);
        let v = load(&path(&d)).expect("load").expect("hub.json");
        assert_eq!(
            v.get("ops_token").and_then(Value::as_str),
            Some(first.as_str())
        );
        assert!(bearer_matches(Some(&format!("Bearer {first}")), &first));
        for wrong in [
            None,
            Some(first.as_str()),
            Some("Bearer "),
            Some("Bearer x"),
        ] {
            assert!(!bearer_matches(wrong, &first), "{wrong:?}");
        }
        let sub = d.join("inner");
        private_dir(&sub).expect("dir");
        assert_eq!(mode(&sub), 0o700);
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
