//! The Event Hubs-compatible endpoint's links (issue 10, spec §3): receivers on
//! `{hub}/ConsumerGroups/{group}/Partitions/{p}` with their start filters, epochs and
//! credit-fed reads from the `events` log, and the `$management` READ answers.

use bytes::BytesMut;
use roost_amqp::{AmqpError, Attach, Body, LinkId, Message};
use roost_eventhubs::cbs;
use roost_eventhubs::{address, event, filter, management, Right};
use roost_storage::record::BUILTIN;
use roost_storage::LogStore;

use super::{authority, now_unix, AmqpEndpoint, Link, Session};

/// The most events one pass sends on a receiver before the connection reads again.
const PUMP_BATCH: u32 = 1024;

/// A receiver on a consumer group's partition, for epoch ownership (`com.microsoft:epoch`).
pub struct Reader {
    epoch: Option<i64>,
    conn: u64,
    link: LinkId,
    /// Tells the reader's connection to detach it.
    evict: tokio::sync::mpsc::UnboundedSender<(LinkId, AmqpError)>,
}

/// The receiver's epoch, from its attach properties.
fn epoch_of(a: &Attach) -> Option<i64> {
    let roost_amqp::Value::Map(pairs) = &a.properties else {
        return None;
    };
    pairs
        .iter()
        .find(|(k, _)| k.as_str() == Some("com.microsoft:epoch"))
        .and_then(|(_, v)| v.as_i64())
}

/// Takes ownership of a group's partition for a new receiver (Event Hubs' epochs): a receiver
/// with an epoch evicts the receivers with a lower or equal one and those with none, and is
/// refused while one with a higher epoch reads; a receiver without an epoch is refused while an
/// epoch receiver reads. Evicted receivers are detached with `amqp:link:stolen`.
fn claim(endpoint: &AmqpEndpoint, key: (String, usize), new: Reader) -> Result<(), AmqpError> {
    let mut readers = endpoint.readers.lock().unwrap_or_else(|p| p.into_inner());
    let list = readers.entry(key).or_default();
    let highest = list.iter().filter_map(|r| r.epoch).max();
    match (new.epoch, highest) {
        (Some(e), Some(h)) if h > e => {
            return Err(AmqpError::new(
                "amqp:link:stolen",
                format!(
                    "a receiver with the higher epoch {h} reads this partition; epoch {e} cannot"
                ),
            ))
        }
        (None, Some(h)) => {
            return Err(AmqpError::new(
                "amqp:link:stolen",
                format!(
                    "a receiver with epoch {h} reads this partition; one without an epoch cannot"
                ),
            ))
        }
        (Some(e), _) => {
            for old in list.drain(..) {
                let _ = old.evict.send((
                    old.link,
                    AmqpError::new(
                        "amqp:link:stolen",
                        format!("a receiver with epoch {e} took this partition"),
                    ),
                ));
            }
        }
        (None, None) => {}
    }
    list.push(new);
    Ok(())
}

/// Forgets a connection's readers when it ends, however it ends.
pub(super) struct Release<'a> {
    pub(super) endpoint: &'a AmqpEndpoint,
    pub(super) conn: u64,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        release(self.endpoint, self.conn, None);
    }
}

/// Forgets a connection's readers (all of them, or the one on `link`).
pub(super) fn release(endpoint: &AmqpEndpoint, conn: u64, link: Option<LinkId>) {
    let mut readers = endpoint.readers.lock().unwrap_or_else(|p| p.into_inner());
    for list in readers.values_mut() {
        list.retain(|r| r.conn != conn || link.is_some_and(|l| l != r.link));
    }
    readers.retain(|_, list| !list.is_empty());
}

/// A receiver attached to `address`: a consumer group's partition, claimed for its epoch.
pub(super) fn attach_receiver(
    s: &Session,
    endpoint: &AmqpEndpoint,
    link: LinkId,
    address: &str,
    a: &Attach,
) -> Result<Link, AmqpError> {
    let kind = receiver(s, endpoint, address, a)?;
    let Link::Receiver {
        group, partition, ..
    } = &kind
    else {
        return Ok(kind);
    };
    let reader = Reader {
        epoch: epoch_of(a),
        conn: s.id,
        link,
        evict: s.evict.clone(),
    };
    claim(endpoint, (group.clone(), *partition), reader)?;
    Ok(kind)
}

