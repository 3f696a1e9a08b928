//! Jobs (spec §4.5): a twin update or a direct method scheduled on every device a condition
//! selects, run by control at a bounded rate, surviving restarts.
//!
//! A job is stored (column family `jobs`) from `PUT /jobs/v2/{id}` on; the runner takes jobs one
//! at a time (IoT Hub's S1 runs one job at a time and queues the rest), in order of start time.
//! It walks the devices the `queryCondition` selects as a twin query in pages of [`BATCH`]
//! (`SELECT deviceId FROM devices WHERE …`, so the primary-key index and paging of `query.rs`
//! serve it), does each page's devices — methods concurrently, twin updates in order — paced to
//! [`DEVICE_OPS_PER_SEC`], and then writes, in one synced batch, each device's record (the rows
//! of `devices.jobs`), the job's statistics and the continuation token of the next page. A
//! restarted control resumes a running job from that token: a page that was in progress when
//! it stopped is done again (a method may be called twice; a twin patch is idempotent).
//!
//! What it is not: import/export jobs (`/jobs/create`), which need a blob store.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_iothub::time::{iso_ms, parse_iso_ms};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::api::now_ms;
use crate::methods::{MethodCall, MethodFailure, Methods};
use crate::metrics::ControlMetrics;
use crate::query::{Queries, QueryFailure};
use crate::store::{Store, StoreError};
use crate::twins::Twins;

/// Devices read, done and checkpointed together.
pub const BATCH: usize = 16;
/// The most device operations (twin updates, method calls) jobs start per second, so a job
/// over a large fleet never starves interactive calls (IoT Hub's S1: 10/s per unit).
pub const DEVICE_OPS_PER_SEC: u32 = 50;
/// The longest a job may run when the request does not say.
const DEFAULT_MAX_SECS: u64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum JobFailure {
    #[error("{0}")]
    BadRequest(String),
    #[error("job {0} does not exist")]
    NotFound(String),
    #[error("job {0} already exists")]
    Exists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A job's device statistics, as IoT Hub reports them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Statistics {
    pub device_count: u64,
    pub failed_count: u64,
    pub succeeded_count: u64,
    pub running_count: u64,
    pub pending_count: u64,
}

/// A job as `GET /jobs/v2/{id}` shows it (IoT Hub's JobResponse).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub job_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// queued, scheduled, running, completed, failed, cancelled.
    pub status: String,
    pub query_condition: String,
    pub created_time: String,
    pub start_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    pub max_execution_time_in_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_twin: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_method: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    pub device_job_statistics: Statistics,
}

/// A job and where its run stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredJob {
    job: Job,
    /// The continuation token of the next page of devices (`None`: from the first).
    next: Option<String>,
    /// When it started running (Unix ms): `maxExecutionTimeInSeconds` counts from here, not
    /// from a start time it may have waited past behind another job.
    #[serde(default)]
    started_ms: Option<u64>,
}

/// The body of `PUT /jobs/v2/{id}` (IoT Hub's JobRequest).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobRequest {
    job_id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    query_condition: Option<String>,
    start_time: Option<String>,
    max_execution_time_in_seconds: Option<u64>,
    update_twin: Option<Value>,
    cloud_to_device_method: Option<Value>,
}

fn terminal(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

/// The twin query that selects a job's devices: a `WHERE` clause (`*` or nothing: every
/// device), or a whole `SELECT … FROM devices WHERE …` whose condition is taken.
fn device_query(condition: &str) -> Result<String, JobFailure> {
    let c = condition.trim();
    let bad =
        |e: roost_query::QueryError| JobFailure::BadRequest(format!("invalid queryCondition: {e}"));
    if c.is_empty() || c == "*" {
        return Ok("SELECT deviceId FROM devices".into());
    }
    if c.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("select")) {
        let q = roost_query::query(c).map_err(bad)?;
        if q.from != roost_query::Source::Devices {
            return Err(JobFailure::BadRequest(
                "a job's query must select FROM devices".into(),
            ));
        }
        return Ok(match roost_query::where_text(c).map_err(bad)? {
            Some(cond) => format!("SELECT deviceId FROM devices WHERE {cond}"),
            None => "SELECT deviceId FROM devices".into(),
        });
    }
    roost_query::condition(c).map_err(bad)?;
    Ok(format!("SELECT deviceId FROM devices WHERE {c}"))
}

