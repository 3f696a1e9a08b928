//! Devices over AMQP (spec §5, the Node SDK's `azure-iot-device-amqp`): a device's `$cbs`
//! put-token starts its device session on a shard (`crate::bridge`: the same session as MQTT,
//! so claim, kick, quotas, ingest and acknowledgement once durable are the shard's), and its
//! links are adapters over that session — telemetry (`/devices/{d}/messages/events`, settled
//! once durable), cloud-to-device (`…/messages/devicebound`, accept / reject / release meaning
//! complete / reject / abandon), direct methods (`…/methods/devicebound`) and the twin
//! (`…/twin`), and their module forms (`/devices/{d}/modules/{m}/…`).
//!
//! A link must name an identity whose put-token succeeded on this connection; a token renewed
//! there extends the session; when the session ends (its token expired, a newer connection of
//! the identity, revoked) its links are detached.

use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};
use roost_amqp::{AmqpError, Attach, Body, DeliveryState, LinkId, Message, Role, Value};
use roost_eventhubs::cbs;
use roost_eventhubs::messaging::{self, DeviceAddress, DeviceNode, TwinRequest};
use roost_model::link::{C2dOutcome, DeviceCommand, TwinOp};
use roost_session::DisconnectReason;
use tokio::sync::mpsc::UnboundedSender;

use super::{AmqpEndpoint, Done, Link, Session};
use crate::bridge::{Bridge, Credential, FromSession, ToSession};
use crate::shard::ShardCommand;

/// Telemetry one device link may have waiting to be durable (its credit).
pub const TELEMETRY_WINDOW: u32 = 64;
/// Credit on a device's method-response and twin-request links.
pub const REQUEST_WINDOW: u32 = 16;
/// Commands waiting for credit on a device's links, at most; past it the oldest is dropped.
const OUTBOX: usize = 1024;

/// Which of a device's links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceLink {
    Telemetry,
    C2d,
    /// The device sends method responses here.
    MethodsIn,
    /// Method requests go here.
    MethodsOut,
    /// The device sends twin requests here.
    TwinIn,
    /// Twin answers and desired patches go here.
    TwinOut,
}

impl DeviceLink {
    pub fn kind(self) -> &'static str {
        match self {
            DeviceLink::Telemetry => "device_telemetry",
            DeviceLink::C2d => "device_c2d",
            DeviceLink::MethodsIn | DeviceLink::MethodsOut => "device_methods",
            DeviceLink::TwinIn | DeviceLink::TwinOut => "device_twin",
        }
    }
}

/// One device (or module) authenticated, or authenticating, on this connection.
pub struct Device {
    to_session: UnboundedSender<ToSession>,
    authenticated: bool,
    /// Put-token requests waiting for the session's verdict (their message-ids).
    waiting_tokens: Vec<Value>,
    /// Telemetry waiting to be durable: ack → (link, delivery id).
    acks: HashMap<u64, (LinkId, u32)>,
    next_ack: u64,
    /// The links the hub sends on.
    c2d: Option<LinkId>,
    methods_out: Option<LinkId>,
    twin_out: Option<LinkId>,
    /// The device subscribed to desired-property changes (a twin PUT).
    desired: bool,
    /// Commands waiting for credit or for their link.
    outbox: VecDeque<DeviceCommand>,
    /// C2D messages sent and not settled: delivery id → lock.
    c2d_unsettled: HashMap<u32, u64>,
    next_tag: u64,
    /// Links attached while the session was still authenticating (a device authenticated by
    /// its certificate attaches without a put-token): answered once the session has decided.
    pending: Vec<(LinkId, Box<Attach>, DeviceLink)>,
}

impl Device {
    fn new(to_session: UnboundedSender<ToSession>) -> Self {
        Self {
            to_session,
            authenticated: false,
            waiting_tokens: Vec::new(),
            acks: HashMap::new(),
            next_ack: 0,
            c2d: None,
            methods_out: None,
            twin_out: None,
            desired: false,
            outbox: VecDeque::new(),
            c2d_unsettled: HashMap::new(),
            next_tag: 0,
            pending: Vec::new(),
        }
    }

    /// Links waiting for the session's verdict.
    pub fn pending_links(&self) -> usize {
        self.pending.len()
    }

    /// Whether its session accepted its token.
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }
}

/// The FNV-1a hash of a client id picks its shard.
fn shard_of(client_id: &str, shards: usize) -> usize {
    let hash = client_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    (hash % shards.max(1) as u64) as usize
}

