//! [`MemStore`]: both storage traits in memory, for tests of the logic above them and for tools
//! that need a throwaway engine store. Nothing survives the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use roost_model::link::{DeviceAuth, Epoch, RegistryChange};

use crate::batch;
use crate::log::{LogError, LogStore};
use crate::replica::{ReplicaStore, SessionStore, StoreError};

#[derive(Default)]
struct Inner {
    seq: u64,
    devices: BTreeMap<String, DeviceAuth>,
    epoch: Option<Epoch>,
    /// Per partition: first offset → stored value; and the next offset.
    partitions: Vec<(BTreeMap<u64, Vec<u8>>, u64)>,
    checkpoints: HashMap<(String, usize), u64>,
    sessions: BTreeMap<String, Vec<u8>>,
}

/// An in-memory [`ReplicaStore`] and [`LogStore`].
pub struct MemStore {
    inner: Mutex<Inner>,
}

impl MemStore {
    /// A store with `partitions` empty log partitions.
    pub fn new(partitions: usize) -> Self {
        let inner = Inner {
            partitions: (0..partitions).map(|_| (BTreeMap::new(), 0)).collect(),
            ..Inner::default()
        };
        Self {
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic in another test thread must not hide this store's state.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SessionStore for MemStore {
    fn load_sessions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self.lock().sessions.clone().into_iter().collect())
    }

    fn save_session(&self, client_id: &str, state: &[u8]) -> Result<(), StoreError> {
        self.lock()
            .sessions
            .insert(client_id.to_string(), state.to_vec());
        Ok(())
    }

    fn delete_session(&self, client_id: &str) -> Result<(), StoreError> {
        self.lock().sessions.remove(client_id);
        Ok(())
    }
}

impl ReplicaStore for MemStore {
    fn load(&self) -> Result<(u64, Vec<DeviceAuth>), StoreError> {
        let g = self.lock();
        Ok((g.seq, g.devices.values().cloned().collect()))
    }

    fn replace(&self, seq: u64, devices: &[DeviceAuth]) -> Result<(), StoreError> {
        let mut g = self.lock();
        g.devices = devices
            .iter()
            .map(|d| (d.device_id.clone(), d.clone()))
            .collect();
        g.seq = seq;
        Ok(())
    }

    fn apply(&self, from_seq: u64, changes: &[RegistryChange]) -> Result<(), StoreError> {
        let mut g = self.lock();
        if from_seq != g.seq {
            return Err(StoreError::OutOfOrder {
                from_seq,
                have: g.seq,
            });
        }
        for change in changes {
            match change {
                RegistryChange::Upsert(d) => {
                    g.devices.insert(d.device_id.clone(), d.clone());
                }
                RegistryChange::Delete { device_id } => {
                    g.devices.remove(device_id);
                }
            }
        }
        g.seq = from_seq + changes.len() as u64;
        Ok(())
    }

    fn load_epoch(&self) -> Result<Option<Epoch>, StoreError> {
        Ok(self.lock().epoch.clone())
    }

    fn save_epoch(&self, epoch: &Epoch) -> Result<(), StoreError> {
        self.lock().epoch = Some(epoch.clone());
        Ok(())
    }
}

/// The first offset of the stored value holding `offset` (which starts at or before it).
pub(crate) fn holding(values: &BTreeMap<u64, Vec<u8>>, offset: u64) -> u64 {
    values
        .range(..=offset)
        .next_back()
        .map(|(k, _)| *k)
        .unwrap_or(0)
}

/// [`LogStore::scan`] over stored values kept in memory by first offset.
pub(crate) fn scan_values(
    values: &BTreeMap<u64, Vec<u8>>,
    from: u64,
    visit: &mut dyn FnMut(u64, &[u8]) -> bool,
) {
    for (first, value) in values.range(holding(values, from)..) {
        if !visit(*first, value) {
            break;
        }
    }
}

impl LogStore for MemStore {
    fn partition_count(&self) -> usize {
        self.lock().partitions.len()
    }

