//! The `roost` command line (DESIGN.md §9).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper::Method;
use roost_common::client::{self, request_once};
use roost_common::hubfile;
use roost_common::service::ServiceClient;
use roost_common::shutdown::wait_for_shutdown_signal;
use roost_server::{ListenerSpec, PreAuthLimits, Protocol};

use crate::output::Output;
use serde_json::{json, Value};

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
        #[arg(short = 'o', long, value_enum, default_value = "json", global = true)]
        output: crate::output::Output,
    },
    /// Read and write device twins through the service API.
    ///
    /// Example: roost twin patch my-device '{"properties":{"desired":{"rate":5}}}'
    Twin {
        #[command(subcommand)]
        action: TwinCmd,
        #[arg(long, default_value = "./roost-data", global = true)]
        data_dir: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value = "json", global = true)]
        output: crate::output::Output,
    },
    /// Call a direct method on a device and print its answer.
    ///
    /// Example: roost method invoke my-device reboot '{"delay":5}' --timeout 30
    Method {
        #[command(subcommand)]
        action: MethodCmd,
        #[arg(long, default_value = "./roost-data", global = true)]
        data_dir: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value = "json", global = true)]
        output: crate::output::Output,
    },
    /// Send cloud-to-device messages and read their feedback.
    ///
    /// Example: roost c2d send my-device 'hello' --prop colour=blue --ack full
    C2d {
        #[command(subcommand)]
        action: C2dCmd,
        #[arg(long, default_value = "./roost-data", global = true)]
        data_dir: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value = "json", global = true)]
        output: crate::output::Output,
    },
    /// Manage module identities through the service API.
    ///
    /// Example: roost module create my-device sensor; roost module list my-device -o table
    Module {
        #[command(subcommand)]
        action: crate::manage::ModuleCmd,
        #[arg(long, default_value = "./roost-data", global = true)]
        data_dir: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value = "json", global = true)]
        output: crate::output::Output,
    },
    /// Check, apply and test the hub's routing (routes.lua and its plugins; docs/routing.md).
    ///
    /// Example: roost routes check routes.lua; roost routes apply routes.lua
    Routes {
        #[command(subcommand)]
        action: crate::routes::RoutesCmd,
    },
    /// Create, list and delete the Event Hubs consumer groups (docs/eventhubs.md).
    ///
    /// Example: roost consumer-group create analytics
    ConsumerGroup {
        #[command(subcommand)]
        action: crate::groups::GroupCmd,
    },
    /// Make, register and verify the CAs that sign device certificates (docs/x509.md).
    ///
    /// Example: roost ca init; roost device create dev-1 --x509 --ca fleet
    Ca {
        #[command(subcommand)]
        action: crate::cas::CaCmd,
    },
    /// The provisioning service: enrollments, groups, registrations (docs/provisioning.md).
    ///
    /// Example: roost dps group create fleet --twin '{"tags":{"site":"lab"}}'; roost dps derive-key fleet sensor-1
    Dps {
        #[command(subcommand)]
        action: crate::dps::DpsCmd,
    },
    /// Run an IoT Hub query over device twins, module twins or device jobs; prints every page.
    ///
    /// Example: roost query "SELECT deviceId, tags.site FROM devices WHERE properties.reported.battery < 20" -o table
    Query {
        /// The query: SELECT … FROM devices | devices.modules | devices.jobs [WHERE …] [GROUP BY …].
        query: String,
        /// Stop after this many items.
        #[arg(long)]
        max: Option<usize>,
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value = "json")]
        output: crate::output::Output,
    },
    /// Schedule twin updates and direct methods over many devices, and follow them.
    Job {
        #[command(subcommand)]
        action: crate::manage::JobCmd,
        #[arg(long, default_value = "./roost-data", global = true)]
        data_dir: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value = "json", global = true)]
        output: crate::output::Output,
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

/// Where the engine listens for devices: the one place a protocol or port is added.
#[derive(Args, Clone)]
pub struct ListenArgs {
    /// A device listener, PROTOCOL[+tls]=ADDRESS; repeat for more. Without any (and without
    /// --mqtt) the engine listens on mqtt+tls=0.0.0.0:8883, IoT Hub's MQTT port, and with no
    /// listener option at all also on https+tls=0.0.0.0:443 (binding 443 needs root or
    /// CAP_NET_BIND_SERVICE; give --https ADDR for another port).
    #[arg(long = "listen", value_name = "SPEC")]
    pub listen: Vec<ListenerSpec>,
    /// Shorthand for --listen mqtt+tls=ADDR.
    #[arg(long, value_name = "ADDR")]
    pub mqtt: Option<SocketAddr>,
    /// Shorthand for --listen mqtt=ADDR: plain (unencrypted) MQTT, for benchmarks only.
    #[arg(long, value_name = "ADDR")]
    pub plain_mqtt: Option<SocketAddr>,
    /// Shorthand for --listen https+tls=ADDR: IoT Hub's port 443 (MQTT and AMQP over
    /// WebSockets, the HTTPS device API).
    #[arg(long, value_name = "ADDR")]
    pub https: Option<SocketAddr>,
}

