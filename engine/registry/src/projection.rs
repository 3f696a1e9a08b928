//! The in-memory projection and its lock-free holder.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use roost_model::link::{DeviceAuth, RegistryChange};

/// Buckets the device map is split into. A delta copies only the buckets it touches, so
/// applying one change to a registry of a million devices copies about 4,000 entries (pointers),
/// not a million.
const BUCKETS: usize = 256;

type Bucket = HashMap<String, Arc<DeviceAuth>>;

/// One immutable version of the registry as the data plane sees it.
#[derive(Debug, Clone)]
pub struct Projection {
    seq: u64,
    len: usize,
    buckets: Vec<Arc<Bucket>>,
}

impl Default for Projection {
    fn default() -> Self {
        Self::new(0, [])
    }
}

/// FNV-1a: stable and cheap; only picks a bucket (the bucket's map hashes again with SipHash).
fn bucket_of(id: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % BUCKETS as u64) as usize
}

impl Projection {
    pub fn new(seq: u64, devices: impl IntoIterator<Item = DeviceAuth>) -> Self {
        let mut buckets: Vec<Bucket> = (0..BUCKETS).map(|_| HashMap::new()).collect();
        for d in devices {
            buckets[bucket_of(&d.device_id)].insert(d.device_id.clone(), Arc::new(d));
        }
        let len = buckets.iter().map(HashMap::len).sum();
        Self {
            seq,
            len,
            buckets: buckets.into_iter().map(Arc::new).collect(),
        }
    }

    /// The registry sequence this projection is complete up to.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn device(&self, id: &str) -> Option<&DeviceAuth> {
        self.buckets[bucket_of(id)].get(id).map(|d| d.as_ref())
    }

    pub fn device_ids(&self) -> impl Iterator<Item = &str> {
        self.buckets
            .iter()
            .flat_map(|b| b.keys().map(String::as_str))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A new projection with `changes` (which follow `self.seq()`) applied. Untouched buckets
    /// are shared with `self`; a touched bucket is copied once however many changes it gets.
    pub fn with_changes(&self, changes: &[RegistryChange]) -> Self {
        let mut next = self.clone();
        for change in changes {
            match change {
                RegistryChange::Upsert(d) => {
                    let bucket = Arc::make_mut(&mut next.buckets[bucket_of(&d.device_id)]);
                    if bucket
                        .insert(d.device_id.clone(), Arc::new(d.clone()))
                        .is_none()
                    {
                        next.len += 1;
                    }
                }
                RegistryChange::Delete { device_id } => {
                    let slot = &mut next.buckets[bucket_of(device_id)];
                    if slot.contains_key(device_id.as_str()) {
                        Arc::make_mut(slot).remove(device_id.as_str());
                        next.len -= 1;
                    }
                }
            }
        }
        next.seq = self.seq + changes.len() as u64;
        next
    }

    /// How many buckets `self` and `other` share (the cost of a delta, for tests).
    pub fn shared_buckets(&self, other: &Projection) -> usize {
        self.buckets
            .iter()
            .zip(&other.buckets)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count()
    }
}

/// The current projection, replaced whole on every update. Readers take a cheap snapshot
/// (`Arc` clone); writers never block them.
#[derive(Debug, Default)]
pub struct Registry {
    current: ArcSwap<Projection>,
}

impl Registry {
    pub fn new(initial: Projection) -> Self {
        Self {
            current: ArcSwap::from_pointee(initial),
        }
    }

    /// The projection in force now.
    pub fn load(&self) -> Arc<Projection> {
        self.current.load_full()
    }

    pub fn replace(&self, next: Projection) {
        self.current.store(Arc::new(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str, enabled: bool) -> DeviceAuth {
        DeviceAuth::with_keys(id, enabled, &[1], &[2])
    }

    #[test]
    fn deltas_advance_the_sequence_and_leave_the_old_view_intact() {
        let reg = Registry::new(Projection::new(5, [dev("a", true), dev("b", true)]));
        let before = reg.load();
        let next = before.with_changes(&[
            RegistryChange::Upsert(dev("a", false)),
            RegistryChange::Delete {
                device_id: "b".into(),
            },
        ]);
        reg.replace(next);
        let after = reg.load();
        assert_eq!(after.seq(), 7);
        assert_eq!(after.len(), 1);
        assert!(!after.device("a").expect("a").enabled);
        assert!(after.device("b").is_none());
        assert!(
            before.device("a").expect("a").enabled,
            "readers holding the old view keep it"
        );
        assert!(before.device("b").is_some());
        assert_eq!(before.len(), 2);
    }

    #[test]
    fn a_delta_copies_only_the_buckets_it_touches() {
        let base = Projection::new(0, (0..10_000).map(|i| dev(&format!("d{i}"), true)));
        assert_eq!(base.len(), 10_000);
        let next = base.with_changes(&[
            RegistryChange::Upsert(dev("d1", false)),
            RegistryChange::Upsert(dev("new", true)),
            RegistryChange::Delete {
                device_id: "missing".into(),
            },
        ]);
        let touched = BUCKETS - next.shared_buckets(&base);
        assert!(
            touched <= 2,
            "one upsert each touches one bucket; got {touched}"
        );
        assert_eq!(
            next.len(),
            10_001,
            "a delete of an absent id changes nothing"
        );
        assert_eq!(next.device_ids().count(), 10_001);
        assert!(!next.device("d1").expect("d1").enabled);
        assert!(base.device("d1").expect("d1").enabled);
    }
}