pub struct Jobs {
    store: Arc<Store>,
    queries: Arc<Queries>,
    twins: Arc<Twins>,
    methods: Arc<Methods>,
    metrics: Arc<ControlMetrics>,
    wake: Notify,
    cancelled: Mutex<HashSet<String>>,
}

impl Jobs {
    pub fn new(
        store: Arc<Store>,
        queries: Arc<Queries>,
        twins: Arc<Twins>,
        methods: Arc<Methods>,
        metrics: Arc<ControlMetrics>,
    ) -> Self {
        Jobs {
            store,
            queries,
            twins,
            methods,
            metrics,
            wake: Notify::new(),
            cancelled: Mutex::new(HashSet::new()),
        }
    }

    fn load(&self, id: &str) -> Result<StoredJob, JobFailure> {
        let bytes = self
            .store
            .job(id)?
            .ok_or_else(|| JobFailure::NotFound(id.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt(e.to_string()).into())
    }

    /// Saves `job` unless the stored one has ended meanwhile (a cancel); whether it did.
    fn save_unless_ended(&self, job: &StoredJob) -> Result<bool, StoreError> {
        self.store.exclusive(|| {
            let current = self.load(&job.job.job_id).map(|s| s.job.status);
            if current.as_deref().is_ok_and(terminal) {
                return Ok(false);
            }
            self.save(job, &[])?;
            Ok(true)
        })
    }

    fn save(&self, job: &StoredJob, device_jobs: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.store.put_job(&job.job.job_id, &bytes, device_jobs)
    }

    /// `PUT /jobs/v2/{id}`: checks and stores the job; the runner starts it at its start time.
    pub fn create(&self, id: &str, body: &[u8]) -> Result<Job, JobFailure> {
        let bad = |m: &str| JobFailure::BadRequest(m.to_string());
        let req: JobRequest = serde_json::from_slice(body)
            .map_err(|e| JobFailure::BadRequest(format!("invalid job JSON: {e}")))?;
        roost_model::DeviceId::parse(id)
            .map_err(|e| JobFailure::BadRequest(format!("invalid job id: {e}")))?;
        if req.job_id.as_deref().is_some_and(|j| j != id) {
            return Err(bad("jobId in the body does not match the path"));
        }
        let kind = req.kind.unwrap_or_default();
        match kind.as_str() {
            "scheduleUpdateTwin" => {
                if !req.update_twin.as_ref().is_some_and(Value::is_object) {
                    return Err(bad("a scheduleUpdateTwin job needs updateTwin"));
                }
            }
            "scheduleDeviceMethod" => {
                let call = req
                    .cloud_to_device_method
                    .as_ref()
                    .ok_or_else(|| bad("a scheduleDeviceMethod job needs cloudToDeviceMethod"))?;
                MethodCall::parse(call.to_string().as_bytes()).map_err(|e| JobFailure::BadRequest(e.to_string()))?;
            }
            _ => {
                return Err(bad(
                    "type must be scheduleUpdateTwin or scheduleDeviceMethod (import and export jobs are not served)",
                ))
            }
        }
        let condition = req.query_condition.unwrap_or_default();
        device_query(&condition)?;
        let now = now_ms();
        let start = match req.start_time.as_deref() {
            None => now,
            Some(t) => {
                parse_iso_ms(t).ok_or_else(|| bad("startTime must be an ISO-8601 UTC time"))?
            }
        };
        let max = match req.max_execution_time_in_seconds {
            None | Some(0) => DEFAULT_MAX_SECS,
            Some(s) => s,
        };
        let job = Job {
            job_id: id.to_string(),
            kind,
            status: if start > now { "scheduled" } else { "queued" }.into(),
            query_condition: condition,
            created_time: iso_ms(now),
            start_time: iso_ms(start),
            end_time: None,
            max_execution_time_in_seconds: max,
            update_twin: req.update_twin,
            cloud_to_device_method: req.cloud_to_device_method,
            failure_reason: None,
            status_message: None,
            device_job_statistics: Statistics::default(),
        };
        self.store.exclusive(|| {
            if self.store.job(id)?.is_some() {
                return Err(JobFailure::Exists(id.to_string()));
            }
            self.save(
                &StoredJob {
                    job: job.clone(),
                    next: None,
                    started_ms: None,
                },
                &[],
            )?;
            Ok(())
        })?;
        self.count(&job.status);
        self.wake.notify_one();
        Ok(job)
    }

    /// `GET /jobs/v2/{id}`.
    pub fn get(&self, id: &str) -> Result<Job, JobFailure> {
        Ok(self.load(id)?.job)
    }

    /// `POST /jobs/v2/{id}/cancel`: a job not yet done is cancelled (a running one after the
    /// page of devices it is on).
    pub fn cancel(&self, id: &str) -> Result<Job, JobFailure> {
        let job = self.store.exclusive(|| {
            let mut stored = self.load(id)?;
            if terminal(&stored.job.status) {
                return Ok(stored.job);
            }
            if stored.job.status == "running" {
                self.cancelled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.to_string());
            }
            stored.job.status = "cancelled".into();
            stored.job.end_time = Some(iso_ms(now_ms()));
            self.save(&stored, &[])?;
            self.count("cancelled");
            Ok::<_, JobFailure>(stored.job)
        })?;
        Ok(job)
    }

