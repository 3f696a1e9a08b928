//! roost-server: the data plane (`roost engine`).
//!
//! What it is: one glommio executor per core ("shard"), each with SO_REUSEPORT listeners for
//! the configured [`ListenerSpec`]s, its own connections, its own partition of the `events` log
//! and its own counters; plus one tokio thread for everything that is not the data path — the
//! QUIC control link, the router that owns the device directory, the ops HTTP port (metrics,
//! health, events consumer API) and signals. It is the only crate that imports glommio.
//!
//! What it is not: the registry of record or an API for services (that is `roost-control`),
//! nor storage (`roost-storage` traits, RocksDB in `roost-rocks`), nor protocol logic
//! (`roost-mqtt`, `roost-session`, `roost-iothub` are sans-IO).
//!
//! The key decision: shared nothing on the data path. A connection lives on the core that
//! accepted it; shard state is `Rc`/`Cell`; other threads reach a shard only through its command
//! channel, and the registry reaches shards as an immutable projection swapped whole.
//!
//! Layout: `shard` (executor, listeners, connection table, deadline wheel), `session` (the
//! protocol-neutral device session), `conn` (the MQTT adapter), `router` (directory, commands),
//! `link` (control link, epochs, the one apply path), `listeners` (listeners as data), `log`
//! (group commit of the events log), `metrics`, `ops` (HTTP), `signal` (per-connection
//! wake-ups), `wire` (a connection's bytes: plain or TLS, received through the shard's buffer),
//! `nudge` (wakes every shard from outside, against a glommio 0.9 park).

mod amqp;
mod bridge;
mod conn;
mod https;
mod https_device;
mod https_service;
pub mod link;
pub mod listeners;
pub mod log;
pub mod metrics;
mod nudge;
mod ops;
pub mod router;
pub mod routing;
mod service_calls;
mod session;
pub mod sessions;
pub mod shard;
mod signal;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use glommio::{LocalExecutorBuilder, Placement};
use roost_common::httpd;
use roost_common::shutdown::wait_for_shutdown_signal;
use roost_common::tls::{self, CertPaths};
use roost_endpoints::Dispatchers;
use roost_rocks::EngineDb;
use roost_storage::{LogStore, ReplicaStore};

use link::{EngineState, Origin, Update};
pub use listeners::{ListenerSpec, Protocol};
pub use log::Durability;
use metrics::Metrics;
pub use roost_session::PreAuthLimits;
pub use roost_storage::retention::Retention;
use router::RouterTx;
use shard::{ShardCommand, ShardListener, Shared};

/// Everything `roost engine` is told on its command line.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The hub's data directory: certificates in `certs/`, the engine's database in `engine/`.
    pub data_dir: PathBuf,
    /// The hub host name devices sign their tokens for.
    pub hostname: String,
    /// The control plane's QUIC link address.
    pub control: SocketAddr,
    /// Where devices connect: every shard listens on each.
    pub listeners: Vec<ListenerSpec>,
    /// Ops HTTP: /metrics, /healthz, events consumer API.
    pub ops: SocketAddr,
    /// AMQP over TLS (IoT Hub's 5671): the Event Hubs-compatible endpoint. `None`: no AMQP.
    pub amqp: Option<SocketAddr>,
    /// Number of shards (one per core by default).
    pub cores: usize,
    /// Name the engine gives itself on the control link.
    pub node: String,
    pub durability: Durability,
    /// Shortest time between two commits of a partition: a trickle of messages shares one
    /// sync per window; a batch of 64 KiB or more is committed at once.
    pub commit_window: Duration,
    /// Caps on device connections not yet authenticated.
    pub pre_auth: PreAuthLimits,
    /// What the events log keeps.
    pub retention: Retention,
}