/// A put-token whose token names a device or module (`sr={host}/devices/{d}[/modules/{m}]`,
/// no `skn`): the first starts the identity's session on its shard and is answered when the
/// session has checked it; a later one renews it. `None`: the answer comes later.
pub(super) fn put_token(
    s: &mut Session,
    endpoint: &AmqpEndpoint,
    message_id: Value,
    token: &str,
    identity: (String, Option<String>),
) -> Option<Message> {
    let (device_id, module_id) = identity;
    let client_id = roost_session::auth::client_id_of(&device_id, module_id.as_deref());
    if let Some(d) = s.devices.get_mut(&client_id) {
        let renew = ToSession::Renew {
            token: token.to_string(),
        };
        if d.to_session.send(renew).is_err() {
            return Some(cbs::response(
                &message_id,
                401,
                "the device session has ended",
                Body::Empty,
            ));
        }
        d.waiting_tokens.push(message_id);
        return None;
    }
    match start(s, endpoint, device_id, module_id, Credential::Token(token.to_string())) {
        Some(d) => {
            d.waiting_tokens.push(message_id);
            None
        }
        None => Some(cbs::response(
            &message_id,
            503,
            "the engine is stopping",
            Body::Empty,
        )),
    }
}

/// Starts the identity's session on its shard with `credential`; `None` when the engine is
/// stopping.
fn start<'s>(
    s: &'s mut Session,
    endpoint: &AmqpEndpoint,
    device_id: String,
    module_id: Option<String>,
    credential: Credential,
) -> Option<&'s mut Device> {
    let client_id = roost_session::auth::client_id_of(&device_id, module_id.as_deref());
    let (to_session, input) = tokio::sync::mpsc::unbounded_channel();
    let done = s.done.clone();
    let client = client_id.clone();
    let bridge = Bridge {
        device_id,
        module_id,
        credential,
        transport: s.transport,
        input,
        output: Box::new(move |event| {
            let _ = done.send(Done::Device {
                client: client.clone(),
                event,
            });
        }),
    };
    let shard = shard_of(&client_id, endpoint.shards.len());
    let started = endpoint
        .shards
        .get(shard)
        .is_some_and(|tx| tx.send(ShardCommand::Bridge(Box::new(bridge))).is_ok());
    if !started {
        return None;
    }
    if let Some(n) = endpoint.nudges.get(shard) {
        n.nudge();
    }
    Some(
        s.devices
            .entry(client_id)
            .or_insert_with(|| Device::new(to_session)),
    )
}

/// A link on a device address: the identity must be authenticated on this connection — by a
/// put-token, or by the connection's client certificate, in which case the first link starts
/// the session and the links wait for its verdict (`Ok(None)`: answered later).
pub(super) fn attach(
    s: &mut Session,
    endpoint: &AmqpEndpoint,
    link: LinkId,
    a: &Attach,
    at: DeviceAddress,
) -> Result<Option<Link>, AmqpError> {
    let client = at.client_id();
    let role = role_of(a, &at)?;
    let authenticating = match s.devices.get(&client) {
        Some(d) => !d.authenticated,
        None => match s.client_cert.as_ref() {
            Some(Ok(cert)) => {
                let cert = Credential::Certificate(Box::new(cert.clone()));
                let (device_id, module_id) = (at.device_id.clone(), at.module_id.clone());
                if start(s, endpoint, device_id, module_id, cert).is_none() {
                    return Err(AmqpError::new("amqp:internal-error", "the engine is stopping"));
                }
                true
            }
            Some(Err(_)) => {
                return Err(AmqpError::new(
                    "amqp:unauthorized-access",
                    "the connection's client certificate cannot be read",
                ))
            }
            None => {
                return Err(AmqpError::new(
                    "amqp:unauthorized-access",
                    format!("no put-token on this connection authenticated {client:?}"),
                ))
            }
        },
    };
    let Some(d) = s.devices.get_mut(&client) else {
        return Err(AmqpError::new("amqp:internal-error", "the device session is gone"));
    };
    if authenticating {
        d.pending.push((link, Box::new(a.clone()), role));
        return Ok(None);
    }
    bind(d, link, role);
    Ok(Some(Link::Device { client, role }))
}

