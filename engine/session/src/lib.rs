//! roost-session: the life of a device connection that every protocol shares.
//!
//! What it is: the protocol-neutral half of a device session (DESIGN.md §2, "one device
//! session under every protocol") as plain data and functions — [`auth`] (a claimed identity
//! and its SAS token against the registry projection), [`telemetry`] (an accepted message →
//! the stored record), [`Ingest`] (acknowledge in order, once durable), [`Inbox`] (the bounded
//! outbound queue control's commands land in), [`DisconnectReason`] (why a session ended, with
//! a stable `error_code()`), [`Directory`] (which shard and connection hold each client id) and
//! [`CommandTracker`] (commands in flight to shards, with their deadlines), composed into the
//! engine's [`Router`] (claims, kicks, commands and their answers) — plus
//! [`Deadlines`], the lazy timer wheel a shard keeps its connections' deadlines in, and
//! [`PreAuthGate`], the caps on connections not yet authenticated (in total and per source
//! address) that every adapter takes a slot from at accept, and [`quota`], the hub's rate and
//! size quotas (IoT Hub's tiers as presets) with the token bucket that meters each.
//!
//! What it is not: I/O. No sockets, no clock (time is passed in), no glommio or tokio: the
//! engine's shards (`roost-server`) drive these, and each protocol adapter (MQTT today; AMQP,
//! WebSockets and HTTPS later) only adds framing.
//!
//! How an adapter uses a session: authenticate with [`auth::authenticate_sas`]; claim the
//! client id on its shard (which tells the [`Directory`]); for each message build the record
//! with [`telemetry::record`], append it to the log and [`Ingest::push`] the acknowledgement it
//! owes; when the log reports a batch durable, send what [`Ingest::durable`] yields; drain the
//! [`Inbox`] when woken; end with a [`DisconnectReason`].

pub mod auth;
mod commands;
mod deadlines;
mod directory;
mod inbox;
mod ingest;
mod preauth;
pub mod quota;
mod reason;
pub mod router;
pub mod telemetry;
mod twin_waits;

pub use auth::{Identity, Refusal};
pub use commands::{CommandTracker, Route};
pub use deadlines::Deadlines;
pub use directory::{Directory, Holder};
pub use inbox::{Inbox, InboxFull};
pub use ingest::Ingest;
pub use preauth::{PreAuthGate, PreAuthLimits, PreAuthSlot};
pub use reason::DisconnectReason;
pub use router::{Router, RouterInput, RouterOutput};
pub use twin_waits::{TwinWaits, MAX_TWIN_WAITS};
