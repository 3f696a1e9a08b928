//! Persistent sessions (spec §2.3, MQTT CleanSession=0): what each client id subscribed to
//! outlives its connection — across reconnects, to any shard, and across engine restarts —
//! because the Python SDK never subscribes again after it reconnects (to renew its token, for
//! one). A CONNECT with CleanSession=0 resumes the client's subscriptions and is answered with
//! session-present; CleanSession=1 forgets them and starts empty.
//!
//! Engine-wide (a client may come back on another shard), behind a lock taken only at CONNECT
//! and SUBSCRIBE/UNSUBSCRIBE, and written through to the engine's `SessionStore` on every
//! change. Only authenticated identities have sessions, so the table is bounded by the registry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use roost_iothub::topic::DeviceFilter;
use roost_mqtt::QoS;
use roost_storage::SessionStore;

/// The device-bound filters a session subscribed to, with the QoS granted for each.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
pub struct Subscriptions([Option<QoS>; DeviceFilter::ALL.len()]);

/// First byte of an encoded [`Subscriptions`].
const FORMAT: u8 = 1;

impl Subscriptions {
    pub fn set(&mut self, filter: DeviceFilter, qos: Option<QoS>) {
        self.0[filter.index()] = qos;
    }

    pub fn qos(&self, filter: DeviceFilter) -> Option<QoS> {
        self.0[filter.index()]
    }

    /// One byte per filter: 0 or 1 for the QoS granted, 0xff for none.
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        out.extend(self.0.iter().map(|q| match q {
            None => 0xff,
            Some(QoS::AtMostOnce) => 0,
            Some(_) => 1,
        }));
        out
    }

    /// `None` for a value this engine did not write (another format, a corrupt record).
    fn decode(bytes: &[u8]) -> Option<Self> {
        let (&format, rest) = bytes.split_first()?;
        if format != FORMAT || rest.len() != DeviceFilter::ALL.len() {
            return None;
        }
        let mut s = Self::default();
        for (slot, b) in s.0.iter_mut().zip(rest) {
            *slot = match b {
                0xff => None,
                0 => Some(QoS::AtMostOnce),
                1 => Some(QoS::AtLeastOnce),
                _ => return None,
            };
        }
        Some(s)
    }
}

pub struct Sessions {
    table: Mutex<HashMap<String, Subscriptions>>,
    store: Arc<dyn SessionStore>,
}

impl Sessions {
    /// The sessions `store` holds; a record that cannot be read is reported and dropped.
    pub fn load(store: Arc<dyn SessionStore>) -> anyhow::Result<Self> {
        let mut table = HashMap::new();
        for (client_id, bytes) in store.load_sessions()? {
            match Subscriptions::decode(&bytes) {
                Some(s) => {
                    table.insert(client_id, s);
                }
                None => {
                    tracing::warn!(client = %client_id, "unreadable persistent session dropped");
                    let _ = store.delete_session(&client_id);
                }
            }
        }
        Ok(Self {
            table: Mutex::new(table),
            store,
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Subscriptions>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.table().len()
    }

    pub fn is_empty(&self) -> bool {
        self.table().is_empty()
    }

    /// A CONNECT of `client_id`: with CleanSession=0 its stored subscriptions (`None`: no
    /// session, which CONNACK says); with CleanSession=1 the stored ones are forgotten.
    pub fn on_connect(&self, client_id: &str, clean_session: bool) -> Option<Subscriptions> {
        if !clean_session {
            return self.table().get(client_id).copied();
        }
        if self.table().remove(client_id).is_some() {
            if let Err(e) = self.store.delete_session(client_id) {
                tracing::warn!(error = %e, "forgetting a persistent session failed");
            }
        }
        None
    }

    /// `client_id`'s subscriptions changed (a persistent session's only).
    pub fn save(&self, client_id: &str, subscriptions: &Subscriptions) {
        let mut table = self.table();
        if table.get(client_id) == Some(subscriptions) {
            return;
        }
        table.insert(client_id.to_string(), *subscriptions);
        // Written under the lock, so the store gets changes in the order the table did.
        if let Err(e) = self.store.save_session(client_id, &subscriptions.encode()) {
            tracing::warn!(error = %e, "saving a persistent session failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use roost_storage::MemStore;

    use super::*;

    #[test]
    fn subscriptions_survive_a_reload_and_clean_session_forgets_them() {
        let store = Arc::new(MemStore::new(1));
        let sessions = Sessions::load(store.clone()).unwrap();
        assert_eq!(sessions.on_connect("d1", false), None, "no session yet");
        let mut subs = Subscriptions::default();
        subs.set(DeviceFilter::Methods, Some(QoS::AtLeastOnce));
        subs.set(DeviceFilter::TwinResponses, Some(QoS::AtMostOnce));
        sessions.save("d1", &subs);
        sessions.save("d1/m", &Subscriptions::default());
        // An engine restart: the same from the store.
        let again = Sessions::load(store.clone()).unwrap();
        assert_eq!(again.on_connect("d1", false), Some(subs));
        assert_eq!(again.len(), 2);
        assert_eq!(again.on_connect("d1", true), None);
        assert_eq!(
            again.on_connect("d1", false),
            None,
            "CleanSession=1 forgot it"
        );
        assert_eq!(Sessions::load(store.clone()).unwrap().len(), 1);
        // A record this engine cannot read is dropped, not trusted.
        store.save_session("d2", &[9, 9]).unwrap();
        let loaded = Sessions::load(store.clone()).unwrap();
        assert_eq!(loaded.on_connect("d2", false), None);
        assert_eq!(store.load_sessions().unwrap().len(), 1);
        assert_eq!(Subscriptions::decode(&subs.encode()), Some(subs));
    }
}
