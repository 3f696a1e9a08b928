//! The in-memory projection and its lock-free holder.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use roost_model::link::{DeviceAuth, RegistryChange};

/// One immutable version of the registry as the data plane sees it.
#[derive(Debug, Default, Clone)]
pub struct Projection {
    seq: u64,
    devices: HashMap<String, Arc<DeviceAuth>>,
}

impl Projection {
    pub fn new(seq: u64, devices: impl IntoIterator<Item = DeviceAuth>) -> Self {
        let devices = devices
            .into_iter()
            .map(|d| (d.device_id.clone(), Arc::new(d)))
            .collect();
        Self { seq, devices }
    }

    /// The registry sequence this projection is complete up to.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn device(&self, id: &str) -> Option<&DeviceAuth> {
        self.devices.get(id).map(|d| d.as_ref())
    }

    pub fn device_ids(&self) -> impl Iterator<Item = &str> {
        self.devices.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// A new projection with `changes` (which follow `self.seq()`) applied. Entries are shared
    /// with `self`, so a delta costs one map copy of pointers, not a copy of every key.
    pub fn with_changes(&self, changes: &[RegistryChange]) -> Self {
        let mut next = self.clone();
        for change in changes {
            match change {
                RegistryChange::Upsert(d) => {
                    next.devices
                        .insert(d.device_id.clone(), Arc::new(d.clone()));
                }
                RegistryChange::Delete { device_id } => {
                    next.devices.remove(device_id);
                }
            }
        }
        next.seq = self.seq + changes.len() as u64;
        next
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
        DeviceAuth {
            device_id: id.into(),
            enabled,
            primary_key: vec![1],
            secondary_key: vec![2],
            generation_id: "g".into(),
        }
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
        assert!(!after.device("a").expect("a").enabled);
        assert!(after.device("b").is_none());
        assert!(
            before.device("a").expect("a").enabled,
            "readers holding the old view keep it"
        );
        assert!(before.device("b").is_some());
    }
}
