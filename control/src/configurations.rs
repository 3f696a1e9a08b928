//! Automatic device management (issue 8 §9, spec §4.5): configurations that set desired
//! properties on every device twin a condition selects — IoT Hub's "set device state based on
//! common characteristics of devices".
//!
//! A configuration has a `targetCondition` (a `WHERE` clause over twins), a `priority`, and
//! `content.deviceContent`: desired properties by path (`"properties.desired.fw": {…}`). On
//! each twin, every configuration whose condition matches is `Targeted`; of those, the one with
//! the highest priority (the newest on a tie) is `Applied`: its content is patched into the
//! twin's desired properties (reaching a connected device as any desired change does), and
//! again whenever the configuration changes (its condition, priority or labels: IoT Hub fixes
//! the content once created). The standing of each configuration is kept with
//! the twin and shown as its `configurations` member, so queries and metrics can use it
//! (`configurations.[[id]].status = 'Applied'`, IoT Hub's placeholder syntax, is
//! `configurations['id'].status` in the language).
//!
//! When: the reconciler ([`Configurations::run`]) looks at every twin again after a
//! configuration is created, changed or deleted and every 5 minutes, and at one twin after its
//! tags or reported properties change or it is created (`Retarget`). `systemMetrics` (targeted, applied) and the custom `metrics` are counted by
//! queries when a configuration is read.
//!
//! What it is not: edge deployments. `modulesContent` is kept and shown but not applied to
//! module twins, and `POST /devices/{id}/applyConfigurationContent` is not served.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use crate::query::Queries;
use crate::store::{Store, StoreError};
use crate::twins::{ConfigState, TwinFailure, Twins};

