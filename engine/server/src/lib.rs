//! roost-server: the data plane (`roost engine`).
//!
//! What it is: one glommio executor per core ("shard"), each with SO_REUSEPORT listeners for
//! MQTT (TLS, and plain when asked), its own connections, its own partition of the `events` log
//! and its own counters; plus one tokio thread for everything that is not the data path — the
//! QUIC control link, the ops HTTP port (metrics, health, events consumer API) and signals.
//! It is the only crate that imports glommio.
//!
//! What it is not: the registry of record or an API for services (that is `roost-control`).
//!
//! The key decision: shared nothing on the data path. A connection lives on the core that
//! accepted it; shard state is `Rc`/`Cell`; other threads reach a shard only through its command
//! channel, and the registry reaches shards as an immutable projection swapped whole.
//!
//! Layout: `shard` (executor, listeners, connection table), `conn` (one MQTT connection),
//! `auth`, `telemetry` (PUBLISH → record), `log` (events log), `metrics`, `link` (control link),
//! `ops` + `httpd` (HTTP), `tls` (certificates), `signal` (per-connection wake-ups), `wire`
//! (a connection's bytes: plain or TLS, received through the shard's buffer), `nudge` (wakes
//! every shard from outside, against a glommio 0.9 park).

pub mod auth;
mod conn;
pub mod httpd;
pub mod link;
pub mod log;
pub mod metrics;
mod nudge;
mod ops;
pub mod shard;
mod signal;
pub mod telemetry;
pub mod tls;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use glommio::{LocalExecutorBuilder, Placement};
use roost_registry::{Projection, Registry, ReplicaStore, RocksReplica};

pub use log::Durability;
use metrics::Metrics;
use shard::{Listeners, ShardCommand, Shared};
use tls::CertPaths;

/// Everything `roost engine` is told on its command line.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The hub's data directory: certificates in `certs/`, the engine's database in `engine/`.
    pub data_dir: PathBuf,
    /// The hub host name devices sign their tokens for.
    pub hostname: String,
    /// The control plane's QUIC link address.
    pub control: SocketAddr,
    /// MQTT over TLS (IoT Hub's :8883).
    pub mqtt: Option<SocketAddr>,
    /// Plain MQTT, for benchmarks only.
    pub plain_mqtt: Option<SocketAddr>,
    /// Ops HTTP: /metrics, /healthz, events consumer API.
    pub ops: SocketAddr,
    /// Number of shards (one per core by default).
    pub cores: usize,
    /// Name the engine gives itself on the control link.
    pub node: String,
    pub durability: Durability,
    /// Shortest time between two commits of a partition: a trickle of messages shares one
    /// sync per window; a batch of 64 KiB or more is committed at once.
    pub commit_window: Duration,
}

/// Runs the engine until SIGINT or SIGTERM. `on_ready` is called once every shard listens and
/// the ops port is up.
pub fn run(config: EngineConfig, on_ready: impl FnOnce() + Send + 'static) -> anyhow::Result<()> {
    let certs = CertPaths::new(&config.data_dir);
    let db_path = config.data_dir.join("engine");
    let db = log::open_db(&db_path, config.cores)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", db_path.display()))?;
    let metrics = Arc::new(Metrics::new());

    // Boot from the persisted replica: the data plane must work before control answers.
    let replica = RocksReplica::new(db.clone());
    let (seq, devices) = replica.load().context("loading the registry replica")?;
    tracing::info!(seq, devices = devices.len(), "registry replica loaded");
    let registry = Arc::new(Registry::new(Projection::new(seq, devices)));
    metrics.registry_sequence.set(seq as i64);
    metrics.registry_devices.set(registry.load().len() as i64);

    let tls = match config.mqtt {
        Some(addr) => Some((addr, tls::device_server_config(&certs)?)),
        None => None,
    };
    let listeners = Listeners {
        mqtt_tls: tls,
        mqtt_plain: config.plain_mqtt,
    };

    let (link_tx, link_rx) = tokio::sync::mpsc::unbounded_channel();
    let (cmd_txs, cmd_rxs): (Vec<_>, Vec<_>) = (0..config.cores)
        .map(|_| crossbeam::channel::unbounded())
        .unzip();
    let nudges: Vec<nudge::Nudge> = (0..config.cores).map(|_| nudge::Nudge::default()).collect();
    let shared = Arc::new(Shared {
        hostname: config.hostname.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
        db: db.clone(),
        durability: config.durability,
        commit_window: config.commit_window,
        link: link_tx,
        shards: cmd_txs.clone(),
        nudges: nudges.clone(),
    });

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut handles = Vec::new();
    for (id, commands) in cmd_rxs.into_iter().enumerate() {
        let (shared, listeners, ready) = (shared.clone(), listeners.clone(), ready_tx.clone());
        let handle = LocalExecutorBuilder::new(Placement::Fixed(id % cpus))
            .name(&format!("shard-{id}"))
            // Locked memory is scarce (ulimit -l 8 MiB); 1 MiB per shard fits (DEPENDENCIES.md).
            .io_memory(1 << 20)
            // Task quota: a busy connection yields within a millisecond (see conn.rs).
            .preempt_timer(Duration::from_millis(1))
            .spawn(move || shard::run(id, shared, listeners, commands, ready))
            .map_err(|e| anyhow::anyhow!("starting shard {id}: {e}"))?;
        handles.push(handle);
    }
    drop(ready_tx);
    for _ in 0..config.cores {
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!(e),
            Err(_) => anyhow::bail!("a shard did not start (see its error above)"),
        }
    }
    let nudger = nudge::Nudger::start(nudges).context("starting the shard nudge thread")?;

    let mut link_client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls::link_client_config(&certs)?)
            .map_err(|e| anyhow::anyhow!("control link TLS: {e}"))?,
    ));
    // Notice a vanished control plane within seconds, not the default half minute.
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(Duration::from_secs(6).try_into()?));
    link_client.transport_config(Arc::new(transport));
    let link_ctx = Arc::new(link::LinkContext {
        node: config.node.clone(),
        control: config.control,
        client: link_client,
        registry,
        replica: Box::new(replica),
        metrics: metrics.clone(),
        shards: cmd_txs.clone(),
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let ops_listener = tokio::net::TcpListener::bind(config.ops)
            .await
            .with_context(|| format!("cannot listen on ops address {}", config.ops))?;
        let ops = Arc::new(ops::Ops { db: db.clone(), metrics });
        tokio::spawn(httpd::serve(ops_listener, None, move |req| ops.clone().handle(req)));
        tokio::spawn(link::run(link_ctx, link_rx));
        tracing::info!(mqtt = ?config.mqtt, plain_mqtt = ?config.plain_mqtt, ops = %config.ops, shards = config.cores, "engine ready");
        on_ready();
        wait_for_shutdown_signal().await;
        anyhow::Ok(())
    })?;

    tracing::info!("engine stopping");
    for tx in &cmd_txs {
        let _ = tx.send(ShardCommand::Shutdown);
    }
    for h in handles {
        if h.join().is_err() {
            tracing::error!("a shard ended abnormally");
        }
    }
    drop(nudger);
    db.flush_wal(true).context("flushing the events log")?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
