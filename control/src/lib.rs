//! roost-control: the control plane (`roost control`).
//!
//! What it is: the registry of record (device identities and shared access policies in
//! RocksDB), the service REST API on :8443 that the Azure IoT service SDKs speak, and the QUIC
//! server of the control link that keeps every engine's registry replica current and collects
//! connection state. It also generates the hub's certificates and writes `hub.json`.
//!
//! What it is not: on the data path, nor a glommio user. No device message passes through
//! control; engines keep working from their replicas while it is down. The `roost` binary that
//! runs it lives in `control/cli` (crate `roost-cli`), above this crate and the engine.
//!
//! Layout: `store` (RocksDB), `device` + `policies` (data), `twins` (device twins), `methods` (direct methods), `c2d` (cloud-to-device queues and feedback), `api`
//! (REST), `linkserver` (QUIC), `certs`, `cas` (CA certificates for X.509 devices), `dps/`
//! (the Device Provisioning Service on its own ports), `files` + `blobs` + `azure_store`
//! (file upload: upload targets, the embedded blob store, or a storage account), `metrics`.
//! HTTP serving, certificate loading and hub.json come from `roost-common`.

pub mod api;
pub mod azure_store;
pub mod blobs;
pub mod c2d;
pub mod cas;
pub mod certs;
pub mod configurations;
pub mod consumer_groups;
pub mod device;
pub mod dps;
pub mod events;
pub mod files;
pub mod jobs;
pub mod linkserver;
pub mod methods;
pub mod metrics;
pub mod policies;
pub mod query;
pub mod routes;
pub mod store;
pub mod twins;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use hyper::StatusCode;
use roost_common::shutdown::wait_for_shutdown_signal;
use roost_common::{httpd, hubfile, tls};
use serde_json::json;

pub use roost_session::quota::{QuotaError, Quotas};

/// Everything `roost control` is told on its command line.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub data_dir: PathBuf,
    pub hostname: String,
    /// Service REST API (TLS).
    pub service: SocketAddr,
    /// Plain HTTP: /metrics, /healthz.
    pub ops: SocketAddr,
    /// QUIC control link.
    pub link: SocketAddr,
    /// The hub's quotas: metered here (the service API) and sent to every engine in the
    /// config epoch.
    pub quotas: Quotas,
    /// The provisioning service's listeners and host name.
    pub dps: dps::DpsConfig,
    /// Where file uploads go (`None`: file upload is off).
    pub blob: Option<BlobConfig>,
}

/// The store file uploads go to.
#[derive(Debug, Clone)]
pub enum BlobConfig {
    /// The embedded store: where it listens (HTTPS) and the host name devices reach it by.
    Embedded { addr: SocketAddr, hostname: String },
    /// An Azure Storage account (or Azurite): its blob endpoint URL, its key (base64), and
    /// the container uploads go to (which must exist).
    Azure { url: String, key: String, container: String },
}

/// Each completed upload is also the hub's `file_upload` event, routable like its other
/// events.
fn file_upload_events(
    store: Arc<store::Store>,
    events: Arc<events::HubEvents>,
) -> Box<dyn Fn(&files::Notification) + Send + Sync> {
    Box::new(move |n: &files::Notification| {
        tracing::info!(device = %n.device_id, blob = %n.blob_name, bytes = n.size, "file uploaded");
        let mut writes = store.writes();
        events::HubEvent::new(events::EventSource::FileUpload, &n.device_id, "fileUploaded", n.body())
            .write_in(&mut writes);
        match writes.commit() {
            Ok(()) => events.written(),
            Err(e) => tracing::warn!(error = %e, "the file upload event could not be stored"),
        }
    })
}

