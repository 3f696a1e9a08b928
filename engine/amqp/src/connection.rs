//! The server side of an AMQP 1.0 connection as a state machine (AMQP 1.0 part 2; wire spec
//! §0, §1): protocol headers, SASL, OPEN, sessions, links, credit, transfers in and out (split
//! and joined), dispositions, heartbeats and idle timeouts, and CLOSE — with no I/O and no
//! clock. Bytes and `now` go in ([`Connection::handle_bytes`], [`Connection::handle_timeout`]);
//! [`Event`]s and bytes come out ([`Connection::poll_event`], [`Connection::poll_transmit`]).
//! What a link means (CBS, an Event Hubs partition, a device's telemetry) is the caller's: it
//! answers each attach and each SASL init, sends and settles.
//!
//! Limits hold before anything is buffered: a frame larger than the limit is refused from its
//! size field (8 KiB until OPEN: an unauthenticated peer holds one small frame), sessions and
//! links are capped, a delivery split over transfers is joined up to the message size limit.
//! Whatever the peer gets wrong closes the connection with the AMQP error condition, or for a
//! delivery too large, detaches that link; nothing panics.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::frame::{check, protocol_header, write_frame, Frame, FrameType, Protocol};
use crate::performative::{
    AmqpError, Attach, Begin, DeliveryState, Detach, Disposition, Flow, Open, Performative, Role,
    Sasl, Transfer,
};
use crate::types::Str;
use crate::Error;

/// What the server announces and enforces.
#[derive(Debug, Clone)]
pub struct Config {
    pub container_id: String,
    /// The largest frame accepted once OPEN is done (announced as max-frame-size).
    pub max_frame_size: u32,
    /// The largest frame accepted before OPEN: the protocol header, SASL and OPEN are small.
    pub pre_open_frame_size: u32,
    /// Sessions per connection: channels 0..=channel_max.
    pub channel_max: u16,
    /// Links per session: handles 0..=handle_max.
    pub handle_max: u32,
    /// The idle timeout announced: a peer silent for longer is closed (heartbeats count).
    pub idle_timeout: Duration,
    /// How long the peer has from its first byte to a completed OPEN.
    pub open_timeout: Duration,
    /// The largest message a link accepts, all of a delivery's transfers together.
    pub max_message_size: u64,
    /// The SASL mechanisms offered, in order.
    pub sasl_mechanisms: Vec<String>,
    /// The incoming window announced in BEGIN and FLOW, in transfers.
    pub incoming_window: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            container_id: "roost".into(),
            max_frame_size: 65_536,
            pre_open_frame_size: 8 * 1024,
            channel_max: 15,
            handle_max: 63,
            idle_timeout: Duration::from_secs(240),
            open_timeout: Duration::from_secs(30),
            max_message_size: 1024 * 1024,
            sasl_mechanisms: vec!["MSSBCBS".into(), "ANONYMOUS".into()],
            incoming_window: 5000,
        }
    }
}

/// A link, as the server names it: the session's channel and the server's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkId {
    pub channel: u16,
    pub handle: u32,
}

/// What happened, for the caller to act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The peer chose a SASL mechanism; answer with [`Connection::sasl_outcome`].
    SaslInit {
        mechanism: String,
        initial_response: Option<Bytes>,
        hostname: Option<String>,
    },
    /// The peer's OPEN arrived; the server's was sent.
    Opened {
        container_id: String,
        hostname: Option<String>,
    },
    /// The peer attached a link; answer with [`Connection::accept_attach`] or
    /// [`Connection::refuse_attach`]. `attach.role` is the peer's role.
    Attach { link: LinkId, attach: Box<Attach> },
    /// Credit for a link the server sends on: how many more deliveries it may send now.
    Credit {
        link: LinkId,
        credit: u32,
        drain: bool,
    },
    /// A whole delivery on a link the server receives on.
    Delivery {
        link: LinkId,
        delivery_id: u32,
        tag: Bytes,
        settled: bool,
        payload: Bytes,
    },
    /// The peer settled or updated deliveries the server sent (`first..=last`).
    Disposition {
        channel: u16,
        first: u32,
        last: u32,
        settled: bool,
        state: Option<DeliveryState>,
    },
    /// The link ended (by the peer, or by the server for a delivery too large).
    Detached {
        link: LinkId,
        error: Option<AmqpError>,
    },
    /// The connection is over: the peer closed it, or the server did for `error`. Nothing more
    /// is read; what [`Connection::poll_transmit`] still gives should be written, then the
    /// socket closed.
    Closed {
        error: Option<AmqpError>,
        by_peer: bool,
    },
}

