//! IoT Hub's service links over AMQP (spec §4): the `/messages/devicebound` sender through
//! which `send_c2d_message` (Python) and `Client.send` (Node) queue cloud-to-device messages,
//! the `/messages/serviceBound/feedback` receiver that delivers feedback batches, and the
//! `/messages/serviceBound/filenotifications` receiver that delivers file-upload notifications
//! one per message. Control holds the queues, the feedback and the notifications; every
//! operation is a call over the control link
//! (`crate::service_calls`), answered on the connection's completion channel, so the
//! connection never waits for control.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use roost_amqp::{AmqpError, DeliveryState, LinkId, Message};
use roost_eventhubs::messaging::{self, MessagingError};
use roost_eventhubs::Right;
use roost_model::link::{ServiceReply, ServiceRequest};

use super::{now_unix, AmqpEndpoint, Done, Link, Session};
use crate::service_calls::CallFailed;

/// The paths a service link's token must cover.
pub const DEVICEBOUND: &str = "messages/devicebound";
pub const FEEDBACK: &str = "messages/servicebound/feedback";
pub const FILE_NOTIFICATIONS: &str = "messages/servicebound/filenotifications";
/// Cloud-to-device messages one sender link may have at control at once (its credit).
pub const C2D_WINDOW: u32 = 16;
/// How often a feedback receiver with credit asks control for records when there were none.
const FEEDBACK_POLL: Duration = Duration::from_secs(1);

/// The node a service sends cloud-to-device messages to: `/messages/devicebound`, bare or as
/// uamqp writes it, `amqps://{host}/messages/devicebound`.
pub fn is_devicebound(address: &str) -> bool {
    node_path(address).eq_ignore_ascii_case("/messages/devicebound")
}

/// The node feedback is read from.
pub fn is_feedback(address: &str) -> bool {
    node_path(address).eq_ignore_ascii_case("/messages/servicebound/feedback")
}

/// The node file-upload notifications are read from.
pub fn is_file_notifications(address: &str) -> bool {
    node_path(address).eq_ignore_ascii_case("/messages/servicebound/filenotifications")
}

/// The path of an address with any `scheme://host` in front.
fn node_path(address: &str) -> &str {
    match address.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("", |i| &rest[i..]),
        None => address,
    }
}

/// What a service link needs: a put-token on this connection granting ServiceConnect on the
/// hub (a device's token does not).
pub(super) fn authorize(s: &Session, endpoint: &AmqpEndpoint, path: &str) -> Result<(), AmqpError> {
    let now = now_unix();
    let allowed = s
        .grants
        .iter()
        .any(|g| g.expires > now && g.covers(&endpoint.hostname, path, Right::ServiceConnect));
    if allowed {
        return Ok(());
    }
    Err(AmqpError::new(
        "amqp:unauthorized-access",
        "no put-token on this connection grants ServiceConnect on this hub (a shared access policy's token is needed)",
    ))
}

/// A service's transfer on the devicebound link: read here, queued at control, settled when
/// control answers ([`Done::C2dSent`]).
pub(super) fn on_c2d(
    s: &mut Session,
    endpoint: &AmqpEndpoint,
    link: LinkId,
    delivery_id: u32,
    payload: &Bytes,
) {
    let metrics = endpoint.metrics.clone();
    let parsed = Message::read(payload)
        .map_err(|e| AmqpError::new("amqp:decode-error", e.to_string()))
        .and_then(|m| {
            messaging::c2d_from_service(&m).map_err(|e: MessagingError| {
                metrics
                    .amqp_service_calls
                    .with_label_values(&["c2d_send", e.error_code()])
                    .inc();
                AmqpError::new(e.condition(), e.to_string())
            })
        });
    let (device_id, message) = match parsed {
        Ok(m) => m,
        Err(error) => {
            let rejected = DeliveryState::Rejected(Some(error));
            s.conn
                .disposition(link.channel, delivery_id, delivery_id, true, rejected);
            return;
        }
    };
    if let Some(Link::C2dIn { in_flight }) = s.links.get_mut(&link) {
        *in_flight += 1;
    }
    let (services, done) = (endpoint.services.clone(), s.done.clone());
    tokio::spawn(async move {
        let reply = services
            .call(ServiceRequest::C2dSend {
                device_id,
                message: Box::new(message),
            })
            .await;
        count_call(&metrics, "c2d_send", &reply);
        let state = match reply {
            Ok(ServiceReply::Done) => DeliveryState::Accepted,
            Ok(ServiceReply::Refused {
                status, message, ..
            }) => {
                // Conditions the SDKs do not retry and translate: unknown device, full queue.
                let condition = match status {
                    404 => "amqp:not-found",
                    403 => "amqp:resource-limit-exceeded",
                    400 => "amqp:not-allowed",
                    _ => "amqp:internal-error",
                };
                DeliveryState::Rejected(Some(AmqpError::new(condition, message)))
            }
            Ok(_) => DeliveryState::Rejected(Some(AmqpError::new(
                "amqp:internal-error",
                "control answered something else",
            ))),
            Err(e) => DeliveryState::Rejected(Some(AmqpError::new(
                "com.microsoft:server-busy",
                e.to_string(),
            ))),
        };
        let _ = done.send(Done::C2dSent {
            link,
            delivery_id,
            state,
        });
    });
}

