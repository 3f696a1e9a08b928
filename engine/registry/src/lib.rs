//! roost-registry: the engine's view of the device registry.
//!
//! What it is: an immutable in-memory [`Projection`] (device → keys, status, generation) that
//! every shard reads, held in a [`Registry`] that swaps in a new projection when a snapshot or a
//! delta arrives from the control plane — readers never take a lock. Durability comes from a
//! [`ReplicaStore`]: the engine persists what it applied, and boots from it when control is down.
//!
//! What it is not: the registry of record (that lives in the control plane), and it does no
//! network I/O. The store trait has no RocksDB in it; [`RocksReplica`] is the implementation.

mod projection;
pub mod rocks;

pub use projection::{Projection, Registry};
pub use rocks::RocksReplica;

use roost_model::link::{DeviceAuth, RegistryChange};

/// Why the replica could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The underlying database failed.
    #[error("replica store: {0}")]
    Db(String),
    /// A stored entry is not a valid device record.
    #[error("replica store holds a corrupt record for key {0:?}")]
    Corrupt(String),
}

/// Durable copy of the registry projection, with the sequence number it is complete up to.
pub trait ReplicaStore {
    /// Everything stored, and the sequence it reflects (0 = empty).
    fn load(&self) -> Result<(u64, Vec<DeviceAuth>), StoreError>;
    /// Replaces the whole replica with a snapshot.
    fn replace(&self, seq: u64, devices: &[DeviceAuth]) -> Result<(), StoreError>;
    /// Applies changes that follow `from_seq` atomically.
    fn apply(&self, from_seq: u64, changes: &[RegistryChange]) -> Result<(), StoreError>;
}
