//! A device session on a shard for a connection another thread serves — the AMQP listener
//! (`amqp/device.rs`) — so a device over AMQP has the same one device session as over MQTT
//! (DESIGN.md §2): authentication and the claim of its client id (which kicks an older
//! connection of it anywhere), ingest into this shard's log with acknowledgements once
//! durable, the quotas, the inbox control's commands arrive in, its token's expiry and its end.
//!
//! The connection's thread sends what the device does ([`ToSession`]) over a channel; the
//! session answers through a callback with what the device is owed ([`FromSession`]). A task
//! per bridged session runs in the shard's devices queue and waits, as the MQTT adapter does,
//! on whichever comes first: input from the channel, the log making the oldest owed batch
//! durable, or the session's signal (kick, deadline, inbox). Dropping the sender ends it.

use std::time::Instant;

use bytes::Bytes;
use futures_lite::future;
use roost_iothub::props::PropertyBag;
use roost_model::link::{C2dOutcome, DeviceCommand, TwinOp};
use roost_iothub::x509::ClientCert;
use roost_session::auth::{SasClaim, X509Claim};
use roost_session::{telemetry, DisconnectReason, PreAuthSlot};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::session::DeviceSession;
use crate::shard::Shard;
use crate::signal::Wake;

/// What the device does, sent by the connection's thread.
#[derive(Debug)]
pub enum ToSession {
    /// A new token for the same identity (a `$cbs` renewal): the session lives until its
    /// expiry instead.
    Renew {
        token: String,
    },
    /// A telemetry message; `ack` names it in [`FromSession::Acked`].
    Telemetry {
        bag: PropertyBag,
        body: Bytes,
        ack: u64,
    },
    /// The device takes cloud-to-device messages now (it attached its receiver).
    TakeC2d,
    /// The device takes direct method requests (it attached its method receiver), or no more.
    TakeMethods(bool),
    C2dSettled {
        lock: u64,
        outcome: C2dOutcome,
    },
    MethodResponse {
        rid: String,
        status: u16,
        payload: Vec<u8>,
    },
    Twin {
        rid: String,
        op: TwinOp,
    },
}

