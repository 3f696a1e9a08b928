//! The engine's AMQP listener (`--amqp`, IoT Hub's 5671), today the Event Hubs-compatible
//! endpoint over the `events` log (issue 10): TLS, a `roost_amqp::Connection` per socket,
//! `$cbs` put-token, `$management` READ, and receivers on
//! `{hub}/ConsumerGroups/{group}/Partitions/{p}` fed from the log by credit.
//!
//! It runs on a thread of its own with a small tokio runtime, like the ops port: reading the
//! log is a blocking store read, and a reader that falls behind must never hold a shard.
//! IoT Hub's service links (`service.rs`: cloud-to-device sends and feedback) call control
//! over the control link. An attach to any other address is refused with `amqp:not-found`.

mod device;
mod eventhubs;
mod service;

use crate::metrics::Transport;
use roost_iothub::x509::{CertError, ClientCert};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use roost_amqp::{
    AmqpError, Attach, Body, Config, Connection, DeliveryState, Event, LinkId, Message, Role,
};
use roost_eventhubs::cbs::{self, Grant};
use roost_eventhubs::{Authority, PolicyKeys, Right};
use roost_storage::LogStore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::metrics::Metrics;

/// How often a caught-up receiver with credit looks for new records.
const POLL: Duration = Duration::from_millis(20);

/// What the listener needs.
pub struct AmqpEndpoint {
    pub log: Arc<dyn LogStore>,
    pub metrics: Arc<Metrics>,
    pub hostname: String,
    /// The event hub's name: the hub name (the host name's first label).
    pub entity: String,
    /// The policies of the epoch in force.
    pub policies: Arc<RwLock<Vec<PolicyKeys>>>,
    /// The consumer groups of the epoch in force besides `$Default`, lowercase.
    pub consumer_groups: Arc<RwLock<Vec<String>>>,
    /// When the endpoint started, as the event hub's `created_at`.
    pub created_ms: i64,
    /// The receivers on each consumer group and partition, for epoch ownership.
    pub readers: std::sync::Mutex<HashMap<(String, usize), Vec<Reader>>>,
    /// Numbers the connections (to tell their readers apart).
    pub connections: std::sync::atomic::AtomicU64,
    /// The engine-wide caps on unauthenticated connections (shared with MQTT): a connection
    /// holds a slot from accept until its first put-token succeeds.
    pub pre_auth: Arc<roost_session::PreAuthGate>,
    /// Calls of control for the service links (C2D sends, feedback).
    pub services: Arc<crate::service_calls::ServiceCalls>,
    /// Each shard's command channel and wake-up: a device's session runs on a shard.
    pub shards: Vec<crossbeam::channel::Sender<crate::shard::ShardCommand>>,
    pub nudges: Vec<crate::nudge::Nudge>,
}

pub use eventhubs::Reader;

/// An AMQP connection that came over a WebSocket on port 443: a shard holds the socket, TLS
/// and WebSocket framing and pumps the stream through `stream`; it runs here like any other.
pub struct Tunnel {
    pub stream: tokio::io::DuplexStream,
    /// The certificates the client presented in port 443's TLS handshake, if any.
    pub client_certs: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    /// Its place under the caps on unauthenticated connections, until its first put-token.
    pub slot: roost_session::PreAuthSlot,
}

/// Starts the listener on a thread of its own; returns once it listens. `tunnels` brings the
/// AMQP-over-WebSocket connections port 443 accepted.
pub fn start(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    endpoint: Arc<AmqpEndpoint>,
    mut tunnels: tokio::sync::mpsc::UnboundedReceiver<Tunnel>,
) -> anyhow::Result<()> {
    crate::listen_on_thread("amqp", addr, "AMQP", move |listener| async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let (socket, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
                Some(tunnel) = tunnels.recv() => {
                    let endpoint = endpoint.clone();
                    tokio::spawn(async move {
                        endpoint.metrics.amqp_connections.inc();
                        let cert = tunnel.client_certs.as_deref().map(ClientCert::from_chain);
                        serve(tunnel.stream, &endpoint, tunnel.slot, Transport::AmqpWs, cert).await;
                        endpoint.metrics.amqp_connections.dec();
                    });
                    continue;
                }
            };
            let slot = match endpoint.pre_auth.enter(peer.ip()) {
                Ok(slot) => slot,
                Err(reason) => {
                    endpoint
                        .metrics
                        .amqp_refused
                        .with_label_values(&[reason.error_code()])
                        .inc();
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            let (acceptor, endpoint) = (acceptor.clone(), endpoint.clone());
            tokio::spawn(async move {
                endpoint.metrics.amqp_connections.inc();
                let handshake =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(socket));
                if let Ok(Ok(stream)) = handshake.await {
                    let cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .filter(|c| !c.is_empty())
                        .map(ClientCert::from_chain);
                    serve(stream, &endpoint, slot, Transport::Amqp, cert).await;
                }
                endpoint.metrics.amqp_connections.dec();
            });
        }
    })
}