/// What the events log keeps (docs/operations.md).
#[derive(Args, Clone)]
pub struct RetentionArgs {
    /// How long the events log keeps a message (IoT Hub: 1 to 7 days), e.g. 1d, 36h, 7d.
    #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
    pub retention: std::time::Duration,
    /// Bytes on disk each events partition may take, about; the oldest messages go first.
    #[arg(long)]
    pub retention_max_bytes: Option<u64>,
}

impl RetentionArgs {
    pub fn policy(&self) -> roost_server::Retention {
        roost_server::Retention {
            max_age: self.retention,
            max_bytes: self.retention_max_bytes,
        }
    }

    /// The same settings as `roost engine` arguments.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--retention".into(),
            humantime::format_duration(self.retention).to_string(),
        ];
        if let Some(b) = self.retention_max_bytes {
            a.extend(["--retention-max-bytes".into(), b.to_string()]);
        }
        a
    }
}

/// The hub's quotas and throttles (docs/operations.md, spec §8): a preset, then overrides.
#[derive(Args, Clone)]
pub struct QuotaArgs {
    /// The rate quotas: `unlimited` (roost's default: only IoT Hub's message-size limit), or
    /// IoT Hub's tier `free`, `s1`, `s2`, `s3`.
    #[arg(long, default_value = "unlimited", value_name = "PRESET")]
    pub quota: String,
    /// Units of the tier (IoT Hub scales most throttles by them).
    #[arg(long, default_value_t = 1)]
    pub quota_units: u32,
    /// One limit over the preset, NAME=VALUE (a whole number or `unlimited`), e.g.
    /// d2c_sends_per_sec=5000 or device_d2c_sends_per_sec=10; repeat for more.
    #[arg(long = "limit", value_name = "NAME=VALUE")]
    pub limits: Vec<String>,
}

impl QuotaArgs {
    pub fn quotas(&self) -> anyhow::Result<roost_control::Quotas> {
        let mut q = roost_control::Quotas::named_preset(&self.quota, self.quota_units)?;
        for l in &self.limits {
            q.apply_setting(l)?;
        }
        Ok(q)
    }

    /// The same settings as `roost control` arguments.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--quota".into(),
            self.quota.clone(),
            "--quota-units".into(),
            self.quota_units.to_string(),
        ];
        for l in &self.limits {
            a.extend(["--limit".into(), l.clone()]);
        }
        a
    }
}

/// How many device connections may be open and not yet authenticated (docs/operations.md).
#[derive(Args, Clone)]
pub struct PreAuthArgs {
    /// Unauthenticated device connections the engine holds at most; more are closed at accept.
    #[arg(long, default_value_t = PreAuthLimits::default().total)]
    pub max_unauthenticated: usize,
    /// Unauthenticated device connections one source address may hold at most.
    #[arg(long, default_value_t = PreAuthLimits::default().per_source)]
    pub max_unauthenticated_per_source: usize,
}

impl PreAuthArgs {
    pub fn limits(&self) -> PreAuthLimits {
        PreAuthLimits {
            total: self.max_unauthenticated,
            per_source: self.max_unauthenticated_per_source,
        }
    }

    /// The same settings as `roost engine` arguments.
    pub fn to_args(&self) -> [String; 4] {
        [
            "--max-unauthenticated".into(),
            self.max_unauthenticated.to_string(),
            "--max-unauthenticated-per-source".into(),
            self.max_unauthenticated_per_source.to_string(),
        ]
    }
}