    fn next_offset(&self, partition: usize) -> Result<u64, LogError> {
        self.lock()
            .partitions
            .get(partition)
            .map(|(_, next)| *next)
            .ok_or(LogError::NoPartition(partition))
    }

    fn write_batch(
        &self,
        partition: usize,
        first: u64,
        records: &[u8],
        _sync: bool,
    ) -> Result<(), LogError> {
        let mut g = self.lock();
        let (values, next) = g
            .partitions
            .get_mut(partition)
            .ok_or(LogError::NoPartition(partition))?;
        if first != *next {
            return Err(LogError::Gap {
                partition,
                first,
                next: *next,
            });
        }
        // Stored as given, like the RocksDB store: a corrupt value is found by its readers.
        let mut count = 0;
        for (index, value) in batch::chunks(records) {
            values.insert(first + index, value.to_vec());
            count = index + batch::count(value).unwrap_or(1);
        }
        *next = first + count;
        Ok(())
    }

    fn scan(
        &self,
        partition: usize,
        from: u64,
        visit: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), LogError> {
        let g = self.lock();
        let (values, _) = g
            .partitions
            .get(partition)
            .ok_or(LogError::NoPartition(partition))?;
        scan_values(values, from, visit);
        Ok(())
    }

    fn checkpoint(&self, group: &str, partition: usize) -> Result<Option<u64>, LogError> {
        Ok(self
            .lock()
            .checkpoints
            .get(&(group.to_string(), partition))
            .copied())
    }

    fn commit_checkpoint(&self, group: &str, positions: &[(usize, u64)]) -> Result<(), LogError> {
        let mut g = self.lock();
        for (p, next) in positions {
            g.checkpoints.insert((group.to_string(), *p), *next);
        }
        Ok(())
    }

    fn checkpoints(&self) -> Result<Vec<(String, usize, u64)>, LogError> {
        Ok(self
            .lock()
            .checkpoints
            .iter()
            .map(|((g, p), next)| (g.clone(), *p, *next))
            .collect())
    }

    fn truncate_before(&self, partition: usize, offset: u64) -> Result<(), LogError> {
        let mut g = self.lock();
        let (values, _) = g
            .partitions
            .get_mut(partition)
            .ok_or(LogError::NoPartition(partition))?;
        let newest = values.keys().next_back().copied().unwrap_or(0);
        // The value holding `offset` and later ones stay.
        let keep_from = holding(values, offset).min(newest);
        *values = values.split_off(&keep_from);
        Ok(())
    }

    fn discard_from(&self, partition: usize, offset: u64) -> Result<(), LogError> {
        let mut g = self.lock();
        let (values, next) = g
            .partitions
            .get_mut(partition)
            .ok_or(LogError::NoPartition(partition))?;
        values.split_off(&offset);
        *next = (*next).min(offset);
        Ok(())
    }

    fn stored_bytes(&self, partition: usize) -> Result<u64, LogError> {
        let g = self.lock();
        let (values, _) = g
            .partitions
            .get(partition)
            .ok_or(LogError::NoPartition(partition))?;
        Ok(values.values().map(|v| v.len() as u64 + 8).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str) -> DeviceAuth {
        DeviceAuth::with_keys(id, true, &[1], &[2])
    }

    #[test]
    fn replica_applies_deltas_in_order_only() {
        let s = MemStore::new(0);
        s.replace(3, &[dev("a"), dev("b")]).expect("replace");
        s.apply(
            3,
            &[RegistryChange::Delete {
                device_id: "a".into(),
            }],
        )
        .expect("follows");
        assert!(matches!(
            s.apply(3, &[RegistryChange::Upsert(dev("c"))]),
            Err(StoreError::OutOfOrder {
                from_seq: 3,
                have: 4
            })
        ));
        let (seq, devices) = s.load().expect("load");
        assert_eq!(seq, 4);
        assert_eq!(devices, vec![dev("b")]);
    }
}
