//! The built-in `events` endpoint: an append-only log in the engine's RocksDB, one partition
//! (column family `events-{k}`) per shard. Each group commit stores its records as one value
//! ([`batch`]) keyed by the big-endian offset of its first record, so iteration is in order.
//!
//! Appends are group-committed: a shard puts records into the open batch and gets that batch's
//! id back; one committer task per shard writes a closed batch with a single (synced) WAL write
//! on glommio's blocking pool while the next batch fills. A PUBACK waits for its batch id to be
//! durable, so one fsync covers every message that arrived during the previous one.

pub mod batch;
mod json;
mod partition;
mod reader;

pub use json::RecordsJson;
pub use partition::{Durability, LogFailed, Partition};
pub use reader::{checkpoint, commit_checkpoint, partitions, read_records, PartitionInfo};

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};
use roost_registry::rocks::{CF_META, CF_REGISTRY};

/// Column family name of partition `k`.
pub fn partition_cf(k: usize) -> String {
    format!("events-{k}")
}

/// Opens (creating when absent) the engine database with the registry, meta and `partitions`
/// event column families; event partitions from an earlier run with more shards stay readable.
pub fn open_db(path: &Path, partitions: usize) -> Result<Arc<DB>, String> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let mut names: Vec<String> = DB::list_cf(&opts, path).unwrap_or_default();
    for required in [CF_REGISTRY.to_string(), CF_META.to_string()]
        .into_iter()
        .chain((0..partitions).map(partition_cf))
    {
        if !names.contains(&required) {
            names.push(required);
        }
    }
    let cfs = names
        .iter()
        .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| e.to_string())?;
    check_format(&db, &names)?;
    Ok(Arc::new(db))
}

/// Version of the on-disk log layout ([`batch`]); bumped when it changes.
const LOG_FORMAT: &[u8] = b"2";
const FORMAT_KEY: &[u8] = b"log_format";

/// Refuses a database written in another log layout instead of misreading it; stamps a new one.
fn check_format(db: &DB, names: &[String]) -> Result<(), String> {
    let meta = db.cf_handle(CF_META).ok_or("missing meta column family")?;
    match db.get_cf(meta, FORMAT_KEY).map_err(|e| e.to_string())? {
        Some(v) if v == LOG_FORMAT => Ok(()),
        Some(v) => Err(format!(
            "the events log is in format {} but this roost reads format {}; use a new --data-dir",
            String::from_utf8_lossy(&v),
            String::from_utf8_lossy(LOG_FORMAT)
        )),
        None => {
            let has_records = names.iter().filter(|n| n.starts_with("events-")).any(|n| {
                db.cf_handle(n).is_some_and(|cf| {
                    let mut it = db.raw_iterator_cf(cf);
                    it.seek_to_first();
                    it.valid()
                })
            });
            if has_records {
                return Err(
                    "the events log predates format versioning (format 1); use a new --data-dir"
                        .into(),
                );
            }
            db.put_cf(meta, FORMAT_KEY, LOG_FORMAT)
                .map_err(|e| e.to_string())
        }
    }
}
