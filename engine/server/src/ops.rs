//! The engine's ops port: `/healthz`, `/metrics` and the `events` consumer API.
//!
//! Consumer API (JSON):
//! - `GET /events/partitions` → `{"partitions":[{"partition","first","next"}]}`
//! - `GET /events/partitions/{p}/records?from=N&max=M` → `{"records":[..],"next":K}`
//! - `GET /events/groups/{g}/records?max=M&from=earliest|latest` → records from the group's
//!   persisted checkpoint (or `from` when it has none) and `{"positions":{"p":next}}`
//! - `POST /events/groups/{g}/checkpoint` with `{"p":next,..}` → 204
//! - `GET /registry/devices/{id}[/modules/{m}]` → the identity as this engine's registry view
//!   has it (`enabled`, `generationId`, twin `tags` and `properties` as routing sees them, `registrySequence`; never keys)
//! - both reads take `source=Telemetry|twinChangeEvents|deviceLifecycleEvents|deviceConnectionStateEvents`:
//!   only records of that `iothub-message-source` (a read looks at most at `MAX_SCANNED`)

use std::collections::BTreeMap;
use std::sync::Arc;

use hyper::{Method, StatusCode};
use roost_common::httpd::{self, query_param, Req, Resp};
use roost_storage::json::RecordsJson;
use roost_storage::log::read_records;
use roost_storage::{LogError, LogStore};
use serde_json::json;

use crate::metrics::Metrics;

pub struct Ops {
    pub log: Arc<dyn LogStore>,
    pub metrics: Arc<Metrics>,
    /// The engine's registry view (what `GET /registry/devices/{id}` shows).
    pub registry: Arc<roost_registry::Registry>,
}

/// Most records one read returns.
const MAX_READ: usize = 10_000;
/// Largest request body the ops port reads (a checkpoint commit, a few hundred bytes).
pub const MAX_REQUEST_BODY: usize = 64 * 1024;

