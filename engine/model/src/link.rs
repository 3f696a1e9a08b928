//! Frames of the control link (DESIGN.md §6): engine ⇄ control over QUIC.
//!
//! On the wire each frame is a little-endian `u32` length followed by the rkyv archive of the
//! frame. The link is not a hot path, so frames are decoded into owned values.

use rkyv::{Archive, Deserialize, Serialize};

/// The slice of a device identity the data plane needs to authenticate it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct DeviceAuth {
    pub device_id: String,
    pub enabled: bool,
    /// Decoded SAS keys; empty when the device has none.
    pub primary_key: Vec<u8>,
    pub secondary_key: Vec<u8>,
    pub generation_id: String,
    /// What routing reads of the identity's twin, as JSON text (empty: nothing):
    /// `{"tags":{…},"properties":{"desired":{…},"reported":{…}}}` (the sections with their
    /// `$version`, without `$metadata`), for conditions and enrichments over `$twin.tags…` and
    /// `$twin.properties…`.
    pub twin: String,
    /// How the identity may authenticate with a client certificate (none for SAS devices).
    pub x509: X509Auth,
}

/// An identity's X.509 authentication (IoT Hub's `selfSigned` and `certificateAuthority`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum X509Auth {
    #[default]
    None,
    /// A certificate whose SHA-1 or SHA-256 thumbprint is one of these (primary, secondary;
    /// lowercase hex).
    SelfSigned { thumbprints: Vec<String> },
    /// A certificate chaining to a CA the hub verified, its common name the identity's.
    CertificateAuthority,
}

impl DeviceAuth {
    /// An identity with SAS keys and a fixed generation id (for tests and tools).
    pub fn with_keys(device_id: &str, enabled: bool, primary: &[u8], secondary: &[u8]) -> Self {
        Self {
            device_id: device_id.into(),
            enabled,
            primary_key: primary.to_vec(),
            secondary_key: secondary.to_vec(),
            generation_id: "g".into(),
            twin: String::new(),
            x509: X509Auth::None,
        }
    }
}

/// One change to the registry, in sequence order.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum RegistryChange {
    Upsert(DeviceAuth),
    Delete { device_id: String },
}

/// What a config epoch carries: routing, limits, and the shared access policies the engine's
/// AMQP endpoints check tokens against.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct EpochPayload {
    /// The source of `routes.lua`.
    pub routes: String,
    /// Plugins by name: (name, handler source).
    pub plugins: Vec<(String, String)>,
    /// Named limits (name, value).
    pub limits: Vec<(String, u64)>,
    pub policies: Vec<PolicyEntry>,
    /// The Event Hubs consumer groups created besides `$Default`.
    pub consumer_groups: Vec<String>,
    /// The CA certificates verified by proof of possession: `certificateAuthority` devices'
    /// chains must lead to one of them.
    pub cas: Vec<CaEntry>,
}

/// A CA certificate the hub trusts: its name at control and its DER.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct CaEntry {
    pub name: String,
    pub der: Vec<u8>,
}

/// A shared access policy: its keys (base64 text, as in connection strings) and its rights
/// (`RegistryRead`, `RegistryWrite`, `ServiceConnect`, `DeviceConnect`). `Debug` shows no key.
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct PolicyEntry {
    pub name: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub rights: Vec<String>,
}

impl std::fmt::Debug for PolicyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEntry")
            .field("name", &self.name)
            .field("rights", &self.rights)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ArchivedPolicyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEntry")
            .field("name", &self.name.as_str())
            .finish_non_exhaustive()
    }
}

/// The content hash of an epoch: SHA-256 over its version and payload.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
pub struct EpochHash(pub [u8; 32]);

impl std::fmt::Display for EpochHash {
    /// The first 8 bytes in hex: enough to tell epochs apart in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for EpochHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EpochHash({self})")
    }
}

/// An immutable config epoch (DESIGN.md §2): built by control, applied whole by an engine.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Epoch {
    pub version: u64,
    pub hash: EpochHash,
    pub payload: EpochPayload,
}

impl Epoch {
    /// The epoch `version` with `payload`, hashed.
    pub fn new(version: u64, payload: EpochPayload) -> Self {
        let hash = Self::content_hash(version, &payload);
        Self {
            version,
            hash,
            payload,
        }
    }