/// Which of the identity's links an attach is. The peer's role: a sender sends to the hub. A
/// module receives its inputs on its events address.
fn role_of(a: &Attach, at: &DeviceAddress) -> Result<DeviceLink, AmqpError> {
    Ok(match (a.role, at.node) {
        (Role::Sender, DeviceNode::Events) => DeviceLink::Telemetry,
        (Role::Receiver, DeviceNode::DeviceBound) => DeviceLink::C2d,
        (Role::Receiver, DeviceNode::Events) if at.module_id.is_some() => DeviceLink::C2d,
        (Role::Sender, DeviceNode::Methods) => DeviceLink::MethodsIn,
        (Role::Receiver, DeviceNode::Methods) => DeviceLink::MethodsOut,
        (Role::Sender, DeviceNode::Twin) => DeviceLink::TwinIn,
        (Role::Receiver, DeviceNode::Twin) => DeviceLink::TwinOut,
        _ => {
            return Err(AmqpError::new(
                "amqp:not-allowed",
                "this device node does not go that way",
            ))
        }
    })
}

/// The identity's session now sends on `link` what its role carries.
fn bind(d: &mut Device, link: LinkId, role: DeviceLink) {
    match role {
        DeviceLink::C2d => {
            d.c2d = Some(link);
            let _ = d.to_session.send(ToSession::TakeC2d);
        }
        DeviceLink::MethodsOut => {
            d.methods_out = Some(link);
            let _ = d.to_session.send(ToSession::TakeMethods(true));
        }
        DeviceLink::TwinOut => d.twin_out = Some(link),
        _ => {}
    }
}

/// The credit a device link starts with.
pub fn initial_credit(role: DeviceLink) -> u32 {
    match role {
        DeviceLink::Telemetry => TELEMETRY_WINDOW,
        DeviceLink::MethodsIn | DeviceLink::TwinIn => REQUEST_WINDOW,
        _ => 0,
    }
}

/// A device's link ended.
pub(super) fn on_detached(s: &mut Session, client: &str, role: DeviceLink) {
    let Some(d) = s.devices.get_mut(client) else {
        return;
    };
    match role {
        DeviceLink::C2d => d.c2d = None,
        DeviceLink::MethodsOut => {
            d.methods_out = None;
            let _ = d.to_session.send(ToSession::TakeMethods(false));
        }
        DeviceLink::TwinOut => d.twin_out = None,
        _ => {}
    }
}

fn settle(s: &mut Session, link: LinkId, delivery_id: u32, state: DeliveryState) {
    s.conn
        .disposition(link.channel, delivery_id, delivery_id, true, state);
}

fn reject(s: &mut Session, link: LinkId, delivery_id: u32, condition: &str, why: String) {
    settle(
        s,
        link,
        delivery_id,
        DeliveryState::Rejected(Some(AmqpError::new(condition, why))),
    );
}

/// Gives a receiving link its credit back up to `window` once it ran half down.
fn top_up(s: &mut Session, link: LinkId, window: u32) {
    if s.conn.credit(link) < window / 2 {
        s.conn.grant(link, window);
    }
}

/// A transfer from the device on one of its links.
pub(super) fn on_delivery(
    s: &mut Session,
    endpoint: &AmqpEndpoint,
    link: LinkId,
    client: &str,
    role: DeviceLink,
    delivery_id: u32,
    settled: bool,
    payload: &Bytes,
) {
    let m = match Message::read(payload) {
        Ok(m) => m,
        Err(e) => {
            endpoint
                .metrics
                .amqp_refused
                .with_label_values(&[e.error_code()])
                .inc();
            return reject(s, link, delivery_id, "amqp:decode-error", e.to_string());
        }
    };
    let Some(d) = s.devices.get_mut(client) else {
        return;
    };
    let refused = |e: messaging::MessagingError| {
        endpoint
            .metrics
            .amqp_refused
            .with_label_values(&[e.error_code()])
            .inc();
        (e.condition(), e.to_string())
    };
    let outcome = match role {
        DeviceLink::Telemetry => match messaging::telemetry(&m) {
            Ok((bag, body)) => {
                let ack = d.next_ack;
                d.next_ack += 1;
                d.acks.insert(ack, (link, delivery_id));
                let _ = d.to_session.send(ToSession::Telemetry { bag, body, ack });
                // Settled once durable ([`FromSession::Acked`]).
                return;
            }
            Err(e) => Err(refused(e)),
        },
        DeviceLink::MethodsIn => match messaging::method_response(&m) {
            Ok((rid, status, payload)) => {
                let _ = d.to_session.send(ToSession::MethodResponse {
                    rid,
                    status,
                    payload: payload.to_vec(),
                });
                Ok(())
            }
            Err(e) => Err(refused(e)),
        },
        DeviceLink::TwinIn => match messaging::twin_request(&m) {
            Ok((rid, request)) => {
                let op = match request {
                    TwinRequest::Get => Some(TwinOp::Get),
                    TwinRequest::PatchReported(body) => Some(TwinOp::PatchReported {
                        body: body.to_vec(),
                    }),
                    // Answered here: the subscription is the connection's.
                    TwinRequest::SubscribeDesired | TwinRequest::UnsubscribeDesired => {
                        d.desired = request == TwinRequest::SubscribeDesired;
                        d.outbox.push_back(DeviceCommand::TwinResponse {
                            rid: rid.clone(),
                            status: 200,
                            version: None,
                            body: Vec::new(),
                        });
                        None
                    }
                };
                if let Some(op) = op {
                    let _ = d.to_session.send(ToSession::Twin { rid, op });
                }
                Ok(())
            }
            Err(e) => Err(refused(e)),
        },
        _ => Err((
            "amqp:not-allowed",
            "this link takes no messages".to_string(),
        )),
    };
    if !settled {
        match outcome {
            Ok(()) => settle(s, link, delivery_id, DeliveryState::Accepted),
            Err((condition, why)) => reject(s, link, delivery_id, condition, why),
        }
    }
    top_up(s, link, REQUEST_WINDOW);
}