impl Ops {
    pub async fn handle(self: Arc<Self>, req: Req) -> Resp {
        let path = req.uri().path().to_string();
        let segments = path_segments(&path);
        // Bounded reads (at most MAX_READ records and 4 MiB, usually from the memtable) are
        // served on the ops thread (not the control link's): handing each to a blocking-pool thread cost more than the read (about
        // 40 µs of CPU per empty poll, in thread wake-ups). Consumer-group requests, which
        // may write a synced checkpoint, go to the blocking pool.
        if !matches!(segments.as_slice(), ["events", "groups", ..]) {
            return self.route(req.method(), &segments, &req);
        }
        let result = tokio::task::spawn_blocking(move || {
            self.route(req.method(), &path_segments(&path), &req)
        })
        .await;
        result.unwrap_or_else(|e| httpd::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    }

    fn route(&self, method: &Method, segments: &[&str], req: &Req) -> Resp {
        match (method, segments) {
            (&Method::GET, ["healthz"]) => httpd::text(StatusCode::OK, "ok\n"),
            (&Method::GET, ["readyz"]) => self.readiness(),
            (&Method::GET, ["metrics"]) => {
                self.update_consumer_lag();
                let mut r = httpd::text(StatusCode::OK, self.metrics.encode());
                r.headers_mut().insert(
                    "content-type",
                    hyper::header::HeaderValue::from_static(
                        "text/plain; version=0.0.4; charset=utf-8",
                    ),
                );
                r
            }
            (&Method::GET, ["registry", "devices", d]) => {
                self.registry_entry(&httpd::percent_decode(d))
            }
            (&Method::GET, ["registry", "devices", d, "modules", m]) => self.registry_entry(
                &format!("{}/{}", httpd::percent_decode(d), httpd::percent_decode(m)),
            ),
            (&Method::GET, ["events", "partitions"]) => match self.log.partitions() {
                Ok(p) => httpd::json(StatusCode::OK, &json!({ "partitions": p })),
                Err(e) => failed(&e),
            },
            (&Method::GET, ["events", "partitions", p, "records"]) => self.read_partition(p, req),
            (&Method::GET, ["events", "groups", g, "records"]) => {
                self.read_group(&httpd::percent_decode(g), req)
            }
            (&Method::POST, ["events", "groups", g, "checkpoint"]) => {
                self.checkpoint(&httpd::percent_decode(g), req)
            }
            _ => httpd::text(StatusCode::NOT_FOUND, "no such ops endpoint\n"),
        }
    }

    /// 200 while every shard's log partition takes writes; 503 naming the shards whose
    /// partition refuses appends after a failed write (a full disk), until it works again.
    /// One identity as this engine's registry view has it: enabled, generation, the sequence
    /// it is complete to, and the twin tags routing sees — never its keys.
    fn registry_entry(&self, client_id: &str) -> Resp {
        let view = self.registry.load();
        let Some(d) = view.device(client_id) else {
            return httpd::text(
                StatusCode::NOT_FOUND,
                format!("{client_id} is not in this engine's registry\n"),
            );
        };
        let twin = match d.twin.as_str() {
            "" => json!({}),
            t => serde_json::from_str(t).unwrap_or(json!({})),
        };
        httpd::json(
            StatusCode::OK,
            &json!({
                "clientId": d.device_id,
                "enabled": d.enabled,
                "generationId": d.generation_id,
                "tags": twin.get("tags").cloned().unwrap_or(json!({})),
                "properties": twin.get("properties").cloned().unwrap_or(json!({})),
                "registrySequence": view.seq(),
            }),
        )
    }

    fn readiness(&self) -> Resp {
        let down: Vec<String> = (0..self.log.partition_count())
            .filter(|s| {
                self.metrics
                    .log_unavailable
                    .with_label_values(&[&s.to_string()])
                    .get()
                    != 0
            })
            .map(|s| s.to_string())
            .collect();
        if down.is_empty() {
            httpd::text(StatusCode::OK, "ready\n")
        } else {
            httpd::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "not ready: the events log refuses writes on shard {} (see roost_log_write_failures_total)\n",
                    down.join(", ")
                ),
            )
        }
    }

    /// `roost_events_consumer_lag` as of now: for each checkpoint, the records between it (or
    /// the first retained offset, if retention passed it) and the partition's end.
    fn update_consumer_lag(&self) {
        let (Ok(checkpoints), Ok(partitions)) = (self.log.checkpoints(), self.log.partitions())
        else {
            return;
        };
        self.metrics.consumer_lag.reset();
        // Endpoint dispatchers report their own lag (roost_endpoint_lag_records).
        let consumers = checkpoints
            .into_iter()
            .filter(|(g, _, _)| !roost_endpoints::is_reserved_group(g));
        for (group, p, next) in consumers {
            let Some(info) = partitions.iter().find(|i| i.partition == p) else {
                continue;
            };
            let lag = info.next.saturating_sub(next.max(info.first));
            self.metrics
                .consumer_lag
                .with_label_values(&[group.as_str(), &p.to_string()])
                .set(lag as i64);
        }
    }

    fn read_partition(&self, p: &str, req: &Req) -> Resp {
        let Ok(p) = p.parse::<usize>() else {
            return bad("partition must be a number");
        };
        let from = match query_param(req, "from").map(|v| v.parse::<u64>()) {
            None => 0,
            Some(Ok(v)) => v,
            Some(Err(_)) => return bad("from must be an offset"),
        };
        let max = match max_param(req) {
            Ok(m) => m,
            Err(r) => return r,
        };
        let mut records = match records_for(req) {
            Ok(r) => r,
            Err(r) => return r,
        };
        match read_records(self.log.as_ref(), p, from, max, &mut records) {
            Ok(next) => httpd::json_raw(StatusCode::OK, records.finish("next", &next.to_string())),
            Err(e @ LogError::NoPartition(_)) => httpd::text(StatusCode::NOT_FOUND, e.to_string()),
            Err(e) => failed(&e),
        }
    }

    fn read_group(&self, group: &str, req: &Req) -> Resp {
        if roost_endpoints::is_reserved_group(group) {
            return reserved(group);
        }
        let latest = match query_param(req, "from").as_deref() {
            None | Some("earliest") => false,
            Some("latest") => true,
            Some(_) => return bad("from must be earliest or latest"),
        };
        let mut remaining = match max_param(req) {
            Ok(m) => m,
            Err(r) => return r,
        };
        let mut records = match records_for(req) {
            Ok(r) => r,
            Err(r) => return r,
        };
        let mut positions = BTreeMap::new();
        let partitions = match self.log.partitions() {
            Ok(p) => p,
            Err(e) => return failed(&e),
        };
        for info in partitions {
            let start = match self.log.checkpoint(group, info.partition) {
                Ok(Some(c)) => c,
                Ok(None) if latest => info.next,
                Ok(None) => info.first,
                Err(e) => return failed(&e),
            };
            let before = records.count();
            let next = match read_records(
                self.log.as_ref(),
                info.partition,
                start,
                remaining,
                &mut records,
            ) {
                Ok(next) => next,
                Err(e) => return failed(&e),
            };
            remaining -= records.count() - before;
            positions.insert(info.partition.to_string(), next);
        }
        let positions = match serde_json::to_string(&positions) {
            Ok(p) => p,
            Err(e) => return httpd::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        httpd::json_raw(StatusCode::OK, records.finish("positions", &positions))
    }

    fn checkpoint(&self, group: &str, req: &Req) -> Resp {
        if roost_endpoints::is_reserved_group(group) {
            return reserved(group);
        }
        let Ok(body) = serde_json::from_slice::<BTreeMap<String, u64>>(req.body()) else {
            return bad("body must be a JSON object of partition → next offset");
        };
        let mut positions = Vec::new();
        for (p, next) in body {
            let Ok(p) = p.parse::<usize>() else {
                return bad("partition keys must be numbers");
            };
            positions.push((p, next));
        }
        match self.log.commit_checkpoint(group, &positions) {
            Ok(()) => httpd::empty(StatusCode::NO_CONTENT),
            Err(e) => failed(&e),
        }
    }
}

