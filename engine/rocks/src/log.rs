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

    fn checkpoints(&self) -> Result<Vec<(String, usize, u64)>, LogError> {
        let mut out = Vec::new();
        let mut it = self.db.raw_iterator_cf(self.meta()?);
        it.seek(b"cg/");
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Some(rest) = k.strip_prefix(b"cg/") else {
                break;
            };
            // `cg/{group}/{partition}`: the group may itself hold '/'; the partition is last.
            let parsed = std::str::from_utf8(rest).ok().and_then(|rest| {
                let (group, p) = rest.rsplit_once('/')?;
                let next = u64::from_le_bytes(v.try_into().ok()?);
                Some((group.to_string(), p.parse().ok()?, next))
            });
            match parsed {
                Some(c) => out.push(c),
                None => return Err(LogError::Db("corrupt consumer-group checkpoint key".into())),
            }
            it.next();
        }
        it.status().map_err(db_err)?;
        Ok(out)
    }

    fn truncate_before(&self, partition: usize, offset: u64) -> Result<(), LogError> {
        let cf = self.cf(partition)?;
        let mut it = self.db.raw_iterator_cf(cf);
        it.seek_to_last();
        let Some(newest) = it.key().and_then(decode_offset_key) else {
            return it.status().map_err(db_err);
        };
        // The value holding `offset` starts at or before it; it and later ones stay.
        it.seek_for_prev(offset_key(offset));
        let holding = it.key().and_then(decode_offset_key).unwrap_or(0);
        it.status().map_err(db_err)?;
        let keep_from = holding.min(newest);
        if keep_from == 0 {
            return Ok(());
        }
        let (start, end) = (offset_key(0), offset_key(keep_from));
        self.db.delete_range_cf(cf, start, end).map_err(db_err)?;
        // Give the space back now: a size bound checks the store's estimate next time.
        self.db.compact_range_cf(cf, Some(start), Some(end));
        Ok(())
    }

    fn discard_from(&self, partition: usize, offset: u64) -> Result<(), LogError> {
        let cf = self.cf(partition)?;
        let mut wb = WriteBatch::default();
        wb.delete_range_cf(cf, offset_key(offset), offset_key(u64::MAX));
        wb.delete_cf(cf, offset_key(u64::MAX));
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(wb, &opts).map_err(db_err)
    }

    fn stored_bytes(&self, partition: usize) -> Result<u64, LogError> {
        let cf = self.cf(partition)?;
        let prop = |name: &str| {
            self.db
                .property_int_value_cf(cf, name)
                .map(|v| v.unwrap_or(0))
                .map_err(db_err)
        };
        Ok(prop("rocksdb.total-sst-files-size")? + prop("rocksdb.cur-size-all-mem-tables")?)
    }
}

#[cfg(test)]
mod tests {
    use roost_storage::batch;
    use roost_storage::log::LogStore;

    use crate::EngineDb;

    #[test]
    fn truncation_keeps_whole_values_and_the_newest_and_checkpoints_list() {
        let dir = std::env::temp_dir().join(format!("roost-rocks-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = EngineDb::open(&dir, 1).expect("open");
        let log = db.log();
        // Values of 2 records at 0, 2, 4, 6 (the records' bytes do not matter here).
        for first in [0u64, 2, 4, 6] {
            let mut b = Vec::new();
            batch::push(&mut b, batch::plain(b"r1"));
            batch::push(&mut b, batch::plain(b"r2"));
            log.write_batch(0, first, &b, false).expect("write");
        }
        log.truncate_before(0, 5).expect("truncate");
        let p = &log.partitions().expect("partitions")[0];
        assert_eq!((p.first, p.next), (4, 8), "the value holding 5 stays");
        log.truncate_before(0, 100).expect("truncate all");
        let p = &log.partitions().expect("partitions")[0];
        assert_eq!(
            (p.first, p.next),
            (6, 8),
            "the newest value stays: the next offset is kept"
        );
        assert!(log.stored_bytes(0).expect("bytes") > 0);

        log.commit_checkpoint("app/1", &[(0, 7)])
            .expect("checkpoint");
        log.commit_checkpoint("b", &[(0, 3)]).expect("checkpoint");
        let mut c = log.checkpoints().expect("list");
        c.sort();
        assert_eq!(
            c,
            vec![("app/1".to_string(), 0, 7), ("b".to_string(), 0, 3)]
        );
        drop(log);
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
