//! The `roost` command line (DESIGN.md §9).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper::Method;
use serde_json::{json, Value};

use crate::client;
use crate::hubfile::{self, HubInfo};

#[derive(Parser)]
#[command(
    name = "roost",
    version,
    about = "roost: a self-hosted IoT hub that speaks Azure IoT Hub's protocols"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run control and engine on this host, generating certificates on first start.
    Up(UpArgs),
    /// Run the data plane alone.
    Engine(EngineArgs),
    /// Run the control plane alone.
    Control(ControlArgs),
    /// Manage device identities through the service API.
    Device {
        #[command(subcommand)]
        action: DeviceCmd,
        #[arg(long, default_value = "./roost-data", global = true)]
        data_dir: PathBuf,
    },
    /// Read the built-in `events` endpoint.
    Events {
        #[command(subcommand)]
        action: EventsCmd,
        #[arg(long, default_value = "./roost-data", global = true)]
        data_dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DurabilityArg {
    /// fsync the log before acknowledging (survives power loss).
    Synced,
    /// write the log before acknowledging (survives a crash of roost, not of the machine).
    Written,
}

#[derive(Args, Clone)]
pub struct UpArgs {
    #[arg(long, default_value = "./roost-data")]
    pub data_dir: PathBuf,
    /// The host name devices connect to; it goes into certificates and connection strings.
    #[arg(long, default_value = "localhost")]
    pub hostname: String,
    #[arg(long, default_value = "0.0.0.0:8883")]
    pub mqtt: SocketAddr,
    /// Also serve plain (unencrypted) MQTT here — for benchmarks only.
    #[arg(long)]
    pub plain_mqtt: Option<SocketAddr>,
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub service: SocketAddr,
    /// Engine ops port: /metrics, /healthz, events consumer API.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub ops: SocketAddr,
    /// Control ops port: /metrics, /healthz.
    #[arg(long, default_value = "127.0.0.1:9465")]
    pub control_ops: SocketAddr,
    /// QUIC control link between the two processes.
    #[arg(long, default_value = "127.0.0.1:8472")]
    pub link: SocketAddr,
    /// Engine shards (default: one per core).
    #[arg(long)]
    pub cores: Option<usize>,
    #[arg(long, value_enum, default_value = "synced")]
    pub durability: DurabilityArg,
    /// Group commit: shortest time in microseconds between two syncs of a log partition (a
    /// batch of 64 KiB or more is synced at once). 0 syncs as soon as the last sync ended.
    #[arg(long, default_value_t = 2000)]
    pub commit_window_us: u64,
}

#[derive(Args, Clone)]
pub struct EngineArgs {
    #[arg(long, default_value = "./roost-data")]
    pub data_dir: PathBuf,
    /// Defaults to the hostname in hub.json, else localhost.
    #[arg(long)]
    pub hostname: Option<String>,
    #[arg(long, default_value = "127.0.0.1:8472")]
    pub control: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:8883")]
    pub mqtt: SocketAddr,
    #[arg(long)]
    pub plain_mqtt: Option<SocketAddr>,
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub ops: SocketAddr,
    #[arg(long)]
    pub cores: Option<usize>,
    #[arg(long, default_value = "engine-1")]
    pub node: String,
    #[arg(long, value_enum, default_value = "synced")]
    pub durability: DurabilityArg,
    /// Group commit: shortest time in microseconds between two syncs of a log partition (a
    /// batch of 64 KiB or more is synced at once). 0 syncs as soon as the last sync ended.
    #[arg(long, default_value_t = 2000)]
    pub commit_window_us: u64,
}

#[derive(Args, Clone)]
pub struct ControlArgs {
    #[arg(long, default_value = "./roost-data")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "localhost")]
    pub hostname: String,
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub service: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9465")]
    pub ops: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8472")]
    pub link: SocketAddr,
}

#[derive(Subcommand)]
pub enum DeviceCmd {
    /// Register a device (SAS keys generated) and print its connection string.
    Create {
        id: String,
        /// Register it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List devices as JSON.
    List,
    /// Show one device as JSON.
    Show { id: String },
    /// Delete a device.
    Delete { id: String },
    /// Print a device's primary and secondary keys.
    Keys { id: String },
}

#[derive(Subcommand)]
pub enum EventsCmd {
    /// Print messages from the `events` log.
    Tail {
        /// Read as this consumer group, continuing from its checkpoint and advancing it.
        #[arg(long)]
        group: Option<String>,
        #[arg(long, value_enum, default_value = "earliest")]
        from: From,
        /// Stop after this many messages.
        #[arg(long)]
        max: Option<usize>,
        /// One JSON record per line.
        #[arg(long)]
        json: bool,
        /// Keep waiting for new messages (until Ctrl-C or --max).
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum From {
    Earliest,
    Latest,
}

impl From {
    fn as_str(self) -> &'static str {
        match self {
            From::Earliest => "earliest",
            From::Latest => "latest",
        }
    }
}

fn durability(d: DurabilityArg) -> roost_server::Durability {
    match d {
        DurabilityArg::Synced => roost_server::Durability::Synced,
        DurabilityArg::Written => roost_server::Durability::Written,
    }
}

fn cores(c: Option<usize>) -> usize {
    c.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
    .max(1)
}

/// A loopback URL for a listen address (0.0.0.0 is reachable as 127.0.0.1).
fn local_url(scheme: &str, addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    format!("{scheme}://{ip}:{}", addr.port())
}

pub fn run_engine(args: EngineArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let hostname = args
        .hostname
        .clone()
        .or_else(|| hubfile::read(&data_dir).ok().map(|h| h.hostname))
        .unwrap_or_else(|| "localhost".into());
    let config = roost_server::EngineConfig {
        data_dir: data_dir.clone(),
        hostname,
        control: args.control,
        mqtt: Some(args.mqtt),
        plain_mqtt: args.plain_mqtt,
        ops: args.ops,
        cores: cores(args.cores),
        node: args.node.clone(),
        durability: durability(args.durability),
        commit_window: std::time::Duration::from_micros(args.commit_window_us),
    };
    let mut ports = json!({ "mqtt": args.mqtt.port(), "ops": args.ops.port() });
    if let Some(p) = args.plain_mqtt {
        ports["plain_mqtt"] = json!(p.port());
    }
    let patch = json!({ "ports": ports, "ops_url": local_url("http", args.ops) });
    roost_server::run(config, move || {
        if let Err(e) = hubfile::merge(&data_dir, patch) {
            tracing::warn!(error = %e, "could not update hub.json");
        }
    })
}

pub fn run_control(args: ControlArgs) -> anyhow::Result<()> {
    crate::run(
        crate::ControlConfig {
            data_dir: args.data_dir,
            hostname: args.hostname,
            service: args.service,
            ops: args.ops,
            link: args.link,
        },
        || {},
    )
}

/// `roost up`: control and engine as two child processes of this binary.
pub fn run_up(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let exe = std::env::current_exe().context("cannot find the roost binary")?;
    let d = data_dir.to_string_lossy().to_string();
    let mut control = Command::new(&exe)
        .args(["control", "--data-dir", &d, "--hostname", &args.hostname])
        .args([
            "--service",
            &args.service.to_string(),
            "--ops",
            &args.control_ops.to_string(),
        ])
        .args(["--link", &args.link.to_string()])
        .spawn()
        .context("starting control")?;
    let mut children = Children(vec![]);
    if let Err(e) = wait_healthy(&mut control, args.control_ops, "control") {
        children.0.push(control);
        return Err(e);
    }
    children.0.push(control);
    let mut engine_cmd = Command::new(&exe);
    engine_cmd
        .args(["engine", "--data-dir", &d, "--hostname", &args.hostname])
        .args([
            "--control",
            &args.link.to_string(),
            "--mqtt",
            &args.mqtt.to_string(),
            "--ops",
            &args.ops.to_string(),
        ])
        .args(["--cores", &cores(args.cores).to_string()])
        .args([
            "--durability",
            match args.durability {
                DurabilityArg::Synced => "synced",
                DurabilityArg::Written => "written",
            },
        ])
        .args(["--commit-window-us", &args.commit_window_us.to_string()]);
    if let Some(p) = args.plain_mqtt {
        engine_cmd.args(["--plain-mqtt", &p.to_string()]);
    }
    let mut engine = engine_cmd.spawn().context("starting engine")?;
    let healthy = wait_healthy(&mut engine, args.ops, "engine");
    children.0.push(engine);
    healthy?;

    let hub = hubfile::read(&data_dir)?;
    println!("roost is up.");
    println!("  hub host name      {}", hub.hostname);
    println!(
        "  MQTT over TLS      {} (device SDKs: port 8883 is their fixed default)",
        args.mqtt
    );
    if let Some(p) = args.plain_mqtt {
        println!("  plain MQTT         {p} (benchmarks only)");
    }
    println!("  service API        {}", hub.service_url);
    println!(
        "  engine ops         {}/metrics, /healthz, /events",
        local_url("http", args.ops)
    );
    println!(
        "  control ops        {}/metrics",
        local_url("http", args.control_ops)
    );
    println!("  CA certificate     {}", hub.ca.display());
    println!("  service connection string (iothubowner):");
    println!("    {}", hub.service_connection_string);
    println!(
        "  all of this is in  {}",
        hubfile::path(&data_dir).display()
    );
    println!();
    println!("Next: roost device create my-device --data-dir {d}");
    println!("      roost events tail --follow --data-dir {d}");
    println!("Ctrl-C stops the hub.");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let exited = runtime.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let signal = roost_server::wait_for_shutdown_signal();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                _ = &mut signal => return None,
                _ = tick.tick() => {
                    for c in children.0.iter_mut() {
                        if let Ok(Some(status)) = c.try_wait() {
                            return Some(status);
                        }
                    }
                }
            }
        }
    });
    children.stop();
    match exited {
        None => Ok(()),
        Some(status) => bail!("a hub process exited unexpectedly ({status}); stopped the other"),
    }
}