/// Applies the events log's retention on a thread of its own: every partition, every minute
/// (or a quarter of the retention time, if that is shorter; at least every second).
fn start_retention(
    log: Arc<dyn LogStore>,
    policy: Retention,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let every = (policy.max_age / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    std::thread::Builder::new()
        .name("retention".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let now_ms = session::unix_now().as_millis() as u64;
            for p in 0..log.partition_count() {
                match roost_storage::retention::enforce(log.as_ref(), p, policy, now_ms) {
                    Ok(t) if t.records > 0 => {
                        metrics
                            .events_expired
                            .with_label_values(&[&p.to_string()])
                            .inc_by(t.records);
                        tracing::info!(
                            partition = p,
                            records = t.records,
                            first = t.first,
                            "retention deleted old records"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(partition = p, error = %e, "retention pass failed"),
                }
            }
        })
        .context("starting the retention thread")?;
    Ok(())
}

/// Serves the ops port (metrics, probes, the events consumer API) on a thread of its own, so a
/// slow read of the log never delays the control link or the router. Returns once it listens.
fn start_ops(
    addr: SocketAddr,
    ops: Arc<ops::Ops>,
    token: String,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    listen_on_thread("ops", addr, "ops", move |listener| async move {
        let limited = metrics.ops_limited.clone();
        let limits = httpd::Limits {
            on_limit: Arc::new(move |reason| limited.with_label_values(&[reason]).inc()),
            ..httpd::Limits::new()
        };
        httpd::serve(
            listener,
            None,
            limits,
            httpd::admit_bearer(token, ops::MAX_REQUEST_BODY),
            move |req| ops.clone().handle(req),
        )
        .await;
    })
}

/// Serves `addr` on a thread named `name` with a small tokio runtime of its own (the ops port,
/// the AMQP listener: work that must never run on a shard); returns once it listens, or why it
/// cannot (`what` names the port in that error).
fn listen_on_thread<F, Fut>(
    name: &str,
    addr: SocketAddr,
    what: &str,
    serve: F,
) -> anyhow::Result<()>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let what = what.to_string();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = bound_tx.send(Err(anyhow::anyhow!("{what} runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = bound_tx.send(Err(anyhow::anyhow!(
                            "cannot listen on {what} address {addr}: {e}"
                        )));
                        return;
                    }
                };
                let _ = bound_tx.send(Ok(()));
                serve(listener).await;
            });
        })
        .with_context(|| format!("starting the {name} thread"))?;
    bound_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the {name} thread ended before listening"))?
}