/// What the device is owed, sent back to the connection's thread.
#[derive(Debug)]
pub enum FromSession {
    /// The token checked out: the session is the device's now.
    Authenticated,
    /// The token was refused, with the refusal's reason; the session is over.
    Refused(&'static str),
    /// A renewal's verdict (the refusal's reason when refused; the session goes on with the
    /// token it had).
    Renewed(Result<(), &'static str>),
    /// Telemetry `ack` is durable.
    Acked(u64),
    /// Telemetry `ack` was not taken (over the size quota), with the reason.
    NotTaken(u64, DisconnectReason),
    /// A command control sent the device.
    Command(DeviceCommand),
    /// The session ended.
    Ended(DisconnectReason),
}

/// What a bridged session proves its identity with.
pub enum Credential {
    /// A SAS token (an AMQP `$cbs` put-token).
    Token(String),
    /// The client certificate the connection's TLS handshake carried (an AMQP device that
    /// attaches its links without a put-token, as the Node SDK does with X.509).
    Certificate(Box<ClientCert>),
}

/// A bridged session to start on a shard.
pub struct Bridge {
    pub device_id: String,
    pub module_id: Option<String>,
    pub credential: Credential,
    /// `Amqp`, or `AmqpWs` for a connection that came over a WebSocket on port 443.
    pub transport: crate::metrics::Transport,
    pub input: UnboundedReceiver<ToSession>,
    pub output: Box<dyn Fn(FromSession) + Send>,
}

impl std::fmt::Debug for Bridge {
    /// Never the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("device_id", &self.device_id)
            .field("module_id", &self.module_id)
            .finish_non_exhaustive()
    }
}

enum Woken {
    Input(Option<ToSession>),
    Durable(Result<(), crate::log::LogFailed>),
    Signal(Wake),
    Unthrottled,
}

/// Runs a bridged session on `shard` to its end.
pub async fn serve(shard: std::rc::Rc<Shard>, mut bridge: Bridge) {
    // The connection's own thread holds its place under the pre-authentication caps.
    let slot = PreAuthSlot::none(&shard.shared.pre_auth);
    let mut session = DeviceSession::<u64>::open(shard, slot, bridge.transport);
    let (device_id, module_id) = (bridge.device_id.clone(), bridge.module_id.clone());
    let checked = match &bridge.credential {
        Credential::Token(token) => session
            .authenticate(&SasClaim {
                device_id,
                module_id,
                model_id: None,
                token,
            })
            .map(|_| ()),
        Credential::Certificate(cert) => session
            .authenticate_x509(&X509Claim {
                device_id,
                module_id,
                model_id: None,
                cert,
            })
            .map(|_| ()),
    };
    if let Err(refusal) = checked {
        (bridge.output)(FromSession::Refused(refusal.reason()));
        session.finish(DisconnectReason::Refused);
        return;
    }
    bridge.credential = Credential::Token(String::new());
    (bridge.output)(FromSession::Authenticated);
    let reason = run(&mut session, &mut bridge).await;
    (bridge.output)(FromSession::Ended(reason));
    session.finish(reason);
}

async fn run(session: &mut DeviceSession<u64>, bridge: &mut Bridge) -> DisconnectReason {
    let mut throttled_until: Option<Instant> = None;
    loop {
        if let Some(reason) = session.signal().pending_close() {
            return reason;
        }
        session.set_deadline(None);
        glommio::yield_if_needed().await;
        session.shard.log.room().await;
        let woken = {
            let input = &mut bridge.input;
            let sig = session.signal();
            let read = async {
                match throttled_until {
                    None => Woken::Input(input.recv().await),
                    Some(until) => {
                        glommio::timer::Timer::new(until.saturating_duration_since(Instant::now()))
                            .await;
                        Woken::Unthrottled
                    }
                }
            };
            let signal = async { Woken::Signal(sig.wait().await) };
            match session.oldest_unacked_batch() {
                Some(batch) => {
                    let log = session.shard.log.clone();
                    let durable = async move { Woken::Durable(log.durable(batch).await) };
                    future::or(read, future::or(durable, signal)).await
                }
                None => future::or(read, signal).await,
            }
        };
        let step = match woken {
            Woken::Input(None) => Err(DisconnectReason::ConnectionLost),
            Woken::Input(Some(input)) => on_input(session, bridge, input, &mut throttled_until),
            Woken::Unthrottled => {
                throttled_until = None;
                Ok(())
            }
            Woken::Durable(Ok(())) => {
                for ack in session.durable_acks() {
                    (bridge.output)(FromSession::Acked(ack));
                }
                Ok(())
            }
            Woken::Durable(Err(_)) => Err(DisconnectReason::LogWriteFailed),
            Woken::Signal(Wake::Close(reason)) => Err(reason),
            Woken::Signal(Wake::CheckTimeout) => match session.expired(Instant::now()) {
                true => Err(DisconnectReason::TokenExpired),
                false => Ok(()),
            },
            Woken::Signal(Wake::Inbox) => {
                drain(session, bridge);
                Ok(())
            }
        };
        if let Err(reason) = step {
            return reason;
        }
    }
}

fn drain(session: &DeviceSession<u64>, bridge: &Bridge) {
    while let Some(command) = session.next_command() {
        (bridge.output)(FromSession::Command(command));
    }
}

fn on_input(
    session: &mut DeviceSession<u64>,
    bridge: &Bridge,
    input: ToSession,
    throttled_until: &mut Option<Instant>,
) -> Result<(), DisconnectReason> {
    let now = Instant::now();
    match input {
        ToSession::Renew { token } => {
            let verdict = session.renew(&token).map_err(|r| r.reason());
            (bridge.output)(FromSession::Renewed(verdict));
        }
        ToSession::Telemetry { bag, body, ack } => {
            if body.len() > session.max_body(now) {
                (bridge.output)(FromSession::NotTaken(
                    ack,
                    DisconnectReason::PayloadTooLarge,
                ));
                return Ok(());
            }
            *throttled_until = session.meter_send(now)?;
            let Some(identity) = session.identity() else {
                return Err(DisconnectReason::PublishBeforeConnect);
            };
            let wall_ms = crate::session::unix_now().as_millis() as u64;
            let message = telemetry::record(identity, bag, false, &body, wall_ms);
            if let Some(ack) = session.ingest(message, Some(ack), body.len(), now)? {
                (bridge.output)(FromSession::Acked(ack));
            }
        }
        ToSession::TakeC2d => session.set_takes_c2d(true),
        ToSession::TakeMethods(takes) => session.set_takes_methods(takes),
        ToSession::C2dSettled { lock, outcome } => session.c2d_settled(lock, outcome),
        ToSession::MethodResponse {
            rid,
            status,
            payload,
        } => session.method_response(&rid, status, &payload)?,
        ToSession::Twin { rid, op } => {
            let until = session.twin_request(&rid, op, now)?;
            if until.is_some() {
                *throttled_until = until;
            }
            // An answer given at once (a refusal) is in the inbox already.
            drain(session, bridge);
        }
    }
    Ok(())
}
