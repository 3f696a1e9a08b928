//! The control plane's store: device identities (JSON), the ordered log of registry changes the
//! engines replicate, and the shared access policies — in one RocksDB.
//!
//! Every write that changes what engines see appends to the change log in the same synced
//! batch, so the log and the devices never disagree after a crash.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use roost_model::link::{DeviceAuth, RegistryChange};
use tokio::sync::broadcast;

use crate::device::{Device, Module};
use crate::policies::{self, Policy};
use crate::twins::StoredTwin;

const CF_DEVICES: &str = "devices";
const CF_CHANGES: &str = "changes";
const CF_META: &str = "meta";
/// Twins by client id (`device`; `device/module` for module twins), JSON of `StoredTwin`.
const CF_TWINS: &str = "twins";
/// Cloud-to-device queues: `device_id \0 lock(be u64)` → JSON of a queued message.
const CF_C2D: &str = "c2d";
/// Feedback records for the service: `seq(be u64)` → JSON of one record.
const CF_FEEDBACK: &str = "feedback";
/// Module identities: `device/module` → JSON of `Module`.
const CF_MODULES: &str = "modules";
/// Jobs by id (`jobs.rs`'s `StoredJob`).
const CF_JOBS: &str = "jobs";
/// What each job did on each device, keyed `device\0job` (the rows of `devices.jobs`).
const CF_DEVICE_JOBS: &str = "device_jobs";
/// Automatic device management configurations by id (`configurations.rs`).
const CF_CONFIGURATIONS: &str = "configurations";
/// The hub's own events waiting to reach an engine's `events` log (`events.rs`), by sequence.
const CF_EVENTS_OUT: &str = "events_out";
/// The provisioning service's enrollments and registration states (`dps/`), by kind-prefixed
/// key.
const CF_DPS: &str = "dps";
/// File-upload notifications waiting for the service (`files.rs`), by sequence.
const CF_FILE_NOTIFICATIONS: &str = "file_notifications";

/// A queue of records the service reads over AMQP in order: C2D feedback, file-upload
/// notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceQueue {
    Feedback,
    FileNotifications,
}

impl ServiceQueue {
    fn cf(self) -> &'static str {
        match self {
            ServiceQueue::Feedback => CF_FEEDBACK,
            ServiceQueue::FileNotifications => CF_FILE_NOTIFICATIONS,
        }
    }
}
const SEQ_KEY: &[u8] = b"registry_seq";
const POLICIES_KEY: &[u8] = b"policies";
const ETAG_KEY: &[u8] = b"etag_counter";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
}

pub struct Store {
    db: DB,
    /// Serializes writers so sequence numbers and etags are handed out in order.
    write_lock: Mutex<()>,
    changes: broadcast::Sender<(u64, RegistryChange)>,
    /// The sequence of the next event written to the outbox.
    next_event: std::sync::atomic::AtomicU64,
}

