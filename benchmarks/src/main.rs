//! roost-bench: the load generator for roost and for the peer brokers it is compared with
//! (mosquitto, rumqttd).
//!
//! It opens N MQTT connections (plain or TLS, bound to source addresses spread over
//! 127.0.0.0/8), publishes pre-encoded, stamped frames open-loop at a fixed total rate or flat
//! out, at QoS 0 or QoS 1 with an inflight window, reads every message back (roost's `events`
//! consumer API, or one MQTT subscriber for peers) and reports msgs/s in and out, loss,
//! duplicates, latency percentiles (HDR), and the server's CPU and RSS from /proc. It is not a
//! conformance client: it speaks just enough MQTT to publish, subscribe and be acknowledged.
//!
//! The key decision is that every run is bounded in time and in count, and the measurement
//! needs no cooperation from the server beyond its normal protocol and /proc.
//!
//! # Layout
//! - `main`: command line and the set-up shared by the modes (target, devices, runtime).
//! - `run`, `idle`, `connrate`, `flood`: the four modes (`flood` is an unauthenticated
//!   attacker, run beside a publish run).
//! - `publish`: one publishing connection (pacing, inflight window, PUBACK latency).
//! - `readback`: reading messages back and the [`readback::Tally`] of what arrived.
//! - `target`, `hub`: whom we connect as; roost's hub.json and service API (through `roost-common`).
//! - `net`, `client`, `frame`, `stamp`, `pace`: sockets, MQTT framing, pre-encoded frames,
//!   the payload stamp, rate arithmetic.
//! - `procfs`, `report`: server cost from /proc; the printed result.

mod client;
mod connrate;
mod flood;
mod frame;
mod hub;
mod idle;
mod net;
mod pace;
mod procfs;
mod publish;
mod readback;
mod readlog;
mod report;
mod run;
mod stamp;
mod target;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use clap::{Parser, ValueEnum};
use roost_mqtt::{ConnectReturnCode, QoS};

use crate::client::Refused;
use crate::hub::Hub;
use crate::net::{Sources, Transport};
use crate::report::Report;
use crate::target::{Kind, Target};

/// Longest run this tool agrees to (warm-up + duration, or --max-time).
const MAX_RUN: Duration = Duration::from_secs(3600);
/// The key every device created by roost-bench gets, unless --device-key says otherwise: fixed,
/// so a second run finds the devices of the first already usable.
const DEFAULT_DEVICE_KEY: &[u8; 32] = b"roost-bench-shared-device-key-01";

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TargetKind {
    /// A roost hub: IoT Hub devices (SAS tokens), telemetry topics, read back via the ops port.
    Roost,
    /// A plain MQTT 3.1.1 broker: anonymous clients on bench/{i}, read back by a subscriber.
    Mqtt,
}

