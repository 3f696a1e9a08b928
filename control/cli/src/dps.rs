//! `roost dps …`: the provisioning service (docs/provisioning.md) through its service API,
//! with the `provisioningserviceowner` connection string in hub.json.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use hyper::Method;
use roost_common::hubfile;
use roost_common::service::ServiceClient;
use serde_json::{json, Value};

use crate::cli::path_id as id;

/// The DPS service API version the Node service client calls.
const API_VERSION: &str = "2021-10-01";

#[derive(Subcommand)]
pub enum DpsCmd {
    /// The service's host name, ID scope, ports and service connection string.
    Show {
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
    },
    /// Individual enrollments: one registration id each.
    Enrollment {
        #[command(subcommand)]
        action: EnrollmentCmd,
        #[arg(long, default_value = "./roost-data", global = true)]
        data_dir: PathBuf,
    },
    /// Enrollment groups: every device whose key the group's derives, or whose certificate its
    /// CA signed.
    Group {
        #[command(subcommand)]
        action: GroupCmd,
        #[arg(long, default_value = "./roost-data", global = true)]
        data_dir: PathBuf,
    },
    /// A device's registration state.
    Registration {
        #[command(subcommand)]
        action: RegistrationCmd,
        #[arg(long, default_value = "./roost-data", global = true)]
        data_dir: PathBuf,
    },
    /// The key a device of a symmetric-key group uses: HMAC-SHA256 of its registration id
    /// with the group's key.
    DeriveKey {
        group_id: String,
        registration_id: String,
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
    },
}

/// What an enrollment of either kind is made with.
#[derive(clap::Args)]
pub struct Settings {
    /// X.509 attestation: for an individual enrollment the device's certificate (PEM), for a
    /// group the signing (CA or intermediate) certificate. Without it, symmetric keys are
    /// generated.
    #[arg(long, value_name = "PEM", conflicts_with = "ca")]
    certificate: Option<PathBuf>,
    /// X.509 attestation by a CA registered and verified with the hub (`roost ca`).
    #[arg(long, value_name = "NAME")]
    ca: Option<String>,
    /// The initial twin: `{"tags": {…}, "properties": {"desired": {…}}}`.
    #[arg(long, value_name = "JSON")]
    twin: Option<String>,
    /// Create it disabled.
    #[arg(long)]
    disabled: bool,
    /// The allocation policy: hashed (default), static, geoLatency, or custom (the
    /// `on_provision` hook of routes.lua's provisioning plugin).
    #[arg(long, value_name = "POLICY")]
    allocation: Option<String>,
}

#[derive(Subcommand)]
pub enum EnrollmentCmd {
    /// Enroll one device; prints the enrollment (with its generated keys).
    Create {
        registration_id: String,
        /// The device id in the hub (default: the registration id).
        #[arg(long)]
        device_id: Option<String>,
        #[command(flatten)]
        settings: Settings,
    },
    List,
    Show { registration_id: String },
    Delete { registration_id: String },
}

#[derive(Subcommand)]
pub enum GroupCmd {
    /// Create a group; prints it (with its generated keys).
    Create {
        group_id: String,
        #[command(flatten)]
        settings: Settings,
    },
    List,
    Show { group_id: String },
    Delete { group_id: String },
}

#[derive(Subcommand)]
pub enum RegistrationCmd {
    Show { registration_id: String },
    Delete { registration_id: String },
}

fn client(data_dir: &Path) -> anyhow::Result<ServiceClient> {
    let hub = hubfile::read(data_dir)?;
    let Some(dps) = hub.dps.clone() else {
        bail!("this hub serves no provisioning service (start control with --dps-https)");
    };
    let Some(url) = dps.url.clone() else {
        bail!("the provisioning service has no HTTPS listener (--dps-https)");
    };
    Ok(ServiceClient::of(hub, &url, &dps.service_connection_string, API_VERSION)?)
}

fn call(data_dir: &Path, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let mut svc = client(data_dir)?;
    let body = body.map(|b| serde_json::to_vec(&b)).transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let resp = svc.call(method, path, body, &[]).await?;
        if !(200..300).contains(&resp.status) {
            bail!("the provisioning service refused it ({}): {}", resp.status, resp.text());
        }
        match resp.body.is_empty() {
            true => Ok(Value::Null),
            false => Ok(serde_json::from_slice(&resp.body)?),
        }
    })
}