/// What a link is for.
enum Link {
    /// The client sends put-token requests here (target `$cbs`).
    CbsIn,
    /// Answers go here (source `$cbs`).
    CbsOut,
    ManagementIn,
    ManagementOut,
    /// An Event Hubs receiver: the next offset of `partition` to send.
    Receiver {
        group: String,
        partition: usize,
        next: u64,
        /// The partition's end as last looked up.
        end: u64,
    },
    /// A service sends cloud-to-device messages here (`/messages/devicebound`); `in_flight`
    /// of them wait for control.
    C2dIn {
        in_flight: u32,
    },
    /// Feedback batches go here (`/messages/serviceBound/feedback`).
    FeedbackOut(service::Feedback),
    /// One of a device's links (`client` is `device` or `device/module`).
    Device {
        client: String,
        role: device::DeviceLink,
    },
}

impl Link {
    /// The `kind` label of `roost_amqp_links_total`.
    fn kind(&self) -> &'static str {
        match self {
            Link::CbsIn | Link::CbsOut => "cbs",
            Link::ManagementIn | Link::ManagementOut => "management",
            Link::Receiver { .. } => "eventhubs_receiver",
            Link::C2dIn { .. } => "c2d_sender",
            Link::FeedbackOut(_) => "feedback_receiver",
            Link::Device { role, .. } => role.kind(),
        }
    }
}

impl Session {
    /// Whether a put-token succeeded on this connection (a policy's, or a device's).
    fn authenticated(&self) -> bool {
        !self.grants.is_empty() || self.devices.values().any(device::Device::authenticated)
    }
}

/// Work finished off the connection's task, for it to act on.
enum Done {
    /// Control answered a cloud-to-device send: settle the delivery with `state`.
    C2dSent {
        link: LinkId,
        delivery_id: u32,
        state: DeliveryState,
    },
    /// Control completed the feedback batch the receiver accepted.
    FeedbackCompleted { link: LinkId },
    /// A device session on a shard said something.
    Device {
        client: String,
        event: crate::bridge::FromSession,
    },
    /// Control answered a feedback read.
    Feedback {
        link: LinkId,
        reply: Result<roost_model::link::ServiceReply, crate::service_calls::CallFailed>,
    },
}