/// Why a send cannot go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("no such link")]
    NoLink,
    #[error("the link has no credit")]
    NoCredit,
    #[error("the session's outgoing window is full")]
    WindowFull,
    #[error("the link receives; it cannot send")]
    NotASender,
    #[error("the connection is closed")]
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Sasl,
    /// The peer's sasl-init is out to the application; what follows it (a pipelining client's
    /// AMQP header) waits until [`Connection::sasl_outcome`].
    SaslAwaitOutcome,
    SaslAwaitHeader,
    /// After the AMQP header: waiting for OPEN.
    AwaitOpen,
    Opened,
    Closed,
}

/// A delivery arriving in more than one transfer.
struct Partial {
    delivery_id: u32,
    tag: Bytes,
    settled: bool,
    payload: BytesMut,
}

struct Link {
    /// The peer's handle for it.
    remote_handle: u32,
    /// The server's role: it sends on links the peer receives on.
    sending: bool,
    /// Answered (accepted or refused) yet.
    answered: bool,
    delivery_count: u32,
    credit: u32,
    partial: Option<Partial>,
}

struct Session {
    next_incoming_id: u32,
    /// The transfer id of the next transfer frame out (one per frame).
    next_outgoing_id: u32,
    /// The delivery id of the next delivery out (one per delivery, however many frames it
    /// takes: rhea checks they are consecutive).
    next_delivery_id: u32,
    /// How many more transfers the peer takes (its incoming window, as of its last FLOW).
    remote_incoming_window: u32,
    /// Ours left before a FLOW restores it.
    incoming_window: u32,
    links: BTreeMap<u32, Link>,
    /// The peer's handle → ours.
    by_remote: BTreeMap<u32, u32>,
}

impl Session {
    /// A FLOW with the session's state (and no link's): where its transfers stand both ways
    /// and its incoming window.
    fn flow(&self) -> Flow {
        Flow {
            next_incoming_id: Some(self.next_incoming_id),
            incoming_window: self.incoming_window,
            next_outgoing_id: self.next_outgoing_id,
            outgoing_window: u32::MAX,
            ..Flow::default()
        }
    }
}

pub struct Connection {
    config: Config,
    state: State,
    input: BytesMut,
    output: BytesMut,
    events: VecDeque<Event>,
    /// The largest frame the peer takes (its OPEN's max-frame-size).
    peer_max_frame: usize,
    /// Half the peer's idle timeout: the server sends a heartbeat when silent this long.
    heartbeat_every: Option<Duration>,
    sessions: BTreeMap<u16, Session>,
    /// The peer's channel → ours.
    by_remote_channel: BTreeMap<u16, u16>,
    /// The peer's channels whose session it ended: a DETACH or FLOW still arriving on one is
    /// dropped (pyamqp ends its session before it detaches the `$cbs` links). At most
    /// channel-max of them, since a BEGIN on the channel takes it out again.
    ended_channels: std::collections::BTreeSet<u16>,
    started: Instant,
    last_received: Instant,
    last_sent: Instant,
    /// The latest `now` the caller gave: writes the caller asks for outside a call that
    /// passes the time count as sent then.
    clock: Instant,
}

/// The server's role on a link: the sender of a link the peer receives on.
fn role_of(sending: bool) -> Role {
    match sending {
        true => Role::Sender,
        false => Role::Receiver,
    }
}

fn err(condition: &str, description: impl Into<String>) -> AmqpError {
    AmqpError::new(condition, description)
}

impl Connection {
    pub fn new(config: Config, now: Instant) -> Self {
        Connection {
            config,
            state: State::Header,
            input: BytesMut::new(),
            output: BytesMut::new(),
            events: VecDeque::new(),
            peer_max_frame: 512,
            heartbeat_every: None,
            sessions: BTreeMap::new(),
            by_remote_channel: BTreeMap::new(),
            ended_channels: std::collections::BTreeSet::new(),
            started: now,
            last_received: now,
            last_sent: now,
            clock: now,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Opened
    }

    /// Bytes buffered of a frame not yet whole.
    pub fn buffered(&self) -> usize {
        self.input.len()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes to write to the peer, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.output.is_empty()).then(|| self.output.split().freeze())
    }

