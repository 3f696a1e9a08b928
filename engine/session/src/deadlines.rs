//! A lazy timer wheel for connection deadlines (keep-alive, connect, token expiry).
//!
//! A shard used to visit every connection each 100 ms to compare its deadline with the clock:
//! work proportional to the fleet, most of it idle. Here each connection is filed under the
//! time slot of its deadline, and only the slots that have passed are visited. Deadlines that
//! move later (every packet pushes the keep-alive deadline back) are not re-filed when they
//! move: the owner checks an entry's current deadline when its slot fires and files it again
//! if it is still in the future — so a connection costs about one visit per keep-alive period.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Deadlines<K> {
    origin: Instant,
    slot: Duration,
    slots: BTreeMap<u64, Vec<K>>,
    len: usize,
}

impl<K> Deadlines<K> {
    /// A wheel whose slots are `slot` long (the precision of every deadline), starting at
    /// `origin`.
    pub fn new(origin: Instant, slot: Duration) -> Self {
        Self {
            origin,
            slot: slot.max(Duration::from_millis(1)),
            slots: BTreeMap::new(),
            len: 0,
        }
    }

    fn index(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.origin);
        // Round up: an entry never fires before its deadline.
        since.as_nanos().div_ceil(self.slot.as_nanos()) as u64
    }

    /// Files `key` to fire at `at` (or just after, within one slot).
    pub fn insert(&mut self, key: K, at: Instant) {
        let i = self.index(at);
        self.slots.entry(i).or_default().push(key);
        self.len += 1;
    }

    /// Takes every key whose slot has passed at `now`, earliest first.
    pub fn expired(&mut self, now: Instant) -> Vec<K> {
        let since = now.saturating_duration_since(self.origin);
        let current = (since.as_nanos() / self.slot.as_nanos()) as u64;
        let later = self.slots.split_off(&(current + 1));
        let due = std::mem::replace(&mut self.slots, later);
        let keys: Vec<K> = due.into_values().flatten().collect();
        self.len -= keys.len();
        keys
    }

    /// When the earliest filed slot fires.
    pub fn next_deadline(&self) -> Option<Instant> {
        let (&i, _) = self.slots.iter().next()?;
        Some(self.origin + self.slot * i as u32)
    }

    /// Entries filed (a connection may be filed more than once while its deadline moves).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_fire_once_their_slot_has_passed_never_before_their_deadline() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut w = Deadlines::new(t0, ms(100));
        w.insert("a", t0 + ms(250));
        w.insert("b", t0 + ms(100));
        w.insert("c", t0 + ms(5_000));
        assert_eq!(w.len(), 3);
        assert!(w.expired(t0 + ms(99)).is_empty());
        assert_eq!(w.expired(t0 + ms(100)), vec!["b"]);
        assert!(
            w.expired(t0 + ms(249)).is_empty(),
            "a is due at 250, not before"
        );
        assert_eq!(w.expired(t0 + ms(300)), vec!["a"]);
        assert_eq!(w.next_deadline(), Some(t0 + ms(5_000)));
        assert_eq!(w.expired(t0 + ms(60_000)), vec!["c"]);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn an_idle_fleet_costs_nothing_between_deadlines() {
        let t0 = Instant::now();
        let mut w = Deadlines::new(t0, Duration::from_millis(100));
        for k in 0..10_000u32 {
            w.insert(k, t0 + Duration::from_secs(90));
        }
        let mut visited = 0;
        for tick in 1..900 {
            visited += w.expired(t0 + Duration::from_millis(100 * tick)).len();
        }
        assert_eq!(visited, 0, "no connection is looked at before its deadline");
        assert_eq!(w.expired(t0 + Duration::from_secs(90)).len(), 10_000);
    }
}
