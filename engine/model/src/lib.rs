//! roost-model: the plain data types every roost process shares — device identities, the
//! telemetry record as it is stored in the `events` log, and the frames of the control link.
//!
//! It does no I/O and knows nothing of glommio, tokio or RocksDB. The one design decision: every
//! type that crosses a process or touches disk is an rkyv type, so the engine can read a stored
//! record or a control frame in place, without deserializing it first.

mod id;
pub mod link;
pub mod message;

pub use id::{DeviceId, IdError, ModuleId};
pub use message::{
    ArchivedMessage, ArchivedRouted, Message, Routed, Source, Stamp, SystemProperties,
};