#[derive(Parser)]
#[command(
    name = "roost-bench",
    version,
    about = "Load generator for roost and peer MQTT brokers: throughput, loss, latency, server CPU and RSS.",
    after_help = "Modes: a publish run (default; needs --duration and/or --messages), --idle (connect, hold, \
RSS per connection) and --connect-rate (connect+CONNACK+disconnect loops for --duration).\n\n\
Examples:\n  roost-bench --target mqtt --addr 127.0.0.1:1883 --duration 20 --payload 100 --server-pid $(pidof mosquitto)\n  \
roost-bench --target roost --hub ./roost-data --connections 1000 --rate 20000 --qos 1 --duration 20 --warmup 2 --server-pid $ENGINE_PID\n  \
roost-bench --target roost --hub ./roost-data --tls --idle --connections 5000 --hold 10 --server-pid $ENGINE_PID\n  \
roost-bench --target mqtt --addr 127.0.0.1:8883 --tls --ca ca.pem --connect-rate --connections 8 --duration 15"
)]
struct Args {
    /// What to load.
    #[arg(long, value_enum, default_value = "mqtt")]
    target: TargetKind,
    /// roost data directory: hub.json gives the addresses, the CA and the service credentials.
    #[arg(long, value_name = "DATA_DIR", required_if_eq("target", "roost"))]
    hub: Option<PathBuf>,
    /// Broker address. Default: from hub.json for roost (ports.plain_mqtt, or ports.mqtt with
    /// --tls), 127.0.0.1:1883 for mqtt.
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// Connect over TLS.
    #[arg(long)]
    tls: bool,
    /// CA certificate (PEM) to trust with --tls. Default for roost: the hub's CA.
    #[arg(long, value_name = "PATH")]
    ca: Option<PathBuf>,
    /// Name the server certificate must carry (SNI). Default: the hub's host name for roost,
    /// else localhost.
    #[arg(long)]
    server_name: Option<String>,
    /// Allow TLS session resumption (default: every connect is a full handshake).
    #[arg(long)]
    tls_resume: bool,
    /// MQTT over a WebSocket on roost's port 443 (`/$iothub/websocket`, subprotocol `mqtt`), as
    /// the SDKs' WebSocket transports connect; needs --target roost and --tls. Default address:
    /// hub.json's ports.https.
    #[arg(long, requires = "tls")]
    websocket: bool,
    /// Connections (publishers; idle connections; parallel connect loops with --connect-rate).
    #[arg(short = 'c', long, default_value_t = 1)]
    connections: usize,
    /// Client ids and roost device ids are {prefix}{i}.
    #[arg(long, default_value = "bench-")]
    prefix: String,
    /// Symmetric key (base64) of the roost devices; default: a fixed key shared by all.
    #[arg(long)]
    device_key: Option<String>,
    /// Total messages per second over all connections, open loop; 0 = flat out.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// QoS of the publishes (and of the peer subscriber).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Unacknowledged QoS 1 publishes allowed per connection.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    inflight: u16,
    /// Payload bytes per message (at least 24: the stamp).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Seconds of measured publishing (after the warm-up); or of connect loops.
    #[arg(long)]
    duration: Option<f64>,
    /// Total messages to publish (over all connections).
    #[arg(long)]
    messages: Option<u64>,
    /// Seconds of publishing before the measured window (excluded from rates and latencies).
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Seconds to keep waiting, after publishing ends, for PUBACKs and for read-back messages
    /// (reading stops once nothing new arrived for this long).
    #[arg(long, default_value_t = 10.0)]
    drain_timeout: f64,
    /// Longest the reader keeps catching up on a backlog after publishing ends, in seconds.
    #[arg(long, default_value_t = 60.0)]
    max_drain: f64,
    /// Hard limit in seconds on the publishing of a --messages run without --duration.
    #[arg(long, default_value_t = 300.0)]
    max_time: f64,
    /// Do not read the messages back (no loss, duplicates or end-to-end latency).
    #[arg(long)]
    no_readback: bool,
    /// A server process to measure (CPU, RSS); repeat for several; they are summed.
    /// For roost, pass the engine's pid.
    #[arg(long = "server-pid", value_name = "PID")]
    server_pids: Vec<u32>,
    /// Print the report as one JSON line on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// A label copied into the report (e.g. "a/mosquitto").
    #[arg(long)]
    label: Option<String>,
    /// Idle mode: connect, hold for --hold seconds, report RSS per connection, disconnect.
    #[arg(long, conflicts_with = "connect_rate")]
    idle: bool,
    /// Seconds to hold the idle connections.
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    /// Connect-rate mode: --connections loops of connect + CONNACK + DISCONNECT for --duration.
    #[arg(long)]
    connect_rate: bool,
    /// Flood mode (an unauthenticated attacker, plain TCP, for --duration): silent sockets,
    /// failing CONNECTs and oversize frames; see --flood-silent, --flood-bad-rate,
    /// --flood-oversize-rate.
    #[arg(long, conflicts_with_all = ["idle", "connect_rate"])]
    flood: bool,
    /// Read roost's whole events log once, every partition from its first record, through
    /// `amqp` (the Event Hubs-compatible endpoint) or `json` (the consumer API), and report
    /// records per second and the engine's CPU per million (needs --target roost --hub).
    #[arg(long, value_name = "amqp|json", conflicts_with_all = ["idle", "connect_rate", "flood"])]
    read_log: Option<String>,
    /// With --read-log amqp: read live for this many seconds (receivers on every partition
    /// from the log's end, following what is published meanwhile), then until the log's end
    /// as it is then;
    /// reports how far behind the reader was when the window closed and how long it took to
    /// catch up (a reader that keeps up with the publishers catches up at once).
    #[arg(long, value_name = "SECS", requires = "read_log")]
    follow: Option<f64>,
    /// Flood: sockets that connect and never send (held until the server closes them).
    #[arg(long, default_value_t = 0)]
    flood_silent: usize,
    /// Flood: bytes of an unfinished CONNECT each silent socket sends first (0: none).
    #[arg(long, default_value_t = 0)]
    flood_silent_bytes: usize,
    /// Flood: CONNECTs with a failing token per second.
    #[arg(long, default_value_t = 0.0)]
    flood_bad_rate: f64,
    /// Flood: sockets per second whose first frame claims 256 MiB.
    #[arg(long, default_value_t = 0.0)]
    flood_oversize_rate: f64,
    /// Handshakes in flight at once while opening connections.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Seconds one connect (TCP, TLS, CONNECT → CONNACK) may take.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Worker threads of the generator (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

impl Args {
    fn qos(&self) -> QoS {
        if self.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
    }