/// IoT Hub's limit on configurations per hub.
pub const MAX_CONFIGURATIONS: usize = 100;
/// Devices the reconciler reads at a time when it looks at every twin.
const BATCH: usize = 256;
/// How often every twin is looked at again, whatever changed (IoT Hub: every 5 minutes).
const FULL_PASS: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ConfigFailure {
    #[error("{0}")]
    BadRequest(String),
    #[error("configuration {0} does not exist")]
    NotFound(String),
    #[error("configuration {0} already exists")]
    Exists(String),
    #[error("the configuration's etag does not match If-Match")]
    PreconditionFailed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A configuration as the service API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Configuration {
    pub id: String,
    #[serde(default = "schema_version")]
    pub schema_version: String,
    #[serde(default)]
    pub labels: Map<String, Value>,
    #[serde(default)]
    pub content: Value,
    #[serde(default)]
    pub target_condition: String,
    #[serde(default)]
    pub priority: i64,
    #[serde(default)]
    pub metrics: Value,
    #[serde(default)]
    pub system_metrics: Value,
    #[serde(default)]
    pub etag: String,
    #[serde(default)]
    pub created_time_utc: String,
    #[serde(default)]
    pub last_updated_time_utc: String,
}

fn schema_version() -> String {
    "1.0".into()
}

/// Twins to look at again: all of them (a configuration changed) or some (their tags did).
#[derive(Debug, Default)]
pub struct Retarget {
    all: AtomicBool,
    devices: Mutex<HashSet<String>>,
    wake: Notify,
}

impl Retarget {
    pub fn device(&self, client_id: &str) {
        if client_id.contains('/') {
            return; // module twins are not targeted by device configurations
        }
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client_id.to_string());
        self.wake.notify_one();
    }

    pub fn all(&self) {
        self.all.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    fn take(&self) -> (bool, Vec<String>) {
        let all = self.all.swap(false, Ordering::AcqRel);
        let devices = std::mem::take(&mut *self.devices.lock().unwrap_or_else(|p| p.into_inner()));
        (all, devices.into_iter().collect())
    }
}

/// IoT Hub's `[[id]]` placeholder (`configurations.[[cfg]].status`) in the language's own
/// syntax (`configurations['cfg'].status`).
fn placeholders(query: &str) -> String {
    query
        .replace(".[[", "['")
        .replace("[[", "['")
        .replace("]]", "']")
}

/// The condition of `text`: `*` (or nothing) selects every device.
fn target(text: &str) -> Result<Option<roost_query::Expr>, roost_query::QueryError> {
    let t = text.trim();
    if t.is_empty() || t == "*" {
        return Ok(None);
    }
    roost_query::condition(&placeholders(t)).map(Some)
}

/// `deviceContent` (`{"properties.desired.a.b": v}`) as a twin patch
/// (`{"properties":{"desired":{"a":{"b":v}}}}`).
fn device_patch(content: &Value) -> Result<Value, ConfigFailure> {
    let mut desired = Map::new();
    let Some(device) = content.get("deviceContent") else {
        return Ok(json!({}));
    };
    let device = device.as_object().ok_or_else(|| {
        ConfigFailure::BadRequest("content.deviceContent must be an object".into())
    })?;
    for (path, value) in device {
        let rest = path.strip_prefix("properties.desired.").ok_or_else(|| {
            ConfigFailure::BadRequest(format!(
                "deviceContent key {path:?} must start with properties.desired."
            ))
        })?;
        let keys: Vec<&str> = rest.split('.').collect();
        if keys.iter().any(|k| k.is_empty()) {
            return Err(ConfigFailure::BadRequest(format!(
                "deviceContent key {path:?} has an empty part"
            )));
        }
        let mut node = &mut desired;
        for k in &keys[..keys.len() - 1] {
            let next = node
                .entry(k.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !next.is_object() {
                *next = Value::Object(Map::new());
            }
            node = next.as_object_mut().expect("made an object just above");
        }
        node.insert(keys[keys.len() - 1].to_string(), value.clone());
    }
    Ok(json!({ "properties": { "desired": desired } }))
}

pub struct Configurations {
    pub store: Arc<Store>,
    pub twins: Arc<Twins>,
    pub queries: Arc<Queries>,
    pub retarget: Arc<Retarget>,
}

impl Configurations {
    fn all(&self) -> Result<Vec<Configuration>, StoreError> {
        self.store
            .configurations()?
            .iter()
            .map(|b| serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect()
    }

    fn load(&self, id: &str) -> Result<Configuration, ConfigFailure> {
        let bytes = self
            .store
            .configuration(id)?
            .ok_or_else(|| ConfigFailure::NotFound(id.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt(e.to_string()).into())
    }

    /// `PUT /configurations/{id}`: creates (no `If-Match`) or replaces (`If-Match` the etag
    /// or `*`) a configuration; every twin is looked at again.
    pub fn put(
        &self,
        id: &str,
        body: &[u8],
        if_match: Option<&str>,
    ) -> Result<Configuration, ConfigFailure> {
        let bad = |m: String| ConfigFailure::BadRequest(m);
        let mut c: Configuration = serde_json::from_slice(body)
            .map_err(|e| bad(format!("invalid configuration JSON: {e}")))?;
        roost_model::DeviceId::parse(id)
            .map_err(|e| bad(format!("invalid configuration id: {e}")))?;
        if c.id != id {
            return Err(bad("id in the body does not match the path".into()));
        }
        target(&c.target_condition).map_err(|e| bad(format!("invalid targetCondition: {e}")))?;
        device_patch(&c.content)?;
        if c.priority < 0 {
            return Err(bad("priority must not be negative".into()));
        }
        for (name, q) in custom_queries(&c.metrics) {
            roost_query::query(&placeholders(&q))
                .map_err(|e| bad(format!("invalid metric query {name}: {e}")))?;
        }
        let saved = self.store.exclusive(|| {
            let existing = match self.load(id) {
                Ok(e) => Some(e),
                Err(ConfigFailure::NotFound(_)) => None,
                Err(e) => return Err(e),
            };
            let now = crate::api::iso_now();
            match (&existing, if_match) {
                (Some(_), None) => return Err(ConfigFailure::Exists(id.to_string())),
                (Some(e), Some(tag)) if tag != "*" && tag != e.etag => {
                    return Err(ConfigFailure::PreconditionFailed)
                }
                (None, Some(tag)) if tag != "*" => {
                    return Err(ConfigFailure::NotFound(id.to_string()))
                }
                (None, _) if self.store.configurations()?.len() >= MAX_CONFIGURATIONS => {
                    return Err(bad(format!(
                        "a hub has at most {MAX_CONFIGURATIONS} configurations"
                    )))
                }
                // IoT Hub: a configuration's content is fixed once created.
                (Some(e), _) if e.content != c.content && !c.content.is_null() => {
                    return Err(bad(
                        "a configuration's content cannot be changed; create another configuration"
                            .into(),
                    ))
                }
                _ => {}
            }
            if let Some(e) = &existing {
                c.content = e.content.clone();
            }
            c.created_time_utc = existing
                .as_ref()
                .map_or(now.clone(), |e| e.created_time_utc.clone());
            c.last_updated_time_utc = now;
            c.etag = self.store.next_etag()?;
            c.system_metrics = json!({});
            if let Some(m) = c.metrics.as_object_mut() {
                m.remove("results");
            }
            let bytes = serde_json::to_vec(&c).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            self.store.put_configuration(id, Some(&bytes))?;
            Ok(c)
        })?;
        self.retarget.all();
        self.with_metrics(saved)
    }

    /// `GET /configurations/{id}`, with its metrics counted now.
    pub fn get(&self, id: &str) -> Result<Configuration, ConfigFailure> {
        let c = self.load(id)?;
        self.with_metrics(c)
    }

    /// `GET /configurations?top=N`.
    pub fn list(&self, top: usize) -> Result<Vec<Configuration>, ConfigFailure> {
        let mut out = Vec::new();
        for c in self.all()?.into_iter().take(top) {
            out.push(self.with_metrics(c)?);
        }
        Ok(out)
    }

    /// `DELETE /configurations/{id}` (`If-Match`); twins it was applied to keep their desired
    /// properties (as in IoT Hub), and lose its standing.
    pub fn delete(&self, id: &str, if_match: Option<&str>) -> Result<(), ConfigFailure> {
        self.store.exclusive(|| {
            let c = self.load(id)?;
            if if_match.is_some_and(|t| t != "*" && t != c.etag) {
                return Err(ConfigFailure::PreconditionFailed);
            }
            self.store.put_configuration(id, None)?;
            Ok(())
        })?;
        self.retarget.all();
        Ok(())
    }

    /// `POST /configurations/testQueries`: `{targetCondition, customMetricQueries}` →
    /// `{targetConditionError, customMetricQueryErrors}` (empty strings for valid ones).
    pub fn test_queries(&self, body: &[u8]) -> Result<Value, ConfigFailure> {
        let input: Value = serde_json::from_slice(body)
            .map_err(|e| ConfigFailure::BadRequest(format!("invalid JSON: {e}")))?;
        let condition = input["targetCondition"].as_str().unwrap_or("");
        let target_error = target(condition)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let mut errors = Map::new();
        if let Some(q) = input["customMetricQueries"].as_object() {
            for (name, text) in q {
                let e = match text.as_str() {
                    Some(t) => roost_query::query(&placeholders(t))
                        .err()
                        .map(|e| e.to_string()),
                    None => Some("a query must be a string".into()),
                };
                errors.insert(name.clone(), json!(e.unwrap_or_default()));
            }
        }
        Ok(json!({ "targetConditionError": target_error, "customMetricQueryErrors": errors }))
    }

    /// Counts how many twins match each of a query's rows: how IoT Hub reports a metric.
    fn count(&self, query: &str) -> i64 {
        let mut n = 0i64;
        let mut token: Option<String> = None;
        loop {
            let Ok(page) = self
                .queries
                .run(query, token.as_deref(), Some(crate::query::MAX_PAGE))
            else {
                return n;
            };
            n += page.items.len() as i64;
            match page.continuation {
                Some(t) => token = Some(t),
                None => return n,
            }
        }
    }

    fn with_metrics(&self, mut c: Configuration) -> Result<Configuration, ConfigFailure> {
        let quoted = c.id.replace('\'', "\\'");
        let targeted_q =
            format!("SELECT deviceId FROM devices WHERE IS_DEFINED(configurations['{quoted}'])");
        let applied_q = format!(
            "SELECT deviceId FROM devices WHERE configurations['{quoted}'].status = 'Applied'"
        );
        c.system_metrics = json!({
            "queries": {
                "targetedCount": format!("select deviceId from devices where {}", if c.target_condition.trim().is_empty() { "*" } else { c.target_condition.as_str() }),
                "appliedCount": format!("select deviceId from devices where configurations.[[{}]].status = 'Applied'", c.id),
            },
            "results": { "targetedCount": self.count(&targeted_q), "appliedCount": self.count(&applied_q) },
        });
        let queries = custom_queries(&c.metrics);
        if !queries.is_empty() {
            let results: Map<String, Value> = queries
                .iter()
                .map(|(name, q)| (name.clone(), json!(self.count(&placeholders(q)))))
                .collect();
            let query_map: Map<String, Value> =
                queries.into_iter().map(|(k, v)| (k, json!(v))).collect();
            c.metrics = json!({ "queries": query_map, "results": results });
        }
        Ok(c)
    }

    /// Looks at twins again whenever asked, for as long as control runs.
    pub async fn run(self: Arc<Self>) {
        let mut last_full = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = self.retarget.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            // As IoT Hub does, every twin is looked at again now and then (a twin may come to
            // match through what no hook sees: a query on identity fields, say).
            if last_full.elapsed() >= FULL_PASS {
                last_full = tokio::time::Instant::now();
                let store = self.store.clone();
                let any = tokio::task::spawn_blocking(move || {
                    store.configurations().map(|c| !c.is_empty())
                });
                if matches!(any.await, Ok(Ok(true))) {
                    self.retarget.all();
                }
            }
            let me = self.clone();
            let done = tokio::task::spawn_blocking(move || me.reconcile_pending()).await;
            if let Ok(Err(e)) = done {
                tracing::warn!(error = %e, "applying configurations failed; retrying");
                self.retarget.all();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    pub(crate) fn reconcile_pending(&self) -> Result<(), ConfigFailure> {
        let (all, devices) = self.retarget.take();
        if !all && devices.is_empty() {
            return Ok(());
        }
        let configs = self.all()?;
        let compiled: Vec<(Configuration, Option<roost_query::Expr>, Value)> = configs
            .into_iter()
            .filter_map(|c| {
                let t = target(&c.target_condition).ok()?;
                let patch = device_patch(&c.content).ok()?;
                Some((c, t, patch))
            })
            .collect();
        if all {
            let mut after: Option<String> = None;
            loop {
                let batch = self.store.devices_after(after.as_deref(), BATCH)?;
                for d in &batch {
                    self.reconcile_logged(&d.device_id, &compiled)?;
                }
                match batch.last() {
                    Some(d) if batch.len() == BATCH => after = Some(d.device_id.clone()),
                    _ => break,
                }
            }
        } else {
            for d in devices {
                self.reconcile_logged(&d, &compiled)?;
            }
        }
        Ok(())
    }

    /// [`Self::reconcile`], where a twin that cannot take a configuration (its content would
    /// pass the twin's limits) is logged and passed over: it must not stop the fleet's. Only a
    /// store failure stops the pass (and it is tried again).
    fn reconcile_logged(
        &self,
        device_id: &str,
        configs: &[(Configuration, Option<roost_query::Expr>, Value)],
    ) -> Result<(), ConfigFailure> {
        match self.reconcile(device_id, configs) {
            Err(ConfigFailure::Store(e)) => Err(ConfigFailure::Store(e)),
            Err(e) => {
                tracing::warn!(device = %device_id, error = %e, "a configuration could not be applied to a twin");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// One twin against every configuration: their standing, and the winner's content.
    fn reconcile(
        &self,
        device_id: &str,
        configs: &[(Configuration, Option<roost_query::Expr>, Value)],
    ) -> Result<(), ConfigFailure> {
        let (twin, stored) = match self.twins.load_both(device_id) {
            Ok(t) => t,
            Err(TwinFailure::DeviceNotFound(_)) => return Ok(()),
            Err(TwinFailure::Store(e)) => return Err(e.into()),
            Err(e) => return Err(ConfigFailure::BadRequest(e.to_string())),
        };
        let matching: Vec<&(Configuration, Option<roost_query::Expr>, Value)> = configs
            .iter()
            .filter(|(_, t, _)| t.as_ref().is_none_or(|t| roost_query::is_true(t, &twin)))
            .collect();
        let winner = matching.iter().max_by(|a, b| {
            (a.0.priority, &a.0.created_time_utc).cmp(&(b.0.priority, &b.0.created_time_utc))
        });
        let mut states = BTreeMap::new();
        for (c, _, _) in &matching {
            states.insert(
                c.id.clone(),
                ConfigState {
                    status: "Targeted".into(),
                    applied_etag: String::new(),
                },
            );
        }
        if let Some((c, _, patch)) = winner {
            let before = stored.configurations.get(&c.id);
            let current = before.is_some_and(|s| s.status == "Applied" && s.applied_etag == c.etag);
            if !current {
                self.twins
                    .write(device_id, patch.to_string().as_bytes(), None, false)
                    .map_err(|e| ConfigFailure::BadRequest(e.to_string()))?;
            }
            states.insert(
                c.id.clone(),
                ConfigState {
                    status: "Applied".into(),
                    applied_etag: c.etag.clone(),
                },
            );
        }
        self.twins
            .set_configurations(device_id, states)
            .map_err(|e| ConfigFailure::BadRequest(e.to_string()))
    }
}

fn custom_queries(metrics: &Value) -> Vec<(String, String)> {
    metrics
        .get("queries")
        .and_then(Value::as_object)
        .map(|q| {
            q.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_content_becomes_a_desired_patch() {
        let content = json!({"deviceContent": {"properties.desired.fw": {"v": "2"}, "properties.desired.a.b": 5, "properties.desired.a.c": true}});
        assert_eq!(
            device_patch(&content).expect("valid"),
            json!({"properties": {"desired": {"fw": {"v": "2"}, "a": {"b": 5, "c": true}}}})
        );
        assert!(device_patch(&json!({"deviceContent": {"tags.x": 1}})).is_err());
        assert!(device_patch(&json!({"deviceContent": {"properties.desired..x": 1}})).is_err());
        assert_eq!(
            placeholders("configurations.[[cfg-1]].status = 'Applied'"),
            "configurations['cfg-1'].status = 'Applied'"
        );
        assert!(target("*").expect("all").is_none());
        assert!(target("tags.x = ").is_err());
    }
}