/// The device settled C2D deliveries `first..=last` on `channel`: accepted completes, rejected
/// dead-letters, released or modified abandons.
pub(super) fn on_disposition(
    s: &mut Session,
    channel: u16,
    first: u32,
    last: u32,
    state: Option<&DeliveryState>,
) {
    tracing::debug!(channel, first, last, ?state, "device disposition");
    let outcome = match state {
        Some(DeliveryState::Rejected(_)) => C2dOutcome::Reject,
        Some(DeliveryState::Released | DeliveryState::Modified { .. }) => C2dOutcome::Abandon,
        _ => C2dOutcome::Complete,
    };
    for d in s.devices.values_mut() {
        if d.c2d.is_none_or(|l| l.channel != channel) {
            continue;
        }
        for id in first..=last {
            if let Some(lock) = d.c2d_unsettled.remove(&id) {
                let _ = d.to_session.send(ToSession::C2dSettled { lock, outcome });
            }
        }
    }
}

/// What the device's session says.
pub(super) fn on_session(
    s: &mut Session,
    endpoint: &AmqpEndpoint,
    client: String,
    event: FromSession,
) {
    let Some(d) = s.devices.get_mut(&client) else {
        return;
    };
    let metrics = &endpoint.metrics;
    match event {
        FromSession::Authenticated => {
            d.authenticated = true;
            if !d.waiting_tokens.is_empty() {
                metrics.amqp_cbs.with_label_values(&["ok"]).inc();
            }
            for id in d.waiting_tokens.drain(..) {
                s.replies
                    .push((true, cbs::response(&id, 200, "OK", Body::Empty)));
            }
            let pending = std::mem::take(&mut d.pending);
            for (link, _, role) in &pending {
                bind(d, *link, *role);
            }
            s.pre_auth.release();
            for (link, attach, role) in pending {
                let kind = Link::Device {
                    client: client.clone(),
                    role,
                };
                super::accept_link(s, endpoint, link, &attach, kind);
            }
        }
        FromSession::Refused(reason) => {
            if !d.waiting_tokens.is_empty() {
                metrics.amqp_cbs.with_label_values(&[reason]).inc();
            }
            for id in d.waiting_tokens.drain(..) {
                let why = format!("the device token was refused: {reason}");
                s.replies
                    .push((true, cbs::response(&id, 401, &why, Body::Empty)));
            }
            let pending = std::mem::take(&mut d.pending);
            s.devices.remove(&client);
            for (link, attach, _) in pending {
                let why = format!("the device's client certificate was refused: {reason}");
                super::refuse_link(
                    s,
                    endpoint,
                    link,
                    &attach,
                    AmqpError::new("amqp:unauthorized-access", why),
                );
            }
        }
        FromSession::Renewed(verdict) => {
            let (status, why) = match verdict {
                Ok(()) => (200, "OK".to_string()),
                Err(reason) => (401, format!("the device token was refused: {reason}")),
            };
            metrics
                .amqp_cbs
                .with_label_values(&[verdict.err().unwrap_or("ok")])
                .inc();
            if let Some(id) = d.waiting_tokens.first().cloned() {
                d.waiting_tokens.remove(0);
                s.replies
                    .push((true, cbs::response(&id, status, &why, Body::Empty)));
            }
        }
        FromSession::Acked(ack) => {
            if let Some((link, delivery_id)) = d.acks.remove(&ack) {
                settle(s, link, delivery_id, DeliveryState::Accepted);
                top_up(s, link, TELEMETRY_WINDOW);
            }
        }
        FromSession::NotTaken(ack, reason) => {
            if let Some((link, delivery_id)) = d.acks.remove(&ack) {
                let why = format!("not taken: {}", reason.error_code());
                reject(s, link, delivery_id, "amqp:link:message-size-exceeded", why);
                top_up(s, link, TELEMETRY_WINDOW);
            }
        }
        FromSession::Command(DeviceCommand::Disconnect { reason }) => {
            end(
                s,
                &client,
                AmqpError::new("amqp:unauthorized-access", reason),
            );
        }
        FromSession::Command(command) => {
            if d.outbox.len() >= OUTBOX {
                if let Some(old) = d.outbox.pop_front() {
                    metrics
                        .commands_dropped
                        .with_label_values(&["amqp", old.kind()])
                        .inc();
                }
            }
            d.outbox.push_back(command);
        }
        FromSession::Ended(reason) => {
            let condition = match reason {
                DisconnectReason::ReplacedByNewConnection => "amqp:link:stolen",
                DisconnectReason::TokenExpired | DisconnectReason::DeviceRevoked => {
                    "amqp:unauthorized-access"
                }
                _ => "amqp:internal-error",
            };
            let why = format!("the device session ended: {}", reason.error_code());
            end(s, &client, AmqpError::new(condition, why));
        }
    }
}

