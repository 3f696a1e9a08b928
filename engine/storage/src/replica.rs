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

/// The persistent sessions (MQTT CleanSession=0) of the engine's clients, by client id
/// (`device` or `device/module`): each an opaque value the session layer encodes (what the
/// client subscribed to). Written when a subscription changes, not per message; not synced
/// (a session survives a kill of the engine, and a power loss may cost the last change).
pub trait SessionStore: Send + Sync {
    fn load_sessions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    fn save_session(&self, client_id: &str, state: &[u8]) -> Result<(), StoreError>;
    fn delete_session(&self, client_id: &str) -> Result<(), StoreError>;
}
