//! Routing on a shard: the epoch's `routes.lua` and plugins loaded into the shard's own Lua VM,
//! and the one durable append per message with the endpoints it goes to.
//!
//! The link puts an epoch's routes in the engine-wide [`RoutesCell`] once it has checked them
//! (by loading them: the same `roost-routing` code control ran). Each shard notices the new
//! version on its tick and loads its own [`ShardRouting`] — a VM is not `Send`, and loading
//! between two messages is what "swap between messages" means: a message is routed by the
//! epoch it started on. Before any epoch, and for an epoch without routes, a shard routes by the
//! default table, the repository's `routes.lua` (everything to `events`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use roost_model::{Message, Routed};
use roost_routing::table::PLUGIN_ERRORS;
use roost_routing::{ConfigError, Outcome, Routing, Stats};

use crate::metrics::RoutingMetrics;

/// What an epoch's routing is made of, as the link hands it to the shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutesSource {
    /// The epoch version it came with (0: the built-in default).
    pub version: u64,
    pub routes: String,
    /// Plugin files by path (`name/handler.lua`, `name/schema.lua`).
    pub plugins: Vec<(String, String)>,
}

/// The default routing, the repository's `routes.lua`: telemetry and the hub's own events to
/// `events`.
pub const DEFAULT_ROUTES: &str = include_str!("../../../routes.lua");

impl RoutesSource {
    fn default_routes() -> Self {
        RoutesSource {
            version: 0,
            routes: DEFAULT_ROUTES.into(),
            plugins: Vec::new(),
        }
    }

    /// Loads the routing (checks everything; see `roost_routing::Routing::load`).
    pub fn load(&self, hub_name: &str) -> Result<Routing, ConfigError> {
        let routes = if self.routes.trim().is_empty() {
            DEFAULT_ROUTES
        } else {
            &self.routes
        };
        Routing::load_with_defaults("routes.lua", routes, &self.plugins, hub_name)
    }
}

/// The routing in force, engine-wide: set by the link, read by the shards on their tick; each
/// shard reports the version it has loaded, so the link answers `Applied` only once every
/// shard routes by the new epoch.
pub struct RoutesCell {
    version: AtomicU64,
    current: Mutex<Arc<RoutesSource>>,
    /// Per shard (by id), the cell version it has loaded (or given up on).
    loaded: Mutex<Vec<u64>>,
    changed: Condvar,
}

impl Default for RoutesCell {
    fn default() -> Self {
        RoutesCell {
            version: AtomicU64::new(0),
            current: Mutex::new(Arc::new(RoutesSource::default_routes())),
            loaded: Mutex::new(Vec::new()),
            changed: Condvar::new(),
        }
    }
}