impl ListenArgs {
    /// The listeners, shorthands included, with the default when none names MQTT over TLS.
    pub fn specs(&self) -> Vec<ListenerSpec> {
        let mut specs = self.listen.clone();
        if let Some(addr) = self.mqtt {
            specs.push(ListenerSpec::new(Protocol::Mqtt, addr, true));
        }
        if let Some(addr) = self.plain_mqtt {
            specs.push(ListenerSpec::new(Protocol::Mqtt, addr, false));
        }
        if let Some(addr) = self.https {
            specs.push(ListenerSpec::new(Protocol::Https, addr, true));
        }
        let nothing_asked = specs.is_empty();
        if self.listen.is_empty() && self.mqtt.is_none() {
            specs.insert(
                0,
                ListenerSpec::new(Protocol::Mqtt, SocketAddr::from(([0, 0, 0, 0], 8883)), true),
            );
        }
        // With no listener asked for, IoT Hub's ports: 8883, and 443 (WebSockets, HTTPS).
        if nothing_asked {
            specs.push(ListenerSpec::new(
                Protocol::Https,
                SocketAddr::from(([0, 0, 0, 0], 443)),
                true,
            ));
        }
        specs
    }
}

#[derive(Args, Clone)]
pub struct UpArgs {
    #[arg(long, default_value = "./roost-data")]
    pub data_dir: PathBuf,
    /// The host name devices connect to; it goes into certificates and connection strings.
    #[arg(long, default_value = "localhost")]
    pub hostname: String,
    #[command(flatten)]
    pub listen: ListenArgs,
    #[command(flatten)]
    pub pre_auth: PreAuthArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
    #[command(flatten)]
    pub quotas: QuotaArgs,
    #[command(flatten)]
    pub dps: DpsArgs,
    #[command(flatten)]
    pub blob: BlobArgs,
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub service: SocketAddr,
    /// Engine ops port: /metrics, /healthz, events consumer API.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub ops: SocketAddr,
    /// AMQP over TLS: the Event Hubs-compatible endpoint (IoT Hub's port).
    #[arg(long, default_value = "0.0.0.0:5671")]
    pub amqp: SocketAddr,
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
    #[command(flatten)]
    pub listen: ListenArgs,
    #[command(flatten)]
    pub pre_auth: PreAuthArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub ops: SocketAddr,
    /// AMQP over TLS: the Event Hubs-compatible endpoint (IoT Hub's port is 5671). None: off.
    #[arg(long, value_name = "ADDR")]
    pub amqp: Option<SocketAddr>,
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
    #[command(flatten)]
    pub quotas: QuotaArgs,
    #[command(flatten)]
    pub dps: DpsArgs,
    #[command(flatten)]
    pub blob: BlobArgs,
}

/// The embedded blob store file uploads go to (docs/file-upload.md): off unless given.
#[derive(Args, Clone)]
pub struct BlobArgs {
    /// Serve the blob store (HTTPS, Azure Blob's block-blob calls) here; devices upload to it.
    #[arg(long, value_name = "ADDR")]
    pub blob: Option<SocketAddr>,
    /// The host name devices reach the blob store by. Default: the hub's host name. The
    /// server certificate must name it.
    #[arg(long, value_name = "NAME")]
    pub blob_hostname: Option<String>,
    /// Send uploads to this Azure Storage account instead (its blob endpoint:
    /// https://ACCOUNT.blob.core.windows.net, or https://host:port/ACCOUNT for Azurite).
    #[arg(long, value_name = "URL", conflicts_with = "blob", requires = "blob_account_key")]
    pub blob_account_url: Option<String>,
    /// The storage account's key (base64).
    #[arg(long, value_name = "KEY", requires = "blob_account_url")]
    pub blob_account_key: Option<String>,
    /// The account's container uploads go to (it must exist).
    #[arg(long, value_name = "NAME", default_value = "fileuploads")]
    pub blob_container: String,
}

impl BlobArgs {
    pub fn config(&self, hub: &str) -> Option<roost_control::BlobConfig> {
        if let (Some(url), Some(key)) = (&self.blob_account_url, &self.blob_account_key) {
            return Some(roost_control::BlobConfig::Azure {
                url: url.clone(),
                key: key.clone(),
                container: self.blob_container.clone(),
            });
        }
        self.blob.map(|addr| roost_control::BlobConfig::Embedded {
            addr,
            hostname: self.blob_hostname.clone().unwrap_or_else(|| hub.to_string()),
        })
    }

    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(a) = self.blob {
            out.extend(["--blob".to_string(), a.to_string()]);
        }
        if let Some(h) = &self.blob_hostname {
            out.extend(["--blob-hostname".to_string(), h.clone()]);
        }
        if let (Some(u), Some(k)) = (&self.blob_account_url, &self.blob_account_key) {
            out.extend(["--blob-account-url".to_string(), u.clone(), "--blob-account-key".to_string(), k.clone()]);
        }
        out.extend(["--blob-container".to_string(), self.blob_container.clone()]);
        out
    }
}

