//! `roost module`, `roost query` and `roost job`: fleet management through the service API,
//! printed as JSON or as a table (`-o`).

use std::path::Path;

use anyhow::Context;
use clap::Subcommand;
use hyper::Method;
use roost_common::hubfile;
use roost_common::service::ServiceClient;
use serde_json::{json, Value};

use crate::cli::{check, path_id};
use crate::output::{self, Output};

#[derive(Subcommand)]
pub enum ModuleCmd {
    /// Register module MODULE of device DEVICE (SAS keys generated) and print its connection
    /// string.
    ///
    /// Example: roost module create my-device sensor
    Create { device: String, module: String },
    /// List a device's modules.
    List { device: String },
    /// Show one module.
    Show { device: String, module: String },
    /// Delete a module (its twin goes with it).
    Delete { device: String, module: String },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn call(
    svc: &mut ServiceClient,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, String)],
) -> anyhow::Result<roost_common::client::Response> {
    let body = body.map(|b| serde_json::to_vec(&b)).transpose()?;
    let resp = svc.call(method, path, body, headers).await?;
    check(&resp)?;
    Ok(resp)
}

fn body(resp: &roost_common::client::Response) -> anyhow::Result<Value> {
    if resp.body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&resp.body).context("the hub's answer is not JSON")
}

pub fn run_module(action: ModuleCmd, data_dir: &Path, out: Output) -> anyhow::Result<()> {
    let mut svc = ServiceClient::new(hubfile::read(data_dir)?)?;
    runtime()?.block_on(async {
        match action {
            ModuleCmd::Create { device, module } => {
                roost_model::DeviceId::parse(&module)
                    .map_err(|e| anyhow::anyhow!("invalid module id {module:?}: {e}"))?;
                let path = format!("/devices/{}/modules/{}", path_id(&device), path_id(&module));
                let req = json!({
                    "deviceId": device,
                    "moduleId": module,
                    "authentication": { "type": "sas", "symmetricKey": {} },
                });
                let m = body(&call(&mut svc, Method::PUT, &path, Some(req), &[]).await?)?;
                let key = m["authentication"]["symmetricKey"]["primaryKey"]
                    .as_str()
                    .context("the hub returned no key")?;
                println!(
                    "HostName={};DeviceId={};ModuleId={};SharedAccessKey={}",
                    svc.hub.hostname, device, module, key
                );
            }
            ModuleCmd::List { device } => {
                let path = format!("/devices/{}/modules", path_id(&device));
                output::print(
                    &body(&call(&mut svc, Method::GET, &path, None, &[]).await?)?,
                    out,
                );
            }
            ModuleCmd::Show { device, module } => {
                let path = format!("/devices/{}/modules/{}", path_id(&device), path_id(&module));
                output::print(
                    &body(&call(&mut svc, Method::GET, &path, None, &[]).await?)?,
                    out,
                );
            }
            ModuleCmd::Delete { device, module } => {
                let path = format!("/devices/{}/modules/{}", path_id(&device), path_id(&module));
                call(
                    &mut svc,
                    Method::DELETE,
                    &path,
                    None,
                    &[("if-match", "\"*\"".into())],
                )
                .await?;
                println!("deleted {device}/{module}");
            }
        }
        anyhow::Ok(())
    })
}

/// `roost query`: every page of the result, up to `max` items.
pub fn run_query(
    text: &str,
    max: Option<usize>,
    data_dir: &Path,
    out: Output,
) -> anyhow::Result<()> {
    let mut svc = ServiceClient::new(hubfile::read(data_dir)?)?;
    runtime()?.block_on(async {
        let mut items: Vec<Value> = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let left = max.map_or(1000, |m| m.saturating_sub(items.len()).min(1000));
            if left == 0 {
                break;
            }
            let mut headers = vec![("x-ms-max-item-count", left.to_string())];
            if let Some(c) = &continuation {
                headers.push(("x-ms-continuation", c.clone()));
            }
            let resp = call(
                &mut svc,
                Method::POST,
                "/devices/query",
                Some(json!({ "query": text })),
                &headers,
            )
            .await?;
            continuation = resp
                .headers
                .get("x-ms-continuation")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            match body(&resp)? {
                Value::Array(page) => items.extend(page),
                other => anyhow::bail!("the hub answered a query with {other}"),
            }
            if continuation.is_none() {
                break;
            }
        }
        output::print(&Value::Array(items), out);
        anyhow::Ok(())
    })
}