    /// The hash `version` and `payload` must carry.
    pub fn content_hash(version: u64, payload: &EpochPayload) -> EpochHash {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&version.to_le_bytes());
        ctx.update(&(payload.routes.len() as u64).to_le_bytes());
        ctx.update(payload.routes.as_bytes());
        for (name, source) in &payload.plugins {
            for part in [name.as_bytes(), source.as_bytes()] {
                ctx.update(&(part.len() as u64).to_le_bytes());
                ctx.update(part);
            }
        }
        for (name, value) in &payload.limits {
            ctx.update(&(name.len() as u64).to_le_bytes());
            ctx.update(name.as_bytes());
            ctx.update(&value.to_le_bytes());
        }
        for g in &payload.consumer_groups {
            ctx.update(&(g.len() as u64).to_le_bytes());
            ctx.update(g.as_bytes());
        }
        for p in &payload.policies {
            let rights = p.rights.join(",");
            for part in [&p.name, &p.primary_key, &p.secondary_key, &rights] {
                ctx.update(&(part.len() as u64).to_le_bytes());
                ctx.update(part.as_bytes());
            }
        }
        for ca in &payload.cas {
            for part in [ca.name.as_bytes(), &ca.der] {
                ctx.update(&(part.len() as u64).to_le_bytes());
                ctx.update(part);
            }
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        EpochHash(out)
    }

    /// Whether the hash matches the content (a frame damaged or forged in between does not).
    pub fn hash_is_valid(&self) -> bool {
        Self::content_hash(self.version, &self.payload) == self.hash
    }
}

/// Something control asks the session of one connected client (device or module) to do; the
/// session's outbound inbox holds these (DESIGN.md §2, "one device session").
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum DeviceCommand {
    /// A cloud-to-device message from the device's queue at control: `lock` names it in the
    /// client's `C2dSettled`; `properties` are its property bag in order, system keys
    /// (`$.mid`, `$.to`, …) included; `redelivered` when an earlier connection was sent it and
    /// did not acknowledge it (MQTT DUP).
    C2d {
        lock: u64,
        properties: Vec<(String, String)>,
        body: Vec<u8>,
        redelivered: bool,
    },
    /// A direct method invocation; the device answers with `rid`.
    MethodRequest {
        name: String,
        rid: String,
        payload: Vec<u8>,
    },
    /// A change to the desired properties, at twin version `version`.
    DesiredPatch { version: u64, body: Vec<u8> },
    /// The answer to a twin request the device made.
    TwinResponse {
        rid: String,
        status: u16,
        version: Option<u64>,
        body: Vec<u8>,
    },
    /// Close the connection; `reason` is a bounded label.
    Disconnect { reason: String },
}

impl DeviceCommand {
    /// A stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceCommand::C2d { .. } => "c2d",
            DeviceCommand::MethodRequest { .. } => "method_request",
            DeviceCommand::DesiredPatch { .. } => "desired_patch",
            DeviceCommand::TwinResponse { .. } => "twin_response",
            DeviceCommand::Disconnect { .. } => "disconnect",
        }
    }
}

/// A device's twin request (MQTT `$iothub/twin/…`), carried to control, which answers it
/// with a [`DeviceCommand::TwinResponse`] for the same `rid`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum TwinOp {
    /// `$iothub/twin/GET`: the desired and reported properties.
    Get,
    /// `$iothub/twin/PATCH/properties/reported`: a JSON merge patch of reported properties.
    PatchReported { body: Vec<u8> },
}

impl TwinOp {
    /// A stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TwinOp::Get => "get",
            TwinOp::PatchReported { .. } => "patch_reported",
        }
    }
}

/// How a client settled a cloud-to-device message (spec §5.2 of the AMQP spec).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum C2dOutcome {
    /// Done: deleted, positive feedback.
    Complete,
    /// Dead-lettered: deleted, negative feedback.
    Reject,
    /// Given back: sent again, up to the delivery count.
    Abandon,
}