/// Runs the control plane until SIGINT or SIGTERM; `on_ready` once every port listens.
pub fn run(config: ControlConfig, on_ready: impl FnOnce() + Send + 'static) -> anyhow::Result<()> {
    hubfile::private_dir(&config.data_dir)?;
    let data_dir = std::fs::canonicalize(&config.data_dir)?;
    let certs = certs::ensure(&data_dir, &config.hostname)?;
    hubfile::private_dir(&data_dir.join("control"))?;
    let ops_token = hubfile::ops_token(&data_dir)?;
    let store =
        store::Store::open(&data_dir.join("control")).context("opening the control store")?;
    let metrics = Arc::new(metrics::ControlMetrics::new());

    let owner = store
        .policy("iothubowner")?
        .context("the iothubowner policy is missing")?;
    hubfile::merge(
        &data_dir,
        json!({
            "hostname": config.hostname,
            "ports": { "service": config.service.port() },
            "ca": certs.ca(),
            "service_connection_string": format!(
                "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
                config.hostname, owner.name, owner.primary_key
            ),
            // The Event Hubs-compatible endpoint: the SDKs connect to 5671 on the Endpoint's
            // host (the engine's --amqp; hub.json's ports.amqp when it is another port).
            "eventhubs_connection_string": format!(
                "Endpoint=sb://{}/;SharedAccessKeyName={};SharedAccessKey={};EntityPath={}",
                config.hostname,
                owner.name,
                owner.primary_key,
                config.hostname.split('.').next().unwrap_or(&config.hostname)
            ),
            "service_url": format!("https://{}", config.service),
            "control_ops_url": format!("http://{}", config.ops),
        }),
    )?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let service_tls = tokio_rustls::TlsAcceptor::from(tls::device_server_config(&certs)?);
        let service = tokio::net::TcpListener::bind(config.service)
            .await
            .with_context(|| format!("cannot listen on service address {}", config.service))?;
        let commands = Arc::new(linkserver::Commands::default());
        let events = Arc::new(events::HubEvents::new(
            store.clone(),
            commands.clone(),
            metrics.clone(),
            &config.hostname,
        ));
        tokio::spawn(events.clone().run());
        let retarget = Arc::new(configurations::Retarget::default());
        let twins = Arc::new(twins::Twins {
            store: store.clone(),
            commands: commands.clone(),
            metrics: metrics.clone(),
            events: events.clone(),
            retarget: retarget.clone(),
        });
        let methods = Arc::new(methods::Methods::new(
            store.clone(),
            commands.clone(),
            metrics.clone(),
        ));
        let c2d = Arc::new(c2d::C2d::new(
            store.clone(),
            commands.clone(),
            metrics.clone(),
        ));
        // Expired C2D messages go (with their feedback) within a second.
        let sweeper = c2d.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                let c2d = sweeper.clone();
                match tokio::task::spawn_blocking(move || c2d.sweep_expired()).await {
                    Ok(Err(e)) => tracing::warn!(error = %e, "expiring C2D messages failed"),
                    Err(e) => tracing::warn!(error = %e, "the C2D expiry task failed"),
                    Ok(Ok(_)) => {}
                }
            }
        });
        let queries = Arc::new(query::Queries {
            store: store.clone(),
        });
        let jobs = Arc::new(jobs::Jobs::new(
            store.clone(),
            queries.clone(),
            twins.clone(),
            methods.clone(),
            metrics.clone(),
        ));
        tokio::spawn(jobs.clone().run());
        let configurations = Arc::new(configurations::Configurations {
            store: store.clone(),
            twins: twins.clone(),
            queries: queries.clone(),
            retarget,
        });
        tokio::spawn(configurations.clone().run());
        // The config epoch engines run: the stored routing (its version numbers the epoch) and
        // the hub's quotas. A change of settings changes the hash, which is what engines compare.
        let routing = routes::stored(&store)?;
        let policies = routes::policy_entries(&store)?;
        let (epoch, _) = tokio::sync::watch::channel(routes::epoch(
            &routing,
            config.quotas.to_named(),
            policies.clone(),
            consumer_groups::stored(&store)?,
            cas::trusted(&store)?,
        ));
        let routes = Arc::new(routes::Routes {
            store: store.clone(),
            hub_name: config.hostname.split('.').next().unwrap_or(&config.hostname).to_string(),
            limits: config.quotas.to_named(),
            policies,
            epoch: epoch.clone(),
            verdicts: Arc::default(),
        });
        let api = Arc::new(api::Api {
            store: store.clone(),
            hostname: config.hostname.clone(),
            metrics: metrics.clone(),
            throttle: api::Throttle::new(&config.quotas),
            twins: twins.clone(),
            methods: methods.clone(),
            c2d: c2d.clone(),
            queries: queries.clone(),
            jobs: jobs.clone(),
            configurations,
            routes: routes.clone(),
        });
        let admit_api = api.clone();
        tokio::spawn(httpd::serve(
            service,
            Some(service_tls),
            metrics.http_limits("service"),
            move |parts: &_| admit_api.admit(parts),
            {
                let api = api.clone();
                move |req| api.clone().handle(req)
            },
        ));

        if config.dps.https.is_some() || config.dps.mqtt.is_some() || config.dps.amqp.is_some() {
            let identity = dps::ServiceIdentity::ensure(&store)?;
            hubfile::merge(
                &data_dir,
                json!({ "dps": {
                    "hostname": config.dps.hostname,
                    "id_scope": identity.id_scope,
                    "service_connection_string": format!(
                        "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
                        config.dps.hostname, identity.policy_name, identity.primary_key
                    ),
                    "ports": {
                        "https": config.dps.https.map(|a| a.port()),
                        "mqtt": config.dps.mqtt.map(|a| a.port()),
                        "amqp": config.dps.amqp.map(|a| a.port()),
                    },
                    // Where this host's own tools reach the HTTPS API.
                    "url": config.dps.https.map(|mut a| {
                        if a.ip().is_unspecified() {
                            a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                        }
                        format!("https://{a}")
                    }),
                }}),
            )?;
            let provisioning = Arc::new(dps::Provisioning::new(
                store.clone(),
                api.clone(),
                identity,
                config.dps.clone(),
                config.hostname.clone(),
                metrics.clone(),
            ));
            let dps_tls = tokio_rustls::TlsAcceptor::from(tls::device_server_config(&certs)?);
            if let Some(addr) = config.dps.https {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on the provisioning HTTPS address {addr}"))?;
                tokio::spawn(dps::http::serve(provisioning.clone(), listener, dps_tls.clone(), metrics.http_limits("dps")));
            }
            if let Some(addr) = config.dps.mqtt {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on the provisioning MQTT address {addr}"))?;
                tokio::spawn(dps::mqtt::serve(provisioning.clone(), listener, dps_tls.clone()));
            }
            if let Some(addr) = config.dps.amqp {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on the provisioning AMQP address {addr}"))?;
                tokio::spawn(dps::amqp::serve(provisioning, listener, dps_tls));
            }
            tracing::info!(https = ?config.dps.https, mqtt = ?config.dps.mqtt, amqp = ?config.dps.amqp, hostname = %config.dps.hostname, "provisioning service ready");
        }

        let ops = tokio::net::TcpListener::bind(config.ops)
            .await
            .with_context(|| format!("cannot listen on ops address {}", config.ops))?;
        let (ops_store, ops_metrics) = (store.clone(), metrics.clone());
        tokio::spawn(httpd::serve(ops, None, metrics.http_limits("ops"), httpd::admit_bearer(ops_token, 0), move |req| {
            let (store, metrics) = (ops_store.clone(), ops_metrics.clone());
            async move {
                match req.uri().path() {
                    "/healthz" => httpd::text(StatusCode::OK, "ok\n"),
                    "/metrics" => {
                        metrics.registry_sequence.set(store.registry_seq().unwrap_or(0) as i64);
                        metrics.c2d_pending.set(store.c2d_scan(&[]).map_or(0, |q| q.len()) as i64);
                        httpd::text(StatusCode::OK, metrics.encode())
                    }
                    _ => httpd::text(StatusCode::NOT_FOUND, "no such ops endpoint\n"),
                }
            }
        }));

        let link_tls = quinn::crypto::rustls::QuicServerConfig::try_from(tls::link_server_config(&certs)?)
            .map_err(|e| anyhow::anyhow!("control link TLS: {e}"))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(link_tls));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(std::time::Duration::from_secs(1)));
        transport.max_idle_timeout(Some(std::time::Duration::from_secs(6).try_into()?));
        server_config.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::server(server_config, config.link)
            .with_context(|| format!("cannot listen on link address {}", config.link))?;
        let files = match &config.blob {
            None => None,
            Some(BlobConfig::Azure { url, key, container }) => {
                let target = Arc::new(azure_store::AzureStore::new(url, key, &data_dir)?);
                tracing::info!(%url, %container, "file uploads go to a storage account");
                Some(Arc::new(files::FileUploads::new(
                    target,
                    container.clone(),
                    store.clone(),
                    metrics.clone(),
                    file_upload_events(store.clone(), events.clone()),
                )))
            }
            Some(BlobConfig::Embedded { addr, hostname: host }) => {
                let key = match store.meta_value(b"blob_key")? {
                    Some(k) => k,
                    None => {
                        let mut k = vec![0u8; 32];
                        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k)
                            .map_err(|_| anyhow::anyhow!("no randomness for the blob store's key"))?;
                        store.put_meta_value(b"blob_key", &k)?;
                        k
                    }
                };
                let root = data_dir.join("blobs");
                hubfile::private_dir(&root)?;
                let host = match addr.port() {
                    443 => host.clone(),
                    port => format!("{host}:{port}"),
                };
                let blobs = Arc::new(blobs::BlobStore::new(root, key, host));
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on the blob store address {addr}"))?;
                let blob_tls = tokio_rustls::TlsAcceptor::from(tls::device_server_config(&certs)?);
                let limits = httpd::Limits {
                    max_connections: 256,
                    max_body: blobs::MAX_BLOB_BODY,
                    body_read: std::time::Duration::from_secs(600),
                    ..metrics.http_limits("blob")
                };
                tokio::spawn(blobs::serve(blobs.clone(), listener, blob_tls, limits));
                hubfile::merge(&data_dir, json!({ "blob": { "url": format!("https://{}", blobs.host) } }))?;
                tracing::info!(%addr, host = %blobs.host, "blob store ready");
                Some(Arc::new(files::FileUploads::new(
                    blobs,
                    "fileuploads".into(),
                    store.clone(),
                    metrics.clone(),
                    file_upload_events(store.clone(), events.clone()),
                )))
            }
        };
        let link = Arc::new(linkserver::LinkServer {
            store: store.clone(),
            metrics: metrics.clone(),
            epoch,
            verdicts: routes.verdicts.clone(),
            commands,
            twins,
            methods,
            c2d,
            events: events.clone(),
            api,
            files,
        });
        tokio::spawn(link.run(endpoint.clone()));

        tracing::info!(service = %config.service, ops = %config.ops, link = %config.link, hostname = %config.hostname, "control ready");
        on_ready();
        wait_for_shutdown_signal().await;
        tracing::info!("control stopping");
        endpoint.close(0u32.into(), b"control stopping");
        anyhow::Ok(())
    })
}
