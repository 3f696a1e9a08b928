//! roost-amqp: an AMQP 1.0 codec as the Azure SDKs speak it (../shared/specs/
//! azure-amqp-eventhubs.md): the type system, the protocol header and frames, the
//! performatives and SASL frames, and the message sections.
//!
//! It does no I/O and reads no clock, and knows nothing of glommio or tokio: bytes go in,
//! typed frames come out, and typed frames are written into a buffer; [`Connection`] drives one
//! connection from them. CBS, the Event Hubs endpoint and the IoT Hub links are built on it.
//!
//! Why its own codec rather than `serde_amqp` (fe2o3-amqp's): the rules of the engine's
//! protocol code (DESIGN.md §4) are zero-copy and limits before buffering. Here a frame is
//! read into one `Bytes`, and every binary, string and symbol of what it holds is a slice of
//! it (a 256 KB telemetry body is never copied on its way to the log); a compound's count can
//! claim no more elements than its bytes, nesting is bounded, and [`frame::check`] refuses an
//! oversized frame from its size field. And the Azure SDKs need an exact encoding on the way
//! out — every performative at full arity with a small-ulong descriptor and never `list0`
//! (pyamqp decodes by position) — which is simplest to guarantee in one small writer.
//!
//! # Layout
//! - `types`: [`Value`], the bounded [`types::Reader`], [`types::encode`].
//! - `frame`: protocol headers, [`frame::check`], [`frame::Frame`], [`frame::write_frame`].
//! - `performative`: [`Performative`] (open … close) and [`Sasl`], read and written.
//! - `message`: [`Message`] and its sections.
//! - `connection`: [`Connection`], the server side of a connection as a state machine: SASL,
//!   OPEN, sessions, links, credit, transfers split and joined, heartbeats, limits, CLOSE.
//! - `error`: [`Error`], one variant per way input can be wrong, with `error_code()` for
//!   metrics and `condition()` for the CLOSE a server answers with.

pub mod connection;
pub mod error;
pub mod frame;
pub mod message;
pub mod performative;
pub mod types;

pub use connection::{Config, Connection, Event, LinkId, SendError};
pub use error::Error;
pub use message::{Body, Header, Message, Properties};
pub use performative::{
    AmqpError, Attach, Begin, DeliveryState, Detach, Disposition, Flow, Open, Performative, Role,
    Sasl, Terminus, Transfer,
};
pub use types::{Str, Value};

#[cfg(test)]
mod tests;