/// The provisioning service (docs/provisioning.md): off unless a listener is given.
#[derive(Args, Clone)]
pub struct DpsArgs {
    /// Serve the provisioning service's HTTPS API (device registration and enrollments) here;
    /// DPS devices expect port 443 on the service's host.
    #[arg(long, value_name = "ADDR")]
    pub dps_https: Option<SocketAddr>,
    /// Serve provisioning over MQTT (TLS) here; DPS devices expect port 8883 on its host.
    #[arg(long, value_name = "ADDR")]
    pub dps_mqtt: Option<SocketAddr>,
    /// Serve provisioning over AMQP (TLS) here; DPS devices expect port 5671 on its host.
    #[arg(long, value_name = "ADDR")]
    pub dps_amqp: Option<SocketAddr>,
    /// The provisioning service's host name (its service API's tokens are scoped to it).
    /// Default: the hub's host name. The server certificate must name it.
    #[arg(long, value_name = "NAME")]
    pub dps_hostname: Option<String>,
}

impl DpsArgs {
    pub fn config(&self, hub: &str) -> roost_control::dps::DpsConfig {
        roost_control::dps::DpsConfig {
            hostname: self.dps_hostname.clone().unwrap_or_else(|| hub.to_string()),
            https: self.dps_https,
            mqtt: self.dps_mqtt,
            amqp: self.dps_amqp,
        }
    }

    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(a) = self.dps_https {
            out.extend(["--dps-https".to_string(), a.to_string()]);
        }
        if let Some(a) = self.dps_mqtt {
            out.extend(["--dps-mqtt".to_string(), a.to_string()]);
        }
        if let Some(a) = self.dps_amqp {
            out.extend(["--dps-amqp".to_string(), a.to_string()]);
        }
        if let Some(h) = &self.dps_hostname {
            out.extend(["--dps-hostname".to_string(), h.clone()]);
        }
        out
    }
}

