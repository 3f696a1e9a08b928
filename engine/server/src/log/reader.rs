//! Reading the events log: partitions, records as JSON, and consumer-group checkpoints.
//! Used by the ops port's consumer API; runs off the shards.

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use rocksdb::{WriteOptions, DB};
use roost_model::{ArchivedMessage, Message};
use roost_registry::rocks::CF_META;
use serde::Serialize;
use serde_json::{Map, Value};

use super::batch;
use super::partition::decode_offset;

/// Bounds of one partition: records `first .. next` are stored.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: usize,
    pub first: u64,
    pub next: u64,
}

/// One record as the consumer API returns it.
#[derive(Debug, Serialize)]
pub struct Record {
    pub partition: usize,
    pub offset: u64,
    #[serde(rename = "enqueuedTime")]
    pub enqueued_time: String,
    pub body: String,
    #[serde(rename = "bodyEncoding")]
    pub body_encoding: &'static str,
    #[serde(rename = "systemProperties")]
    pub system_properties: Map<String, Value>,
    pub properties: Map<String, Value>,
}

/// The partitions of the log, in order.
pub fn partitions(db: &DB) -> Vec<PartitionInfo> {
    let mut out = Vec::new();
    for k in 0.. {
        let Some(cf) = db.cf_handle(&super::partition_cf(k)) else { break };
        let mut it = db.raw_iterator_cf(cf);
        it.seek_to_first();
        let first = it.key().and_then(decode_offset);
        it.seek_to_last();
        let next = match (it.key().and_then(decode_offset), it.value()) {
            (Some(last), Some(v)) => batch::count(v).ok().map(|n| last + n),
            _ => None,
        };
        let (first, next) = match (first, next) {
            (Some(f), Some(n)) => (f, n),
            _ => (0, 0),
        };
        out.push(PartitionInfo { partition: k, first, next });
    }
    out
}

/// Up to `max` records of `partition` from `from`; returns them and the offset to read next.
pub fn read_records(db: &DB, partition: usize, from: u64, max: usize) -> Result<(Vec<Record>, u64), String> {
    let cf = db.cf_handle(&super::partition_cf(partition)).ok_or_else(|| format!("no partition {partition}"))?;
    let mut out = Vec::new();
    let mut next = from;
    let mut it = db.raw_iterator_cf(cf);
    // The batch holding `from` starts at or before it.
    it.seek_for_prev(from.to_be_bytes());
    if !it.valid() {
        it.seek_to_first();
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    while out.len() < max {
        let (Some(key), Some(value)) = (it.key(), it.value()) else { break };
        let first = decode_offset(key).ok_or("corrupt offset key")?;
        for (i, record) in batch::records(value).enumerate() {
            let offset = first + i as u64;
            let record = record.map_err(|e| format!("partition {partition} at {first}: {e}"))?;
            if offset < from {
                continue;
            }
            if out.len() >= max {
                break;
            }
            aligned.clear();
            aligned.extend_from_slice(record);
            let view = Message::view(&aligned).map_err(|e| format!("corrupt record at {partition}/{offset}: {e}"))?;
            out.push(to_record(partition, offset, view));
            next = offset + 1;
        }
        it.next();
    }
    it.status().map_err(|e| e.to_string())?;
    Ok((out, next))
}

fn iso_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn to_record(partition: usize, offset: u64, m: &ArchivedMessage) -> Record {
    let s = &m.system;
    let mut sys = Map::new();
    let mut put = |k: &str, v: Option<&str>| {
        if let Some(v) = v {
            sys.insert(k.to_string(), Value::String(v.to_string()));
        }
    };
    put("message-id", s.message_id.as_deref());
    put("correlation-id", s.correlation_id.as_deref());
    put("user-id", s.user_id.as_deref());
    put("content-type", s.content_type.as_deref());
    put("content-encoding", s.content_encoding.as_deref());
    put("absolute-expiry-time", s.expiry.as_deref());
    put("iothub-outputname", s.output_name.as_deref());
    put("iothub-interface-id", s.interface_id.as_deref());
    put("iothub-creation-time-utc", s.creation_time.as_deref());
    put("dt-subject", s.subject.as_deref());
    put("iothub-connection-device-id", Some(s.connection_device_id.as_str()));
    put("iothub-connection-module-id", s.connection_module_id.as_deref());
    put("iothub-connection-auth-generation-id", Some(s.auth_generation_id.as_str()));
    put("iothub-connection-auth-method", Some(s.auth_method.as_str()));
    put("dt-dataschema", s.data_schema.as_deref());
    let enqueued = iso_ms(m.enqueued_ms.to_native());
    put("iothub-enqueuedtime", Some(&enqueued));
    put("iothub-message-source", Some(m.source.as_str()));
    let properties = m.app.iter().map(|kv| (kv.0.to_string(), Value::String(kv.1.to_string()))).collect();
    let (body, body_encoding) = match std::str::from_utf8(m.body.as_slice()) {
        Ok(text) => (text.to_string(), "utf-8"),
        Err(_) => (base64::engine::general_purpose::STANDARD.encode(m.body.as_slice()), "base64"),
    };
    Record {
        partition,
        offset,
        enqueued_time: enqueued,
        body,
        body_encoding,
        system_properties: sys,
        properties,
    }
}

fn checkpoint_key(group: &str, partition: usize) -> Vec<u8> {
    format!("cg/{group}/{partition}").into_bytes()
}

/// The next offset consumer group `group` will read in `partition`, if it has checkpointed.
pub fn checkpoint(db: &DB, group: &str, partition: usize) -> Result<Option<u64>, String> {
    let cf = db.cf_handle(CF_META).ok_or("missing meta column family")?;
    match db.get_cf(cf, checkpoint_key(group, partition)).map_err(|e| e.to_string())? {
        Some(v) => Ok(Some(u64::from_le_bytes(v.as_slice().try_into().map_err(|_| "corrupt checkpoint")?))),
        None => Ok(None),
    }
}

/// Persists (synced) the next offsets of consumer group `group`.
pub fn commit_checkpoint(db: &DB, group: &str, positions: &[(usize, u64)]) -> Result<(), String> {
    let cf = db.cf_handle(CF_META).ok_or("missing meta column family")?;
    let mut batch = rocksdb::WriteBatch::default();
    for (p, next) in positions {
        batch.put_cf(cf, checkpoint_key(group, *p), next.to_le_bytes());
    }
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(batch, &opts).map_err(|e| e.to_string())
}