/// A receiver on a partition: the connection's put-tokens must cover it with ServiceConnect.
fn receiver(
    s: &Session,
    endpoint: &AmqpEndpoint,
    address: &str,
    a: &Attach,
) -> Result<Link, AmqpError> {
    let at = address::parse(address, &endpoint.entity)
        .map_err(|e| AmqpError::new("amqp:not-found", e.to_string()))?;
    let known = at.consumer_group == "$default"
        || endpoint
            .consumer_groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&at.consumer_group);
    if !known {
        return Err(AmqpError::new(
            "amqp:not-found",
            format!(
                "no consumer group {:?} (roost consumer-group create)",
                at.consumer_group
            ),
        ));
    }
    let path = format!(
        "{}/consumergroups/{}/partitions/{}",
        endpoint.entity, at.consumer_group, at.partition
    );
    let now = now_unix();
    let allowed = s
        .grants
        .iter()
        .any(|g| g.expires > now && g.covers(&endpoint.hostname, &path, Right::ServiceConnect));
    if !allowed {
        return Err(AmqpError::new(
            "amqp:unauthorized-access",
            "no put-token on this connection grants ServiceConnect for this partition",
        ));
    }
    if at.partition >= endpoint.log.partition_count() {
        return Err(AmqpError::new(
            "com.microsoft:argument-out-of-range",
            format!("no partition {}", at.partition),
        ));
    }
    let filter_set = a
        .source
        .as_ref()
        .map_or(roost_amqp::Value::Null, |t| t.filter.clone());
    let start = filter::start(&filter_set)
        .map_err(|e| AmqpError::new("com.microsoft:argument-error", e.to_string()))?;
    let log = endpoint.log.as_ref();
    let p = at.partition;
    let bounds = log
        .next_offset(p)
        .and_then(|next| Ok((log.first_offset(p, next)?, next)));
    let (first, next) =
        bounds.map_err(|e| AmqpError::new("com.microsoft:server-busy", e.to_string()))?;
    let from = start.first_offset(first, next, |ms, inclusive| {
        first_at_time(log, p, first, next, ms, inclusive)
    });
    Ok(Link::Receiver {
        group: at.consumer_group,
        partition: p,
        next: from,
        end: next,
    })
}

/// The first offset enqueued at (or after) `ms`: a scan from the start of the partition.
fn first_at_time(
    log: &dyn LogStore,
    p: usize,
    first: u64,
    next: u64,
    ms: i64,
    inclusive: bool,
) -> u64 {
    let mut found = next;
    let _ = roost_storage::log::visit_records(log, p, first, &mut |offset, view| {
        let at = view.message().enqueued_ms.to_native() as i64;
        if at > ms || (inclusive && at == ms) {
            found = offset;
            return Ok(false);
        }
        Ok(true)
    });
    found
}

pub(super) fn manage(s: &Session, endpoint: &AmqpEndpoint, m: &Message) -> Message {
    let id = m
        .properties
        .as_ref()
        .map_or(roost_amqp::Value::Null, |p| p.message_id.clone());
    let r = match management::read_request(m) {
        Ok(r) => r,
        Err(e) => return cbs::response(&id, 400, &e.to_string(), Body::Empty),
    };
    // The request's own security_token, or a put-token on this connection, granting
    // ServiceConnect (what reading the endpoint needs) or RegistryRead (a read of the hub's
    // description).
    let now = now_unix();
    let reads = |g: &roost_eventhubs::cbs::Grant| {
        [Right::ServiceConnect, Right::RegistryRead]
            .iter()
            .any(|right| g.covers(&endpoint.hostname, &endpoint.entity, *right))
    };
    let by_token = r
        .token
        .as_deref()
        .and_then(|t| authority(endpoint).check(t, now).ok())
        .is_some_and(|g| reads(&g));
    let by_cbs = s.grants.iter().any(|g| g.expires > now && reads(g));
    if !(by_token || by_cbs) {
        return cbs::response(
            &r.message_id,
            401,
            "a token granting ServiceConnect or RegistryRead on this event hub is needed",
            Body::Empty,
        );
    }
    if !r.entity.eq_ignore_ascii_case(&endpoint.entity) {
        return cbs::response(
            &r.message_id,
            404,
            &format!("no event hub {:?}", r.entity),
            Body::Empty,
        );
    }
    let partitions = endpoint.log.partition_count();
    let body = match &r.read {
        management::Read::EventHub => {
            management::eventhub(&endpoint.entity, endpoint.created_ms, partitions)
        }
        management::Read::Partition(id) => {
            let Some(p) = id.parse::<usize>().ok().filter(|p| *p < partitions) else {
                return cbs::response(
                    &r.message_id,
                    404,
                    &format!("no partition {id:?}"),
                    Body::Empty,
                );
            };
            match partition_state(endpoint.log.as_ref(), p) {
                Ok(state) => management::partition(&endpoint.entity, p, state),
                Err(e) => return cbs::response(&r.message_id, 500, &e.to_string(), Body::Empty),
            }
        }
    };
    cbs::response(&r.message_id, 200, "OK", Body::Value(body))
}

