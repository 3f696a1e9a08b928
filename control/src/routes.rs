//! The hub's routing at control: the `routes.lua` and plugins in force, numbered and stored,
//! checked with the engines' own code (`roost-routing`) before they become the config epoch
//! the engines run (DESIGN.md §2, "config is an immutable epoch").
//!
//! `PUT /roost/routes` (roost's own call; IoT Hub configures routes through ARM) takes
//! `{"routes": "<lua>", "plugins": {"name/handler.lua": "<lua>", "name/schema.lua": "<lua>"}}`,
//! loads it as an engine would, stores it with the next version in one synced write, and puts
//! the new epoch on the watch channel every link sends from. `GET /roost/routes` answers what is
//! in force and what each engine said of it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use roost_model::link::{CaEntry, Epoch, EpochPayload, PolicyEntry};
use roost_routing::{ConfigError, Routing};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::{Store, StoreError};

/// What `PUT /roost/routes` takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesRequest {
    pub routes: String,
    #[serde(default)]
    pub plugins: BTreeMap<String, String>,
}

/// Largest request: a `routes.lua` and the plugins it uses.
pub const MAX_BODY: usize = 1024 * 1024;

/// The routing control stores: its version (the epoch's) and sources.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRouting {
    pub version: u64,
    pub routes: String,
    pub plugins: Vec<(String, String)>,
}

/// Why an apply failed.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one engine said of the epoch it was sent, as its link last reported.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineVerdict {
    pub node: String,
    /// The hash of the epoch the engine runs (hex), if it runs one.
    pub epoch_hash: Option<String>,
    /// The rejection of the latest epoch: `code: detail`.
    pub rejected: Option<String>,
}

/// Each linked engine's verdict, by link id.
#[derive(Default)]
pub struct Verdicts(Mutex<BTreeMap<u64, EngineVerdict>>);

impl Verdicts {
    pub fn update(&self, link: u64, f: impl FnOnce(&mut EngineVerdict)) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(link).or_default());
    }

    pub fn remove(&self, link: u64) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&link);
    }

    pub fn list(&self) -> Vec<EngineVerdict> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Loads `routes` and `plugins` as an engine will: every check `roost-routing` makes.
pub fn check(
    routes: &str,
    plugins: &[(String, String)],
    hub_name: &str,
) -> Result<Routing, ConfigError> {
    Routing::load_with_defaults("routes.lua", routes, plugins, hub_name)
}

/// The routing stored at control, or the default (version 1, the engines' built-in routes).
pub fn stored(store: &Store) -> Result<StoredRouting, StoreError> {
    match store.routing()? {
        None => Ok(StoredRouting {
            version: 1,
            ..StoredRouting::default()
        }),
        Some(raw) => serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt(e.to_string())),
    }
}

/// The epoch for `routing` with the hub's limits, shared access policies, consumer groups
/// and verified CAs.
pub fn epoch(
    routing: &StoredRouting,
    limits: Vec<(String, u64)>,
    policies: Vec<PolicyEntry>,
    consumer_groups: Vec<String>,
    cas: Vec<CaEntry>,
) -> Epoch {
    Epoch::new(
        routing.version,
        EpochPayload {
            routes: routing.routes.clone(),
            plugins: routing.plugins.clone(),
            limits,
            policies,
            consumer_groups,
            cas,
        },
    )
}

/// The shared access policies as an epoch carries them.
pub fn policy_entries(store: &Store) -> Result<Vec<PolicyEntry>, StoreError> {
    Ok(store
        .policies()?
        .into_iter()
        .map(|p| PolicyEntry {
            name: p.name,
            primary_key: p.primary_key,
            secondary_key: p.secondary_key,
            rights: p.rights.iter().map(|r| format!("{r:?}")).collect(),
        })
        .collect())
}