/// 400 for a consumer group name an endpoint's dispatcher owns.
fn reserved(group: &str) -> Resp {
    bad(&format!(
        "consumer group {group:?}: names starting with $endpoint: belong to the endpoints' dispatchers"
    ))
}

/// The response a read fills: every record, or with `source=`, those of one
/// `iothub-message-source`.
fn records_for(req: &Req) -> Result<RecordsJson, Resp> {
    let records = RecordsJson::new();
    match query_param(req, "source") {
        None => Ok(records),
        Some(s) if roost_model::message::SOURCES.iter().any(|k| k.eq_ignore_ascii_case(&s)) => {
            Ok(records.only_source(&s))
        }
        Some(_) => Err(bad(
            "source must be Telemetry, twinChangeEvents, deviceLifecycleEvents or deviceConnectionStateEvents",
        )),
    }
}

/// `/events/groups/g/records` → `["events", "groups", "g", "records"]`.
fn path_segments(path: &str) -> Vec<&str> {
    path.trim_matches('/').split('/').collect()
}

fn failed(e: &LogError) -> Resp {
    tracing::error!(error = %e, "events log read failed");
    httpd::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
}

fn bad(why: &str) -> Resp {
    httpd::text(StatusCode::BAD_REQUEST, format!("{why}\n"))
}

fn max_param(req: &Req) -> Result<usize, Resp> {
    match query_param(req, "max").map(|v| v.parse::<usize>()) {
        None => Ok(1000),
        Some(Ok(v)) => Ok(v.min(MAX_READ)),
        Some(Err(_)) => Err(bad("max must be a number")),
    }
}
