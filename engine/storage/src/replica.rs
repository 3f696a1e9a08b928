//! The registry replica: the engine's durable copy of the registry projection and of the last
//! config epoch it applied, so it can boot and serve devices while control is down.

use roost_model::link::{DeviceAuth, Epoch, RegistryChange};

/// Why the replica could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The underlying database failed.
    #[error("replica store: {0}")]
    Db(String),
    /// A stored entry is not a valid record.
    #[error("replica store holds a corrupt record for key {0:?}")]
    Corrupt(String),
    /// A delta does not follow what is stored.
    #[error("delta from {from_seq} does not follow the replica at {have}")]
    OutOfOrder { from_seq: u64, have: u64 },
}

/// Durable copy of the registry projection, with the sequence number it is complete up to,
/// and the config epoch last applied.
pub trait ReplicaStore: Send + Sync {
    /// Everything stored, and the sequence it reflects (0 = empty).
    fn load(&self) -> Result<(u64, Vec<DeviceAuth>), StoreError>;
    /// Replaces the whole replica with a snapshot.
    fn replace(&self, seq: u64, devices: &[DeviceAuth]) -> Result<(), StoreError>;
    /// Applies changes that follow `from_seq` atomically.
    fn apply(&self, from_seq: u64, changes: &[RegistryChange]) -> Result<(), StoreError>;
    /// The config epoch last applied, if any.
    fn load_epoch(&self) -> Result<Option<Epoch>, StoreError>;
    /// Persists (synced) the epoch just applied.
    fn save_epoch(&self, epoch: &Epoch) -> Result<(), StoreError>;
}