/// Checks and stores a new routing; returns it with its version. Applies are serialised by the
/// caller (the version is read and written under the store's exclusive section).
pub fn apply(
    store: &Store,
    req: RoutesRequest,
    hub_name: &str,
) -> Result<StoredRouting, RoutesError> {
    let plugins: Vec<(String, String)> = req.plugins.into_iter().collect();
    for (path, _) in &plugins {
        let ok = path.split_once('/').is_some_and(|(name, file)| {
            !name.is_empty() && matches!(file, "handler.lua" | "schema.lua" | "spec.lua")
        });
        if !ok {
            return Err(RoutesError::Invalid(format!(
                "plugin file {path:?}: expected <name>/handler.lua, <name>/schema.lua or <name>/spec.lua"
            )));
        }
    }
    check(&req.routes, &plugins, hub_name).map_err(|e| RoutesError::Invalid(e.to_string()))?;
    store.exclusive(|| {
        let current = stored(store)?;
        let next = StoredRouting {
            version: current.version + 1,
            routes: req.routes,
            plugins,
        };
        let json = serde_json::to_vec(&next).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        store.put_routing(&json)?;
        Ok(next)
    })
}

/// The routing service behind `PUT` and `GET /roost/routes`.
pub struct Routes {
    pub store: Arc<Store>,
    pub hub_name: String,
    /// The hub's quotas, which every epoch carries beside the routing.
    pub limits: Vec<(String, u64)>,
    /// The shared access policies, which every epoch carries too.
    pub policies: Vec<PolicyEntry>,
    /// The epoch every link sends its engine.
    pub epoch: watch::Sender<Epoch>,
    pub verdicts: Arc<Verdicts>,
}

impl Routes {
    /// Checks, stores and puts in force a new routing (a blocking store write: call it off the
    /// async threads). Answers its version and epoch hash.
    pub fn apply(&self, body: &[u8]) -> Result<serde_json::Value, RoutesError> {
        let req: RoutesRequest = serde_json::from_slice(body).map_err(|e| {
            RoutesError::Invalid(format!(
                "the body must be {{\"routes\": \"…\", \"plugins\": {{…}}}}: {e}"
            ))
        })?;
        let applied = apply(&self.store, req, &self.hub_name)?;
        let hash = self.republish("routing applied")?.to_string();
        Ok(serde_json::json!({ "version": applied.version, "hash": hash }))
    }

    /// Puts in force an epoch of what is stored now — routing, consumer groups, verified
    /// CAs — after `what` changed one of them (same routing version, new hash).
    pub fn republish(&self, what: &str) -> Result<roost_model::link::EpochHash, StoreError> {
        let routing = stored(&self.store)?;
        let epoch = epoch(
            &routing,
            self.limits.clone(),
            self.policies.clone(),
            crate::consumer_groups::stored(&self.store)?,
            crate::cas::trusted(&self.store)?,
        );
        let hash = epoch.hash;
        tracing::info!(version = routing.version, %hash, "{what}; engines get the new epoch");
        self.epoch.send_replace(epoch);
        Ok(hash)
    }

    /// What is in force and what each linked engine said of it.
    pub fn status(&self) -> Result<serde_json::Value, RoutesError> {
        let routing = stored(&self.store)?;
        let hash = self.epoch.borrow().hash.to_string();
        let plugins: Vec<&str> = routing.plugins.iter().map(|(p, _)| p.as_str()).collect();
        Ok(serde_json::json!({
            "version": routing.version,
            "hash": hash,
            "routes": routing.routes,
            "plugins": plugins,
            "engines": self.verdicts.list(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_routing_is_refused_with_its_line_and_a_good_one_numbered() {
        let dir = std::env::temp_dir().join(format!("roost-routes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).expect("store");
        assert_eq!(stored(&store).expect("default").version, 1);
        let bad = RoutesRequest {
            routes: "return {\n  colour = 1,\n}".into(),
            plugins: BTreeMap::new(),
        };
        let e = apply(&store, bad, "hub").expect_err("refused");
        assert!(
            e.to_string()
                .starts_with("routes.lua:2: unknown key \"colour\""),
            "{e}"
        );
        let odd = RoutesRequest {
            routes: "return {}".into(),
            plugins: BTreeMap::from([("../x".to_string(), String::new())]),
        };
        assert!(apply(&store, odd, "hub").is_err());
        let good = RoutesRequest {
            routes: "return { fallback = false }".into(),
            plugins: BTreeMap::new(),
        };
        let applied = apply(&store, good, "hub").expect("applied");
        assert_eq!(applied.version, 2);
        assert_eq!(stored(&store).expect("stored"), applied);
        let e1 = epoch(&applied, vec![], vec![], vec![], vec![]);
        assert!(e1.hash_is_valid());
        assert_eq!(e1.payload.routes, "return { fallback = false }");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