/// A cloud-to-device message as a service sends it (the AMQP `/messages/devicebound` link);
/// control queues it as it queues the REST send.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct C2dMessage {
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// `iothub-ack` as sent (`none`, `positive`, `negative`, `full`); control checks it.
    pub ack: Option<String>,
    /// Unix milliseconds.
    pub expiry_ms: Option<u64>,
    pub properties: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What an AMQP service link asks of control.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ServiceRequest {
    /// Queue `message` for `device_id`.
    C2dSend {
        device_id: String,
        message: Box<C2dMessage>,
    },
    /// An HTTPS receive of `device_id`'s oldest message, locked for a minute.
    C2dReceive { device_id: String },
    /// An HTTPS settlement of the message locked as `lock`.
    C2dSettleLocked {
        device_id: String,
        lock: u64,
        outcome: C2dOutcome,
    },
    /// The oldest feedback records, with the lock that completes them.
    FeedbackReceive,
    /// The records a `FeedbackReceive` returned with `lock` are delivered.
    FeedbackComplete { lock: String },
    /// The oldest file-upload notification, with the lock that completes it (answered
    /// `Feedback` with one JSON object, or `NoFeedback`).
    FileNotificationReceive,
    /// The notification a `FileNotificationReceive` returned with `lock` is delivered.
    FileNotificationComplete { lock: String },
    /// A service REST request that reached the engine's port 443, judged from its head before
    /// its body is read: answered `Admitted` with the route's body limit, or `Http` refused.
    RestAdmit { head: RestHead },
    /// A service REST request that reached port 443, body read: served as control's own
    /// service API serves it, answered `Http`.
    Rest { head: RestHead, body: Vec<u8> },
    /// A device's file-upload request on port 443 (authenticated there): the start
    /// (`POST /devices/{d}/files`), or with `notification` its end
    /// (`…/files/notifications[/{correlation_id}]`); answered `Http`.
    FileUpload {
        device_id: String,
        notification: bool,
        correlation_id: Option<String>,
        body: Vec<u8>,
    },
}

impl ServiceRequest {
    /// A service REST request (served by control's service API), not a C2D queue operation.
    pub fn is_rest(&self) -> bool {
        matches!(
            self,
            ServiceRequest::RestAdmit { .. } | ServiceRequest::Rest { .. }
        )
    }
}

/// A service REST request's head as port 443 read it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct RestHead {
    pub method: String,
    /// The request target: path and query.
    pub target: String,
    pub headers: Vec<(String, String)>,
}

/// Control's answer to a [`ServiceRequest`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ServiceReply {
    Done,
    /// Refused: an HTTP status and IoT Hub's error code and message, as the REST API answers.
    Refused {
        status: u16,
        code: u32,
        message: String,
    },
    /// Feedback records: the JSON array IoT Hub sends, and the lock that completes them.
    Feedback {
        lock: String,
        body: Vec<u8>,
    },
    /// No feedback waits.
    NoFeedback,
    /// A message for an HTTPS receive: its lock token and property bag (`$.mid`, … first).
    Message {
        lock: u64,
        properties: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// No message waits.
    NoMessage,
    /// A `RestAdmit` admitted: the body may hold up to this many bytes.
    Admitted {
        body_limit: u64,
    },
    /// The service API's HTTP answer to a `Rest` (or a `RestAdmit` refused).
    Http {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
}

/// What became of a command.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum CommandOutcome {
    /// In the session's inbox of the client's connection.
    Delivered,
    /// No connection of that client on this engine.
    NotConnected,
    /// The client's inbox is full.
    InboxFull,
    /// The client is connected but does not take this kind of command (an MQTT device not
    /// subscribed to `$iothub/methods/POST/#` for a method request).
    NotSubscribed,
    /// The shard did not answer in time.
    TimedOut,
}

impl CommandOutcome {
    pub fn error_code(&self) -> &'static str {
        match self {
            CommandOutcome::Delivered => "delivered",
            CommandOutcome::NotConnected => "not_connected",
            CommandOutcome::InboxFull => "inbox_full",
            CommandOutcome::NotSubscribed => "not_subscribed",
            CommandOutcome::TimedOut => "timed_out",
        }
    }
}