impl Store {
    pub fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = [
            CF_DEVICES,
            CF_CHANGES,
            CF_META,
            CF_TWINS,
            CF_C2D,
            CF_FEEDBACK,
            CF_MODULES,
            CF_JOBS,
            CF_DEVICE_JOBS,
            CF_EVENTS_OUT,
            CF_CONFIGURATIONS,
            CF_DPS,
            CF_FILE_NOTIFICATIONS,
        ]
        .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let (changes, _) = broadcast::channel(4096);
        let next_event = {
            let mut it = db.iterator_cf(
                db.cf_handle(CF_EVENTS_OUT).expect("created at open"),
                IteratorMode::End,
            );
            match it.next() {
                Some(item) => {
                    let (k, _) = item?;
                    let mut be = [0u8; 8];
                    be.copy_from_slice(&k[..8.min(k.len())]);
                    u64::from_be_bytes(be) + 1
                }
                None => 0,
            }
        };
        let store = Arc::new(Self {
            db,
            write_lock: Mutex::new(()),
            changes,
            next_event: std::sync::atomic::AtomicU64::new(next_event),
        });
        if store.meta(POLICIES_KEY)?.is_none() {
            let json = serde_json::to_vec(&policies::defaults())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            store.put_meta(POLICIES_KEY, &json)?;
        }
        Ok(store)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_META), key)?)
    }

    fn put_meta(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        Ok(self.db.put_cf_opt(self.cf(CF_META), key, value, &opts)?)
    }

    fn u64_meta(&self, key: &[u8]) -> Result<u64, StoreError> {
        match self.meta(key)? {
            Some(v) => Ok(u64::from_le_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("counter".into()))?,
            )),
            None => Ok(0),
        }
    }

    pub fn policies(&self) -> Result<Vec<Policy>, StoreError> {
        let raw = self.meta(POLICIES_KEY)?.unwrap_or_default();
        serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    pub fn policy(&self, name: &str) -> Result<Option<Policy>, StoreError> {
        Ok(self.policies()?.into_iter().find(|p| p.name == name))
    }

    /// The sequence of the last registry change.
    pub fn registry_seq(&self) -> Result<u64, StoreError> {
        self.u64_meta(SEQ_KEY)
    }

    pub fn device(&self, id: &str) -> Result<Option<Device>, StoreError> {
        match self.db.get_cf(self.cf(CF_DEVICES), id.as_bytes())? {
            Some(v) => Ok(Some(
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            )),
            None => Ok(None),
        }
    }

    pub fn devices(&self, limit: usize) -> Result<Vec<Device>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_DEVICES), IteratorMode::Start)
            .take(limit)
        {
            let (_, v) = item?;
            out.push(serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// Up to `limit` devices with ids after `after` (all when `None`), in id order: the pages
    /// of a scan (queries, jobs).
    pub fn devices_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Device>, StoreError> {
        self.scan_after(CF_DEVICES, after, limit)
    }

    /// Up to `limit` modules with client ids (`device/module`) after `after`, in that order.
    pub fn modules_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Module>, StoreError> {
        self.scan_after(CF_MODULES, after, limit)
    }

    fn scan_after<T: serde::de::DeserializeOwned>(
        &self,
        cf: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<T>, StoreError> {
        Ok(self
            .scan_keyed_after(cf, after, limit)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// Up to `limit` rows of `cf` with keys after `after`, decoded, each with its key.
    fn scan_keyed_after<T: serde::de::DeserializeOwned>(
        &self,
        cf: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let mode = match after {
            Some(a) => IteratorMode::From(a.as_bytes(), Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(cf), mode) {
            let (k, v) = item?;
            if after.is_some_and(|a| *k == *a.as_bytes()) {
                continue;
            }
            out.push((String::from_utf8_lossy(&k).into_owned(), decode(&v)?));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Every row of `cf` whose key starts with `prefix`, decoded, each with its key.
    fn scan_prefix<T: serde::de::DeserializeOwned>(
        &self,
        cf: &str,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(cf),
            IteratorMode::From(prefix.as_bytes(), Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            out.push((String::from_utf8_lossy(&k).into_owned(), decode(&v)?));
        }
        Ok(out)
    }

    /// Up to `limit` events of the outbox, oldest first, with their sequence numbers.
    pub fn events_out(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_EVENTS_OUT), IteratorMode::Start)
            .take(limit)
        {
            let (k, v) = item?;
            let mut be = [0u8; 8];
            be.copy_from_slice(&k[..8.min(k.len())]);
            out.push((u64::from_be_bytes(be), v.to_vec()));
        }
        Ok(out)
    }

    /// Forgets events of the outbox (they are in an engine's log).
    pub fn delete_events(&self, seqs: &[u64]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for s in seqs {
            batch.delete_cf(self.cf(CF_EVENTS_OUT), s.to_be_bytes());
        }
        Ok(self.db.write(batch)?)
    }

    /// Writes one event to the outbox on its own, not synced: a connection state, written on
    /// the link's task for every connect and disconnect (a power loss may cost the last few; a
    /// kill costs none).
    pub fn put_event(&self, event: &[u8]) -> Result<(), StoreError> {
        let seq = self
            .next_event
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self
            .db
            .put_cf(self.cf(CF_EVENTS_OUT), seq.to_be_bytes(), event)?)
    }

    /// The routing in force (`routes::StoredRouting` as JSON), if one was ever applied.
    pub fn routing(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.meta(b"routing")
    }

    /// Stores the routing in force, synced.
    pub fn put_routing(&self, json: &[u8]) -> Result<(), StoreError> {
        self.put_meta(b"routing", json)
    }

    /// The Event Hubs consumer groups created besides `$Default` (a JSON list), if any.
    pub fn consumer_groups(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.meta(b"consumer_groups")
    }

    /// Stores the consumer groups, synced.
    pub fn put_consumer_groups(&self, json: &[u8]) -> Result<(), StoreError> {
        self.put_meta(b"consumer_groups", json)
    }

    /// A value of the meta column family (a key the process made for itself).
    pub fn meta_value(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.meta(key)
    }

    /// Stores a value in the meta column family, synced.
    pub fn put_meta_value(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.put_meta(key, value)
    }

    /// A provisioning record (JSON, `dps/`).
    pub fn dps(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_DPS), key.as_bytes())?)
    }

    /// Writes (or with `None` deletes) a provisioning record, synced.
    pub fn put_dps(&self, key: &str, json: Option<&[u8]>) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let cf = self.cf(CF_DPS);
        match json {
            Some(j) => self.db.put_cf_opt(cf, key.as_bytes(), j, &opts)?,
            None => self.db.delete_cf_opt(cf, key.as_bytes(), &opts)?,
        }
        Ok(())
    }

    /// Up to `limit` provisioning records whose keys start with `prefix`, after the key
    /// `after` (a page's continuation), in key order.
    pub fn dps_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let from = after.unwrap_or(prefix);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_DPS),
            IteratorMode::From(from.as_bytes(), Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(prefix.as_bytes()) || out.len() >= limit {
                break;
            }
            if after.is_some_and(|a| *k == *a.as_bytes()) {
                continue;
            }
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// The CA certificates (JSON, `cas.rs`).
    pub fn cas(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.meta(b"cas")
    }

    /// Stores the CA certificates, synced.
    pub fn put_cas(&self, json: &[u8]) -> Result<(), StoreError> {
        self.put_meta(b"cas", json)
    }

    /// A configuration, stored as JSON.
    pub fn configuration(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_CONFIGURATIONS), id.as_bytes())?)
    }

    /// Every configuration, in id order.
    pub fn configurations(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_CONFIGURATIONS), IteratorMode::Start)
        {
            out.push(item?.1.to_vec());
        }
        Ok(out)
    }

    /// Writes (`Some`) or deletes (`None`) a configuration, synced.
    pub fn put_configuration(&self, id: &str, json: Option<&[u8]>) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let mut batch = WriteBatch::default();
        match json {
            Some(j) => batch.put_cf(self.cf(CF_CONFIGURATIONS), id.as_bytes(), j),
            None => batch.delete_cf(self.cf(CF_CONFIGURATIONS), id.as_bytes()),
        }
        Ok(self.db.write_opt(batch, &opts)?)
    }

    /// A job, stored as JSON.
    pub fn job(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_JOBS), id.as_bytes())?)
    }

    /// Every job, in id order.
    pub fn jobs(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_JOBS), IteratorMode::Start) {
            out.push(item?.1.to_vec());
        }
        Ok(out)
    }

    /// Writes a job and, in the same batch, its records of devices done (`device\0job` keys).
    pub fn put_job(
        &self,
        id: &str,
        job: &[u8],
        device_jobs: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_JOBS), id.as_bytes(), job);
        for (k, v) in device_jobs {
            batch.put_cf(self.cf(CF_DEVICE_JOBS), k.as_bytes(), v);
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        Ok(self.db.write_opt(batch, &opts)?)
    }

    /// Up to `limit` device job records after key `after`, with their keys.
    pub fn device_jobs_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        self.scan_keyed_after(CF_DEVICE_JOBS, after, limit)
    }

    /// Every job record of `device_id`, with their keys.
    pub fn device_jobs_of(
        &self,
        device_id: &str,
    ) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        self.scan_prefix(CF_DEVICE_JOBS, &format!("{device_id}\0"))
    }

    /// Module `module_id` of `device_id`.
    pub fn module(&self, device_id: &str, module_id: &str) -> Result<Option<Module>, StoreError> {
        let key = format!("{device_id}/{module_id}");
        match self.db.get_cf(self.cf(CF_MODULES), key.as_bytes())? {
            Some(v) => Ok(Some(
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            )),
            None => Ok(None),
        }
    }

    /// Every module of `device_id`, by module id.
    pub fn modules_of(&self, device_id: &str) -> Result<Vec<Module>, StoreError> {
        Ok(self
            .scan_prefix(CF_MODULES, &format!("{device_id}/"))?
            .into_iter()
            .map(|(_, m)| m)
            .collect())
    }

    fn all_modules(&self) -> Result<Vec<Module>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_MODULES), IteratorMode::Start)
        {
            let (_, v) = item?;
            out.push(serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// Updates a module's connection state or activity without changing its etag.
    pub fn touch_module(
        &self,
        device_id: &str,
        module_id: &str,
        f: impl FnOnce(&mut Module),
    ) -> Result<(), StoreError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut m) = self.module(device_id, module_id)? else {
            return Ok(());
        };
        f(&mut m);
        let json = serde_json::to_vec(&m).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(self
            .db
            .put_cf(self.cf(CF_MODULES), m.client_id().as_bytes(), json)?)
    }

    /// The stored twin of `client_id`, if it has one.
    pub fn twin(&self, client_id: &str) -> Result<Option<StoredTwin>, StoreError> {
        match self.db.get_cf(self.cf(CF_TWINS), client_id.as_bytes())? {
            Some(v) => Ok(Some(
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            )),
            None => Ok(None),
        }
    }

    /// Writes `client_id`'s twin (synced). Twins are not in the registry change log.
    pub fn put_twin(&self, client_id: &str, twin: &StoredTwin) -> Result<(), StoreError> {
        let mut w = self.writes();
        w.put_twin(client_id, twin)?;
        w.commit()
    }

    /// The next value of the counter `key` in meta (not synced: a counter's gaps are fine, and
    /// what it numbers is written synced after).
    pub fn next_counter(&self, key: &[u8]) -> Result<u64, StoreError> {
        let n = self.u64_meta(key)? + 1;
        self.db.put_cf(self.cf(CF_META), key, n.to_le_bytes())?;
        Ok(n)
    }

    /// Writes (synced) `value` under `key` in the C2D queues (`Some`), or deletes it (`None`).
    pub fn c2d_write(&self, writes: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for (key, value) in writes {
            match value {
                Some(v) => batch.put_cf(self.cf(CF_C2D), key, v),
                None => batch.delete_cf(self.cf(CF_C2D), key),
            }
        }
        self.write_synced(batch)
    }

    /// Every entry of the C2D queues whose key starts with `prefix` (all of them for an empty
    /// prefix), in key order.
    pub fn c2d_scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_C2D),
            IteratorMode::From(prefix, Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Appends records to `queue` (synced) under the keys given.
    pub fn queue_put(&self, queue: ServiceQueue, records: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for (seq, v) in records {
            batch.put_cf(self.cf(queue.cf()), seq.to_be_bytes(), v);
        }
        self.write_synced(batch)
    }

    /// Up to `max` records of `queue`, oldest first.
    pub fn queue_list(&self, queue: ServiceQueue, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(queue.cf()), IteratorMode::Start)
            .take(max)
        {
            let (k, v) = item?;
            let seq = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("queue key".into()))?,
            );
            out.push((seq, v.to_vec()));
        }
        Ok(out)
    }

    /// Deletes the records of `queue` up to and including `seq`.
    pub fn queue_delete_through(&self, queue: ServiceQueue, seq: u64) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(queue.cf()),
            0u64.to_be_bytes(),
            seq.saturating_add(1).to_be_bytes(),
        );
        self.write_synced(batch)
    }

    fn write_synced(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        Ok(self.db.write_opt(batch, &opts)?)
    }

    /// A fresh etag (base64 of a counter, like IoT Hub's).
    pub fn next_etag(&self) -> Result<String, StoreError> {
        use base64::Engine as _;
        let n = self.u64_meta(ETAG_KEY)? + 1;
        self.put_meta(ETAG_KEY, &n.to_le_bytes())?;
        Ok(base64::engine::general_purpose::STANDARD.encode(n.to_string()))
    }

    /// Runs `f` with the writer lock held: the read-check-write of a REST call is atomic.
    pub fn exclusive<T>(&self, f: impl FnOnce() -> T) -> T {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        f()
    }

    /// Writes a device and, when `change` is set, appends it to the registry log (one batch).
    pub fn put_device(&self, device: &Device, change: bool) -> Result<(), StoreError> {
        let mut w = self.writes();
        w.put(device, change)?;
        w.commit()
    }

    pub fn delete_device(&self, id: &str) -> Result<(), StoreError> {
        let mut w = self.writes();
        w.delete(id)?;
        w.commit()
    }

    /// A group of device writes committed as one synced batch (bulk operations).
    pub fn writes(&self) -> Writes<'_> {
        Writes {
            store: self,
            batch: WriteBatch::default(),
            changes: Vec::new(),
        }
    }

    /// New registry changes as they are committed.
    pub fn subscribe(&self) -> broadcast::Receiver<(u64, RegistryChange)> {
        self.changes.subscribe()
    }

    /// Changes after `from_seq` up to and including `to_seq`, or None if the log lacks some.
    pub fn changes_between(
        &self,
        from_seq: u64,
        to_seq: u64,
    ) -> Result<Option<Vec<RegistryChange>>, StoreError> {
        let start = (from_seq + 1).to_be_bytes();
        let mut out = Vec::new();
        let mut expect = from_seq + 1;
        for item in self.db.iterator_cf(
            self.cf(CF_CHANGES),
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (k, v) = item?;
            let seq = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("change key".into()))?,
            );
            if seq > to_seq {
                break;
            }
            if seq != expect {
                return Ok(None);
            }
            let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(v.len());
            aligned.extend_from_slice(&v);
            out.push(
                rkyv::from_bytes::<RegistryChange, rkyv::rancor::Error>(&aligned)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            );
            expect += 1;
        }
        Ok((expect == to_seq + 1).then_some(out))
    }

    /// Every device's data-plane view and the sequence it is complete up to.
    pub fn snapshot(&self) -> Result<(u64, Vec<DeviceAuth>), StoreError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.registry_seq()?;
        let mut out = Vec::new();
        for d in self.devices(usize::MAX)? {
            let mut auth = d.auth();
            auth.twin = self.twin_view(&d.device_id)?;
            out.push(auth);
        }
        for m in self.all_modules()? {
            let mut auth = m.auth();
            auth.twin = self.twin_view(&m.client_id())?;
            out.push(auth);
        }
        Ok((seq, out))
    }

    /// `client_id`'s twin, or an empty one (no etag) for an identity registered before twins
    /// existed.
    pub fn twin_or_empty(&self, client_id: &str) -> Result<StoredTwin, StoreError> {
        Ok(self
            .twin(client_id)?
            .unwrap_or_else(|| StoredTwin::new(String::new(), roost_twin::Twin::new(0))))
    }

    /// What routing reads of `client_id`'s twin (`roost_twin::Twin::routing_view`).
    pub fn twin_view(&self, client_id: &str) -> Result<String, StoreError> {
        Ok(self
            .twin(client_id)?
            .map_or_else(String::new, |t| t.twin.routing_view()))
    }

    /// Updates connection state or activity without changing the etag or the registry log.
    pub fn touch(&self, id: &str, f: impl FnOnce(&mut Device)) -> Result<(), StoreError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut d) = self.device(id)? else {
            return Ok(());
        };
        f(&mut d);
        let json = serde_json::to_vec(&d).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(self.db.put_cf(self.cf(CF_DEVICES), id.as_bytes(), json)?)
    }
}