    /// Checks the bounds and combinations before anything connects.
    fn validate(&self) -> anyhow::Result<()> {
        let secs = |name: &str, v: f64| -> anyhow::Result<()> {
            if !(v.is_finite() && v >= 0.0 && v <= MAX_RUN.as_secs_f64()) {
                bail!(
                    "--{name} must be between 0 and {} seconds",
                    MAX_RUN.as_secs()
                );
            }
            Ok(())
        };
        for (name, v) in [
            ("warmup", self.warmup),
            ("drain-timeout", self.drain_timeout),
            ("max-drain", self.max_drain),
            ("max-time", self.max_time),
            ("hold", self.hold),
        ] {
            secs(name, v)?;
        }
        if let Some(d) = self.duration {
            secs("duration", d)?;
            if d + self.warmup > MAX_RUN.as_secs_f64() {
                bail!(
                    "--warmup + --duration must stay within {} s",
                    MAX_RUN.as_secs()
                );
            }
        }
        if !(self.connect_timeout > 0.0 && self.connect_timeout <= 120.0) {
            bail!("--connect-timeout must be in (0, 120] seconds");
        }
        if self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if self.connections > u32::MAX as usize {
            bail!("--connections is too large");
        }
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            bail!("--rate must be a non-negative number");
        }
        if self.payload < stamp::STAMP_LEN {
            bail!(
                "--payload must be at least {} bytes (the stamp)",
                stamp::STAMP_LEN
            );
        }
        if self.payload > 256 * 1024 {
            bail!("--payload must be at most 262144 bytes (IoT Hub's message limit)");
        }
        if !self
            .prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            || self.prefix.is_empty()
        {
            bail!("--prefix may only hold letters, digits and - _ . :");
        }
        if self.websocket && !matches!(self.target, TargetKind::Roost) {
            bail!("--websocket needs --target roost (IoT Hub's WebSocket path)");
        }
        if self.idle {
            if self.hold > target::MAX_SILENCE.as_secs_f64() {
                bail!(
                    "--hold must be at most {} s (connections carry no keep-alive traffic)",
                    target::MAX_SILENCE.as_secs()
                );
            }
            return Ok(());
        }
        if self.connect_rate {
            if self.duration.is_none() {
                bail!("--connect-rate needs --duration");
            }
            return Ok(());
        }
        if let Some(via) = &self.read_log {
            if via != "amqp" && via != "json" {
                bail!("--read-log is amqp or json");
            }
            if !matches!(self.target, TargetKind::Roost) {
                bail!("--read-log needs --target roost --hub DATA_DIR");
            }
            if self.follow.is_some() && via != "amqp" {
                bail!("--follow is for --read-log amqp");
            }
            return Ok(());
        }
        if self.flood {
            if self.duration.is_none() {
                bail!("--flood needs --duration");
            }
            for (name, r) in [
                ("flood-bad-rate", self.flood_bad_rate),
                ("flood-oversize-rate", self.flood_oversize_rate),
            ] {
                if !(r.is_finite() && (0.0..=100_000.0).contains(&r)) {
                    bail!("--{name} must be between 0 and 100000 per second");
                }
            }
            if self.flood_silent_bytes > 1024 * 1024 {
                bail!("--flood-silent-bytes must be at most 1048576");
            }
            if self.flood_silent > 200_000 {
                bail!("--flood-silent must be at most 200000");
            }
            return Ok(());
        }
        if self.duration.is_none() && self.messages.is_none() {
            bail!("a publish run must be bounded: give --duration SECONDS and/or --messages N");
        }
        if self.messages == Some(0) {
            bail!("--messages must be at least 1");
        }
        let per_conn = self
            .messages
            .map(|m| pace::quota(m, self.connections, 0))
            .unwrap_or(0);
        if per_conn > u64::from(u32::MAX) {
            bail!("--messages gives more than 2^32 messages per connection");
        }
        if self.duration.is_none() && self.max_time > target::MAX_SILENCE.as_secs_f64() {
            bail!(
                "--max-time must be at most {} s",
                target::MAX_SILENCE.as_secs()
            );
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("roost-bench: {e:#}");
        return ExitCode::from(2);
    }
    let threads = args
        .threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("roost-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let setup = setup(&args).await?;
        if let Some(via) = &args.read_log {
            readlog::run(&args, setup, via).await
        } else if args.idle {
            idle::run(&args, setup).await
        } else if args.connect_rate {
            connrate::run(&args, setup).await
        } else if args.flood {
            flood::run(&args, setup).await
        } else {
            run::run(&args, setup).await
        }
    });
    // Connections still open are dropped with the runtime; do not wait for their tasks.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(outcome) => {
            print_report(&args, &outcome.report);
            match outcome.failure {
                None => ExitCode::SUCCESS,
                Some(why) => {
                    eprintln!("roost-bench: {why}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("roost-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What a mode returns: its report, and why the run failed if it did (the report is still
/// printed).
pub struct Outcome {
    pub report: Report,
    pub failure: Option<String>,
}

fn print_report(args: &Args, report: &Report) {
    if args.json {
        eprint!("{}", report.table());
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
}

/// Everything a mode needs before it opens its connections.
pub struct Setup {
    pub target: Arc<Target>,
    pub pids: Vec<u32>,
    pub connect_timeout: Duration,
}

/// All `--connections` open, with the server sampled before and after opening them.
struct Opened {
    conns: Vec<(net::Stream, client::FrameReader)>,
    before: procfs::Sample,
    connected: procfs::Sample,
    connect_secs: f64,
}

/// Opens every connection of a run and samples the server around it (the RSS-per-connection
/// and CPU figures of the idle and publish modes start from these samples).
async fn open_measured(args: &Args, setup: &Setup) -> anyhow::Result<Opened> {
    let before = procfs::sample(&setup.pids)?;
    let t0 = std::time::Instant::now();
    let conns = target::open_all(
        setup.target.clone(),
        args.connections,
        args.connect_concurrency,
        setup.connect_timeout,
    )
    .await?;
    let connect_secs = t0.elapsed().as_secs_f64();
    let connected = procfs::sample(&setup.pids)?;
    Ok(Opened {
        conns,
        before,
        connected,
        connect_secs,
    })
}

async fn setup(args: &Args) -> anyhow::Result<Setup> {
    for &pid in &args.server_pids {
        procfs::sample(&[pid]).with_context(|| format!("--server-pid {pid}"))?;
    }
    // Each connection is a file descriptor here (and one at the server).
    let needed = args.connections as u64 + args.flood_silent as u64 + 64;
    if let Some(limit) = net::open_files_limit() {
        if limit < needed {
            bail!("{} connections need about {needed} open files but the limit is {limit}: raise it (ulimit -n)", args.connections);
        }
    }
    let run = unix_nanos() ^ (u64::from(std::process::id()) << 40);
    let max_frame = args.payload + 64 * 1024;
    let connect_timeout = Duration::from_secs_f64(args.connect_timeout);
    // Either kind: only who it is, where and how it connects differ; the rest is the run's.
    let target_of = |kind, addr, transport| Target {
        kind,
        addr,
        transport,
        sources: Sources::for_target(addr),
        prefix: args.prefix.clone(),
        run,
        max_frame,
    };
    let target = match args.target {
        TargetKind::Mqtt => {
            let addr = args
                .addr
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 1883)));
            let transport = transport(args, args.ca.clone(), "localhost")?;
            target_of(Kind::Mqtt, addr, transport)
        }
        TargetKind::Roost => {
            let dir = args
                .hub
                .as_ref()
                .context("--target roost needs --hub DATA_DIR")?;
            let hub = Hub::read(dir)?;
            let addr = match (args.addr, args.websocket) {
                (Some(a), _) => a,
                (None, true) => hub.https_addr()?,
                (None, false) => hub.mqtt_addr(args.tls)?,
            };
            let mut transport = transport(
                args,
                Some(args.ca.clone().unwrap_or_else(|| hub.ca.clone())),
                &hub.hostname,
            )?;
            if args.websocket {
                transport = transport.over_websocket()?;
            }
            let key = match &args.device_key {
                Some(k) => {
                    STANDARD.decode(k).context("--device-key is not base64")?;
                    k.clone()
                }
                None => STANDARD.encode(DEFAULT_DEVICE_KEY),
            };
            let ids: Vec<String> = (0..args.connections)
                .map(|i| format!("{}{i}", args.prefix))
                .collect();
            let t0 = Instant::now();
            let done = hub
                .ensure_devices(&ids, &key)
                .await
                .context("creating the devices")?;
            eprintln!(
                "roost-bench: {} devices ready in {:.1} s ({}; {} existed already)",
                ids.len(),
                t0.elapsed().as_secs_f64(),
                if done.bulk {
                    "bulk API"
                } else {
                    "one PUT each"
                },
                done.existed
            );
            let target = target_of(Kind::Roost { hub, key }, addr, transport);
            let probe = done.last.unwrap_or(args.connections - 1);
            wait_for_engine(&target, probe, connect_timeout).await?;
            target
        }
    };
    Ok(Setup {
        target: Arc::new(target),
        pids: args.server_pids.clone(),
        connect_timeout,
    })
}

fn transport(args: &Args, ca: Option<PathBuf>, default_name: &str) -> anyhow::Result<Transport> {
    if !args.tls {
        return Ok(Transport::Plain);
    }
    let ca = ca.context("--tls needs --ca PATH")?;
    Transport::tls(
        &ca,
        args.server_name.as_deref().unwrap_or(default_name),
        args.tls_resume,
    )
}

/// New devices reach the engine through the control link a moment after the service API
/// answered: retry a CONNECT of the last one (refused as not authorized until then).
async fn wait_for_engine(target: &Target, last: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match target.open(last, timeout).await {
            Ok((mut stream, _)) => {
                use tokio::io::AsyncWriteExt;
                let _ = stream.write_all(&frame::disconnect()).await;
                let _ = stream.shutdown().await;
                return Ok(());
            }
            Err(e)
                if matches!(
                    e.downcast_ref::<Refused>(),
                    Some(Refused(ConnectReturnCode::NotAuthorized))
                ) && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "device {} cannot connect to {}",
                        target.client_id(last),
                        target.addr
                    )
                })
            }
        }
    }
}