    /// `GET /jobs/v2/query?jobType=&jobStatus=`: every job of that type and status, newest
    /// first.
    pub fn list(&self, kind: Option<&str>, status: Option<&str>) -> Result<Vec<Job>, JobFailure> {
        let mut out: Vec<Job> = Vec::new();
        for bytes in self.store.jobs()? {
            let j: StoredJob =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if kind.is_none_or(|k| k.eq_ignore_ascii_case(&j.job.kind))
                && status.is_none_or(|s| s.eq_ignore_ascii_case(&j.job.status))
            {
                out.push(j.job);
            }
        }
        out.sort_by(|a, b| b.created_time.cmp(&a.created_time));
        Ok(out)
    }

    fn count(&self, status: &str) {
        self.metrics.jobs.with_label_values(&[status]).inc();
    }

    /// The next job to run: a running one (control stopped during it) first, then the
    /// earliest start; with how long until it may start.
    fn next(&self) -> Result<Option<(StoredJob, Duration)>, StoreError> {
        let mut best: Option<(StoredJob, u64)> = None;
        for bytes in self.store.jobs()? {
            let Ok(j) = serde_json::from_slice::<StoredJob>(&bytes) else {
                continue;
            };
            if terminal(&j.job.status) {
                continue;
            }
            let start = if j.job.status == "running" {
                0
            } else {
                parse_iso_ms(&j.job.start_time).unwrap_or(0)
            };
            if best.as_ref().is_none_or(|(_, s)| start < *s) {
                best = Some((j, start));
            }
        }
        let now = now_ms();
        Ok(best.map(|(j, start)| (j, Duration::from_millis(start.saturating_sub(now)))))
    }

