//! The engine-wide directory: which shard and connection hold each client id (`device` or
//! `device/module`). Kept by one owner off the shards (the engine's router task), fed by the
//! shards' claims and releases in the order they happened; commands from control are routed
//! with it, and a claim that replaces a connection on another shard is answered with a kick.

use std::collections::BTreeMap;

/// Where a client id is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub shard: usize,
    /// The connection's engine-wide id.
    pub conn: u64,
}

#[derive(Debug, Default)]
pub struct Directory {
    // Ordered, so the clients of one device (`d`, `d/m1`, `d/m2`) are one range.
    clients: BTreeMap<String, Holder>,
    /// The CA each client authenticated through, for those whose certificate chained to one
    /// (`x509::ca_id`).
    anchored: BTreeMap<String, String>,
}

impl Directory {
    /// `holder` is now `client_id`'s connection, authenticated through the CA `ca` if any;
    /// returns the connection it replaces, which must be closed (one connection per identity,
    /// spec §2.3).
    pub fn claim(&mut self, client_id: &str, holder: Holder, ca: Option<String>) -> Option<Holder> {
        match ca {
            Some(ca) => self.anchored.insert(client_id.to_string(), ca),
            None => self.anchored.remove(client_id),
        };
        match self.clients.insert(client_id.to_string(), holder) {
            Some(old) if old.conn != holder.conn => Some(old),
            _ => None,
        }
    }

    /// The connections authenticated through a CA that `trusted` no longer holds.
    pub fn anchored_outside(&self, trusted: &[String]) -> Vec<Holder> {
        self.anchored
            .iter()
            .filter(|(_, ca)| !trusted.contains(ca))
            .filter_map(|(client, _)| self.clients.get(client).copied())
            .collect()
    }

    /// Connection `conn` of `client_id` ended. A release from a connection that was already
    /// replaced changes nothing. Returns whether it was the holder.
    pub fn release(&mut self, client_id: &str, conn: u64) -> bool {
        if self.clients.get(client_id).is_some_and(|h| h.conn == conn) {
            self.clients.remove(client_id);
            self.anchored.remove(client_id);
            return true;
        }
        false
    }

    pub fn lookup(&self, client_id: &str) -> Option<Holder> {
        self.clients.get(client_id).copied()
    }

    /// Every connected client of `device_id`: the device itself and its modules.
    pub fn clients_of_device<'a>(
        &'a self,
        device_id: &'a str,
    ) -> impl Iterator<Item = (&'a str, Holder)> + 'a {
        let modules_from = format!("{device_id}/");
        self.clients
            .get_key_value(device_id)
            .into_iter()
            .chain(
                self.clients
                    .range(modules_from.clone()..)
                    .take_while(move |(k, _)| k.starts_with(&modules_from)),
            )
            .map(|(k, h)| (k.as_str(), *h))
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(shard: usize, conn: u64) -> Holder {
        Holder { shard, conn }
    }

    #[test]
    fn a_device_and_its_module_are_different_clients() {
        let mut d = Directory::default();
        assert_eq!(d.claim("dev", h(0, 1), None), None);
        assert_eq!(
            d.claim("dev/mod", h(1, 2), None),
            None,
            "a module does not replace its device"
        );
        assert_eq!(d.lookup("dev"), Some(h(0, 1)));
        assert_eq!(d.lookup("dev/mod"), Some(h(1, 2)));
        assert_eq!(
            d.claim("dev", h(1, 3), None),
            Some(h(0, 1)),
            "the same client id does"
        );
        let clients: Vec<_> = d.clients_of_device("dev").collect();
        assert_eq!(clients, vec![("dev", h(1, 3)), ("dev/mod", h(1, 2))]);
        d.claim("dev2", h(0, 9), None);
        d.claim("dev-x", h(0, 10), None);
        assert_eq!(
            d.clients_of_device("dev").count(),
            2,
            "dev2 and dev-x are other devices"
        );
    }

    #[test]
    fn a_late_release_of_a_replaced_connection_keeps_the_new_one() {
        let mut d = Directory::default();
        d.claim("dev", h(0, 1), None);
        d.claim("dev", h(1, 2), None);
        assert!(!d.release("dev", 1));
        assert_eq!(d.lookup("dev"), Some(h(1, 2)));
        assert!(d.release("dev", 2));
        assert!(d.is_empty());
        assert_eq!(d.claim("dev", h(0, 5), None), None);
        assert_eq!(
            d.claim("dev", h(0, 5), None),
            None,
            "a repeated claim replaces nothing"
        );
    }

    #[test]
    fn connections_through_a_ca_no_longer_trusted_are_found() {
        let mut d = Directory::default();
        d.claim("a", h(0, 1), Some("ca1".into()));
        d.claim("b", h(1, 2), Some("ca2".into()));
        d.claim("c", h(0, 3), None);
        let trusted = ["ca2".to_string()];
        assert_eq!(d.anchored_outside(&trusted), vec![h(0, 1)]);
        // A reconnection by SAS forgets the CA; a release forgets the client.
        d.claim("a", h(0, 4), None);
        assert!(d.anchored_outside(&trusted).is_empty());
        assert!(d.release("b", 2));
        assert!(d.anchored_outside(&[]).is_empty());
    }
}
