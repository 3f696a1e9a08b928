//! A log store that loses power: [`PowerLossStore`] keeps what a synced write made durable apart
//! from what is only "written" (in the page cache), and [`PowerLossStore::power_loss`] drops the
//! unsynced part the way a machine that loses power does — everything after some point, with
//! the writes before that point kept whole (a write-ahead log replays a prefix of its records).
//! Tests drive the engine's group commit over it to show that what was acknowledged survives and
//! that what is recovered is a dense prefix of what was written.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::batch;
use crate::log::{LogError, LogStore};
use crate::MemStore;

#[derive(Default)]
struct Disk {
    /// False between a power loss and [`PowerLossStore::power_on`]: writes in flight fail.
    off: bool,
    /// Per partition: stored values by first offset, as they would be read after a reboot.
    durable: Vec<BTreeMap<u64, Vec<u8>>>,
    /// Writes since the last sync, in order: (partition, first offset, records).
    unsynced: Vec<(usize, u64, Vec<u8>)>,
}

pub struct PowerLossStore {
    disk: Mutex<Disk>,
    /// Consumer-group checkpoints: always synced, so kept as the in-memory store keeps them.
    checkpoints: MemStore,
}

impl PowerLossStore {
    pub fn new(partitions: usize) -> Self {
        PowerLossStore {
            disk: Mutex::new(Disk {
                durable: vec![BTreeMap::new(); partitions],
                ..Disk::default()
            }),
            checkpoints: MemStore::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Power is cut: of the writes not yet synced, the first `keep` survive (a prefix, as a
    /// write-ahead log replays), the rest are gone, and writes fail until
    /// [`Self::power_on`]. Returns how many were dropped.
    pub fn power_loss(&self, keep: usize) -> usize {
        let mut d = self.lock();
        d.off = true;
        let pending = std::mem::take(&mut d.unsynced);
        let dropped = pending.len().saturating_sub(keep);
        for (p, first, records) in pending.into_iter().take(keep) {
            put(&mut d.durable[p], first, &records);
        }
        dropped
    }

    /// The machine boots again.
    pub fn power_on(&self) {
        self.lock().off = false;
    }

    /// Writes not yet synced.
    pub fn unsynced(&self) -> usize {
        self.lock().unsynced.len()
    }
}

fn put(values: &mut BTreeMap<u64, Vec<u8>>, first: u64, records: &[u8]) {
    for (index, value) in batch::chunks(records) {
        values.insert(first + index, value.to_vec());
    }
}

/// The partition as a reader sees it now: durable values plus the unsynced writes, in order.
fn visible(d: &Disk, partition: usize) -> BTreeMap<u64, Vec<u8>> {
    let mut values = d.durable[partition].clone();
    for (p, first, records) in &d.unsynced {
        if *p == partition {
            put(&mut values, *first, records);
        }
    }
    values
}

fn next_of(values: &BTreeMap<u64, Vec<u8>>) -> u64 {
    values
        .iter()
        .next_back()
        .map(|(first, v)| first + batch::count(v).unwrap_or(1))
        .unwrap_or(0)
}

impl LogStore for PowerLossStore {
    fn partition_count(&self) -> usize {
        self.lock().durable.len()
    }

    fn next_offset(&self, partition: usize) -> Result<u64, LogError> {
        let d = self.lock();
        if partition >= d.durable.len() {
            return Err(LogError::NoPartition(partition));
        }
        Ok(next_of(&visible(&d, partition)))
    }

    fn write_batch(
        &self,
        partition: usize,
        first: u64,
        records: &[u8],
        sync: bool,
    ) -> Result<(), LogError> {
        let mut d = self.lock();
        if d.off {
            return Err(LogError::Db("no power".into()));
        }
        if partition >= d.durable.len() {
            return Err(LogError::NoPartition(partition));
        }
        let next = next_of(&visible(&d, partition));
        if first != next {
            return Err(LogError::Gap {
                partition,
                first,
                next,
            });
        }
        d.unsynced.push((partition, first, records.to_vec()));
        if sync {
            // A sync makes every earlier write durable too (one write-ahead log).
            for (p, first, records) in std::mem::take(&mut d.unsynced) {
                put(&mut d.durable[p], first, &records);
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        partition: usize,
        from: u64,
        visit: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), LogError> {
        let values = {
            let d = self.lock();
            if partition >= d.durable.len() {
                return Err(LogError::NoPartition(partition));
            }
            visible(&d, partition)
        };
        crate::memory::scan_values(&values, from, visit);
        Ok(())
    }

    fn checkpoint(&self, group: &str, partition: usize) -> Result<Option<u64>, LogError> {
        self.checkpoints.checkpoint(group, partition)
    }

    fn commit_checkpoint(&self, group: &str, positions: &[(usize, u64)]) -> Result<(), LogError> {
        self.checkpoints.commit_checkpoint(group, positions)
    }

    fn checkpoints(&self) -> Result<Vec<(String, usize, u64)>, LogError> {
        self.checkpoints.checkpoints()
    }

    fn truncate_before(&self, _partition: usize, _offset: u64) -> Result<(), LogError> {
        Ok(())
    }

    fn discard_from(&self, partition: usize, offset: u64) -> Result<(), LogError> {
        let mut d = self.lock();
        d.unsynced
            .retain(|(p, first, _)| *p != partition || *first < offset);
        d.durable[partition].split_off(&offset);
        Ok(())
    }

    fn stored_bytes(&self, partition: usize) -> Result<u64, LogError> {
        let d = self.lock();
        Ok(visible(&d, partition)
            .values()
            .map(|v| v.len() as u64)
            .sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(n: u8) -> Vec<u8> {
        let mut b = Vec::new();
        batch::push(&mut b, batch::plain(&[n; 4]));
        b
    }

    #[test]
    fn unsynced_writes_are_lost_after_the_surviving_prefix() {
        let s = PowerLossStore::new(1);
        s.write_batch(0, 0, &one(0), true).expect("synced");
        s.write_batch(0, 1, &one(1), false).expect("written");
        s.write_batch(0, 2, &one(2), false).expect("written");
        s.write_batch(0, 3, &one(3), false).expect("written");
        assert_eq!(
            s.next_offset(0).expect("next"),
            4,
            "readers see the page cache"
        );
        assert_eq!(s.power_loss(1), 2);
        assert!(
            s.write_batch(0, 2, &one(2), true).is_err(),
            "no writes without power"
        );
        s.power_on();
        assert_eq!(s.next_offset(0).expect("next"), 2, "a prefix survives");
        s.write_batch(0, 2, &one(9), false).expect("written");
        s.write_batch(0, 3, &one(9), true)
            .expect("a sync keeps what came before it");
        assert_eq!(s.power_loss(0), 0);
        assert_eq!(s.next_offset(0).expect("next"), 4);
    }
}