#[derive(Subcommand)]
pub enum DeviceCmd {
    /// Register a device (SAS keys generated) and print its connection string; with --x509,
    /// a device that authenticates with a client certificate.
    Create {
        id: String,
        /// Register it disabled.
        #[arg(long)]
        disabled: bool,
        /// Authenticate it with a client certificate (IoT Hub's selfSigned): a certificate and
        /// key are issued (common name = the id) into --cert-dir and its SHA-256 thumbprint is
        /// registered, or --thumbprint registers one you have; prints the `x509=true`
        /// connection string and the files' paths.
        #[arg(long)]
        x509: bool,
        /// The thumbprint to register (hex SHA-1 or SHA-256 of your certificate's DER) instead
        /// of issuing a certificate.
        #[arg(long, requires = "x509", value_name = "HEX", conflicts_with = "ca")]
        thumbprint: Option<String>,
        /// Register it as certificateAuthority and issue its certificate with the CA `roost
        /// ca init` made under this name (in <data>/cas).
        #[arg(long, requires = "x509", value_name = "NAME")]
        ca: Option<String>,
        /// Where an issued certificate and key go. Default: <data>/devices.
        #[arg(long, requires = "x509", value_name = "DIR")]
        cert_dir: Option<PathBuf>,
        /// Days an issued certificate is valid (0: it expires at once; for tests).
        #[arg(long, requires = "x509", default_value_t = 365)]
        valid_days: u32,
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
pub enum TwinCmd {
    /// Print a device's twin as JSON (tags, desired and reported properties, versions).
    Get { id: String },
    /// Merge a patch into tags and desired properties (`null` deletes a member); the device
    /// gets the desired change if it is connected.
    ///
    /// Example: roost twin patch my-device '{"tags":{"site":"oslo"},"properties":{"desired":{"rate":5}}}'
    Patch {
        id: String,
        /// The patch, as JSON: `{"tags":{..},"properties":{"desired":{..}}}`.
        json: String,
        /// Apply only if the twin's etag is still this one (else 412).
        #[arg(long)]
        etag: Option<String>,
    },
    /// Replace tags and desired properties whole; the device gets the new desired document.
    ///
    /// Example: roost twin replace my-device '{"properties":{"desired":{"mode":"eco"}}}'
    Replace {
        id: String,
        /// The new twin, as JSON: `{"tags":{..},"properties":{"desired":{..}}}`.
        json: String,
        /// Apply only if the twin's etag is still this one (else 412).
        #[arg(long)]
        etag: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum MethodCmd {
    /// Invoke METHOD on device ID with a JSON payload; prints `{"status", "payload"}`.
    ///
    /// Example: roost method invoke my-device reboot '{"delay":5}'
    Invoke {
        id: String,
        method: String,
        /// The payload, as JSON (default `null`).
        payload: Option<String>,
        /// Seconds to wait for the device's answer (5 to 300).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Seconds to wait for the device to be connected and subscribed (0 to 300).
        #[arg(long, default_value_t = 0)]
        connect_timeout: u64,
    },
}

#[derive(Subcommand)]
pub enum C2dCmd {
    /// Queue a message for device ID (delivered when it is connected and subscribed).
    ///
    /// Example: roost c2d send my-device '{"led":"on"}' --content-type application/json --ack full
    Send {
        id: String,
        /// The message body.
        body: String,
        /// An application property, `name=value` (repeatable).
        #[arg(long = "prop", value_name = "NAME=VALUE")]
        props: Vec<String>,
        #[arg(long)]
        message_id: Option<String>,
        #[arg(long)]
        correlation_id: Option<String>,
        #[arg(long)]
        content_type: Option<String>,
        /// Feedback wanted: none, positive, negative or full.
        #[arg(long)]
        ack: Option<String>,
        /// Seconds the message lives (default 3600, at most 172800).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Print the feedback records waiting (JSON); with --complete, remove them.
    Feedback {
        #[arg(long)]
        complete: bool,
    },
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
        /// Only records of this `iothub-message-source`: Telemetry, twinChangeEvents,
        /// deviceLifecycleEvents or deviceConnectionStateEvents.
        #[arg(long)]
        source: Option<String>,
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
    let listeners = args.listen.specs();
    let mut ports = json!({ "ops": args.ops.port() });
    if let Some(a) = args.amqp {
        ports["amqp"] = json!(a.port());
    }
    for l in &listeners {
        ports[l.hub_port_key()] = json!(l.addr.port());
    }
    let config = roost_server::EngineConfig {
        data_dir: data_dir.clone(),
        hostname,
        control: args.control,
        listeners,
        ops: args.ops,
        amqp: args.amqp,
        cores: cores(args.cores),
        node: args.node.clone(),
        durability: durability(args.durability),
        commit_window: std::time::Duration::from_micros(args.commit_window_us),
        pre_auth: args.pre_auth.limits(),
        retention: args.retention.policy(),
    };
    let patch = json!({ "ports": ports, "ops_url": local_url("http", args.ops) });
    roost_server::run(config, move || {
        if let Err(e) = hubfile::merge(&data_dir, patch) {
            tracing::warn!(error = %e, "could not update hub.json");
        }
    })
}

pub fn run_control(args: ControlArgs) -> anyhow::Result<()> {
    let quotas = args.quotas.quotas()?;
    roost_control::run(
        roost_control::ControlConfig {
            dps: args.dps.config(&args.hostname),
            blob: args.blob.config(&args.hostname),
            data_dir: args.data_dir,
            hostname: args.hostname,
            service: args.service,
            ops: args.ops,
            link: args.link,
            quotas,
        },
        || {},
    )
}

/// `roost up`: control and engine as two child processes of this binary.
pub fn run_up(args: UpArgs) -> anyhow::Result<()> {
    // A bad quota setting is reported here, not by a control process that exits at once.
    args.quotas.quotas()?;
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
        .args(args.quotas.to_args())
        .args(args.dps.to_args())
        .args(args.blob.to_args())
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
            "--ops",
            &args.ops.to_string(),
        ])
        .args(["--amqp", &args.amqp.to_string()])
        .args(["--cores", &cores(args.cores).to_string()])
        .args([
            "--durability",
            match args.durability {
                DurabilityArg::Synced => "synced",
                DurabilityArg::Written => "written",
            },
        ])
        .args(["--commit-window-us", &args.commit_window_us.to_string()])
        .args(args.pre_auth.to_args())
        .args(args.retention.to_args());
    let listeners = args.listen.specs();
    for l in &listeners {
        engine_cmd.args(["--listen", &l.to_string()]);
    }
    let mut engine = engine_cmd.spawn().context("starting engine")?;
    let healthy = wait_healthy(&mut engine, args.ops, "engine");
    children.0.push(engine);
    healthy?;

    let hub = hubfile::read(&data_dir)?;
    println!("roost is up.");
    println!("  hub host name      {}", hub.hostname);
    for l in &listeners {
        let (name, note) = match (l.protocol, l.tls) {
            (Protocol::Mqtt, true) => (
                "MQTT over TLS",
                "(device SDKs: port 8883 is their fixed default)",
            ),
            (Protocol::Mqtt, false) => ("plain MQTT", "(benchmarks only)"),
            (Protocol::Https, _) => (
                "port 443 (HTTPS)",
                "(MQTT over WebSockets at /$iothub/websocket; the SDKs' fixed port is 443)",
            ),
        };
        println!("  {name:<18} {} {note}", l.addr);
    }
    println!(
        "  Event Hubs (AMQP)  {} (the SDKs' fixed port is 5671; connection string in hub.json)",
        args.amqp
    );
    println!("  service API        {}", hub.service_url);
    println!(
        "  engine ops         {}/metrics, /healthz, /events (Authorization: Bearer <ops_token>)",
        local_url("http", args.ops)
    );
    println!(
        "  control ops        {}/metrics (the same token)",
        local_url("http", args.control_ops)
    );
    println!("  CA certificate     {}", hub.ca.display());
    // Secrets stay in the file (0600), not in a terminal's scroll-back or a log.
    println!(
        "  service connection string (iothubowner) and ops_token: in {}",
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
        let signal = wait_for_shutdown_signal();
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
                request_once(Method::GET, &url, &[], None, None),
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

pub(crate) fn check(resp: &client::Response) -> anyhow::Result<()> {
    if resp.status >= 300 {
        // IoT Hub's two error forms: `Message` as JSON text with a `message`, or
        // `ErrorCode:<Name>;<message>`.
        let message = serde_json::from_slice::<Value>(&resp.body)
            .ok()
            .and_then(|v| v.get("Message").and_then(Value::as_str).map(str::to_string));
        let detail = match message {
            Some(m) => match serde_json::from_str::<Value>(&m) {
                Ok(inner) => inner
                    .get("message")
                    .and_then(Value::as_str)
                    .map_or(m.clone(), str::to_string),
                Err(_) => match m.strip_prefix("ErrorCode:").and_then(|r| r.split_once(';')) {
                    Some((name, text)) => format!("{name}: {text}"),
                    None => m,
                },
            },
            None => resp.text(),
        };
        bail!("the hub answered {}: {}", resp.status, detail);
    }
    Ok(())
}

pub(crate) fn path_id(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

async fn get_device(svc: &mut ServiceClient, id: &str) -> anyhow::Result<Value> {
    let path = format!("/devices/{}", path_id(id));
    let resp = svc.call(Method::GET, &path, None, &[]).await?;
    check(&resp)?;
    Ok(serde_json::from_slice(&resp.body)?)
}

pub fn run_device(action: DeviceCmd, data_dir: &Path, out: Output) -> anyhow::Result<()> {
    let mut svc = ServiceClient::new(hubfile::read(data_dir)?)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match action {
            DeviceCmd::Create {
                id,
                disabled,
                x509,
                thumbprint,
                ca,
                cert_dir,
                valid_days,
            } => {
                roost_model::DeviceId::parse(&id)
                    .map_err(|e| anyhow::anyhow!("invalid device id {id:?}: {e}"))?;
                // An issued certificate is written only once the device is registered.
                let issued = match (x509, &thumbprint, &ca) {
                    (true, None, Some(ca)) => {
                        let (cert, key) = crate::cas::files(data_dir, ca);
                        let read = |p: &Path| {
                            std::fs::read_to_string(p).with_context(|| {
                                format!("reading {} (a CA made by `roost ca init {ca}`)", p.display())
                            })
                        };
                        Some(roost_control::certs::ca_signed_device_cert(
                            &id,
                            valid_days,
                            &read(&cert)?,
                            &read(&key)?,
                        )?)
                    }
                    (true, None, None) => {
                        Some(roost_control::certs::self_signed_device_cert(&id, valid_days)?)
                    }
                    _ => None,
                };
                let authentication = match (&ca, thumbprint.or_else(|| issued.as_ref().map(|c| c.thumbprint.clone()))) {
                    (Some(_), _) => json!({ "type": "certificateAuthority" }),
                    // Some exactly with --x509 (--thumbprint requires it).
                    (None, Some(t)) => json!({ "type": "selfSigned", "x509Thumbprint": { "primaryThumbprint": t } }),
                    (None, None) => json!({ "type": "sas", "symmetricKey": {} }),
                };
                let body = json!({
                    "deviceId": id,
                    "status": if disabled { "disabled" } else { "enabled" },
                    "authentication": authentication,
                    "capabilities": { "iotEdge": false },
                });
                let resp = svc
                    .call(
                        Method::PUT,
                        &format!("/devices/{}", path_id(&id)),
                        Some(serde_json::to_vec(&body)?),
                        &[],
                    )
                    .await?;
                check(&resp)?;
                if x509 {
                    println!("HostName={};DeviceId={};x509=true", svc.hub.hostname, id);
                    if let Some(cert) = issued {
                        let dir = cert_dir.unwrap_or_else(|| data_dir.join("devices"));
                        roost_common::hubfile::private_dir(&dir)
                            .with_context(|| format!("creating {}", dir.display()))?;
                        let (pem, key) = (dir.join(format!("{id}.pem")), dir.join(format!("{id}.key")));
                        std::fs::write(&pem, &cert.cert_pem)
                            .with_context(|| format!("writing {}", pem.display()))?;
                        roost_control::certs::write_private(&key, &cert.key_pem)?;
                        println!("certificate: {}", pem.display());
                        println!("key: {}", key.display());
                        println!("thumbprint: {}", cert.thumbprint);
                    }
                    return Ok(());
                }
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
                let resp = svc
                    .call(Method::GET, "/devices?top=1000", None, &[])
                    .await?;
                check(&resp)?;
                let v: Value = serde_json::from_slice(&resp.body)?;
                crate::output::print(&v, out);
            }
            DeviceCmd::Show { id } => {
                let v = get_device(&mut svc, &id).await?;
                crate::output::print(&v, out);
            }
            DeviceCmd::Delete { id } => {
                let headers_path = format!("/devices/{}", path_id(&id));
                let resp = svc.call(Method::DELETE, &headers_path, None, &[]).await?;
                check(&resp)?;
                println!("deleted {id}");
            }
            DeviceCmd::Keys { id } => {
                let v = get_device(&mut svc, &id).await?;
                let k = &v["authentication"]["symmetricKey"];
                println!("primary   {}", k["primaryKey"].as_str().unwrap_or(""));
                println!("secondary {}", k["secondaryKey"].as_str().unwrap_or(""));
            }
        }
        anyhow::Ok(())
    })
}

pub fn run_twin(action: TwinCmd, data_dir: &Path, out: Output) -> anyhow::Result<()> {
    let mut svc = ServiceClient::new(hubfile::read(data_dir)?)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (method, id, body, etag) = match action {
        TwinCmd::Get { id } => (Method::GET, id, None, None),
        TwinCmd::Patch { id, json, etag } => (Method::PATCH, id, Some(json), etag),
        TwinCmd::Replace { id, json, etag } => (Method::PUT, id, Some(json), etag),
    };
    if let Some(body) = &body {
        serde_json::from_str::<Value>(body).context("the twin argument is not valid JSON")?;
    }
    let if_match = format!("\"{}\"", etag.as_deref().unwrap_or("*"));
    let headers = [("if-match", if_match)];
    runtime.block_on(async {
        let path = format!("/twins/{}", path_id(&id));
        let resp = svc
            .call(method, &path, body.map(String::into_bytes), &headers)
            .await?;
        check(&resp)?;
        let v: Value = serde_json::from_slice(&resp.body)?;
        crate::output::print(&v, out);
        anyhow::Ok(())
    })
}

pub fn run_method(action: MethodCmd, data_dir: &Path, out: Output) -> anyhow::Result<()> {
    let MethodCmd::Invoke {
        id,
        method,
        payload,
        timeout,
        connect_timeout,
    } = action;
    let payload: Value = match payload {
        Some(p) => serde_json::from_str(&p).context("the payload is not valid JSON")?,
        None => Value::Null,
    };
    let body = json!({
        "methodName": method,
        "payload": payload,
        "responseTimeoutInSeconds": timeout,
        "connectTimeoutInSeconds": connect_timeout,
    });
    let mut svc = ServiceClient::new(hubfile::read(data_dir)?)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let path = format!("/twins/{}/methods", path_id(&id));
        let resp = svc
            .call(Method::POST, &path, Some(serde_json::to_vec(&body)?), &[])
            .await?;
        check(&resp)?;
        let v: Value = serde_json::from_slice(&resp.body)?;
        crate::output::print(&v, out);
        anyhow::Ok(())
    })
}

pub fn run_c2d(action: C2dCmd, data_dir: &Path, out: Output) -> anyhow::Result<()> {
    let mut svc = ServiceClient::new(hubfile::read(data_dir)?)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match action {
            C2dCmd::Send {
                id,
                body,
                props,
                message_id,
                correlation_id,
                content_type,
                ack,
                ttl,
            } => {
                let mut headers: Vec<(&str, String)> = Vec::new();
                let names: Vec<(String, String)> = props
                    .iter()
                    .map(|p| {
                        let (k, v) = p
                            .split_once('=')
                            .with_context(|| format!("--prop {p}: expected NAME=VALUE"))?;
                        Ok((format!("iothub-app-{k}"), v.to_string()))
                    })
                    .collect::<anyhow::Result<_>>()?;
                for (k, v) in &names {
                    headers.push((k.as_str(), v.clone()));
                }
                for (name, value) in [
                    ("iothub-messageid", message_id),
                    ("iothub-correlationid", correlation_id),
                    ("content-type", content_type),
                    ("iothub-ack", ack),
                ] {
                    if let Some(v) = value {
                        headers.push((name, v));
                    }
                }
                if let Some(secs) = ttl {
                    let at = std::time::SystemTime::now() + Duration::from_secs(secs);
                    headers.push((
                        "iothub-expiry",
                        humantime::format_rfc3339_millis(at).to_string(),
                    ));
                }
                let path = format!("/devices/{}/messages/deviceBound", path_id(&id));
                let resp = svc
                    .call(Method::POST, &path, Some(body.into_bytes()), &headers)
                    .await?;
                check(&resp)?;
                println!("queued for {id}");
            }
            C2dCmd::Feedback { complete } => {
                let path = "/messages/serviceBound/feedback";
                let resp = svc.call(Method::GET, path, None, &[]).await?;
                check(&resp)?;
                if resp.status == 204 {
                    crate::output::print(&json!([]), out);
                    return anyhow::Ok(());
                }
                let v: Value = serde_json::from_slice(&resp.body)?;
                crate::output::print(&v, out);
                if complete {
                    let lock = resp.etag.clone().context("the hub gave no lock token")?;
                    let resp = svc
                        .call(
                            Method::DELETE,
                            &format!("{path}/{}", path_id(&lock)),
                            None,
                            &[],
                        )
                        .await?;
                    check(&resp)?;
                }
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
        source,
    } = action;
    let only = source
        .map(|s| format!("&source={}", path_id(&s)))
        .unwrap_or_default();
    let hub = hubfile::read(data_dir)?;
    let ops = hub.ops_url(data_dir)?.to_string();
    let auth = hub.ops_auth();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut printed = 0usize;
        // Without a group, positions live in this process only.
        let mut positions: Vec<(usize, u64)> = Vec::new();
        if group.is_none() {
            let resp = request_once(
                Method::GET,
                &format!("{ops}/events/partitions"),
                &auth,
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
        let mut last_positions: Option<Value> = None;
        loop {
            let budget = max.map(|m| m - printed).unwrap_or(1000).min(1000);
            let mut records = Vec::new();
            let mut moved = false;
            match &group {
                Some(g) => {
                    let url = format!(
                        "{ops}/events/groups/{}/records?max={budget}&from={}{only}",
                        path_id(g),
                        from.as_str()
                    );
                    let resp = request_once(Method::GET, &url, &auth, None, None).await?;
                    check(&resp)?;
                    let v: Value = serde_json::from_slice(&resp.body)?;
                    records = v["records"].as_array().cloned().unwrap_or_default();
                    print_records(&records, json);
                    // Every record of the answer is printed: the group has read up to the
                    // positions the engine answered, records routed elsewhere included.
                    let positions = v["positions"].clone();
                    if positions.as_object().is_some_and(|p| !p.is_empty())
                        && last_positions.as_ref() != Some(&positions)
                    {
                        let url = format!("{ops}/events/groups/{}/checkpoint", path_id(g));
                        let body = serde_json::to_vec(&positions)?;
                        check(&request_once(Method::POST, &url, &auth, Some(body), None).await?)?;
                        moved = true;
                    }
                    last_positions = Some(positions);
                }
                None => {
                    let mut left = budget;
                    for (k, next) in positions.iter_mut() {
                        if left == 0 {
                            break;
                        }
                        let url = format!(
                            "{ops}/events/partitions/{k}/records?from={next}&max={left}{only}"
                        );
                        let resp = request_once(Method::GET, &url, &auth, None, None).await?;
                        check(&resp)?;
                        let v: Value = serde_json::from_slice(&resp.body)?;
                        let mut got = v["records"].as_array().cloned().unwrap_or_default();
                        let was = *next;
                        *next = v["next"].as_u64().unwrap_or(*next);
                        // A page may be empty and still move on past records routed elsewhere.
                        moved |= *next != was;
                        left -= got.len().min(left);
                        records.append(&mut got);
                    }
                    print_records(&records, json);
                }
            }
            printed += records.len();
            if max.is_some_and(|m| printed >= m) || (!follow && records.is_empty() && !moved) {
                return anyhow::Ok(());
            }
            if records.is_empty() && !moved {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    _ = wait_for_shutdown_signal() => return Ok(()),
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