/// Forgets a device: its links are detached with `error`, its session's channel dropped.
fn end(s: &mut Session, client: &str, error: AmqpError) {
    s.devices.remove(client);
    let links: Vec<LinkId> = s
        .links
        .iter()
        .filter(|(_, l)| matches!(l, Link::Device { client: c, .. } if c == client))
        .map(|(id, _)| *id)
        .collect();
    for link in links {
        s.links.remove(&link);
        s.conn.detach(link, Some(error.clone()));
    }
}

/// Sends the devices' waiting commands on their links while they have credit.
pub(super) fn pump(s: &mut Session) {
    let clients: Vec<String> = s
        .devices
        .iter()
        .filter(|(_, d)| !d.outbox.is_empty())
        .map(|(c, _)| c.clone())
        .collect();
    for client in clients {
        loop {
            let Some(d) = s.devices.get_mut(&client) else {
                break;
            };
            let Some(command) = d.outbox.front() else {
                break;
            };
            // Where it goes, and the message; `None`: dropped (nobody takes it).
            let (link, message, lock) = match command {
                DeviceCommand::C2d {
                    lock,
                    properties,
                    body,
                    ..
                } => (
                    d.c2d,
                    messaging::c2d_to_device(properties, body),
                    Some(*lock),
                ),
                DeviceCommand::MethodRequest { name, rid, payload } => (
                    d.methods_out,
                    messaging::method_request(name, rid, payload),
                    None,
                ),
                DeviceCommand::TwinResponse {
                    rid,
                    status,
                    version,
                    body,
                } => (
                    d.twin_out,
                    messaging::twin_response(rid, *status, *version, body),
                    None,
                ),
                DeviceCommand::DesiredPatch { body, .. } if d.desired => {
                    (d.twin_out, messaging::desired_patch(body), None)
                }
                DeviceCommand::DesiredPatch { .. } | DeviceCommand::Disconnect { .. } => {
                    d.outbox.pop_front();
                    continue;
                }
            };
            let Some(link) = link else {
                // No link takes it: a C2D message stays at control (sent again when the
                // device is next ready); the rest cannot be delivered.
                d.outbox.pop_front();
                continue;
            };
            let mut out = BytesMut::new();
            message.write(&mut out);
            let tag = Bytes::from(d.next_tag.to_be_bytes().to_vec());
            // C2D waits for the device's outcome; the rest go pre-settled.
            let sent = s.conn.send(link, tag, out.freeze(), lock.is_none());
            let Some(d) = s.devices.get_mut(&client) else {
                break;
            };
            match sent {
                Ok(delivery_id) => {
                    d.next_tag += 1;
                    d.outbox.pop_front();
                    if let Some(lock) = lock {
                        d.c2d_unsettled.insert(delivery_id, lock);
                    }
                }
                Err(_) => break, // no credit yet
            }
        }
    }
}