struct Session {
    /// This connection's number.
    id: u64,
    /// Where other connections send evictions of this one's receivers.
    evict: tokio::sync::mpsc::UnboundedSender<(LinkId, AmqpError)>,
    conn: Connection,
    links: HashMap<LinkId, Link>,
    /// What the connection's put-tokens granted.
    grants: Vec<Grant>,
    /// Answers waiting for credit on their reply link (`$cbs` or `$management`).
    replies: Vec<(bool, Message)>,
    /// Held until the first put-token succeeds.
    pre_auth: roost_session::PreAuthSlot,
    /// Where work finished elsewhere reports back ([`Done`]).
    done: tokio::sync::mpsc::UnboundedSender<Done>,
    /// The devices (and modules) whose put-token came on this connection.
    devices: HashMap<String, device::Device>,
    /// `Amqp` (port 5671) or `AmqpWs` (tunnelled from port 443), for its devices' metrics.
    transport: Transport,
    /// The client certificate the TLS handshake carried: a device link attached without a
    /// put-token is authenticated by it (spec §1.4).
    client_cert: Option<Result<ClientCert, CertError>>,
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    endpoint: &AmqpEndpoint,
    slot: roost_session::PreAuthSlot,
    transport: Transport,
    client_cert: Option<Result<ClientCert, CertError>>,
) {
    let config = Config {
        container_id: format!("roost-{}", endpoint.hostname),
        ..Config::default()
    };
    let (evict, mut evicted) = tokio::sync::mpsc::unbounded_channel();
    let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
    let mut s = Session {
        id: endpoint
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        evict,
        conn: Connection::new(config, Instant::now()),
        links: HashMap::new(),
        grants: Vec::new(),
        replies: Vec::new(),
        pre_auth: slot,
        done,
        devices: HashMap::new(),
        transport,
        client_cert,
    };
    let _readers = eventhubs::Release {
        endpoint,
        conn: s.id,
    };
    let mut buf = vec![0u8; 16 * 1024];
    // A pass that filled a receiver's batch may have left records and credit: go again at
    // once rather than after the poll interval.
    let mut busy = false;
    loop {
        let deadline = s
            .conn
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(60))
            .min(grants_end(&s));
        let waiting = s
            .links
            .values()
            .any(|l| matches!(l, Link::Receiver { .. } | Link::FeedbackOut(_)));
        let wake = match (busy, waiting) {
            (true, _) => Instant::now(),
            (false, true) => deadline.min(Instant::now() + POLL),
            (false, false) => deadline,
        };
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => s.conn.handle_bytes(Instant::now(), &buf[..n]),
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                s.conn.handle_timeout(Instant::now());
            }
            Some((link, error)) = evicted.recv() => {
                if s.links.remove(&link).is_some() {
                    s.conn.detach(link, Some(error));
                }
            }
            Some(done) = finished.recv() => match done {
                Done::C2dSent { link, delivery_id, state } => {
                    service::on_c2d_sent(&mut s, link, delivery_id, state);
                }
                Done::Feedback { link, reply } => service::on_feedback(&mut s, endpoint, link, reply),
                Done::FeedbackCompleted { link } => service::on_feedback_completed(&mut s, link),
                Done::Device { client, event } => device::on_session(&mut s, endpoint, client, event),
            },
        }
        let closed = handle_events(&mut s, endpoint);
        expire_links(&mut s, endpoint);
        busy = pump(&mut s, endpoint);
        while let Some(out) = s.conn.poll_transmit() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
        }
        if closed {
            let _ = stream.shutdown().await;
            break;
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn authority(endpoint: &AmqpEndpoint) -> Authority {
    Authority {
        hostname: endpoint.hostname.clone(),
        entity: endpoint.entity.clone(),
        policies: endpoint
            .policies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    }
}

/// Acts on the connection's events; true once it is closed.
fn handle_events(s: &mut Session, endpoint: &AmqpEndpoint) -> bool {
    let mut closed = false;
    while let Some(e) = s.conn.poll_event() {
        match e {
            // Authentication is the put-token that follows, whatever the mechanism.
            Event::SaslInit { .. } => s.conn.sasl_outcome(true),
            Event::Opened { .. } => {}
            Event::Attach { link, attach } => attach_link(s, endpoint, link, &attach),
            Event::Credit { .. } => {}
            Event::Delivery {
                link,
                delivery_id,
                payload,
                settled,
                ..
            } => {
                if let Some(Link::C2dIn { .. }) = s.links.get(&link) {
                    service::on_c2d(s, endpoint, link, delivery_id, &payload);
                    continue;
                }
                if let Some(Link::Device { client, role }) = s.links.get(&link) {
                    let (client, role) = (client.clone(), *role);
                    device::on_delivery(
                        s,
                        endpoint,
                        link,
                        &client,
                        role,
                        delivery_id,
                        settled,
                        &payload,
                    );
                    continue;
                }
                if matches!(s.links.get(&link), Some(Link::CbsIn | Link::ManagementIn))
                    && s.conn.credit(link) < REQUEST_CREDIT / 2
                {
                    s.conn.grant(link, REQUEST_CREDIT);
                }
                let request = Message::read(&payload);
                let node = s.links.get(&link);
                if request.is_ok() && matches!(node, Some(Link::CbsIn | Link::ManagementIn)) {
                    // A request is settled as taken; its answer goes on the reply link.
                    s.conn.disposition(
                        link.channel,
                        delivery_id,
                        delivery_id,
                        true,
                        DeliveryState::Accepted,
                    );
                }
                match (s.links.get(&link), request) {
                    (Some(Link::CbsIn), Ok(m)) => {
                        if let Some(answer) = put_token(s, endpoint, &m) {
                            s.replies.push((true, answer));
                        }
                    }
                    (Some(Link::ManagementIn), Ok(m)) => {
                        let answer = eventhubs::manage(s, endpoint, &m);
                        s.replies.push((false, answer));
                    }
                    (_, Err(e)) => {
                        endpoint
                            .metrics
                            .amqp_refused
                            .with_label_values(&[e.error_code()])
                            .inc();
                        let rejected = DeliveryState::Rejected(Some(AmqpError::new(
                            "amqp:decode-error",
                            e.to_string(),
                        )));
                        s.conn
                            .disposition(link.channel, delivery_id, delivery_id, true, rejected);
                    }
                    _ => {
                        let rejected = DeliveryState::Rejected(Some(AmqpError::new(
                            "amqp:not-allowed",
                            "this link takes no messages",
                        )));
                        s.conn
                            .disposition(link.channel, delivery_id, delivery_id, true, rejected);
                    }
                }
            }
            Event::Disposition {
                channel,
                first,
                last,
                state,
                ..
            } => {
                service::on_disposition(s, endpoint, channel, first, last, state.as_ref());
                device::on_disposition(s, channel, first, last, state.as_ref());
            }
            Event::Detached { link, .. } => match s.links.remove(&link) {
                Some(Link::Receiver { .. }) => eventhubs::release(endpoint, s.id, Some(link)),
                Some(Link::Device { client, role }) => device::on_detached(s, &client, role),
                _ => {}
            },
            Event::Closed { error, by_peer } => {
                if let (Some(e), false) = (&error, by_peer) {
                    endpoint
                        .metrics
                        .amqp_refused
                        .with_label_values(&[short(e.condition.as_str())])
                        .inc();
                }
                closed = true;
            }
        }
    }
    closed
}

/// When the earliest put-token of a policy ends (or far off when there is none).
fn grants_end(s: &Session) -> Instant {
    let now = now_unix();
    let soonest = s.grants.iter().map(|g| g.expires).min();
    let far = Instant::now() + Duration::from_secs(3600);
    soonest.map_or(far, |at| {
        let left = Duration::from_secs(at.saturating_sub(now));
        (Instant::now() + left).min(far)
    })
}

/// The path on the hub a service link's put-token must cover with ServiceConnect.
fn scope_of(endpoint: &AmqpEndpoint, link: &Link) -> Option<String> {
    match link {
        Link::Receiver {
            group, partition, ..
        } => Some(format!(
            "{}/consumergroups/{group}/partitions/{partition}",
            endpoint.entity
        )),
        Link::C2dIn { .. } => Some(service::DEVICEBOUND.to_string()),
        Link::FeedbackOut(_) => Some(service::FEEDBACK.to_string()),
        _ => None,
    }
}

/// Tokens end: a policy's put-token that expired without a renewal is dropped, and each
/// service link no remaining token covers is detached with `amqp:unauthorized-access` (a
/// device's links end with its session, which tracks its own token).
fn expire_links(s: &mut Session, endpoint: &AmqpEndpoint) {
    let now = now_unix();
    if s.grants.iter().all(|g| g.expires > now) {
        return;
    }
    s.grants.retain(|g| g.expires > now);
    let ended: Vec<LinkId> = s
        .links
        .iter()
        .filter(|(_, l)| {
            scope_of(endpoint, l).is_some_and(|path| {
                !s.grants
                    .iter()
                    .any(|g| g.covers(&endpoint.hostname, &path, Right::ServiceConnect))
            })
        })
        .map(|(id, _)| *id)
        .collect();
    for link in ended {
        if let Some(Link::Receiver { .. }) = s.links.remove(&link) {
            eventhubs::release(endpoint, s.id, Some(link));
        }
        endpoint
            .metrics
            .amqp_refused
            .with_label_values(&["token_expired"])
            .inc();
        s.conn.detach(
            link,
            Some(AmqpError::new(
                "amqp:unauthorized-access",
                "the put-token this link was authorized by expired and was not renewed",
            )),
        );
    }
}

/// A bounded label from an error condition.
fn short(condition: &str) -> &'static str {
    match condition {
        "amqp:unauthorized-access" => "unauthorized",
        "amqp:not-found" => "not_found",
        "amqp:decode-error" => "decode_error",
        "amqp:connection:framing-error" => "framing_error",
        "amqp:resource-limit-exceeded" => "resource_limit",
        "amqp:invalid-field" => "invalid_field",
        "amqp:illegal-state" => "illegal_state",
        "amqp:link:stolen" => "link_stolen",
        _ => "other",
    }
}