    /// Runs jobs, one at a time, for as long as control runs.
    pub async fn run(self: Arc<Self>) {
        loop {
            let me = self.clone();
            let next = tokio::task::spawn_blocking(move || me.next()).await;
            match next {
                Ok(Ok(Some((job, wait)))) if wait.is_zero() => {
                    let id = job.job.job_id.clone();
                    if let Err(e) = self.execute(job).await {
                        tracing::warn!(job = %id, error = %e, "a job stopped on a store error");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                Ok(Ok(Some((_, wait)))) => {
                    tokio::select! {
                        _ = tokio::time::sleep(wait.min(Duration::from_secs(60))) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                Ok(Ok(None)) => self.wake.notified().await,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reading jobs failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the job scheduler task failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Jobs) -> T + Send + 'static,
    ) -> impl std::future::Future<Output = T> {
        let me = self.clone();
        async move {
            match tokio::task::spawn_blocking(move || f(&me)).await {
                Ok(t) => t,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
    }

    async fn execute(self: &Arc<Self>, mut stored: StoredJob) -> Result<(), StoreError> {
        let id = stored.job.job_id.clone();
        let query = match device_query(&stored.job.query_condition) {
            Ok(q) => q,
            Err(e) => return self.finish(stored, "failed", Some(e.to_string())).await,
        };
        if stored.job.status != "running" {
            stored.job.status = "running".into();
            stored.started_ms = Some(now_ms());
            let count_query = query.replacen("SELECT deviceId", "SELECT COUNT() AS n", 1);
            let q = self.queries.clone();
            let total = self
                .blocking(move |_| q.run(&count_query, None, None))
                .await
                .ok()
                .and_then(|p| p.items.first().and_then(|i| i["n"].as_u64()))
                .unwrap_or(0);
            stored.job.device_job_statistics.device_count = total;
            stored.job.device_job_statistics.pending_count = total;
            let s = stored.clone();
            // A cancel that came while it was counting stands.
            if !self.blocking(move |j| j.save_unless_ended(&s)).await? {
                return Ok(());
            }
            self.count("running");
        }
        let started = stored.started_ms.unwrap_or_else(now_ms);
        let deadline = started
            + stored
                .job
                .max_execution_time_in_seconds
                .saturating_mul(1000);
        let pace = Duration::from_secs(1) / DEVICE_OPS_PER_SEC;
        loop {
            if self
                .cancelled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id)
            {
                return Ok(()); // `cancel` wrote the status.
            }
            if now_ms() > deadline {
                let why = format!(
                    "the job ran past its maxExecutionTimeInSeconds ({})",
                    stored.job.max_execution_time_in_seconds
                );
                return self.finish(stored, "failed", Some(why)).await;
            }
            let (q, from) = (self.queries.clone(), stored.next.clone());
            let query_text = query.clone();
            let page = self
                .blocking(move |_| q.run(&query_text, from.as_deref(), Some(BATCH)))
                .await;
            let page = match page {
                Ok(p) => p,
                Err(QueryFailure::Store(e)) => return Err(e),
                Err(e) => return self.finish(stored, "failed", Some(e.to_string())).await,
            };
            let ids: Vec<String> = page
                .items
                .iter()
                .filter_map(|i| i["deviceId"].as_str().map(str::to_string))
                .collect();
            let records = self.do_page(&stored.job, &ids, pace).await;
            let stats = &mut stored.job.device_job_statistics;
            for (_, r) in &records {
                if r["status"] == "completed" {
                    stats.succeeded_count += 1;
                } else {
                    stats.failed_count += 1;
                }
            }
            let done = stats.succeeded_count + stats.failed_count;
            stats.device_count = stats.device_count.max(done);
            stats.pending_count = stats.device_count - done;
            stored.next = page.continuation.clone();
            let encoded: Vec<(String, Vec<u8>)> = records
                .into_iter()
                .map(|(k, v)| (k, v.to_string().into_bytes()))
                .collect();
            let more = stored.next.is_some();
            let save = stored.clone();
            // A cancel that came during the page keeps its status.
            let cancelled = self
                .blocking(move |j| {
                    j.store.exclusive(|| {
                        let current = j
                            .load(&save.job.job_id)
                            .map(|s| s.job.status)
                            .unwrap_or_default();
                        let mut save = save;
                        if current == "cancelled" {
                            save.job.status = current;
                            save.job.end_time = Some(iso_ms(now_ms()));
                        }
                        j.save(&save, &encoded)
                            .map(|_| save.job.status == "cancelled")
                    })
                })
                .await?;
            if cancelled {
                self.cancelled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                return Ok(());
            }
            if !more {
                return self.finish(stored, "completed", None).await;
            }
        }
    }

    /// Does the job on `ids` (twin updates one after another, method calls side by side),
    /// starting one device every `pace`; each device's record, keyed `device\0job`.
    async fn do_page(
        self: &Arc<Self>,
        job: &Job,
        ids: &[String],
        pace: Duration,
    ) -> Vec<(String, Value)> {
        let mut out = Vec::with_capacity(ids.len());
        let mut calls = tokio::task::JoinSet::new();
        for (i, device) in ids.iter().enumerate() {
            let op = self.clone().on_device(job.clone(), device.clone());
            if job.kind == "scheduleUpdateTwin" {
                out.push(op.await);
            } else {
                calls.spawn(op);
            }
            if i + 1 < ids.len() {
                tokio::time::sleep(pace).await;
            }
        }
        while let Some(r) = calls.join_next().await {
            if let Ok(r) = r {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The job's operation on one device, and the record of it.
    async fn on_device(self: Arc<Self>, job: Job, device: String) -> (String, Value) {
        let started = now_ms();
        let (status, outcome, error) = match job.kind.as_str() {
            "scheduleUpdateTwin" => {
                let body = job.update_twin.clone().unwrap_or(json!({})).to_string();
                let d = device.clone();
                match self
                    .blocking(move |j| j.twins.write(&d, body.as_bytes(), None, false))
                    .await
                {
                    Ok(_) => ("completed", None, None),
                    Err(e) => ("failed", None, Some(e.to_string())),
                }
            }
            _ => {
                let raw = job
                    .cloud_to_device_method
                    .clone()
                    .unwrap_or(Value::Null)
                    .to_string();
                match MethodCall::parse(raw.as_bytes()) {
                    Err(e) => ("failed", None, Some(e.to_string())),
                    Ok(call) => match self.methods.invoke(&device, None, call).await {
                        Ok(r) => (
                            "completed",
                            Some(
                                json!({"deviceMethodResponse": {"status": r.status, "payload": r.payload}}),
                            ),
                            None,
                        ),
                        Err(e) => ("failed", None, Some(method_error(&e))),
                    },
                }
            }
        };
        let mut record = json!({
            "deviceId": device,
            "jobId": job.job_id,
            "jobType": job.kind,
            "status": status,
            "startTimeUtc": iso_ms(started),
            "endTimeUtc": iso_ms(now_ms()),
            "createdDateTimeUtc": job.created_time,
            "lastUpdatedDateTimeUtc": iso_ms(now_ms()),
        });
        if let Some(o) = outcome {
            record["outcome"] = o;
        }
        if let Some(e) = error {
            record["error"] = json!({ "description": e });
        }
        (format!("{device}\0{}", job.job_id), record)
    }

    async fn finish(
        self: &Arc<Self>,
        mut stored: StoredJob,
        status: &str,
        why: Option<String>,
    ) -> Result<(), StoreError> {
        stored.job.status = status.to_string();
        stored.job.failure_reason = why;
        stored.job.end_time = Some(iso_ms(now_ms()));
        let status = status.to_string();
        // A cancel that came during the last page stands.
        if self.blocking(move |j| j.save_unless_ended(&stored)).await? {
            self.count(&status);
        }
        Ok(())
    }
}

fn method_error(e: &MethodFailure) -> String {
    match e {
        MethodFailure::NotOnline => format!("404103 DeviceNotOnline: {e}"),
        MethodFailure::Timeout => format!("504101 GatewayTimeout: {e}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_condition_selects_what_it_says() {
        assert_eq!(
            device_query("*").expect("all"),
            "SELECT deviceId FROM devices"
        );
        assert_eq!(
            device_query("tags.site = 'oslo'").expect("a clause"),
            "SELECT deviceId FROM devices WHERE tags.site = 'oslo'"
        );
        // Regression: a WHERE after a newline was not found, and the job ran on every device.
        assert_eq!(
            device_query("SELECT * FROM devices\nWHERE\ttags.env = 'test'").expect("a query"),
            "SELECT deviceId FROM devices WHERE tags.env = 'test'"
        );
        assert!(device_query("SELECT TOP 1 * FROM devices WHERE tags.a = 1").is_err());
        assert!(device_query("SELECT * FROM devices.modules").is_err());
        // Regression: slicing six bytes of a condition panicked inside a multi-byte character.
        // (Names are ASCII; other keys go in brackets.)
        assert!(device_query("tags.ö = 1").is_err());
        assert!(device_query("tags['ö'] = 1").is_ok());
    }
}