/// Counts a call of control in `roost_amqp_service_calls_total{op,result}`: `ok`, `none` (no
/// feedback waits), a refusal's status, or why control gave no answer.
fn count_call(
    metrics: &crate::metrics::Metrics,
    op: &str,
    reply: &Result<ServiceReply, CallFailed>,
) {
    let result = match reply {
        Ok(ServiceReply::Refused { status, .. }) => status.to_string(),
        Ok(ServiceReply::NoFeedback) => "none".to_string(),
        Ok(_) => "ok".to_string(),
        Err(CallFailed::ControlAway) => "control_away".to_string(),
        Err(CallFailed::TimedOut) => "timed_out".to_string(),
    };
    metrics
        .amqp_service_calls
        .with_label_values(&[op, &result])
        .inc();
}

/// Control queued (or refused) a message: settle its delivery and give the credit back.
pub(super) fn on_c2d_sent(s: &mut Session, link: LinkId, delivery_id: u32, state: DeliveryState) {
    s.conn
        .disposition(link.channel, delivery_id, delivery_id, true, state);
    if let Some(Link::C2dIn { in_flight }) = s.links.get_mut(&link) {
        *in_flight = in_flight.saturating_sub(1);
        let room = C2D_WINDOW - (*in_flight).min(C2D_WINDOW);
        if s.conn.credit(link) < room / 2 + 1 {
            s.conn.grant(link, room);
        }
    }
}

/// What a service receiver reads: C2D feedback batches, or file-upload notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceQueue {
    Feedback,
    FileNotifications,
}

impl ServiceQueue {
    fn receive(self) -> ServiceRequest {
        match self {
            ServiceQueue::Feedback => ServiceRequest::FeedbackReceive,
            ServiceQueue::FileNotifications => ServiceRequest::FileNotificationReceive,
        }
    }

    fn complete(self, lock: String) -> ServiceRequest {
        match self {
            ServiceQueue::Feedback => ServiceRequest::FeedbackComplete { lock },
            ServiceQueue::FileNotifications => ServiceRequest::FileNotificationComplete { lock },
        }
    }

    /// The `call` label of its calls' metrics.
    fn label(self, what: &str) -> &'static str {
        match (self, what) {
            (ServiceQueue::Feedback, "receive") => "feedback_receive",
            (ServiceQueue::Feedback, "complete") => "feedback_complete",
            (ServiceQueue::Feedback, _) => "feedback_abandon",
            (ServiceQueue::FileNotifications, "receive") => "file_notification_receive",
            (ServiceQueue::FileNotifications, "complete") => "file_notification_complete",
            (ServiceQueue::FileNotifications, _) => "file_notification_abandon",
        }
    }
}

/// A feedback or file-notification receiver's state.
#[derive(Debug)]
pub struct Feedback {
    queue: ServiceQueue,
    /// A call to control is out.
    asking: bool,
    /// The batch sent and not yet settled: its delivery id and lock.
    unsettled: Option<(u32, String)>,
    /// When to ask control again.
    next_poll: Instant,
}

impl Feedback {
    pub fn new(queue: ServiceQueue) -> Self {
        Self {
            queue,
            asking: false,
            unsettled: None,
            next_poll: Instant::now(),
        }
    }
}