/// Control → engine.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ControlFrame {
    /// The whole registry as of `seq`; replaces the replica.
    Snapshot { seq: u64, devices: Vec<DeviceAuth> },
    /// Changes `from_seq + 1 ..= from_seq + changes.len()`.
    Deltas {
        from_seq: u64,
        changes: Vec<RegistryChange>,
    },
    /// Run this config epoch; answered with `Applied` or `Rejected`.
    Apply { epoch: Epoch },
    /// Deliver `command` to the connection of `client_id` (`device` or `device/module`);
    /// answered with `CommandResult { id }`.
    Command {
        id: u64,
        client_id: String,
        command: DeviceCommand,
    },
    /// Append `message` (an event of the hub's own: a twin change, a device's lifecycle or
    /// connection state) to the `events` log, in the partition `device_id` hashes to;
    /// answered with `EventAppended { id }` once it is durable.
    Append {
        id: u64,
        device_id: String,
        message: crate::message::Message,
    },
    /// The answer to the engine's `Service` call `id`.
    ServiceReply { id: u64, reply: ServiceReply },
}

/// Engine → control.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum EngineFrame {
    /// First frame on a link: who the engine is, how far its replica goes and which epoch it
    /// runs.
    Hello {
        node: String,
        registry_seq: u64,
        epoch: Option<EpochHash>,
    },
    /// A client (a device, or a module of it) connected or disconnected; `at_ms` is Unix
    /// milliseconds. Sent by the engine's router in the order of the claims, so a replaced
    /// connection's end never follows its successor's start.
    ConnectionState {
        device_id: String,
        module_id: Option<String>,
        connected: bool,
        at_ms: u64,
    },
    /// The last time a device was heard from (sent at most once per device per second).
    Activity { device_id: String, at_ms: u64 },
    /// Sent every few seconds so control can tell a live link from a dead one, and re-send the
    /// epoch when the engine runs another.
    Heartbeat {
        registry_seq: u64,
        epoch: Option<EpochHash>,
    },
    /// The epoch with this hash is in force.
    Applied { hash: EpochHash },
    /// The epoch with this hash was refused; the engine keeps the one it had.
    Rejected {
        hash: EpochHash,
        code: String,
        detail: String,
    },
    /// What became of command `id`.
    CommandResult { id: u64, outcome: CommandOutcome },
    /// Event `id` of an `Append` is durable in the log (`appended`), or was refused (the log
    /// could not take it; control sends it again).
    EventAppended { id: u64, appended: bool },
    /// The client settled cloud-to-device message `lock`: completed it (MQTT PUBACK, AMQP
    /// accepted), rejected it or abandoned it (AMQP rejected, released).
    C2dSettled {
        device_id: String,
        module_id: Option<String>,
        lock: u64,
        outcome: C2dOutcome,
    },
    /// The client takes cloud-to-device messages now (it subscribed to its devicebound topic,
    /// or resumed a session that had): control sends it what is pending.
    C2dReady {
        device_id: String,
        module_id: Option<String>,
    },
    /// A device's answer to direct method request `rid` (MQTT
    /// `$iothub/methods/res/{status}/?$rid={rid}`), `payload` as the device sent it.
    MethodResponse {
        device_id: String,
        module_id: Option<String>,
        rid: String,
        status: u16,
        payload: Vec<u8>,
    },
    /// A connected client's twin request; control answers with a `TwinResponse` command to
    /// `device_id[/module_id]` carrying the same `rid`.
    TwinRequest {
        device_id: String,
        module_id: Option<String>,
        rid: String,
        op: TwinOp,
    },
    /// A service call an AMQP service link makes of control (issue 10); answered with a
    /// `ServiceReply` of the same `id`.
    Service { id: u64, request: ServiceRequest },
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the link limit")]
    TooLarge(usize),
    #[error("frame is not a valid archive: {0}")]
    Invalid(String),
}

/// Largest frame the link accepts (a snapshot of about a million devices).
pub const MAX_FRAME: usize = 512 * 1024 * 1024;