/// Links a connection may hold before a put-token succeeded: `$cbs` and `$management`, each
/// way. Until then nothing else is attached, so an unauthenticated peer holds at most this many
/// partial deliveries.
const PRE_AUTH_LINKS: usize = 4;
/// Credit on a `$cbs` or `$management` request link, topped up as requests are answered.
const REQUEST_CREDIT: u32 = 100;

fn attach_link(s: &mut Session, endpoint: &AmqpEndpoint, link: LinkId, a: &Attach) {
    let waiting: usize = s.devices.values().map(device::Device::pending_links).sum();
    if !s.authenticated() && s.links.len() + waiting >= PRE_AUTH_LINKS {
        endpoint
            .metrics
            .amqp_refused
            .with_label_values(&["unauthorized"])
            .inc();
        s.conn.refuse_attach(
            link,
            a,
            AmqpError::new(
                "amqp:unauthorized-access",
                format!("at most {PRE_AUTH_LINKS} links before a put-token succeeds"),
            ),
        );
        return;
    }
    // The peer's role names the direction: a sender's target, a receiver's source.
    let address = match a.role {
        Role::Sender => a.target.as_ref(),
        Role::Receiver => a.source.as_ref(),
    }
    .and_then(|t| t.address.as_ref())
    .map(|x| x.as_str().to_string())
    .unwrap_or_default();
    let kind = match roost_eventhubs::messaging::device_address(&address) {
        Some(at) => match device::attach(s, endpoint, link, a, at) {
            Ok(Some(kind)) => Ok(kind),
            // Answered when the device's session has checked its certificate.
            Ok(None) => return,
            Err(e) => Err(e),
        },
        None => match (a.role, address.as_str()) {
            (Role::Sender, "$cbs") => Ok(Link::CbsIn),
            (Role::Receiver, "$cbs") => Ok(Link::CbsOut),
            (Role::Sender, "$management") => Ok(Link::ManagementIn),
            (Role::Receiver, "$management") => Ok(Link::ManagementOut),
            (Role::Sender, addr) if service::is_devicebound(addr) => {
                service::authorize(s, endpoint, service::DEVICEBOUND)
                    .map(|()| Link::C2dIn { in_flight: 0 })
            }
            (Role::Receiver, addr) if service::is_feedback(addr) => {
                service::authorize(s, endpoint, service::FEEDBACK).map(|()| {
                    Link::FeedbackOut(service::Feedback::new(service::ServiceQueue::Feedback))
                })
            }
            (Role::Receiver, addr) if service::is_file_notifications(addr) => {
                service::authorize(s, endpoint, service::FILE_NOTIFICATIONS).map(|()| {
                    Link::FeedbackOut(service::Feedback::new(
                        service::ServiceQueue::FileNotifications,
                    ))
                })
            }
            (Role::Receiver, other) => eventhubs::attach_receiver(s, endpoint, link, other, a),
            (Role::Sender, _) => Err(AmqpError::new(
                "amqp:not-found",
                format!("no node {address:?} takes messages here"),
            )),
        },
    };
    match kind {
        Ok(kind) => accept_link(s, endpoint, link, a, kind),
        Err(error) => {
            tracing::debug!(%address, role = ?a.role, condition = %error.condition.as_str(), description = ?error.description, "AMQP attach refused");
            refuse_link(s, endpoint, link, a, error);
        }
    }
}