    /// Bytes read from the peer.
    pub fn handle_bytes(&mut self, now: Instant, bytes: &[u8]) {
        if self.state == State::Closed {
            return;
        }
        self.last_received = now;
        self.clock = self.clock.max(now);
        self.input.extend_from_slice(bytes);
        self.process_input();
    }

    /// Handles what the input holds, unit by unit, until more bytes are needed.
    fn process_input(&mut self) {
        while self.state != State::Closed {
            match self.next_unit() {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    self.fail(err(e.condition(), e.to_string()));
                    break;
                }
            }
        }
    }

    /// The frame-size limit in force now.
    fn limit(&self) -> usize {
        match self.state {
            State::Opened => self.config.max_frame_size as usize,
            _ => self.config.pre_open_frame_size as usize,
        }
    }

    /// Handles one protocol header or frame from the input; false when more bytes are needed.
    fn next_unit(&mut self) -> Result<bool, Error> {
        match self.state {
            State::SaslAwaitOutcome => {
                // Held, but never more than a frame's worth: nothing an unauthenticated peer
                // sends makes the connection hold more.
                let max = self.limit();
                if self.input.len() > max {
                    return Err(Error::FrameTooLarge {
                        len: self.input.len(),
                        max,
                    });
                }
                Ok(false)
            }
            State::Header | State::SaslAwaitHeader => {
                let Some(protocol) = protocol_header(&self.input)? else {
                    return Ok(false);
                };
                let _ = self.input.split_to(8);
                match (self.state, protocol) {
                    (State::Header, Protocol::Sasl) => {
                        self.write_header(Protocol::Sasl);
                        let mechanisms = self
                            .config
                            .sasl_mechanisms
                            .iter()
                            .map(|m| Str::from(m.as_str()))
                            .collect();
                        self.write_sasl(&Sasl::Mechanisms(mechanisms));
                        self.state = State::Sasl;
                    }
                    (State::Header | State::SaslAwaitHeader, Protocol::Amqp) => {
                        self.write_header(Protocol::Amqp);
                        self.state = State::AwaitOpen;
                    }
                    _ => {
                        // Answer with the header we do speak, then close (§2.2).
                        self.write_header(if self.state == State::Header {
                            Protocol::Sasl
                        } else {
                            Protocol::Amqp
                        });
                        self.state = State::Closed;
                        self.events.push_back(Event::Closed {
                            error: Some(err(
                                "amqp:not-implemented",
                                "that protocol is not offered",
                            )),
                            by_peer: false,
                        });
                    }
                }
                Ok(true)
            }
            _ => {
                let Some(len) = check(&self.input, self.limit())? else {
                    return Ok(false);
                };
                let frame = Frame::parse(self.input.split_to(len).freeze())?;
                self.handle_frame(frame)?;
                Ok(true)
            }
        }
    }

    fn handle_frame(&mut self, frame: Frame) -> Result<(), Error> {
        match (self.state, frame.kind) {
            (State::Sasl, FrameType::Sasl) => {
                match Sasl::read(&frame.body)? {
                    Sasl::Init {
                        mechanism,
                        initial_response,
                        hostname,
                    } => {
                        if !self
                            .config
                            .sasl_mechanisms
                            .iter()
                            .any(|m| m == mechanism.as_str())
                        {
                            self.write_sasl(&Sasl::Outcome {
                                code: 1,
                                additional_data: None,
                            });
                            self.close_now(err(
                                "amqp:unauthorized-access",
                                "SASL mechanism not offered",
                            ));
                            return Ok(());
                        }
                        self.state = State::SaslAwaitOutcome;
                        self.events.push_back(Event::SaslInit {
                            mechanism: mechanism.as_str().to_string(),
                            initial_response,
                            hostname: hostname.map(|h| h.as_str().to_string()),
                        });
                    }
                    _ => return Err(Error::BadFrameHeader),
                }
                Ok(())
            }
            (State::AwaitOpen | State::Opened, FrameType::Amqp) => {
                if frame.body.is_empty() {
                    return Ok(()); // heartbeat
                }
                let p = Performative::read(&frame.body)?;
                self.handle_performative(frame.channel, p)
            }
            _ => Err(Error::UnknownFrameType(frame.kind as u8)),
        }
    }

    /// Answers the peer's SASL init: success goes on to AMQP, failure closes.
    pub fn sasl_outcome(&mut self, ok: bool) {
        if self.state != State::SaslAwaitOutcome {
            return;
        }
        self.write_sasl(&Sasl::Outcome {
            code: if ok { 0 } else { 1 },
            additional_data: None,
        });
        match ok {
            true => {
                self.state = State::SaslAwaitHeader;
                // A pipelining client's AMQP header (and OPEN) may be here already.
                self.process_input();
            }
            false => self.close_now(err(
                "amqp:unauthorized-access",
                "SASL authentication failed",
            )),
        }
    }

    fn handle_performative(&mut self, channel: u16, p: Performative) -> Result<(), Error> {
        if self.state == State::AwaitOpen {
            let Performative::Open(open) = p else {
                self.fail(err(
                    "amqp:illegal-state",
                    format!("{} before open", p.name()),
                ));
                return Ok(());
            };
            return self.handle_open(open);
        }
        match p {
            Performative::Open(_) => self.fail(err("amqp:illegal-state", "a second open")),
            Performative::Close(error) => {
                self.write_close(None);
                self.state = State::Closed;
                self.events.push_back(Event::Closed {
                    error,
                    by_peer: true,
                });
            }
            Performative::Begin(b) => self.handle_begin(channel, b),
            Performative::End(_) => {
                if let Some(local) = self.by_remote_channel.remove(&channel) {
                    self.ended_channels.insert(channel);
                    let links: Vec<u32> = self
                        .sessions
                        .get(&local)
                        .map(|s| s.links.keys().copied().collect())
                        .unwrap_or_default();
                    for handle in links {
                        self.events.push_back(Event::Detached {
                            link: LinkId {
                                channel: local,
                                handle,
                            },
                            error: None,
                        });
                    }
                    self.sessions.remove(&local);
                    self.write(local, &Performative::End(None));
                } else {
                    self.fail(err(
                        "amqp:connection:framing-error",
                        format!("end on channel {channel}, which has no session"),
                    ));
                }
            }
            Performative::Detach(_) | Performative::Flow(_) | Performative::Disposition(_)
                if self.ended_channels.contains(&channel) =>
            {
                // Late frames of a session the peer ended: nothing is left to act on.
            }
            other => {
                let Some(&local) = self.by_remote_channel.get(&channel) else {
                    self.fail(err(
                        "amqp:connection:framing-error",
                        format!(
                            "{} on channel {channel}, which has no session",
                            other.name()
                        ),
                    ));
                    return Ok(());
                };
                self.handle_session_frame(local, other);
            }
        }
        Ok(())
    }

    fn handle_open(&mut self, open: Open) -> Result<(), Error> {
        let peer_max = open.max_frame_size.unwrap_or(u32::MAX) as usize;
        if peer_max < crate::frame::MIN_MAX_FRAME_SIZE {
            self.fail(err("amqp:invalid-field", "max-frame-size is below 512"));
            return Ok(());
        }
        self.peer_max_frame = peer_max
            .min(self.config.max_frame_size as usize)
            .max(crate::frame::MIN_MAX_FRAME_SIZE);
        self.heartbeat_every = open
            .idle_time_out
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(u64::from(ms) / 2));
        let ours = Open {
            container_id: Str::from(self.config.container_id.as_str()),
            max_frame_size: Some(self.config.max_frame_size),
            channel_max: Some(self.config.channel_max),
            idle_time_out: Some(
                self.config
                    .idle_timeout
                    .as_millis()
                    .min(u128::from(u32::MAX)) as u32,
            ),
            ..Open::default()
        };
        self.write(0, &Performative::Open(ours));
        self.state = State::Opened;
        self.events.push_back(Event::Opened {
            container_id: open.container_id.as_str().to_string(),
            hostname: open.hostname.map(|h| h.as_str().to_string()),
        });
        Ok(())
    }

    fn handle_begin(&mut self, channel: u16, b: Begin) {
        if b.remote_channel.is_some() {
            self.fail(err(
                "amqp:not-implemented",
                "the server does not begin sessions",
            ));
            return;
        }
        if self.by_remote_channel.contains_key(&channel) {
            self.fail(err(
                "amqp:connection:framing-error",
                format!("channel {channel} already has a session"),
            ));
            return;
        }
        let Some(local) = (0..=self.config.channel_max).find(|c| !self.sessions.contains_key(c))
        else {
            self.fail(err(
                "amqp:resource-limit-exceeded",
                format!(
                    "at most {} sessions",
                    u32::from(self.config.channel_max) + 1
                ),
            ));
            return;
        };
        self.sessions.insert(
            local,
            Session {
                next_incoming_id: b.next_outgoing_id,
                next_outgoing_id: 0,
                next_delivery_id: 0,
                remote_incoming_window: b.incoming_window,
                incoming_window: self.config.incoming_window,
                links: BTreeMap::new(),
                by_remote: BTreeMap::new(),
            },
        );
        self.by_remote_channel.insert(channel, local);
        self.ended_channels.remove(&channel);
        let reply = Begin {
            remote_channel: Some(channel),
            next_outgoing_id: 0,
            incoming_window: self.config.incoming_window,
            outgoing_window: u32::MAX,
            handle_max: Some(self.config.handle_max),
            ..Begin::default()
        };
        self.write(local, &Performative::Begin(reply));
    }

    fn handle_session_frame(&mut self, local: u16, p: Performative) {
        match p {
            Performative::Attach(a) => self.handle_attach(local, a),
            Performative::Flow(f) => self.handle_flow(local, f),
            Performative::Transfer(t) => self.handle_transfer(local, t),
            Performative::Disposition(d) if d.role == Role::Receiver => {
                self.events.push_back(Event::Disposition {
                    channel: local,
                    first: d.first,
                    last: d.last.unwrap_or(d.first),
                    settled: d.settled,
                    state: d.state,
                });
            }
            // A disposition from a sender (settling what the server received unsettled with
            // rcv-settle-mode second) needs no answer here.
            Performative::Disposition(_) => {}
            Performative::Detach(d) => {
                let Some(session) = self.sessions.get_mut(&local) else {
                    return;
                };
                let Some(handle) = session.by_remote.remove(&d.handle) else {
                    self.fail(err(
                        "amqp:session:unattached-handle",
                        format!("detach of handle {}, which is not attached", d.handle),
                    ));
                    return;
                };
                session.links.remove(&handle);
                self.write(
                    local,
                    &Performative::Detach(Detach {
                        handle,
                        closed: d.closed,
                        error: None,
                    }),
                );
                self.events.push_back(Event::Detached {
                    link: LinkId {
                        channel: local,
                        handle,
                    },
                    error: d.error,
                });
            }
            _ => {}
        }
    }

    fn handle_attach(&mut self, local: u16, a: Attach) {
        let handle_max = self.config.handle_max;
        let Some(session) = self.sessions.get_mut(&local) else {
            return;
        };
        if a.handle > handle_max {
            self.fail(err(
                "amqp:connection:framing-error",
                format!("handle {} is over handle-max {handle_max}", a.handle),
            ));
            return;
        }
        if session.by_remote.contains_key(&a.handle) {
            self.fail(err(
                "amqp:session:handle-in-use",
                format!("handle {} is in use", a.handle),
            ));
            return;
        }
        let Some(handle) = (0..=handle_max).find(|h| !session.links.contains_key(h)) else {
            self.fail(err(
                "amqp:resource-limit-exceeded",
                format!("at most {} links per session", u64::from(handle_max) + 1),
            ));
            return;
        };
        session.by_remote.insert(a.handle, handle);
        session.links.insert(
            handle,
            Link {
                remote_handle: a.handle,
                sending: a.role == Role::Receiver,
                answered: false,
                delivery_count: a.initial_delivery_count.unwrap_or(0),
                credit: 0,
                partial: None,
            },
        );
        self.events.push_back(Event::Attach {
            link: LinkId {
                channel: local,
                handle,
            },
            attach: Box::new(a),
        });
    }

    /// Accepts an attached link: the reply echoes the peer's terminus (both non-null, as the
    /// SDKs need), starts the delivery count at 0 when the server sends, and, when the server
    /// receives, grants `credit`.
    pub fn accept_attach(&mut self, link: LinkId, attach: &Attach, credit: u32) {
        let max_message_size = self.config.max_message_size;
        let Some(l) = self.link_mut(link) else { return };
        if l.answered {
            return;
        }
        l.answered = true;
        let sending = l.sending;
        let reply = Attach {
            snd_settle_mode: attach.snd_settle_mode,
            rcv_settle_mode: attach.rcv_settle_mode,
            source: Some(attach.source.clone().unwrap_or_default()),
            target: Some(attach.target.clone().unwrap_or_default()),
            initial_delivery_count: sending.then_some(0),
            max_message_size: Some(max_message_size),
            ..Attach::new(attach.name.clone(), link.handle, role_of(sending))
        };
        self.write(link.channel, &Performative::Attach(reply));
        if !sending && credit > 0 {
            self.grant(link, credit);
        }
    }

    /// Refuses an attached link: the reply carries a null terminus on the peer's side and is
    /// followed by a closing DETACH with `error` (AMQP 1.0 §2.6.3).
    pub fn refuse_attach(&mut self, link: LinkId, attach: &Attach, error: AmqpError) {
        let Some(l) = self.link_mut(link) else { return };
        l.answered = true;
        let sending = l.sending;
        let reply = Attach {
            source: if sending { None } else { attach.source.clone() },
            target: if sending { attach.target.clone() } else { None },
            initial_delivery_count: sending.then_some(0),
            ..Attach::new(attach.name.clone(), link.handle, role_of(sending))
        };
        self.write(link.channel, &Performative::Attach(reply));
        self.detach(link, Some(error));
    }

    /// Ends a link from the server's side.
    pub fn detach(&mut self, link: LinkId, error: Option<AmqpError>) {
        let Some(session) = self.sessions.get_mut(&link.channel) else {
            return;
        };
        let Some(l) = session.links.remove(&link.handle) else {
            return;
        };
        session.by_remote.remove(&l.remote_handle);
        self.write(
            link.channel,
            &Performative::Detach(Detach {
                handle: link.handle,
                closed: true,
                error,
            }),
        );
    }

    /// Grants `credit` on a link the server receives on (replacing what was left).
    pub fn grant(&mut self, link: LinkId, credit: u32) {
        let incoming_window = self.config.incoming_window;
        let Some(session) = self.sessions.get_mut(&link.channel) else {
            return;
        };
        let Some(l) = session.links.get_mut(&link.handle) else {
            return;
        };
        if l.sending {
            return;
        }
        l.credit = credit;
        let delivery_count = l.delivery_count;
        session.incoming_window = incoming_window;
        let flow = Flow {
            handle: Some(link.handle),
            delivery_count: Some(delivery_count),
            link_credit: Some(credit),
            ..session.flow()
        };
        self.write(link.channel, &Performative::Flow(flow));
    }

    fn handle_flow(&mut self, local: u16, f: Flow) {
        let Some(session) = self.sessions.get_mut(&local) else {
            return;
        };
        // The peer's incoming window, as of the transfers it has seen (§2.5.6).
        let seen = f.next_incoming_id.unwrap_or(0);
        session.remote_incoming_window = seen
            .wrapping_add(f.incoming_window)
            .wrapping_sub(session.next_outgoing_id);
        let Some(remote) = f.handle else { return };
        let Some(&handle) = session.by_remote.get(&remote) else {
            self.fail(err(
                "amqp:session:unattached-handle",
                format!("flow on handle {remote}, which is not attached"),
            ));
            return;
        };
        let Some(l) = session.links.get_mut(&handle) else {
            return;
        };
        if l.sending {
            // The receiver's view: credit counts from its delivery-count (§2.6.7).
            let their_count = f.delivery_count.unwrap_or(0);
            let credit = their_count
                .wrapping_add(f.link_credit.unwrap_or(0))
                .wrapping_sub(l.delivery_count);
            l.credit = credit;
            self.events.push_back(Event::Credit {
                link: LinkId {
                    channel: local,
                    handle,
                },
                credit,
                drain: f.drain.unwrap_or(false),
            });
        }
        if f.echo == Some(true) {
            let (delivery_count, credit) = (l.delivery_count, l.credit);
            let flow = Flow {
                handle: Some(handle),
                delivery_count: Some(delivery_count),
                link_credit: Some(credit),
                ..session.flow()
            };
            self.write(local, &Performative::Flow(flow));
        }
    }

    fn handle_transfer(&mut self, local: u16, t: Transfer) {
        let max = self.config.max_message_size;
        let window = self.config.incoming_window;
        let Some(session) = self.sessions.get_mut(&local) else {
            return;
        };
        let Some(&handle) = session.by_remote.get(&t.handle) else {
            self.fail(err(
                "amqp:session:unattached-handle",
                format!("transfer on handle {}, which is not attached", t.handle),
            ));
            return;
        };
        session.next_incoming_id = session.next_incoming_id.wrapping_add(1);
        session.incoming_window = session.incoming_window.saturating_sub(1);
        let restore = session.incoming_window < window / 2;
        let link = LinkId {
            channel: local,
            handle,
        };
        let Some(l) = session.links.get_mut(&handle) else {
            return;
        };
        if l.sending {
            self.fail(err(
                "amqp:invalid-field",
                "a transfer on a link the peer receives on",
            ));
            return;
        }
        let partial = match l.partial.take() {
            Some(mut p) => {
                p.payload.extend_from_slice(&t.payload);
                p
            }
            None => {
                if l.credit == 0 {
                    self.fail(err(
                        "amqp:link:transfer-limit-exceeded",
                        "a transfer without credit",
                    ));
                    return;
                }
                let (Some(delivery_id), Some(tag)) = (t.delivery_id, t.delivery_tag.clone()) else {
                    self.fail(err(
                        "amqp:invalid-field",
                        "the first transfer of a delivery needs its id and tag",
                    ));
                    return;
                };
                l.credit -= 1;
                l.delivery_count = l.delivery_count.wrapping_add(1);
                Partial {
                    delivery_id,
                    tag,
                    settled: t.settled.unwrap_or(false),
                    payload: BytesMut::from(&t.payload[..]),
                }
            }
        };
        if partial.payload.len() as u64 > max {
            self.detach(
                link,
                Some(err(
                    "amqp:link:message-size-exceeded",
                    format!("a message is over {max} bytes"),
                )),
            );
            self.events.push_back(Event::Detached { link, error: None });
            return;
        }
        if t.aborted == Some(true) {
            // The peer gave up on the delivery: nothing to hand on.
        } else if t.more {
            l.partial = Some(partial);
        } else {
            self.events.push_back(Event::Delivery {
                link,
                delivery_id: partial.delivery_id,
                tag: partial.tag,
                settled: partial.settled,
                payload: partial.payload.freeze(),
            });
        }
        if restore {
            let Some(session) = self.sessions.get_mut(&local) else {
                return;
            };
            session.incoming_window = window;
            let flow = session.flow();
            self.write(local, &Performative::Flow(flow));
        }
    }

    /// Settles (or updates) deliveries the server received, `first..=last`, on the session of
    /// `channel`.
    pub fn disposition(
        &mut self,
        channel: u16,
        first: u32,
        last: u32,
        settled: bool,
        state: DeliveryState,
    ) {
        if !self.sessions.contains_key(&channel) {
            return;
        }
        let d = Disposition {
            role: Role::Receiver,
            first,
            last: (last != first).then_some(last),
            settled,
            state: Some(state),
            batchable: None,
        };
        self.write(channel, &Performative::Disposition(d));
    }

    /// Sends one message (its encoded sections) on a link the peer receives on, split into
    /// transfers that fit the peer's max-frame-size. Returns the delivery id.
    pub fn send(
        &mut self,
        link: LinkId,
        tag: Bytes,
        payload: Bytes,
        settled: bool,
    ) -> Result<u32, SendError> {
        if self.state != State::Opened {
            return Err(SendError::Closed);
        }
        let max_frame = self.peer_max_frame;
        let session = self
            .sessions
            .get_mut(&link.channel)
            .ok_or(SendError::NoLink)?;
        let l = session
            .links
            .get_mut(&link.handle)
            .ok_or(SendError::NoLink)?;
        if !l.sending {
            return Err(SendError::NotASender);
        }
        if l.credit == 0 {
            return Err(SendError::NoCredit);
        }
        // Room for the frame header and a transfer performative with a short tag.
        let room = max_frame.saturating_sub(64 + tag.len()).max(64);
        let frames = payload.len().div_ceil(room).max(1) as u32;
        if session.remote_incoming_window < frames {
            return Err(SendError::WindowFull);
        }
        l.credit -= 1;
        l.delivery_count = l.delivery_count.wrapping_add(1);
        let delivery_id = session.next_delivery_id;
        session.next_delivery_id = session.next_delivery_id.wrapping_add(1);
        session.next_outgoing_id = session.next_outgoing_id.wrapping_add(frames);
        session.remote_incoming_window -= frames;
        let mut rest = payload;
        let mut first = true;
        loop {
            let chunk = rest.split_to(rest.len().min(room));
            let more = !rest.is_empty();
            let t = Transfer {
                delivery_id: first.then_some(delivery_id),
                delivery_tag: first.then(|| tag.clone()),
                message_format: first.then_some(0),
                settled: first.then_some(settled),
                more,
                ..Transfer::new(link.handle, chunk)
            };
            self.write(link.channel, &Performative::Transfer(t));
            first = false;
            if !more {
                break;
            }
        }
        Ok(delivery_id)
    }

    /// The credit left on a link the server sends on.
    pub fn credit(&self, link: LinkId) -> u32 {
        self.sessions
            .get(&link.channel)
            .and_then(|s| s.links.get(&link.handle))
            .map_or(0, |l| l.credit)
    }

    /// Closes the connection with `error` (or none: a normal close).
    pub fn close(&mut self, error: Option<AmqpError>) {
        if self.state == State::Closed {
            return;
        }
        if matches!(self.state, State::AwaitOpen) {
            // CLOSE must follow an OPEN (§2.4.3): send one first.
            let open = Open {
                container_id: Str::from(self.config.container_id.as_str()),
                ..Open::default()
            };
            self.write(0, &Performative::Open(open));
        }
        if matches!(self.state, State::AwaitOpen | State::Opened) {
            self.write_close(error.clone());
        }
        self.state = State::Closed;
        self.events.push_back(Event::Closed {
            error,
            by_peer: false,
        });
    }

    fn close_now(&mut self, error: AmqpError) {
        self.state = State::Closed;
        self.events.push_back(Event::Closed {
            error: Some(error),
            by_peer: false,
        });
    }

    fn fail(&mut self, error: AmqpError) {
        self.close(Some(error));
    }

    /// Deadlines: the open deadline, the peer's silence (twice the announced idle timeout, as
    /// the spec's allowance), and the server's heartbeat.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        match self.state {
            State::Closed => {}
            State::Opened => {
                if now.duration_since(self.last_received) >= self.config.idle_timeout * 2 {
                    self.fail(err(
                        "amqp:resource-limit-exceeded",
                        "local-idle-timeout expired",
                    ));
                    return;
                }
                if let Some(every) = self.heartbeat_every {
                    if now.duration_since(self.last_sent) >= every {
                        crate::frame::write_heartbeat(&mut self.output);
                        self.last_sent = now;
                    }
                }
            }
            _ => {
                if now.duration_since(self.started) >= self.config.open_timeout {
                    self.close_now(err("amqp:resource-limit-exceeded", "no open in time"));
                }
            }
        }
    }

    /// When [`Connection::handle_timeout`] wants calling next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Closed => None,
            State::Opened => {
                let idle = self.last_received + self.config.idle_timeout * 2;
                Some(match self.heartbeat_every {
                    Some(every) => idle.min(self.last_sent + every),
                    None => idle,
                })
            }
            _ => Some(self.started + self.config.open_timeout),
        }
    }

    fn link_mut(&mut self, link: LinkId) -> Option<&mut Link> {
        self.sessions
            .get_mut(&link.channel)?
            .links
            .get_mut(&link.handle)
    }

    fn write_header(&mut self, p: Protocol) {
        self.output.extend_from_slice(&p.header());
        self.last_sent = self.clock;
    }

    fn write_sasl(&mut self, s: &Sasl) {
        write_frame(FrameType::Sasl, 0, &mut self.output, |out| s.write(out));
        self.last_sent = self.clock;
    }

    fn write(&mut self, local_channel: u16, p: &Performative) {
        // Frames go out on the server's channel number for the session (its local channel).
        write_frame(FrameType::Amqp, local_channel, &mut self.output, |out| {
            p.write(out)
        });
        self.last_sent = self.clock;
    }

    fn write_close(&mut self, error: Option<AmqpError>) {
        self.write(0, &Performative::Close(error));
    }
}