fn attestation(settings: &Settings, individual: bool) -> anyhow::Result<Value> {
    Ok(match (&settings.certificate, &settings.ca) {
        (Some(path), _) => {
            let pem = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let section = if individual { "clientCertificates" } else { "signingCertificates" };
            json!({ "type": "x509", "x509": { section: { "primary": { "certificate": pem } } } })
        }
        (None, Some(ca)) => json!({ "type": "x509", "x509": { "caReferences": { "primary": ca } } }),
        (None, None) => json!({ "type": "symmetricKey" }),
    })
}

fn enrollment_body(settings: &Settings, individual: bool) -> anyhow::Result<Value> {
    let mut body = json!({
        "attestation": attestation(settings, individual)?,
        "provisioningStatus": if settings.disabled { "disabled" } else { "enabled" },
    });
    if let Some(t) = &settings.twin {
        body["initialTwin"] = serde_json::from_str(t).context("--twin is not JSON")?;
    }
    if let Some(a) = &settings.allocation {
        body["allocationPolicy"] = json!(a);
    }
    Ok(body)
}

fn print(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn query(data_dir: &Path, path: &str) -> anyhow::Result<Value> {
    call(data_dir, Method::POST, path, Some(json!({ "query": "*" })))
}

pub fn run(cmd: DpsCmd) -> anyhow::Result<()> {
    match cmd {
        DpsCmd::Show { data_dir } => {
            let hub = hubfile::read(&data_dir)?;
            let Some(d) = hub.dps else {
                bail!("this hub serves no provisioning service (start control with --dps-https or --dps-mqtt)");
            };
            println!("host name: {}", d.hostname);
            println!("ID scope: {}", d.id_scope);
            println!("HTTPS: {}", d.url.as_deref().unwrap_or("(not served)"));
            println!("service connection string: {}", d.service_connection_string);
        }
        DpsCmd::Enrollment { action, data_dir } => match action {
            EnrollmentCmd::Create { registration_id, device_id, settings } => {
                let mut body = enrollment_body(&settings, true)?;
                body["registrationId"] = json!(registration_id);
                if let Some(d) = device_id {
                    body["deviceId"] = json!(d);
                }
                print(&call(&data_dir, Method::PUT, &format!("/enrollments/{}", id(&registration_id)), Some(body))?)?;
            }
            EnrollmentCmd::List => print(&query(&data_dir, "/enrollments/query")?)?,
            EnrollmentCmd::Show { registration_id } => {
                print(&call(&data_dir, Method::GET, &format!("/enrollments/{}", id(&registration_id)), None)?)?
            }
            EnrollmentCmd::Delete { registration_id } => {
                call(&data_dir, Method::DELETE, &format!("/enrollments/{}", id(&registration_id)), None)?;
                println!("deleted {registration_id}");
            }
        },
        DpsCmd::Group { action, data_dir } => match action {
            GroupCmd::Create { group_id, settings } => {
                let mut body = enrollment_body(&settings, false)?;
                body["enrollmentGroupId"] = json!(group_id);
                print(&call(&data_dir, Method::PUT, &format!("/enrollmentGroups/{}", id(&group_id)), Some(body))?)?;
            }
            GroupCmd::List => print(&query(&data_dir, "/enrollmentGroups/query")?)?,
            GroupCmd::Show { group_id } => {
                print(&call(&data_dir, Method::GET, &format!("/enrollmentGroups/{}", id(&group_id)), None)?)?
            }
            GroupCmd::Delete { group_id } => {
                call(&data_dir, Method::DELETE, &format!("/enrollmentGroups/{}", id(&group_id)), None)?;
                println!("deleted {group_id}");
            }
        },
        DpsCmd::Registration { action, data_dir } => match action {
            RegistrationCmd::Show { registration_id } => {
                print(&call(&data_dir, Method::GET, &format!("/registrations/{}", id(&registration_id)), None)?)?
            }
            RegistrationCmd::Delete { registration_id } => {
                call(&data_dir, Method::DELETE, &format!("/registrations/{}", id(&registration_id)), None)?;
                println!("deleted {registration_id}");
            }
        },
        DpsCmd::DeriveKey { group_id, registration_id, data_dir } => {
            let g = call(&data_dir, Method::POST, &format!("/enrollmentGroups/{}/attestationmechanism", id(&group_id)), None)?;
            let Some(key) = g["symmetricKey"]["primaryKey"].as_str() else {
                bail!("group {group_id} has no symmetric key");
            };
            println!("{}", roost_control::dps::enrollments::derive_key(key, &registration_id)?);
        }
    }
    Ok(())
}
