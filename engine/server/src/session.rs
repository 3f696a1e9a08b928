//! The device session on a shard (DESIGN.md §2, "one device session under every protocol"):
//! everything about a device connection that does not depend on its protocol — registration
//! with the shard, authentication and the claim of its client id (which kicks an older
//! connection of the same identity, here or on another shard), ingest into the shard's log
//! with acknowledgements released in order once durable, activity and connection-state
//! reports to control, the outbound inbox control's commands arrive in, its deadline in the
//! shard's wheel, and the end with a [`DisconnectReason`].
//!
//! A protocol adapter (`conn.rs` for MQTT) owns one and adds only framing: it turns its
//! protocol's CONNECT into a `SasClaim`, its publish into a record, and its acknowledgement
//! into the token `A` the session hands back once the record is durable.

use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use roost_model::link::{C2dOutcome, DeviceCommand, EngineFrame, TwinOp};
use roost_model::Message;
use roost_session::auth::{authenticate_sas, SasClaim, X509Claim};
use roost_session::quota::{Admit, Bucket, Limit};
use roost_session::router::twin_error;
use roost_session::{DisconnectReason, Identity, Ingest, PreAuthSlot, Refusal, RouterInput};

use crate::metrics::{AuthCredential, Transport};
use crate::shard::{ConnHandles, Shard, StoreError, Stored};
use crate::signal::Signal;

/// How often a busy session refreshes the device's lastActivityTime at control.
const ACTIVITY_EVERY: Duration = Duration::from_secs(5);
/// Most twin requests one connection may have waiting for their answers; past it a request
/// is answered at once with 429.
const MAX_TWIN_IN_FLIGHT: u32 = 16;
/// Largest reported-properties patch taken from a device: a section holds 32 KB of JSON, so
/// twice that as text is refused before it crosses the link (400).
pub const MAX_TWIN_PATCH: usize = 64 * 1024;

pub struct DeviceSession<A> {
    pub shard: Rc<Shard>,
    /// The protocol it speaks, for its metrics.
    transport: Transport,
    gid: u64,
    handles: Rc<ConnHandles>,
    identity: Option<Identity>,
    /// Held until the session authenticates: its place under the engine's caps on
    /// unauthenticated connections.
    pre_auth: PreAuthSlot,
    /// When the token the session authenticated with expires; the session ends then.
    expires_at: Option<Instant>,
    refused: bool,
    /// Set once [`Self::finish`] has run.
    ended: bool,
    ingest: Ingest<A>,
    last_activity: Instant,
    quotas: SessionQuotas,
    /// Twin requests sent (or answered here) whose answers are not drained yet.
    twin_in_flight: std::cell::Cell<u32>,
}

/// What the session meters itself, under the shard's quotas of `version`; rebuilt when they
/// change.
struct SessionQuotas {
    version: u64,
    /// The identity's own send rate (`device_d2c_sends_per_sec`).
    device_rate: Option<Bucket>,
    max_body: usize,
}

impl<A> DeviceSession<A> {
    /// A session for a connection speaking `transport` that has just opened on `shard`,
    /// holding `pre_auth` (taken at accept) until it authenticates.
    pub fn open(shard: Rc<Shard>, pre_auth: PreAuthSlot, transport: Transport) -> Self {
        let (gid, handles) = shard.register();
        Self {
            shard,
            transport,
            gid,
            handles,
            identity: None,
            pre_auth,
            expires_at: None,
            refused: false,
            ended: false,
            ingest: Ingest::default(),
            last_activity: Instant::now(),
            quotas: SessionQuotas {
                version: u64::MAX,
                device_rate: None,
                max_body: 0,
            },
            twin_in_flight: std::cell::Cell::new(0),
        }
    }

    pub fn signal(&self) -> &Signal {
        &self.handles.signal
    }

    /// The protocol's next deadline (connect, keep-alive); `None` for none. The session's own,
    /// its token's expiry, is filed with it: whichever comes first wakes the connection.
    pub fn set_deadline(&self, at: Option<Instant>) {
        let at = match (at, self.expires_at) {
            (Some(a), Some(e)) => Some(a.min(e)),
            (a, e) => a.or(e),
        };
        self.shard.set_deadline(self.gid, &self.handles, at);
    }