/// Child processes stopped with SIGTERM (then SIGKILL after a grace period) when dropped.
struct Children(Vec<Child>);

impl Children {
    fn stop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        // Engine first (it reports to control), then control.
        for c in self.0.iter_mut().rev() {
            if let Ok(None) = c.try_wait() {
                let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(10);
                while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.0.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_healthy(child: &mut Child, ops: SocketAddr, what: &str) -> anyhow::Result<()> {
    let url = format!("{}/healthz", local_url("http", ops));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited during start-up ({status})");
        }
        let ok = runtime.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(2),
                client::request(Method::GET, &url, &[], None, None),
            )
            .await
        });
        if matches!(ok, Ok(Ok(ref r)) if r.status == 200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} did not become healthy at {url} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A service-API client configured from hub.json.
struct Service {
    hub: HubInfo,
    tls: Arc<rustls::ClientConfig>,
    key_name: String,
    key: Vec<u8>,
}

impl Service {
    fn new(data_dir: &Path) -> anyhow::Result<Self> {
        let hub = hubfile::read(data_dir)?;
        let cs =
            roost_iothub::connstr::ServiceConnectionString::parse(&hub.service_connection_string)
                .map_err(|e| anyhow::anyhow!("service connection string in hub.json: {e}"))?;
        let key = roost_iothub::sas::decode_key(&cs.key)
            .map_err(|e| anyhow::anyhow!("service key: {e}"))?;
        let tls = roost_server::tls::ca_client_config(&roost_server::tls::CertPaths {
            dir: hub.ca.parent().map(Path::to_path_buf).unwrap_or_default(),
        })?;
        Ok(Self {
            hub,
            tls,
            key_name: cs.key_name,
            key,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<client::Response> {
        let expiry = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
        let resource = roost_iothub::sas::encode_resource(&self.hub.hostname);
        let token = roost_iothub::sas::sign(&resource, &self.key, expiry, Some(&self.key_name));
        let url = format!(
            "{}{}{}api-version=2021-04-12",
            self.hub.service_url,
            path,
            if path.contains('?') { "&" } else { "?" }
        );
        let mut headers = vec![
            ("authorization", token),
            ("accept", "application/json".to_string()),
        ];
        let body = match body {
            Some(b) => {
                headers.push(("content-type", "application/json; charset=utf-8".into()));
                Some(serde_json::to_vec(&b)?)
            }
            None => None,
        };
        let server_name = self.hub.hostname.clone();
        client::request(
            method,
            &url,
            &headers,
            body,
            Some((self.tls.clone(), server_name)),
        )
        .await
    }
}

fn check(resp: &client::Response) -> anyhow::Result<()> {
    if resp.status >= 300 {
        let detail = serde_json::from_slice::<Value>(&resp.body)
            .ok()
            .and_then(|v| v.get("Message").and_then(Value::as_str).map(str::to_string))
            .and_then(|m| serde_json::from_str::<Value>(&m).ok())
            .and_then(|m| m.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| resp.text());
        bail!("the hub answered {}: {}", resp.status, detail);
    }
    Ok(())
}

fn path_id(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

pub fn run_device(action: DeviceCmd, data_dir: &Path) -> anyhow::Result<()> {
    let svc = Service::new(data_dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match action {
            DeviceCmd::Create { id, disabled } => {
                roost_model::DeviceId::parse(&id)
                    .map_err(|e| anyhow::anyhow!("invalid device id {id:?}: {e}"))?;
                let body = json!({
                    "deviceId": id,
                    "status": if disabled { "disabled" } else { "enabled" },
                    "authentication": { "type": "sas", "symmetricKey": {} },
                    "capabilities": { "iotEdge": false },
                });
                let resp = svc
                    .call(
                        Method::PUT,
                        &format!("/devices/{}", path_id(&id)),
                        Some(body),
                    )
                    .await?;
                check(&resp)?;
                let device: Value = serde_json::from_slice(&resp.body)?;
                let key = device["authentication"]["symmetricKey"]["primaryKey"]
                    .as_str()
                    .context("the hub returned no key")?;
                println!(
                    "HostName={};DeviceId={};SharedAccessKey={}",
                    svc.hub.hostname, id, key
                );
            }
            DeviceCmd::List => {
                let resp = svc.call(Method::GET, "/devices?top=1000", None).await?;
                check(&resp)?;
                let v: Value = serde_json::from_slice(&resp.body)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            DeviceCmd::Show { id } => {
                let resp = svc
                    .call(Method::GET, &format!("/devices/{}", path_id(&id)), None)
                    .await?;
                check(&resp)?;
                let v: Value = serde_json::from_slice(&resp.body)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            DeviceCmd::Delete { id } => {
                let headers_path = format!("/devices/{}", path_id(&id));
                let resp = svc.call(Method::DELETE, &headers_path, None).await?;
                check(&resp)?;
                println!("deleted {id}");
            }
            DeviceCmd::Keys { id } => {
                let resp = svc
                    .call(Method::GET, &format!("/devices/{}", path_id(&id)), None)
                    .await?;
                check(&resp)?;
                let v: Value = serde_json::from_slice(&resp.body)?;
                let k = &v["authentication"]["symmetricKey"];
                println!("primary   {}", k["primaryKey"].as_str().unwrap_or(""));
                println!("secondary {}", k["secondaryKey"].as_str().unwrap_or(""));
            }
        }
        anyhow::Ok(())
    })
}

pub fn run_events(action: EventsCmd, data_dir: &Path) -> anyhow::Result<()> {
    let EventsCmd::Tail {
        group,
        from,
        max,
        json,
        follow,
    } = action;
    let hub = hubfile::read(data_dir)?;
    let ops = hub
        .ops_url
        .clone()
        .context("hub.json has no ops_url: is the engine running?")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut printed = 0usize;
        // Without a group, positions live in this process only.
        let mut positions: Vec<(usize, u64)> = Vec::new();
        if group.is_none() {
            let resp = client::request(
                Method::GET,
                &format!("{ops}/events/partitions"),
                &[],
                None,
                None,
            )
            .await?;
            check(&resp)?;
            let v: Value = serde_json::from_slice(&resp.body)?;
            for p in v["partitions"].as_array().cloned().unwrap_or_default() {
                let k = p["partition"].as_u64().unwrap_or(0) as usize;
                let start = if from == From::Latest {
                    p["next"].as_u64()
                } else {
                    p["first"].as_u64()
                };
                positions.push((k, start.unwrap_or(0)));
            }
        }
        loop {
            let budget = max.map(|m| m - printed).unwrap_or(1000).min(1000);
            let mut records = Vec::new();
            match &group {
                Some(g) => {
                    let url = format!(
                        "{ops}/events/groups/{}/records?max={budget}&from={}",
                        path_id(g),
                        from.as_str()
                    );
                    let resp = client::request(Method::GET, &url, &[], None, None).await?;
                    check(&resp)?;
                    let v: Value = serde_json::from_slice(&resp.body)?;
                    records = v["records"].as_array().cloned().unwrap_or_default();
                    // Checkpoint only what is printed.
                    let mut done = serde_json::Map::new();
                    for r in &records {
                        let p = r["partition"].as_u64().unwrap_or(0).to_string();
                        done.insert(p, json!(r["offset"].as_u64().unwrap_or(0) + 1));
                    }
                    print_records(&records, json);
                    if !done.is_empty() {
                        let url = format!("{ops}/events/groups/{}/checkpoint", path_id(g));
                        let body = serde_json::to_vec(&Value::Object(done))?;
                        check(&client::request(Method::POST, &url, &[], Some(body), None).await?)?;
                    }
                }
                None => {
                    let mut left = budget;
                    for (k, next) in positions.iter_mut() {
                        if left == 0 {
                            break;
                        }
                        let url =
                            format!("{ops}/events/partitions/{k}/records?from={next}&max={left}");
                        let resp = client::request(Method::GET, &url, &[], None, None).await?;
                        check(&resp)?;
                        let v: Value = serde_json::from_slice(&resp.body)?;
                        let mut got = v["records"].as_array().cloned().unwrap_or_default();
                        *next = v["next"].as_u64().unwrap_or(*next);
                        left -= got.len().min(left);
                        records.append(&mut got);
                    }
                    print_records(&records, json);
                }
            }
            printed += records.len();
            if max.is_some_and(|m| printed >= m) || (!follow && records.is_empty()) {
                return anyhow::Ok(());
            }
            if records.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    _ = roost_server::wait_for_shutdown_signal() => return Ok(()),
                }
            }
        }
    })
}

fn print_records(records: &[Value], as_json: bool) {
    for r in records {
        if as_json {
            println!("{r}");
            continue;
        }
        let sys = &r["systemProperties"];
        println!(
            "[{}/{}] {} {} props={} body={}",
            r["partition"],
            r["offset"],
            r["enqueuedTime"].as_str().unwrap_or(""),
            sys["iothub-connection-device-id"].as_str().unwrap_or("?"),
            r["properties"],
            r["body"].as_str().unwrap_or(""),
        );
    }
}