/// Asks control for feedback for each receiver with credit and nothing out.
pub(super) fn pump_feedback(s: &mut Session, endpoint: &AmqpEndpoint) {
    let now = Instant::now();
    let ready: Vec<(LinkId, ServiceQueue)> = s
        .links
        .iter()
        .filter_map(|(id, l)| match l {
            Link::FeedbackOut(f) if !f.asking && f.unsettled.is_none() && f.next_poll <= now => {
                Some((*id, f.queue))
            }
            _ => None,
        })
        .collect();
    for (link, queue) in ready {
        if s.conn.credit(link) == 0 {
            continue;
        }
        if let Some(Link::FeedbackOut(f)) = s.links.get_mut(&link) {
            f.asking = true;
        }
        let (services, done) = (endpoint.services.clone(), s.done.clone());
        tokio::spawn(async move {
            let reply = services.call(queue.receive()).await;
            let _ = done.send(Done::Feedback { link, reply });
        });
    }
}

/// Control answered a feedback read: send the batch (unsettled: the receiver's accept
/// completes it), or wait before asking again.
pub(super) fn on_feedback(
    s: &mut Session,
    endpoint: &AmqpEndpoint,
    link: LinkId,
    reply: Result<ServiceReply, CallFailed>,
) {
    let queue = match s.links.get(&link) {
        Some(Link::FeedbackOut(f)) => f.queue,
        _ => return,
    };
    count_call(&endpoint.metrics, queue.label("receive"), &reply);
    let sent = match reply {
        Ok(ServiceReply::Feedback { lock, body }) => {
            let mut out = BytesMut::new();
            let message = match queue {
                ServiceQueue::Feedback => messaging::feedback_message(&lock, body),
                ServiceQueue::FileNotifications => messaging::file_notification_message(&lock, body),
            };
            message.write(&mut out);
            let tag = Bytes::from(lock.clone().into_bytes());
            s.conn
                .send(link, tag, out.freeze(), false)
                .ok()
                .map(|id| (id, lock))
        }
        _ => None,
    };
    if let Some(Link::FeedbackOut(f)) = s.links.get_mut(&link) {
        f.asking = false;
        if sent.is_none() {
            f.next_poll = Instant::now() + FEEDBACK_POLL;
        }
        f.unsettled = sent;
    }
}

/// The receiver settled deliveries `first..=last` on `channel`: an accepted feedback batch is
/// completed at control; any other outcome leaves its records for the next read.
pub(super) fn on_disposition(
    s: &mut Session,
    endpoint: &AmqpEndpoint,
    channel: u16,
    first: u32,
    last: u32,
    state: Option<&DeliveryState>,
) {
    for (id, l) in s.links.iter_mut() {
        let Link::FeedbackOut(f) = l else { continue };
        let settled = match &f.unsettled {
            Some((delivery, _)) => id.channel == channel && (first..=last).contains(delivery),
            None => false,
        };
        if !settled {
            continue;
        }
        let Some((_, lock)) = f.unsettled.take() else {
            continue;
        };
        let metrics = endpoint.metrics.clone();
        let queue = f.queue;
        if !matches!(state, Some(DeliveryState::Accepted)) {
            f.next_poll = Instant::now();
            metrics
                .amqp_service_calls
                .with_label_values(&[queue.label("abandon"), "ok"])
                .inc();
            continue;
        }
        // No new read until control has completed these records (it would return them again).
        f.asking = true;
        let (services, done, link) = (endpoint.services.clone(), s.done.clone(), *id);
        tokio::spawn(async move {
            let reply = services.call(queue.complete(lock)).await;
            count_call(&metrics, queue.label("complete"), &reply);
            let _ = done.send(Done::FeedbackCompleted { link });
        });
    }
}

/// Control has completed a batch: the receiver may read again at once.
pub(super) fn on_feedback_completed(s: &mut Session, link: LinkId) {
    if let Some(Link::FeedbackOut(f)) = s.links.get_mut(&link) {
        f.asking = false;
        f.next_poll = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_nodes_are_named_bare_or_with_the_hub_in_front() {
        assert!(is_devicebound("/messages/devicebound"));
        assert!(is_devicebound(
            "amqps://hub.example:5671/messages/devicebound"
        ));
        assert!(is_devicebound("/messages/deviceBound"));
        assert!(!is_devicebound("/devices/d/messages/devicebound"));
        assert!(is_feedback("/messages/serviceBound/feedback"));
        assert!(!is_feedback("/messages/serviceBound/filenotifications"));
    }
}
