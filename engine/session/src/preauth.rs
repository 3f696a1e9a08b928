//! How many connections may be open and not yet authenticated: in total, and from one source
//! address. Every protocol adapter takes a [`PreAuthSlot`] when it accepts a connection and
//! gives it back when the connection authenticates or ends, so an unauthenticated peer can hold
//! at most `per_source` connections and the engine at most `total` (each bounded in memory and
//! time by its adapter). One gate serves every shard: connections from one address are spread
//! over the shards by the kernel.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::DisconnectReason;

/// The caps. Both count connections between accept and a successful authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreAuthLimits {
    pub total: usize,
    pub per_source: usize,
}

impl Default for PreAuthLimits {
    /// 16,384 in all (at most 16 KiB each before CONNECT is read: 256 MiB), 1,024 from one
    /// address (a site behind NAT reconnecting its fleet after an outage).
    fn default() -> Self {
        PreAuthLimits {
            total: 16_384,
            per_source: 1_024,
        }
    }
}

#[derive(Debug)]
pub struct PreAuthGate {
    limits: PreAuthLimits,
    total: AtomicUsize,
    by_source: Mutex<HashMap<IpAddr, usize>>,
}

/// One unauthenticated connection's place at the gate; given back when dropped (or with
/// [`PreAuthSlot::release`] as the connection authenticates).
#[derive(Debug)]
pub struct PreAuthSlot {
    gate: Arc<PreAuthGate>,
    source: IpAddr,
    held: bool,
}

impl PreAuthGate {
    pub fn new(limits: PreAuthLimits) -> Arc<Self> {
        Arc::new(PreAuthGate {
            limits,
            total: AtomicUsize::new(0),
            by_source: Mutex::new(HashMap::new()),
        })
    }

    pub fn limits(&self) -> PreAuthLimits {
        self.limits
    }

    /// Unauthenticated connections held now.
    pub fn held(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// A slot for a new connection from `source`, or why it must be closed at once.
    pub fn enter(self: &Arc<Self>, source: IpAddr) -> Result<PreAuthSlot, DisconnectReason> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.limits.total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(DisconnectReason::TooManyUnauthenticated);
        }
        let mut by_source = self.sources();
        let n = by_source.entry(source).or_insert(0);
        if *n >= self.limits.per_source {
            drop(by_source);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(DisconnectReason::TooManyUnauthenticatedFromSource);
        }
        *n += 1;
        Ok(PreAuthSlot {
            gate: self.clone(),
            source,
            held: true,
        })
    }

    fn leave(&self, source: IpAddr) {
        let mut by_source = self.sources();
        if let Some(n) = by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&source);
            }
        }
        drop(by_source);
        self.total.fetch_sub(1, Ordering::AcqRel);
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // The map is consistent after every statement; a panic elsewhere cannot tear it.
        self.by_source.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PreAuthSlot {
    /// A slot that holds no place: for a session whose connection holds its place elsewhere
    /// (an AMQP connection's thread holds one for the whole connection until a put-token).
    pub fn none(gate: &Arc<PreAuthGate>) -> PreAuthSlot {
        PreAuthSlot {
            gate: gate.clone(),
            source: IpAddr::from([0, 0, 0, 0]),
            held: false,
        }
    }

    /// The connection authenticated: it no longer counts against the caps.
    pub fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.gate.leave(self.source);
        }
    }
}

impl Drop for PreAuthSlot {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn caps_total_and_per_source_and_gives_back_on_release_or_drop() {
        let gate = PreAuthGate::new(PreAuthLimits {
            total: 3,
            per_source: 2,
        });
        let a1 = gate.enter(ip(1)).expect("first");
        let mut a2 = gate.enter(ip(1)).expect("second from the same source");
        assert_eq!(
            gate.enter(ip(1)).expect_err("third from one source"),
            DisconnectReason::TooManyUnauthenticatedFromSource
        );
        let b1 = gate.enter(ip(2)).expect("another source");
        assert_eq!(
            gate.enter(ip(3)).expect_err("over the total"),
            DisconnectReason::TooManyUnauthenticated
        );
        assert_eq!(gate.held(), 3);
        a2.release();
        a2.release(); // twice is once
        assert_eq!(gate.held(), 2);
        let _a3 = gate.enter(ip(1)).expect("room again");
        drop(a1);
        drop(b1);
        assert_eq!(gate.held(), 1);
        assert_eq!(
            gate.sources().len(),
            1,
            "a source with none held is forgotten"
        );
    }
}
