//! The replica store on RocksDB: one column family of device records, plus the sequence and
//! the applied epoch in `meta`.

use std::sync::Arc;

use rocksdb::{WriteBatch, DB};
use roost_model::link::{DeviceAuth, Epoch, RegistryChange};
use roost_storage::{ReplicaStore, SessionStore, StoreError};

use crate::{CF_META, CF_REGISTRY, CF_SESSIONS};

const SEQ_KEY: &[u8] = b"registry_seq";
/// The layout of the stored `DeviceAuth` values. A replica of another layout (written by an
/// older roost) is emptied when it loads: the engine then starts from sequence 0 and control
/// sends it the registry again.
const FORMAT_KEY: &[u8] = b"registry_format";
/// 2: `DeviceAuth::twin` holds the routing view of tags and properties (1 held tags only).
/// 3: the stored epoch carries the shared access policies.
/// 4: `DeviceAuth::x509` (certificate authentication).
/// 5: the stored epoch carries the verified CAs.
const FORMAT: u32 = 5;
const EPOCH_KEY: &[u8] = b"epoch";

/// A [`ReplicaStore`] in the engine's RocksDB (which must have the `registry` and `meta`
/// column families).
pub struct RocksReplica {
    db: Arc<DB>,
}

impl RocksReplica {
    pub(crate) fn new(db: Arc<DB>) -> Self {
        Self { db }
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| StoreError::Db(format!("missing column family {name}")))
    }

    fn put_device(&self, batch: &mut WriteBatch, d: &DeviceAuth) -> Result<(), StoreError> {
        let bytes =
            rkyv::to_bytes::<rkyv::rancor::Error>(d).map_err(|e| StoreError::Db(e.to_string()))?;
        batch.put_cf(
            self.cf(CF_REGISTRY)?,
            d.device_id.as_bytes(),
            bytes.as_slice(),
        );
        Ok(())
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        self.db
            .write_opt(batch, &opts)
            .map_err(|e| StoreError::Db(e.to_string()))
    }
}

impl RocksReplica {
    fn seq(&self) -> Result<u64, StoreError> {
        Ok(
            match self.db.get_cf(self.cf(CF_META)?, SEQ_KEY).map_err(db_err)? {
                Some(v) => u64::from_le_bytes(
                    v.as_slice()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("registry_seq".into()))?,
                ),
                None => 0,
            },
        )
    }
}

fn db_err(e: rocksdb::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

impl SessionStore for RocksReplica {
    fn load_sessions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_SESSIONS)?, rocksdb::IteratorMode::Start)
        {
            let (k, v) = item.map_err(|e| StoreError::Db(e.to_string()))?;
            let key = String::from_utf8(k.to_vec())
                .map_err(|_| StoreError::Corrupt(String::from_utf8_lossy(&k).into_owned()))?;
            out.push((key, v.to_vec()));
        }
        Ok(out)
    }

    fn save_session(&self, client_id: &str, state: &[u8]) -> Result<(), StoreError> {
        self.db
            .put_cf(self.cf(CF_SESSIONS)?, client_id.as_bytes(), state)
            .map_err(|e| StoreError::Db(e.to_string()))
    }

    fn delete_session(&self, client_id: &str) -> Result<(), StoreError> {
        self.db
            .delete_cf(self.cf(CF_SESSIONS)?, client_id.as_bytes())
            .map_err(|e| StoreError::Db(e.to_string()))
    }
}