fn partition_state(
    log: &dyn LogStore,
    p: usize,
) -> Result<management::PartitionState, roost_storage::LogError> {
    let next = log.next_offset(p)?;
    let first = log.first_offset(p, next)?;
    let mut last_enqueued_ms = None;
    if next > first {
        roost_storage::log::visit_records(log, p, next - 1, &mut |_, view| {
            last_enqueued_ms = Some(view.message().enqueued_ms.to_native() as i64);
            Ok(false)
        })?;
    }
    Ok(management::PartitionState {
        first,
        next,
        last_enqueued_ms,
    })
}

/// Sends events on the receivers with credit. True when a receiver sent a whole batch (more
/// may be waiting).
pub(super) fn pump_receivers(s: &mut Session, endpoint: &AmqpEndpoint) -> bool {
    let mut busy = false;
    let receivers: Vec<LinkId> = s
        .links
        .iter()
        .filter(|(_, l)| matches!(l, Link::Receiver { .. }))
        .map(|(id, _)| *id)
        .collect();
    for link in receivers {
        let Some(Link::Receiver {
            group,
            partition,
            next,
            end,
        }) = s.links.get_mut(&link)
        else {
            continue;
        };
        let (p, from) = (*partition, *next);
        // The log's end is looked up (a seek and a count of its last value) only once the
        // receiver has read to the end it knew: not once per pass of a reader with a backlog.
        if from >= *end {
            *end = endpoint.log.next_offset(p).unwrap_or(from);
        }
        let end = *end;
        endpoint
            .metrics
            .amqp_receiver_lag
            .with_label_values(&[group.as_str(), &p.to_string()])
            .set(end.saturating_sub(from) as i64);
        let credit = s.conn.credit(link).min(PUMP_BATCH);
        if credit == 0 {
            if end > from {
                endpoint.metrics.amqp_credit_stalls.inc();
            }
            continue;
        }
        // One buffer for the pass: each event's tag and message are slices of it.
        let mut scratch = BytesMut::with_capacity(credit as usize * 320);
        let mut events = Vec::with_capacity(credit as usize);
        let read = roost_storage::log::visit_records(
            endpoint.log.as_ref(),
            p,
            from,
            &mut |offset, view| {
                if events.len() as u32 >= credit {
                    return Ok(false);
                }
                if view.endpoint(BUILTIN).is_some() {
                    scratch.extend_from_slice(&offset.to_be_bytes());
                    let tag = scratch.split().freeze();
                    event::write_event(offset, view, &mut scratch);
                    events.push((offset, tag, scratch.split().freeze()));
                }
                Ok(true)
            },
        );
        let Ok(read_to) = read else { continue };
        let mut sent_to = read_to;
        let mut sent = 0u32;
        for (offset, tag, payload) in events {
            match s.conn.send(link, tag, payload, true) {
                Ok(_) => sent += 1,
                Err(_) => {
                    sent_to = offset;
                    break;
                }
            }
        }
        endpoint.metrics.amqp_events_sent.inc_by(u64::from(sent));
        busy |= sent == credit && sent_to < end;
        if let Some(Link::Receiver { next, .. }) = s.links.get_mut(&link) {
            *next = sent_to;
        }
    }
    busy
}
