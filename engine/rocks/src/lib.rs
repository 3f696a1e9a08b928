//! roost-rocks: the engine's database on RocksDB, behind `roost-storage`'s traits.
//!
//! What it is: [`EngineDb::open`] (one RocksDB with a column family per `events` partition, the
//! registry replica and a meta family for the log format, consumer checkpoints and the applied
//! epoch, the clients' persistent sessions), [`RocksLog`] implementing `LogStore` and
//! [`RocksReplica`] implementing `ReplicaStore` and `SessionStore`.
//!
//! What it is not: the logic. Reading records, the batch format, consumer JSON and the
//! in-memory store used to test them are in `roost-storage`; group commit is in `roost-server`.

mod log;
mod replica;

pub use log::RocksLog;
pub use replica::RocksReplica;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

/// Column family holding `device_id → rkyv(DeviceAuth)`.
pub const CF_REGISTRY: &str = "registry";
/// Column family for small engine bookkeeping values.
pub const CF_META: &str = "meta";
/// Column family holding `client_id → persistent session state` (`roost_storage::SessionStore`).
pub const CF_SESSIONS: &str = "sessions";

/// Column family name of partition `k`.
pub fn partition_cf(k: usize) -> String {
    format!("events-{k}")
}

/// Why the engine database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("opening {path}: {detail}")]
    Db { path: String, detail: String },
    #[error("the events log is in format {found} but this roost reads format {wants}; use a new --data-dir")]
    Format { found: String, wants: String },
    #[error("the events log predates format versioning (format 1); use a new --data-dir")]
    Unversioned,
}

/// The opened engine database.
#[derive(Clone)]
pub struct EngineDb {
    db: Arc<DB>,
}

impl EngineDb {
    /// Opens (creating when absent) the database with the registry, meta and `partitions`
    /// event column families; partitions from an earlier run with more shards stay readable.
    pub fn open(path: &Path, partitions: usize) -> Result<Self, OpenError> {
        let err = |e: rocksdb::Error| OpenError::Db {
            path: path.display().to_string(),
            detail: e.to_string(),
        };
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let mut names: Vec<String> = DB::list_cf(&opts, path).unwrap_or_default();
        for required in [
            CF_REGISTRY.to_string(),
            CF_META.to_string(),
            CF_SESSIONS.to_string(),
        ]
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
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(err)?;
        check_format(&db, &names).map_err(|e| match e {
            FormatCheck::Db(e) => err(e),
            FormatCheck::Bad(e) => e,
        })?;
        Ok(Self { db: Arc::new(db) })
    }

    pub fn log(&self) -> RocksLog {
        RocksLog::new(self.db.clone())
    }

    pub fn replica(&self) -> RocksReplica {
        RocksReplica::new(self.db.clone())
    }

    /// Writes the WAL to stable storage (at shutdown).
    pub fn flush_wal(&self) -> Result<(), String> {
        self.db.flush_wal(true).map_err(|e| e.to_string())
    }
}

/// Version of the on-disk log layout (`roost_storage::batch`); bumped when it changes.
const LOG_FORMAT: &[u8] = b"2";
const FORMAT_KEY: &[u8] = b"log_format";

enum FormatCheck {
    Db(rocksdb::Error),
    Bad(OpenError),
}

/// Refuses a database written in another log layout instead of misreading it; stamps a new one.
fn check_format(db: &DB, names: &[String]) -> Result<(), FormatCheck> {
    let Some(meta) = db.cf_handle(CF_META) else {
        return Err(FormatCheck::Bad(OpenError::Unversioned));
    };
    match db.get_cf(meta, FORMAT_KEY).map_err(FormatCheck::Db)? {
        Some(v) if v == LOG_FORMAT => Ok(()),
        Some(v) => Err(FormatCheck::Bad(OpenError::Format {
            found: String::from_utf8_lossy(&v).into_owned(),
            wants: String::from_utf8_lossy(LOG_FORMAT).into_owned(),
        })),
        None => {
            let has_records = names.iter().filter(|n| n.starts_with("events-")).any(|n| {
                db.cf_handle(n).is_some_and(|cf| {
                    let mut it = db.raw_iterator_cf(cf);
                    it.seek_to_first();
                    it.valid()
                })
            });
            if has_records {
                return Err(FormatCheck::Bad(OpenError::Unversioned));
            }
            db.put_cf(meta, FORMAT_KEY, LOG_FORMAT)
                .map_err(FormatCheck::Db)
        }
    }
}
