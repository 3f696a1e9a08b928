//! roost-registry: the engine's view of the device registry.
//!
//! What it is: an immutable in-memory [`Projection`] (device → keys, status, generation) that
//! every shard reads, held in a [`Registry`] that swaps in a new projection when a snapshot or a
//! delta arrives from the control plane — readers never take a lock. The map is split into
//! buckets shared between versions, so a delta copies the buckets it touches, not the fleet.
//!
//! What it is not: the registry of record (that lives in the control plane), nor storage: the
//! durable replica is `roost_storage::ReplicaStore` (RocksDB implementation in `roost-rocks`).
//! It does no I/O.

mod projection;

pub use projection::{Projection, Registry};