impl ReplicaStore for RocksReplica {
    fn load(&self) -> Result<(u64, Vec<DeviceAuth>), StoreError> {
        let format = self
            .db
            .get_cf(self.cf(CF_META)?, FORMAT_KEY)
            .map_err(db_err)?
            .and_then(|v| v.as_slice().try_into().ok().map(u32::from_le_bytes));
        if format != Some(FORMAT) {
            // Another layout (or a new database): start over; control sends the registry and
            // the epoch on the next link.
            let mut batch = WriteBatch::default();
            batch.delete_cf(self.cf(CF_META)?, EPOCH_KEY);
            self.write(batch)?;
            self.replace(0, &[])?;
            return Ok((0, Vec::new()));
        }
        let seq = self.seq()?;
        let mut devices = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_REGISTRY)?, rocksdb::IteratorMode::Start)
        {
            let (key, value) = item.map_err(db_err)?;
            let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(value.len());
            aligned.extend_from_slice(&value);
            let d = rkyv::from_bytes::<DeviceAuth, rkyv::rancor::Error>(&aligned)
                .map_err(|_| StoreError::Corrupt(String::from_utf8_lossy(&key).into_owned()))?;
            devices.push(d);
        }
        Ok((seq, devices))
    }

    fn replace(&self, seq: u64, devices: &[DeviceAuth]) -> Result<(), StoreError> {
        let cf = self.cf(CF_REGISTRY)?;
        let mut batch = WriteBatch::default();
        // Delete everything first: a snapshot removes devices the replica still has.
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (key, _) = item.map_err(db_err)?;
            batch.delete_cf(cf, key);
        }
        for d in devices {
            self.put_device(&mut batch, d)?;
        }
        batch.put_cf(self.cf(CF_META)?, SEQ_KEY, seq.to_le_bytes());
        batch.put_cf(self.cf(CF_META)?, FORMAT_KEY, FORMAT.to_le_bytes());
        self.write(batch)
    }

    fn apply(&self, from_seq: u64, changes: &[RegistryChange]) -> Result<(), StoreError> {
        let have = self.seq()?;
        if from_seq != have {
            return Err(StoreError::OutOfOrder { from_seq, have });
        }
        let mut batch = WriteBatch::default();
        for change in changes {
            match change {
                RegistryChange::Upsert(d) => self.put_device(&mut batch, d)?,
                RegistryChange::Delete { device_id } => {
                    batch.delete_cf(self.cf(CF_REGISTRY)?, device_id.as_bytes())
                }
            }
        }
        let seq = from_seq + changes.len() as u64;
        batch.put_cf(self.cf(CF_META)?, SEQ_KEY, seq.to_le_bytes());
        batch.put_cf(self.cf(CF_META)?, FORMAT_KEY, FORMAT.to_le_bytes());
        self.write(batch)
    }

    fn load_epoch(&self) -> Result<Option<Epoch>, StoreError> {
        let Some(v) = self
            .db
            .get_cf(self.cf(CF_META)?, EPOCH_KEY)
            .map_err(db_err)?
        else {
            return Ok(None);
        };
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(v.len());
        aligned.extend_from_slice(&v);
        rkyv::from_bytes::<Epoch, rkyv::rancor::Error>(&aligned)
            .map(Some)
            .map_err(|_| StoreError::Corrupt("epoch".into()))
    }

    fn save_epoch(&self, epoch: &Epoch) -> Result<(), StoreError> {
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(epoch)
            .map_err(|e| StoreError::Db(e.to_string()))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META)?, EPOCH_KEY, bytes.as_slice());
        batch.put_cf(self.cf(CF_META)?, FORMAT_KEY, FORMAT.to_le_bytes());
        self.write(batch)
    }
}

#[cfg(test)]
mod tests {
    use roost_model::link::{DeviceAuth, RegistryChange};
    use roost_storage::ReplicaStore;

    use crate::{EngineDb, CF_META};

    #[test]
    fn a_replica_of_another_layout_is_emptied_when_it_loads() {
        let dir = std::env::temp_dir().join(format!("roost-rocks-replica-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = EngineDb::open(&dir, 1).expect("open");
        let replica = db.replica();
        let d = DeviceAuth::with_keys("d1", true, &[1], &[2]);
        replica
            .apply(0, &[RegistryChange::Upsert(d.clone())])
            .expect("apply");
        assert_eq!(replica.load().expect("load"), (1, vec![d.clone()]));
        // As an older roost left it: no layout key.
        let raw = &replica.db;
        raw.delete_cf(raw.cf_handle(CF_META).expect("cf"), super::FORMAT_KEY)
            .expect("delete");
        assert_eq!(replica.load().expect("load"), (0, vec![]), "emptied");
        assert_eq!(replica.load().expect("again"), (0, vec![]));
        replica
            .apply(0, &[RegistryChange::Upsert(d.clone())])
            .expect("apply from 0");
        assert_eq!(replica.load().expect("load"), (1, vec![d]));
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
