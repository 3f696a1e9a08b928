//! The built-in `events` endpoint on a shard: one partition of the log per shard, appended to
//! by the shard's connections and committed by the shard's committer task.
//!
//! Appends are group-committed: a shard puts records into the open batch and gets that batch's
//! id back; one committer task per shard writes a closed batch with a single (synced) write on
//! glommio's blocking pool while the next batch fills. A PUBACK waits for its batch id to be
//! durable, so one fsync covers every message that arrived during the previous one.
//!
//! Where the batch goes is a `roost_storage::LogStore` (RocksDB in production, `MemStore` in
//! tests); the stored format and the readers are in `roost-storage`.

mod partition;

pub use partition::{Durability, LogFailed, Partition};