/// Unix time in nanoseconds.
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Args {
        let mut argv = vec!["roost-bench"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).expect("parses")
    }

    #[test]
    fn a_publish_run_must_be_bounded() {
        assert!(parse(&[]).validate().is_err());
        assert!(parse(&["--duration", "1"]).validate().is_ok());
        assert!(parse(&["--messages", "10"]).validate().is_ok());
        assert!(parse(&["--messages", "0"]).validate().is_err());
        assert!(parse(&["--duration", "4000"]).validate().is_err());
        assert!(parse(&["--connect-rate"]).validate().is_err());
        assert!(parse(&["--connect-rate", "--duration", "2"])
            .validate()
            .is_ok());
        assert!(parse(&["--idle", "--hold", "2"]).validate().is_ok());
        assert!(parse(&["--idle", "--hold", "2000"]).validate().is_err());
    }

    #[test]
    fn bad_values_are_refused_before_connecting() {
        assert!(parse(&["--duration", "1", "--payload", "23"])
            .validate()
            .is_err());
        assert!(parse(&["--duration", "1", "--connections", "0"])
            .validate()
            .is_err());
        assert!(parse(&["--duration", "1", "--prefix", "a/b"])
            .validate()
            .is_err());
        assert!(parse(&["--duration", "1", "--rate=-5"]).validate().is_err());
        assert!(Args::try_parse_from(["roost-bench", "--qos", "2"]).is_err());
        assert!(Args::try_parse_from(["roost-bench", "--idle", "--connect-rate"]).is_err());
        assert!(
            Args::try_parse_from(["roost-bench", "--target", "roost", "--duration", "1"]).is_err(),
            "roost needs --hub"
        );
    }
}