    /// Whether the session's credentials have ended by `now`: the adapter then closes the
    /// connection with [`DisconnectReason::TokenExpired`].
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }

    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// Checks `claim` against the registry; on success the session is that identity and holds
    /// its client id. A refusal is counted with its reason.
    pub fn authenticate(&mut self, claim: &SasClaim<'_>) -> Result<&Identity, Refusal> {
        let registry = self.shard.shared.registry.load();
        let now_unix = unix_now();
        let checked = authenticate_sas(
            claim,
            &registry,
            &self.shard.shared.hostname,
            now_unix.as_secs(),
        );
        self.admit(checked, now_unix, AuthCredential::Sas)
    }

    /// As [`Self::authenticate`], with the client certificate the TLS handshake carried; the
    /// session lasts until the certificate expires.
    pub fn authenticate_x509(&mut self, claim: &X509Claim<'_>) -> Result<&Identity, Refusal> {
        let registry = self.shard.shared.registry.load();
        let now_unix = unix_now();
        let cas = self.shard.shared.cas.load();
        let checked =
            roost_session::auth::authenticate_x509(claim, &registry, &cas, now_unix.as_secs());
        self.admit(checked, now_unix, AuthCredential::X509)
    }

    /// The session becomes the identity the registry admitted (or counts the refusal).
    fn admit(
        &mut self,
        checked: Result<Identity, Refusal>,
        now_unix: Duration,
        credential: AuthCredential,
    ) -> Result<&Identity, Refusal> {
        let outcome = checked.as_ref().map_or_else(Refusal::reason, |_| "accepted");
        self.shard
            .metrics
            .of(self.transport)
            .authenticated(credential, outcome);
        let identity = match checked {
            Ok(identity) => identity,
            Err(refusal) => {
                self.refuse(refusal.reason());
                return Err(refusal);
            }
        };
        self.pre_auth.release();
        self.expires_at =
            Instant::now().checked_add(token_lifetime(identity.token_expiry, now_unix));
        // The router reports the client connected, in claim order with every shard's.
        self.shard.claim(&identity, self.gid);
        let m = self.shard.metrics.of(self.transport);
        m.connections_accepted.inc();
        m.connections_current.inc();
        tracing::debug!(client = %identity.client_id(), shard = self.shard.id, "device connected");
        Ok(self.identity.insert(identity))
    }

    /// A new token for the session's own identity (an AMQP `$cbs` renewal): checked as the
    /// first was; on success the session lives until its expiry instead. A refused renewal
    /// leaves the session with the token it had.
    pub fn renew(&mut self, token: &str) -> Result<(), Refusal> {
        let Some(identity) = &self.identity else {
            return Err(Refusal::UnknownDevice);
        };
        let claim = SasClaim {
            device_id: identity.device_id.clone(),
            module_id: identity.module_id.clone(),
            model_id: None,
            token,
        };
        let registry = self.shard.shared.registry.load();
        let now_unix = unix_now();
        let renewed = authenticate_sas(
            &claim,
            &registry,
            &self.shard.shared.hostname,
            now_unix.as_secs(),
        )?;
        self.expires_at =
            Instant::now().checked_add(token_lifetime(renewed.token_expiry, now_unix));
        self.set_deadline(None);
        Ok(())
    }

    /// Counts a refusal the protocol decided before authentication (an unsupported version, a
    /// malformed username). Ignored once authenticated: a session that has an identity ends as
    /// a disconnect, never as a refusal.
    pub fn refuse(&mut self, reason: &'static str) {
        if self.identity.is_some() {
            return;
        }
        self.shard.metrics.of(self.transport).refused.inc(reason);
        self.refused = true;
    }

    /// Routes `message` and appends it once to the shard's log (`Shard::store`). `ack` (if the
    /// protocol owes one) comes back from [`Self::durable_acks`] once the record is durable; a
    /// message stored nowhere (dropped or refused by a plugin, or unrouted) is acknowledged in
    /// order behind what is owed, and comes back here when nothing is.
    // hot path: routing without Lua is a few comparisons; one archive, one memcpy.
    pub fn ingest(
        &mut self,
        message: Message,
        ack: Option<A>,
        body_len: usize,
        mono_now: Instant,
    ) -> Result<Option<A>, DisconnectReason> {
        let Some(identity) = &self.identity else {
            return Err(DisconnectReason::PublishBeforeConnect);
        };
        let enqueued_ms = message.enqueued_ms;
        let stored = self.shard.store(message).map_err(|e| match e {
            StoreError::Archive => DisconnectReason::ArchiveFailed,
            StoreError::Log => DisconnectReason::LogWriteFailed,
        })?;
        let m = self.shard.metrics.of(self.transport);
        m.messages_in.inc();
        m.bytes_in.inc_by(body_len as u64);
        if mono_now.duration_since(self.last_activity) >= ACTIVITY_EVERY {
            self.last_activity = mono_now;
            self.shard.shared.router.report(EngineFrame::Activity {
                device_id: identity.device_id.clone(),
                at_ms: enqueued_ms,
            });
        }
        let Some(ack) = ack else {
            return Ok(None);
        };
        match stored {
            Stored::Appended(batch) => {
                self.ingest.push(batch, ack);
                Ok(None)
            }
            Stored::Nowhere => Ok(self.ack_in_order(ack)),
        }
    }

    /// The session's quotas, brought up to the shard's.
    fn quotas(&mut self, now: Instant) -> &mut SessionQuotas {
        let version = self.shard.quota_version();
        if self.quotas.version != version {
            let quotas = self.shard.quotas();
            self.quotas = SessionQuotas {
                version,
                device_rate: quotas.bucket(Limit::DeviceD2cSendsPerSec, 1, now),
                max_body: quotas
                    .get(Limit::D2cMaxBytes)
                    .map_or(roost_session::telemetry::MAX_D2C_BODY, |v| v as usize),
            };
        }
        &mut self.quotas
    }

    /// The largest message body the hub's quotas allow.
    pub fn max_body(&mut self, now: Instant) -> usize {
        self.quotas(now).max_body
    }

    /// Meters one device-to-cloud message against the identity's and the hub's send rates:
    /// `Ok(None)` within both, `Ok(Some(until))` when the adapter must hold the connection's
    /// input until then (IoT Hub's traffic shaping), or [`DisconnectReason::Throttled`] when
    /// the wait would be longer than the shaping backlog.
    pub fn meter_send(&mut self, now: Instant) -> Result<Option<Instant>, DisconnectReason> {
        // The identity's own rate first: a device over it must not spend the hub's.
        let device = self
            .quotas(now)
            .device_rate
            .as_mut()
            .map_or(Admit::Now, |b| b.take(now, 1.0));
        let device = self.shaped(Limit::DeviceD2cSendsPerSec, device)?;
        let hub = self.shaped(Limit::D2cSendsPerSec, self.shard.meter_d2c(now))?;
        Ok(device.max(hub).map(|d| now + d))
    }

    /// What `admit` under `limit` means for the adapter: a delay (counted) or the end.
    fn shaped(&self, limit: Limit, admit: Admit) -> Result<Option<Duration>, DisconnectReason> {
        match admit {
            Admit::Now => Ok(None),
            Admit::After(d) => {
                self.shard.metrics.throttle_delayed.inc(limit.name());
                Ok(Some(d))
            }
            Admit::Refused => Err(DisconnectReason::Throttled),
        }
    }

    /// A twin request of the device (`rid` as it wrote it): sent to control through the
    /// router, which answers for control if it is silent; or answered here at once when it
    /// is too large (400), over the twin rate quota's backlog or too many are in flight (429).
    /// `Ok(Some(until))`: the request went, and the connection holds its input until then
    /// (traffic shaping, as for telemetry). The answer arrives in the inbox.
    pub fn twin_request(
        &mut self,
        rid: &str,
        op: TwinOp,
        now: Instant,
    ) -> Result<Option<Instant>, DisconnectReason> {
        let Some(identity) = &self.identity else {
            return Err(DisconnectReason::PublishBeforeConnect);
        };
        let update = matches!(op, TwinOp::PatchReported { .. });
        let refuse = |status, code, why: &str| (status, code, why.to_string());
        let refusal = if matches!(&op, TwinOp::PatchReported { body } if body.len() > MAX_TWIN_PATCH)
        {
            Some((
                "too_large",
                refuse(400, 400004, "the reported properties patch is too large"),
            ))
        } else if self.twin_in_flight.get() >= MAX_TWIN_IN_FLIGHT {
            Some((
                "too_many_in_flight",
                refuse(429, 429001, "too many twin requests in flight"),
            ))
        } else {
            None
        };
        let mut until = None;
        let refusal = match refusal {
            Some(r) => Some(r),
            None => match self.shard.meter_twin(now, update) {
                Admit::Now => None,
                Admit::After(d) => {
                    let limit = if update {
                        Limit::TwinUpdatesPerSec
                    } else {
                        Limit::TwinReadsPerSec
                    };
                    self.shard.metrics.throttle_delayed.inc(limit.name());
                    until = Some(now + d);
                    None
                }
                Admit::Refused => Some((
                    "throttled",
                    refuse(
                        429,
                        429001,
                        "the hub's twin operation quota is spent; retry later",
                    ),
                )),
            },
        };
        self.twin_in_flight.set(self.twin_in_flight.get() + 1);
        if let Some((label, (status, code, why))) = refusal {
            self.shard.metrics.twin_requests.inc(label);
            let answer = twin_error(rid.to_string(), status, code, &why);
            if self.handles.inbox.borrow_mut().push(answer).is_err() {
                self.twin_in_flight.set(self.twin_in_flight.get() - 1);
                self.shard.metrics.commands_dropped.inc("twin_response");
            }
            return Ok(None);
        }
        self.shard.metrics.twin_requests.inc(op.kind());
        self.shard.shared.router.send(RouterInput::TwinRequest {
            client_id: identity.client_id(),
            device_id: identity.device_id.clone(),
            module_id: identity.module_id.clone(),
            rid: rid.to_string(),
            op,
        });
        Ok(until)
    }

    /// Whether the session takes direct method requests (the protocol's subscription to
    /// them): the shard refuses method requests for one that does not (`NotSubscribed`).
    pub fn set_takes_methods(&self, takes: bool) {
        self.handles.takes_methods.set(takes);
    }

    /// Whether the session takes cloud-to-device messages; when it starts to, control is told
    /// to send what is pending.
    pub fn set_takes_c2d(&self, takes: bool) {
        let was = self.handles.takes_c2d.replace(takes);
        if takes && !was {
            if let Some(identity) = &self.identity {
                self.shard.shared.router.report(EngineFrame::C2dReady {
                    device_id: identity.device_id.clone(),
                    module_id: identity.module_id.clone(),
                });
            }
        }
    }

    /// The client settled cloud-to-device message `lock` (completed, rejected or abandoned).
    pub fn c2d_settled(&self, lock: u64, outcome: C2dOutcome) {
        if let Some(identity) = &self.identity {
            self.shard.shared.router.report(EngineFrame::C2dSettled {
                device_id: identity.device_id.clone(),
                module_id: identity.module_id.clone(),
                lock,
                outcome,
            });
        }
    }

    /// The device's answer to method request `rid`, for control.
    pub fn method_response(
        &self,
        rid: &str,
        status: u16,
        payload: &[u8],
    ) -> Result<(), DisconnectReason> {
        let Some(identity) = &self.identity else {
            return Err(DisconnectReason::PublishBeforeConnect);
        };
        self.shard
            .shared
            .router
            .report(EngineFrame::MethodResponse {
                device_id: identity.device_id.clone(),
                module_id: identity.module_id.clone(),
                rid: rid.to_string(),
                status,
                payload: payload.to_vec(),
            });
        Ok(())
    }

    /// `ack` for a packet that is not a record (a twin request): back at once when nothing
    /// is owed before it, else queued behind the newest owed acknowledgement, so
    /// acknowledgements keep the order of the packets (MQTT 3.1.1 §4.6).
    pub fn ack_in_order(&mut self, ack: A) -> Option<A> {
        match self.ingest.newest_batch() {
            Some(batch) => {
                self.ingest.push(batch, ack);
                None
            }
            None => Some(ack),
        }
    }

    /// The log batch the oldest owed acknowledgement waits for.
    pub fn oldest_unacked_batch(&self) -> Option<u64> {
        self.ingest.oldest_batch()
    }

    /// Acknowledgements whose records are durable now, in order.
    pub fn durable_acks(&mut self) -> impl Iterator<Item = A> + '_ {
        let log = &self.shard.log;
        self.ingest.durable(|b| log.is_durable(b))
    }

    /// The oldest command control sent this session, if any.
    pub fn next_command(&self) -> Option<DeviceCommand> {
        let command = self.handles.inbox.borrow_mut().pop();
        if let Some(DeviceCommand::TwinResponse { .. }) = &command {
            self.twin_in_flight
                .set(self.twin_in_flight.get().saturating_sub(1));
        }
        command
    }

    /// Whether nothing is owed to the client (a quiet session may free its buffers).
    pub fn is_quiet(&self) -> bool {
        self.ingest.is_empty() && self.handles.inbox.borrow().is_empty()
    }

    pub fn release_idle_memory(&mut self) {
        self.ingest.release_idle_memory();
    }

    /// Ends the session: unregisters it (the router tells control the client left, unless a
    /// newer connection of it holds its client id by now), counts why, and counts the commands
    /// still in its inbox as dropped.
    pub fn finish(mut self, reason: DisconnectReason) {
        self.ended = true;
        self.end(Some(reason));
    }

    /// `reason` is `None` for a session dropped without [`Self::finish`]: its task panicked,
    /// which the shard counts.
    fn end(&mut self, reason: Option<DisconnectReason>) {
        let shard = self.shard.clone();
        shard.unregister(self.gid, self.identity.as_ref());
        while let Some(command) = self.next_command() {
            shard.metrics.commands_dropped.inc(command.kind());
        }
        let identity = self.identity.take();
        if self.refused {
            return;
        }
        if let Some(reason) = reason {
            shard
                .metrics
                .of(self.transport)
                .disconnects
                .inc(reason.error_code());
        }
        let Some(identity) = identity else {
            return;
        };
        shard.metrics.of(self.transport).connections_current.dec();
        tracing::debug!(device = %identity.device_id, reason = reason.map(|r| r.error_code()), "device disconnected");
    }
}