/// Refuses an attach, counted by its condition.
fn refuse_link(s: &mut Session, endpoint: &AmqpEndpoint, link: LinkId, a: &Attach, error: AmqpError) {
    endpoint
        .metrics
        .amqp_refused
        .with_label_values(&[short(error.condition.as_str())])
        .inc();
    s.conn.refuse_attach(link, a, error);
}

/// Accepts an attach as `kind`, with the credit its kind starts with.
fn accept_link(s: &mut Session, endpoint: &AmqpEndpoint, link: LinkId, a: &Attach, kind: Link) {
    let credit = match kind {
        Link::CbsIn | Link::ManagementIn => REQUEST_CREDIT,
        Link::C2dIn { .. } => service::C2D_WINDOW,
        Link::Device { role, .. } => device::initial_credit(role),
        _ => 0,
    };
    endpoint
        .metrics
        .amqp_links
        .with_label_values(&[kind.kind()])
        .inc();
    s.links.insert(link, kind);
    s.conn.accept_attach(link, a, credit);
}

/// The answer to a put-token: at once for a policy's token; for a device's, once its session
/// on a shard has checked it (`None` here).
fn put_token(s: &mut Session, endpoint: &AmqpEndpoint, m: &Message) -> Option<Message> {
    let request = match cbs::read_put_token(m) {
        Ok(r) => r,
        Err(e) => {
            let id = m
                .properties
                .as_ref()
                .map_or(roost_amqp::Value::Null, |p| p.message_id.clone());
            endpoint
                .metrics
                .amqp_cbs
                .with_label_values(&[e.error_code()])
                .inc();
            return Some(cbs::response(&id, e.status(), &e.to_string(), Body::Empty));
        }
    };
    if let Some(identity) = device_identity(endpoint, &request.token) {
        return device::put_token(s, endpoint, request.message_id, &request.token, identity);
    }
    Some(
        match authority(endpoint).check(&request.token, now_unix()) {
            Ok(grant) => {
                endpoint.metrics.amqp_cbs.with_label_values(&["ok"]).inc();
                s.grants.retain(|g| g.scope != grant.scope);
                s.grants.push(grant);
                s.pre_auth.release();
                cbs::response(&request.message_id, 200, "OK", Body::Empty)
            }
            Err(e) => {
                endpoint
                    .metrics
                    .amqp_cbs
                    .with_label_values(&[e.error_code()])
                    .inc();
                cbs::response(&request.message_id, e.status(), &e.to_string(), Body::Empty)
            }
        },
    )
}

