//! roost-eventhubs: the Event Hubs-compatible endpoint's meaning, over the `events` log
//! (../shared/specs/azure-amqp-eventhubs.md §2–§3), for the unmodified Event Hubs SDKs.
//!
//! What it is: pure functions from AMQP messages and log records to AMQP messages —
//! [`address`] (which partition of which consumer group a receiver names), [`filter`] (where
//! a receiver starts: offset, sequence number, enqueued time, or the end), [`cbs`] (the
//! `$cbs` put-token request, checked against the shared access policies with both SAS
//! algorithms), [`management`] (the `$management` READ answers) and [`event`] (a record as the
//! event message IoT Hub delivers, with its annotations), and [`messaging`] (IoT Hub's
//! messaging links: a service's cloud-to-device message, feedback batches).
//!
//! What it is not: a server. It does no I/O; the engine's AMQP listener drives a
//! `roost_amqp::Connection` and calls these. An offset and a sequence number are the same
//! number here: the record's offset in its partition.

pub mod address;
pub mod cbs;
pub mod event;
pub mod filter;
pub mod management;
pub mod messaging;

pub use address::PartitionAddress;
pub use cbs::{Authority, CbsError, PolicyKeys, Right};
pub use filter::Start;
