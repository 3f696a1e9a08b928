//! Reading the events log: partitions, records as JSON, and consumer-group checkpoints.
//! Used by the ops port's consumer API; runs off the shards.

use rocksdb::{WriteOptions, DB};
use roost_model::Message;
use roost_registry::rocks::CF_META;
use serde::Serialize;

use super::batch;
use super::json::RecordsJson;
use super::partition::decode_offset;

/// Bounds of one partition: records `first .. next` are stored.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: usize,
    pub first: u64,
    pub next: u64,
}

/// The partitions of the log, in order.
pub fn partitions(db: &DB) -> Vec<PartitionInfo> {
    let mut out = Vec::new();
    for k in 0.. {
        let Some(cf) = db.cf_handle(&super::partition_cf(k)) else {
            break;
        };
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
        out.push(PartitionInfo {
            partition: k,
            first,
            next,
        });
    }
    out
}

/// Appends up to `max` records of `partition` from `from` to `out`; returns the offset to read
/// next.
pub fn read_records(
    db: &DB,
    partition: usize,
    from: u64,
    max: usize,
    out: &mut RecordsJson,
) -> Result<u64, String> {
    let cf = db
        .cf_handle(&super::partition_cf(partition))
        .ok_or_else(|| format!("no partition {partition}"))?;
    let mut taken = 0;
    let mut next = from;
    let mut it = db.raw_iterator_cf(cf);
    // The batch holding `from` starts at or before it.
    it.seek_for_prev(from.to_be_bytes());
    if !it.valid() {
        it.seek_to_first();
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    while taken < max {
        let (Some(key), Some(value)) = (it.key(), it.value()) else {
            break;
        };
        let first = decode_offset(key).ok_or("corrupt offset key")?;
        for (i, record) in batch::records(value).enumerate() {
            let offset = first + i as u64;
            let record = record.map_err(|e| format!("partition {partition} at {first}: {e}"))?;
            if offset < from {
                continue;
            }
            if taken >= max {
                break;
            }
            aligned.clear();
            aligned.extend_from_slice(record);
            let view = Message::view(&aligned)
                .map_err(|e| format!("corrupt record at {partition}/{offset}: {e}"))?;
            out.push(partition, offset, view);
            taken += 1;
            next = offset + 1;
        }
        it.next();
    }
    it.status().map_err(|e| e.to_string())?;
    Ok(next)
}

fn checkpoint_key(group: &str, partition: usize) -> Vec<u8> {
    format!("cg/{group}/{partition}").into_bytes()
}

/// The next offset consumer group `group` will read in `partition`, if it has checkpointed.
pub fn checkpoint(db: &DB, group: &str, partition: usize) -> Result<Option<u64>, String> {
    let cf = db.cf_handle(CF_META).ok_or("missing meta column family")?;
    match db
        .get_cf(cf, checkpoint_key(group, partition))
        .map_err(|e| e.to_string())?
    {
        Some(v) => Ok(Some(u64::from_le_bytes(
            v.as_slice().try_into().map_err(|_| "corrupt checkpoint")?,
        ))),
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