/// The device (and module) a token is for, when it is a device's token on this hub: no
/// policy name, and an `sr` of `{host}/devices/{d}[/modules/{m}]`.
fn device_identity(endpoint: &AmqpEndpoint, token: &str) -> Option<(String, Option<String>)> {
    let t = roost_iothub::sas::SasToken::parse(token).ok()?;
    if t.key_name().is_some() {
        return None;
    }
    let (host, device, module) = roost_eventhubs::messaging::token_identity(t.resource())?;
    let ours = endpoint.hostname.split(':').next().unwrap_or_default();
    let host = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
    host.eq_ignore_ascii_case(ours).then_some((device, module))
}

/// Sends what can go: answers waiting for credit, then events on receivers with credit. True
/// when a receiver sent a whole batch (more may be waiting).
fn pump(s: &mut Session, endpoint: &AmqpEndpoint) -> bool {
    if !s.conn.is_open() {
        return false;
    }
    let mut waiting = std::mem::take(&mut s.replies);
    waiting.retain(|(cbs, answer)| {
        let node = if *cbs { "$cbs" } else { "$management" };
        let reply_link = s.links.iter().find_map(|(id, l)| match (l, *cbs) {
            (Link::CbsOut, true) | (Link::ManagementOut, false) => Some(*id),
            _ => None,
        });
        let Some(link) = reply_link else { return true };
        let mut out = BytesMut::new();
        answer.write(&mut out);
        let sent = s
            .conn
            .send(link, Bytes::from_static(b"\0"), out.freeze(), true)
            .is_ok();
        if !sent {
            tracing::trace!(node, "an answer waits for credit");
        }
        !sent
    });
    s.replies = waiting;
    service::pump_feedback(s, endpoint);
    device::pump(s);
    eventhubs::pump_receivers(s, endpoint)
}