impl<A> Drop for DeviceSession<A> {
    /// A session whose task ended without [`DeviceSession::finish`] (a panic) still leaves the
    /// shard and the router as a finished one does.
    fn drop(&mut self) {
        if !self.ended {
            self.ended = true;
            self.end(None);
        }
    }
}

/// How long a connection that authenticated at `now_unix` with a token expiring at `expiry`
/// (Unix seconds) may live: until the token's `se`, as IoT Hub does. A token already past `se`
/// but inside the clock skew CONNECT tolerates (spec §1.2 step 4) gets that tolerance once: it
/// lives until `se` plus the skew, not zero seconds.
fn token_lifetime(expiry: u64, now_unix: Duration) -> Duration {
    let se = Duration::from_secs(expiry);
    if se > now_unix {
        se - now_unix
    } else {
        (se + Duration::from_secs(roost_iothub::sas::EXPIRY_SKEW_SECS)).saturating_sub(now_unix)
    }
}

pub fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_lives_until_its_token_expires() {
        let now = Duration::from_secs(1_000_000);
        assert_eq!(token_lifetime(1_003_600, now), Duration::from_secs(3600));
        // Accepted inside the skew: the rest of the skew, once.
        assert_eq!(token_lifetime(999_900, now), Duration::from_secs(200));
        assert_eq!(token_lifetime(1_000_000, now), Duration::from_secs(300));
        assert_eq!(token_lifetime(0, now), Duration::ZERO);
    }
}
