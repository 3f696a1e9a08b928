//! The `events` log on RocksDB: partition `k` is column family `events-{k}`, each stored value
//! a chunk of one commit keyed by its first offset; checkpoints live in `meta`.

use std::sync::Arc;

use rocksdb::{WriteBatch, WriteOptions, DB};
use roost_storage::batch;
use roost_storage::log::{decode_offset_key, offset_key, LogError, LogStore};

use crate::{partition_cf, CF_META};

pub struct RocksLog {
    db: Arc<DB>,
    partitions: usize,
}

fn db_err(e: rocksdb::Error) -> LogError {
    LogError::Db(e.to_string())
}

impl RocksLog {
    pub(crate) fn new(db: Arc<DB>) -> Self {
        let partitions = (0..)
            .take_while(|k| db.cf_handle(&partition_cf(*k)).is_some())
            .count();
        Self { db, partitions }
    }

    fn cf(&self, partition: usize) -> Result<&rocksdb::ColumnFamily, LogError> {
        self.db
            .cf_handle(&partition_cf(partition))
            .ok_or(LogError::NoPartition(partition))
    }

    fn meta(&self) -> Result<&rocksdb::ColumnFamily, LogError> {
        self.db
            .cf_handle(CF_META)
            .ok_or_else(|| LogError::Db("missing meta column family".into()))
    }
}

fn checkpoint_key(group: &str, partition: usize) -> Vec<u8> {
    format!("cg/{group}/{partition}").into_bytes()
}

impl LogStore for RocksLog {
    fn partition_count(&self) -> usize {
        self.partitions
    }

    fn next_offset(&self, partition: usize) -> Result<u64, LogError> {
        let mut it = self.db.raw_iterator_cf(self.cf(partition)?);
        it.seek_to_last();
        let next = match (it.key(), it.value()) {
            (Some(k), Some(v)) => {
                let corrupt = |detail: String| LogError::Corrupt {
                    partition,
                    offset: 0,
                    detail,
                };
                let first = decode_offset_key(k).ok_or_else(|| corrupt("bad key".into()))?;
                first + batch::count(v).map_err(|e| corrupt(e.to_string()))?
            }
            _ => 0,
        };
        it.status().map_err(db_err)?;
        Ok(next)
    }

    fn write_batch(
        &self,
        partition: usize,
        first: u64,
        records: &[u8],
        sync: bool,
    ) -> Result<(), LogError> {
        let cf = self.cf(partition)?;
        let mut wb = WriteBatch::default();
        for (index, value) in batch::chunks(records) {
            wb.put_cf(cf, offset_key(first + index), value);
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.db.write_opt(wb, &opts).map_err(db_err)
    }

    fn scan(
        &self,
        partition: usize,
        from: u64,
        visit: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), LogError> {
        let mut it = self.db.raw_iterator_cf(self.cf(partition)?);
        // The value holding `from` starts at or before it.
        it.seek_for_prev(offset_key(from));
        if !it.valid() {
            it.seek_to_first();
        }
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            let first = decode_offset_key(key).ok_or(LogError::Corrupt {
                partition,
                offset: from,
                detail: "bad offset key".into(),
            })?;
            if !visit(first, value) {
                break;
            }
            it.next();
        }
        it.status().map_err(db_err)
    }

    fn checkpoint(&self, group: &str, partition: usize) -> Result<Option<u64>, LogError> {
        match self
            .db
            .get_cf(self.meta()?, checkpoint_key(group, partition))
            .map_err(db_err)?
        {
            Some(v) => Ok(Some(u64::from_le_bytes(v.as_slice().try_into().map_err(
                |_| LogError::Db(format!("corrupt checkpoint of group {group}")),
            )?))),
            None => Ok(None),
        }
    }

    fn commit_checkpoint(&self, group: &str, positions: &[(usize, u64)]) -> Result<(), LogError> {
        let meta = self.meta()?;
        let mut wb = WriteBatch::default();
        for (p, next) in positions {
            wb.put_cf(meta, checkpoint_key(group, *p), next.to_le_bytes());
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(wb, &opts).map_err(db_err)
    }
}