/// Device writes that commit together, with their registry changes in order.
pub struct Writes<'a> {
    store: &'a Store,
    batch: WriteBatch,
    changes: Vec<RegistryChange>,
}

impl Writes<'_> {
    pub fn put(&mut self, device: &Device, change: bool) -> Result<(), StoreError> {
        let json = serde_json::to_vec(device).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.batch
            .put_cf(self.store.cf(CF_DEVICES), device.device_id.as_bytes(), json);
        if change {
            let mut auth = device.auth();
            auth.twin = self.store.twin_view(&device.device_id)?;
            self.changes.push(RegistryChange::Upsert(auth));
        }
        Ok(())
    }

    /// A registry change of its own: an identity's tags changed (the engines' view of them).
    pub fn upsert_auth(&mut self, auth: roost_model::link::DeviceAuth) {
        self.changes.push(RegistryChange::Upsert(auth));
    }

    /// Adds an event to the outbox, in the same batch as the change it tells of.
    pub fn put_event(&mut self, event: &[u8]) {
        let seq = self
            .store
            .next_event
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.batch
            .put_cf(self.store.cf(CF_EVENTS_OUT), seq.to_be_bytes(), event);
    }

    pub fn put_twin(&mut self, client_id: &str, twin: &StoredTwin) -> Result<(), StoreError> {
        let json = serde_json::to_vec(twin).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.batch
            .put_cf(self.store.cf(CF_TWINS), client_id.as_bytes(), json);
        Ok(())
    }

    /// Writes a module and its registry change.
    pub fn put_module(&mut self, module: &Module) -> Result<(), StoreError> {
        let json = serde_json::to_vec(module).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.batch.put_cf(
            self.store.cf(CF_MODULES),
            module.client_id().as_bytes(),
            json,
        );
        let mut auth = module.auth();
        auth.twin = self.store.twin_view(&module.client_id())?;
        self.changes.push(RegistryChange::Upsert(auth));
        Ok(())
    }

    /// Deletes module `client_id` (`device/module`), with its twin.
    pub fn delete_module(&mut self, client_id: &str) {
        self.batch
            .delete_cf(self.store.cf(CF_MODULES), client_id.as_bytes());
        self.batch
            .delete_cf(self.store.cf(CF_TWINS), client_id.as_bytes());
        self.changes.push(RegistryChange::Delete {
            device_id: client_id.to_string(),
        });
    }

    /// Deletes a device, with its twin, its queue and its modules.
    pub fn delete(&mut self, id: &str) -> Result<(), StoreError> {
        for m in self.store.modules_of(id)? {
            self.delete_module(&m.client_id());
        }
        self.batch
            .delete_cf(self.store.cf(CF_DEVICES), id.as_bytes());
        self.batch.delete_cf(self.store.cf(CF_TWINS), id.as_bytes());
        // And its cloud-to-device queue: every key `id \0 …`.
        let mut from = id.as_bytes().to_vec();
        from.push(0);
        let mut to = id.as_bytes().to_vec();
        to.push(1);
        self.batch.delete_range_cf(self.store.cf(CF_C2D), from, to);
        self.changes.push(RegistryChange::Delete {
            device_id: id.to_string(),
        });
        Ok(())
    }

    /// Writes everything (synced) and then announces the changes to engine links.
    pub fn commit(mut self) -> Result<(), StoreError> {
        let store = self.store;
        let first = store.registry_seq()? + 1;
        for (i, change) in self.changes.iter().enumerate() {
            let seq = first + i as u64;
            let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(change)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            self.batch
                .put_cf(store.cf(CF_CHANGES), seq.to_be_bytes(), bytes.as_slice());
        }
        if !self.changes.is_empty() {
            let last = first + self.changes.len() as u64 - 1;
            self.batch
                .put_cf(store.cf(CF_META), SEQ_KEY, last.to_le_bytes());
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        store.db.write_opt(self.batch, &opts)?;
        for (i, change) in self.changes.into_iter().enumerate() {
            // No receivers is fine: engines catch up from the log when they connect.
            let _ = store.changes.send((first + i as u64, change));
        }
        Ok(())
    }
}

fn decode<T: serde::de::DeserializeOwned>(v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}
