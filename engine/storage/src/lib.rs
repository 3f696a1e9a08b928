//! roost-storage: the engine's storage seams, with no RocksDB in them (TiKV style).
//!
//! What it is: the two things the engine keeps on disk, as traits — [`ReplicaStore`] (the
//! registry replica the engine boots from when control is down, and the config epoch it last
//! applied) and [`LogStore`] (the built-in `events` log: committed batches per partition, and
//! consumer-group checkpoints) — plus the pure logic around them: the log's stored value
//! format ([`batch`]), reading records out of stored values ([`log::read_records`]), rendering
//! them as the consumer API's JSON ([`json`]), retention by age and size ([`retention`]), and
//! [`MemStore`], an in-memory implementation of
//! both traits that the pure logic is tested against, and [`fault::PowerLossStore`], a log that
//! loses its unsynced writes when the power goes.
//!
//! What it is not: a database. `roost-rocks` implements the traits on RocksDB; the engine's
//! glommio side (group commit, the blocking pool) lives in `roost-server`.

pub mod batch;
pub mod fault;
pub mod json;
pub mod log;
mod memory;
pub mod record;
pub mod replica;
pub mod retention;

pub use log::{LogError, LogStore, PartitionInfo};
pub use memory::MemStore;
pub use record::RecordView;
pub use replica::{ReplicaStore, SessionStore, StoreError};