#[derive(Subcommand)]
pub enum JobCmd {
    /// Schedule a twin update (--twin) or a direct method (--method) on every device the
    /// condition selects.
    ///
    /// Example: roost job create fw-2 --condition "tags.site = 'oslo'" --twin '{"properties":{"desired":{"fw":"2.0"}}}'
    ///
    /// Example: roost job create reboot-all --condition "*" --method reboot --payload '{"delay":5}'
    Create {
        id: String,
        /// The devices: a WHERE clause over twins (`*`: every device).
        #[arg(long, default_value = "*")]
        condition: String,
        /// The twin patch to apply, as JSON (`{"tags":{..},"properties":{"desired":{..}}}`).
        #[arg(long, conflicts_with = "method")]
        twin: Option<String>,
        /// The method to call.
        #[arg(long)]
        method: Option<String>,
        /// The method's payload, as JSON.
        #[arg(long, requires = "method")]
        payload: Option<String>,
        /// Seconds each device has to answer the method (5 to 300).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Start this many seconds from now (default: at once).
        #[arg(long)]
        start_in: Option<u64>,
        /// The longest the job may run, in seconds.
        #[arg(long, default_value_t = 3600)]
        max_time: u64,
    },
    /// Show a job: status and device statistics.
    Show { id: String },
    /// List jobs, newest first.
    List {
        /// scheduleUpdateTwin or scheduleDeviceMethod.
        #[arg(long = "type")]
        kind: Option<String>,
        /// queued, scheduled, running, completed, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
    },
    /// Cancel a job that has not finished.
    Cancel { id: String },
}

pub fn run_job(action: JobCmd, data_dir: &Path, out: Output) -> anyhow::Result<()> {
    let mut svc = ServiceClient::new(hubfile::read(data_dir)?)?;
    runtime()?.block_on(async {
        let job = match action {
            JobCmd::Create {
                id,
                condition,
                twin,
                method,
                payload,
                timeout,
                start_in,
                max_time,
            } => {
                let mut req = json!({
                    "jobId": id,
                    "queryCondition": condition,
                    "maxExecutionTimeInSeconds": max_time,
                });
                match (twin, method) {
                    (Some(t), None) => {
                        req["type"] = json!("scheduleUpdateTwin");
                        req["updateTwin"] =
                            serde_json::from_str(&t).context("--twin is not valid JSON")?;
                    }
                    (None, Some(m)) => {
                        let payload: Value = match payload {
                            Some(p) => {
                                serde_json::from_str(&p).context("--payload is not valid JSON")?
                            }
                            None => Value::Null,
                        };
                        req["type"] = json!("scheduleDeviceMethod");
                        req["cloudToDeviceMethod"] = json!({
                            "methodName": m,
                            "payload": payload,
                            "responseTimeoutInSeconds": timeout,
                        });
                    }
                    _ => anyhow::bail!("give --twin or --method"),
                }
                if let Some(secs) = start_in {
                    let at = std::time::SystemTime::now() + std::time::Duration::from_secs(secs);
                    req["startTime"] = json!(humantime::format_rfc3339_millis(at).to_string());
                }
                let path = format!("/jobs/v2/{}", path_id(&id));
                call(&mut svc, Method::PUT, &path, Some(req), &[]).await?
            }
            JobCmd::Show { id } => {
                call(
                    &mut svc,
                    Method::GET,
                    &format!("/jobs/v2/{}", path_id(&id)),
                    None,
                    &[],
                )
                .await?
            }
            JobCmd::List { kind, status } => {
                let mut path = "/jobs/v2/query?".to_string();
                if let Some(k) = kind {
                    path.push_str(&format!("jobType={}&", path_id(&k)));
                }
                if let Some(s) = status {
                    path.push_str(&format!("jobStatus={}&", path_id(&s)));
                }
                call(
                    &mut svc,
                    Method::GET,
                    path.trim_end_matches(['&', '?']),
                    None,
                    &[],
                )
                .await?
            }
            JobCmd::Cancel { id } => {
                let path = format!("/jobs/v2/{}/cancel", path_id(&id));
                call(&mut svc, Method::POST, &path, None, &[]).await?
            }
        };
        output::print(&body(&job)?, out);
        anyhow::Ok(())
    })
}