macro_rules! frame_codec {
    ($ty:ty, $archived:ty) => {
        impl $ty {
            /// Length-prefixed archive of the frame.
            pub fn encode(&self) -> Vec<u8> {
                let body = rkyv::to_bytes::<rkyv::rancor::Error>(self)
                    .expect("archiving owned link frames cannot fail");
                let mut out = Vec::with_capacity(4 + body.len());
                out.extend_from_slice(&(body.len() as u32).to_le_bytes());
                out.extend_from_slice(&body);
                out
            }

            /// Decodes a frame body (without its length prefix).
            pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
                let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
                aligned.extend_from_slice(body);
                rkyv::from_bytes::<$ty, rkyv::rancor::Error>(&aligned)
                    .map_err(|e| FrameError::Invalid(e.to_string()))
            }
        }
    };
}

frame_codec!(ControlFrame, ArchivedControlFrame);
frame_codec!(EngineFrame, ArchivedEngineFrame);

/// Reads the length prefix of a frame.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = ControlFrame::Deltas {
            from_seq: 7,
            changes: vec![
                RegistryChange::Upsert(DeviceAuth {
                    device_id: "d1".into(),
                    enabled: true,
                    primary_key: vec![1; 32],
                    secondary_key: vec![2; 32],
                    generation_id: "g".into(),
                    twin: String::new(),
                    x509: X509Auth::None,
                }),
                RegistryChange::Delete {
                    device_id: "d2".into(),
                },
            ],
        };
        let bytes = f.encode();
        let len = frame_len(bytes[..4].try_into().expect("4 bytes")).expect("len");
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(ControlFrame::decode(&bytes[4..]).expect("decode"), f);
        let e = EngineFrame::Hello {
            node: "n".into(),
            registry_seq: 3,
            epoch: Some(Epoch::new(1, EpochPayload::default()).hash),
        };
        assert_eq!(EngineFrame::decode(&e.encode()[4..]).expect("decode"), e);
        let c = ControlFrame::Command {
            id: 9,
            client_id: "d/m".into(),
            command: DeviceCommand::MethodRequest {
                name: "reboot".into(),
                rid: "1".into(),
                payload: b"{}".to_vec(),
            },
        };
        assert_eq!(ControlFrame::decode(&c.encode()[4..]).expect("decode"), c);
    }

    #[test]
    fn epoch_hash_covers_version_and_every_part_of_the_payload() {
        let base = Epoch::new(1, EpochPayload::default());
        assert!(base.hash_is_valid());
        assert_ne!(base.hash, Epoch::new(2, EpochPayload::default()).hash);
        let routes = EpochPayload {
            routes: "return {}".into(),
            ..EpochPayload::default()
        };
        assert_ne!(base.hash, Epoch::new(1, routes).hash);
        // Length prefixes: moving a byte between name and source changes the hash.
        let a = EpochPayload {
            plugins: vec![("ab".into(), "c".into())],
            ..EpochPayload::default()
        };
        let b = EpochPayload {
            plugins: vec![("a".into(), "bc".into())],
            ..EpochPayload::default()
        };
        assert_ne!(Epoch::new(1, a).hash, Epoch::new(1, b).hash);
        let policy = |key: &str| EpochPayload {
            policies: vec![PolicyEntry {
                name: "service".into(),
                primary_key: key.into(),
                secondary_key: "k2".into(),
                rights: vec!["ServiceConnect".into()],
            }],
            ..EpochPayload::default()
        };
        assert_ne!(
            Epoch::new(1, policy("k1")).hash,
            Epoch::new(1, policy("k3")).hash,
            "a new key is a new epoch"
        );
        assert!(
            !format!("{:?}", policy("secret-key")).contains("secret-key"),
            "no key in Debug"
        );
        let ca = |der: &[u8]| EpochPayload {
            cas: vec![CaEntry {
                name: "fleet".into(),
                der: der.to_vec(),
            }],
            ..EpochPayload::default()
        };
        assert_ne!(base.hash, Epoch::new(1, ca(b"x")).hash, "a CA trusted");
        assert_ne!(Epoch::new(1, ca(b"x")).hash, Epoch::new(1, ca(b"y")).hash);
        let mut forged = base.clone();
        forged.version = 5;
        assert!(!forged.hash_is_valid());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(ControlFrame::decode(&[0xff; 13]).is_err());
        assert!(frame_len((MAX_FRAME as u32 + 1).to_le_bytes()).is_err());
    }
}