impl RoutesCell {
    /// Puts `source` in force (a no-op when it is what is in force).
    pub fn set(&self, source: RoutesSource) {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.routes == source.routes && cur.plugins == source.plugins {
            return;
        }
        *cur = Arc::new(source);
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Changes whenever the routing in force does.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn get(&self) -> Arc<RoutesSource> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Shard `shard` has loaded cell version `version` (or kept its routing after failing to).
    pub fn loaded(&self, shard: usize, version: u64) {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.len() <= shard {
            loaded.resize(shard + 1, 0);
        }
        loaded[shard] = version;
        self.changed.notify_all();
    }

    /// Waits until every shard that runs has loaded the version in force, at most `timeout`;
    /// whether they all have. True at once before any shard runs (start-up).
    pub fn wait_in_force(&self, timeout: Duration) -> bool {
        let want = self.version();
        let deadline = Instant::now() + timeout;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if loaded.iter().all(|v| *v >= want) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            loaded = self
                .changed
                .wait_timeout(loaded, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A shard's loaded routing and the buffers its appends reuse.
pub struct ShardRouting {
    /// The [`RoutesCell`] version this was loaded from.
    pub cell_version: u64,
    pub routing: Routing,
    /// Whether routing reads the sender's twin tags (a `$twin` condition or enrichment, or
    /// any Lua): only then is the registry consulted per message.
    pub needs_twin: bool,
    /// The endpoint names of `last_mask`, reused while messages keep going to the same place.
    names: Vec<String>,
    last_mask: u64,
    /// The routing's counters as last flushed to the metrics.
    flushed: Stats,
}

impl ShardRouting {
    pub fn load(
        cell_version: u64,
        source: &RoutesSource,
        hub_name: &str,
    ) -> Result<Self, ConfigError> {
        let routing = source.load(hub_name)?;
        Ok(ShardRouting {
            cell_version,
            needs_twin: routing.reads_twin(),
            flushed: routing.stats().clone(),
            routing,
            names: Vec::new(),
            last_mask: 0,
        })
    }

    /// The default routing, which cannot fail to load.
    pub fn default_routing(hub_name: &str) -> Self {
        match Self::load(0, &RoutesSource::default_routes(), hub_name) {
            Ok(r) => r,
            // The default is a constant the tests load; failing here is a build defect.
            Err(e) => panic!("the default routing does not load: {e}"),
        }
    }

    /// Adds what the routing counted since the last flush to the metrics (from the shard's
    /// tick, and before the routing is replaced).
    pub fn flush(&mut self, m: &RoutingMetrics, shard: &str) {
        let now = self.routing.stats();
        let was = &self.flushed;
        let config = self.routing.config();
        for (i, r) in config.routes.iter().enumerate() {
            let d = now.matches[i] - was.matches[i];
            if d > 0 {
                m.route_matches
                    .with_label_values(&[shard, &r.name])
                    .inc_by(d);
            }
            let d = now.condition_errors[i] - was.condition_errors[i];
            if d > 0 {
                m.condition_errors
                    .with_label_values(&[shard, &r.name])
                    .inc_by(d);
            }
        }
        if now.fallback > was.fallback {
            m.fallback
                .with_label_values(&[shard])
                .inc_by(now.fallback - was.fallback);
        }
        if now.unrouted > was.unrouted {
            m.unrouted
                .with_label_values(&[shard])
                .inc_by(now.unrouted - was.unrouted);
        }
        for (i, p) in config.plugins.iter().enumerate() {
            let (n, w) = (&now.plugins[i], &was.plugins[i]);
            let name = p.name.as_str();
            if n.runs > w.runs {
                m.plugin_runs
                    .with_label_values(&[shard, name])
                    .inc_by(n.runs - w.runs);
                let secs = (n.nanos - w.nanos) as f64 / 1e9;
                m.plugin_seconds
                    .with_label_values(&[shard, name])
                    .inc_by(secs);
            }
            for (k, code) in PLUGIN_ERRORS.iter().enumerate() {
                if n.errors[k] > w.errors[k] {
                    m.plugin_errors
                        .with_label_values(&[shard, name, code])
                        .inc_by(n.errors[k] - w.errors[k]);
                }
            }
            for (verdict, (a, b)) in [
                ("drop", (n.drops, w.drops)),
                ("reject", (n.rejects, w.rejects)),
            ] {
                if a > b {
                    m.plugin_verdicts
                        .with_label_values(&[shard, name, verdict])
                        .inc_by(a - b);
                }
            }
        }
        self.flushed = now.clone();
    }

    /// Routes `message` and, when it goes somewhere, archives it with its endpoints into `out`
    /// (cleared first). `None` in the second place: stored nowhere (dropped, rejected or
    /// unrouted; the outcome says which).
    // hot path: the endpoint names are rebuilt only when the set changes.
    pub fn route_and_archive(
        &mut self,
        mut message: Message,
        twin: &str,
        out: rkyv::util::AlignedVec,
    ) -> (
        Outcome,
        Result<rkyv::util::AlignedVec, rkyv::util::AlignedVec>,
    ) {
        let outcome = self.routing.route(&mut message, twin);
        if outcome.endpoints == 0 || outcome.verdict != roost_routing::Verdict::Route {
            return (outcome, Err(out));
        }
        if outcome.endpoints != self.last_mask || self.names.is_empty() {
            self.names.clear();
            self.names.extend(
                self.routing
                    .endpoint_names(outcome.endpoints)
                    .map(str::to_string),
            );
            self.last_mask = outcome.endpoints;
        }
        let stamps = outcome
            .stamps
            .iter()
            .map(|s| roost_model::Stamp {
                key: s.key.clone(),
                value: s.value.clone(),
                endpoints: compact(s.endpoints, outcome.endpoints),
            })
            .collect();
        let record = Routed {
            message,
            endpoints: std::mem::take(&mut self.names),
            stamps,
        };
        let archived = record.archive_into(out);
        self.names = record.endpoints;
        match archived {
            Ok(buf) => (outcome, Ok(buf)),
            Err(_) => (outcome, Err(rkyv::util::AlignedVec::new())),
        }
    }
}

/// `bits` (over the configuration's endpoints) as bits over the endpoints of `mask` in order:
/// a record names only its own endpoints.
fn compact(bits: u64, mask: u64) -> u64 {
    let mut out = 0u64;
    let mut k = 0;
    for i in 0..64 {
        if mask & (1 << i) != 0 {
            if bits & (1 << i) != 0 {
                out |= 1 << k;
            }
            k += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_renumbered_over_the_records_own_endpoints() {
        assert_eq!(compact(0b0100, 0b0101), 0b10);
        assert_eq!(compact(0b0101, 0b0101), 0b11);
        assert_eq!(compact(0b1000, 0b0101), 0);
    }

    #[test]
    fn the_routing_is_in_force_once_every_shard_has_loaded_it() {
        let cell = RoutesCell::default();
        assert!(cell.wait_in_force(Duration::ZERO), "no shard runs yet");
        cell.loaded(0, cell.version());
        cell.loaded(1, cell.version());
        cell.set(RoutesSource {
            version: 2,
            routes: "return { fallback = false }".into(),
            plugins: Vec::new(),
        });
        cell.loaded(0, cell.version());
        assert!(
            !cell.wait_in_force(Duration::from_millis(20)),
            "shard 1 has not"
        );
        let cell = Arc::new(cell);
        let shard = cell.clone();
        let t = std::thread::spawn(move || shard.loaded(1, shard.version()));
        assert!(cell.wait_in_force(Duration::from_secs(5)));
        t.join().expect("thread");
    }

    #[test]
    fn the_cell_changes_version_only_when_the_routing_does() {
        let cell = RoutesCell::default();
        assert_eq!(cell.get().routes, DEFAULT_ROUTES);
        let v = cell.version();
        cell.set(RoutesSource::default_routes());
        assert_eq!(cell.version(), v);
        cell.set(RoutesSource {
            version: 2,
            routes: "return { fallback = false }".into(),
            plugins: Vec::new(),
        });
        assert_eq!(cell.version(), v + 1);
    }
}