/// Runs the engine until SIGINT or SIGTERM. `on_ready` is called once every shard listens and
/// the ops port is up.
pub fn run(config: EngineConfig, on_ready: impl FnOnce() + Send + 'static) -> anyhow::Result<()> {
    roost_common::hubfile::private_dir(&config.data_dir)?;
    roost_common::hubfile::private_dir(&config.data_dir.join("engine"))?;
    let ops_token = roost_common::hubfile::ops_token(&config.data_dir)?;
    let certs = CertPaths::new(&config.data_dir);
    let db = EngineDb::open(&config.data_dir.join("engine"), config.cores)?;
    let log: Arc<dyn LogStore> = Arc::new(db.log());
    let replica: Arc<dyn ReplicaStore> = Arc::new(db.replica());
    let metrics = Arc::new(Metrics::new());
    let (router, router_rx) = RouterTx::channel();

    // Start-up is "apply the persisted state to an empty engine", through the code that applies
    // what control sends: the data plane works before control answers.
    // Outbound HTTPS (webhook endpoints) trusts the system's roots and the hub's CA.
    let outbound_tls = match tls::outbound_client_config(&certs) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "no TLS for https webhook endpoints");
            None
        }
    };
    let endpoints = Arc::new(Dispatchers::new(
        log.clone(),
        metrics.endpoints.clone(),
        config.data_dir.clone(),
        outbound_tls,
        roost_endpoints::Pace::default(),
    ));
    let state = Arc::new(EngineState::empty(
        replica.clone(),
        metrics.clone(),
        router.clone(),
        endpoints.clone(),
    ));
    let (seq, devices) = replica.load().context("loading the registry replica")?;
    tracing::info!(seq, devices = devices.len(), "registry replica loaded");
    link::apply(&state, Update::Snapshot { seq, devices }, Origin::Replica)?;
    match replica.load_epoch().context("loading the applied epoch")? {
        None => tracing::info!("no config epoch applied yet"),
        Some(epoch) => {
            let version = epoch.version;
            if let Err(e) = link::apply(&state, Update::Epoch(epoch), Origin::Replica) {
                tracing::error!(version, error = %e, "the persisted config epoch no longer applies; waiting for control");
            }
        }
    }

    let mut listeners = Vec::new();
    for spec in &config.listeners {
        let tls = match spec.tls {
            true => Some(tls::device_server_config(&certs)?),
            false => None,
        };
        listeners.push(ShardListener {
            protocol: spec.protocol,
            addr: spec.addr,
            tls,
        });
    }

    let sessions = Arc::new(
        sessions::Sessions::load(Arc::new(db.replica()))
            .context("loading the persistent sessions")?,
    );
    tracing::info!(sessions = sessions.len(), "persistent sessions loaded");
    let (to_control, from_router) = tokio::sync::mpsc::unbounded_channel();
    let (cmd_txs, cmd_rxs): (Vec<_>, Vec<_>) = (0..config.cores)
        .map(|_| crossbeam::channel::unbounded())
        .unzip();
    let nudges: Vec<nudge::Nudge> = (0..config.cores).map(|_| nudge::Nudge::default()).collect();
    let (tunnels_tx, tunnels_rx) = tokio::sync::mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        hostname: config.hostname.clone(),
        registry: state.registry.clone(),
        metrics: metrics.clone(),
        log: log.clone(),
        durability: config.durability,
        commit_window: config.commit_window,
        router: router.clone(),
        nudges: nudges.clone(),
        pre_auth: roost_session::PreAuthGate::new(config.pre_auth),
        quotas: state.quotas.clone(),
        cas: state.cas.clone(),
        routes: state.routes.clone(),
        hub_name: config
            .hostname
            .split('.')
            .next()
            .unwrap_or(&config.hostname)
            .to_string(),
        shards: config.cores,
        sessions: sessions.clone(),
        amqp_tunnels: config.amqp.is_some().then_some(tunnels_tx),
        services: state.services.clone(),
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
        state,
        shards: cmd_txs.clone(),
    });

    let ops = Arc::new(ops::Ops {
        log: log.clone(),
        metrics: metrics.clone(),
        registry: link_ctx.state.registry.clone(),
    });
    start_ops(config.ops, ops, ops_token, metrics.clone())?;
    if let Some(addr) = config.amqp {
        let endpoint = Arc::new(amqp::AmqpEndpoint {
            log: log.clone(),
            metrics: metrics.clone(),
            hostname: config.hostname.clone(),
            entity: shared.hub_name.clone(),
            policies: link_ctx.state.policies.clone(),
            consumer_groups: link_ctx.state.consumer_groups.clone(),
            created_ms: session::unix_now().as_millis() as i64,
            readers: Default::default(),
            connections: Default::default(),
            pre_auth: shared.pre_auth.clone(),
            services: link_ctx.state.services.clone(),
            shards: cmd_txs.clone(),
            nudges: shared.nudges.clone(),
        });
        amqp::start(
            addr,
            tls::device_server_config(&certs)?,
            endpoint,
            tunnels_rx,
        )?;
    }
    start_retention(log.clone(), config.retention, metrics.clone())?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::spawn(router::run(router_rx, cmd_txs.clone(), to_control.clone(), metrics.clone()));
        tokio::spawn(link::run(link_ctx, from_router, to_control));
        let listening: Vec<String> = config.listeners.iter().map(ToString::to_string).collect();
        tracing::info!(listeners = ?listening, ops = %config.ops, shards = config.cores, "engine ready");
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
    drop(router);
    endpoints.stop_all();
    db.flush_wal()
        .map_err(|e| anyhow::anyhow!("flushing the events log: {e}"))?;
    Ok(())
}
