//! The replica store on RocksDB: one column family of device records, plus the sequence.

use std::sync::Arc;

use rocksdb::{WriteBatch, DB};
use roost_model::link::{DeviceAuth, RegistryChange};

use crate::{ReplicaStore, StoreError};

/// Column family holding `device_id → rkyv(DeviceAuth)`.
pub const CF_REGISTRY: &str = "registry";
/// Column family for small engine bookkeeping values.
pub const CF_META: &str = "meta";
const SEQ_KEY: &[u8] = b"registry_seq";

/// A [`ReplicaStore`] in the engine's RocksDB (which must have the `registry` and `meta`
/// column families).
pub struct RocksReplica {
    db: Arc<DB>,
}

impl RocksReplica {
    pub fn new(db: Arc<DB>) -> Self {
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

fn db_err(e: rocksdb::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

impl ReplicaStore for RocksReplica {
    fn load(&self) -> Result<(u64, Vec<DeviceAuth>), StoreError> {
        let seq = match self.db.get_cf(self.cf(CF_META)?, SEQ_KEY).map_err(db_err)? {
            Some(v) => u64::from_le_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("registry_seq".into()))?,
            ),
            None => 0,
        };
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
        self.write(batch)
    }

    fn apply(&self, from_seq: u64, changes: &[RegistryChange]) -> Result<(), StoreError> {
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
        self.write(batch)
    }
}
