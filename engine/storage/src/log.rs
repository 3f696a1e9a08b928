//! The `events` log as a trait: each partition is a sequence of records with dense offsets,
//! stored as values of back-to-back records ([`crate::batch`]) keyed by the offset of their
//! first record; consumer groups keep a next offset per partition.

use serde::Serialize;

use crate::batch;
use crate::json::RecordsJson;
use crate::record::RecordView;

/// Why the log could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// The underlying database failed.
    #[error("events log: {0}")]
    Db(String),
    #[error("no partition {0}")]
    NoPartition(usize),
    /// A stored key or value is not what this log writes.
    #[error("corrupt events log in partition {partition} at offset {offset}: {detail}")]
    Corrupt {
        partition: usize,
        offset: u64,
        detail: String,
    },
    /// A batch does not start at the partition's next offset.
    #[error("partition {partition}: batch at {first} does not follow {next}")]
    Gap {
        partition: usize,
        first: u64,
        next: u64,
    },
}

impl LogError {
    /// A stable label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            LogError::Db(_) => "db",
            LogError::NoPartition(_) => "no_partition",
            LogError::Corrupt { .. } => "corrupt",
            LogError::Gap { .. } => "gap",
        }
    }
}

/// Bounds of one partition: records `first .. next` are stored.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: usize,
    pub first: u64,
    pub next: u64,
}

/// Where the log's partitions and checkpoints are kept. Writes come from a shard's committer
/// (through a blocking pool, never on the shard itself); reads from the ops port.
pub trait LogStore: Send + Sync {
    /// How many partitions exist (they are numbered from 0).
    fn partition_count(&self) -> usize;
    /// The offset the next record of `partition` gets (0 when empty).
    fn next_offset(&self, partition: usize) -> Result<u64, LogError>;
    /// Stores one commit of `partition` with a single durable write: `records` in the
    /// [`batch`] format, the first at offset `first`. `sync` forces it to stable storage.
    fn write_batch(
        &self,
        partition: usize,
        first: u64,
        records: &[u8],
        sync: bool,
    ) -> Result<(), LogError>;
    /// Calls `visit(first_offset, value)` for the stored value holding `from` and every later
    /// one, in order, until `visit` returns false.
    fn scan(
        &self,
        partition: usize,
        from: u64,
        visit: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), LogError>;
    /// The next offset consumer group `group` will read in `partition`, if it has checkpointed.
    fn checkpoint(&self, group: &str, partition: usize) -> Result<Option<u64>, LogError>;
    /// Persists (synced) the next offsets of consumer group `group`.
    fn commit_checkpoint(&self, group: &str, positions: &[(usize, u64)]) -> Result<(), LogError>;
    /// Every checkpoint: (group, partition, next offset).
    fn checkpoints(&self) -> Result<Vec<(String, usize, u64)>, LogError>;
    /// Deletes the stored values of `partition` whose records all come before `offset`: whole
    /// values only (the one holding `offset` stays), and never the newest value, which the
    /// partition's next offset is counted from. Reads from before the new first offset start
    /// at it.
    fn truncate_before(&self, partition: usize, offset: u64) -> Result<(), LogError>;
    /// Deletes every stored value of `partition` at or after `offset`, and the partition goes on
    /// from `offset`: after a write reported failed, what it may have left behind (a write
    /// whose sync failed can still be in the write-ahead log) is never read as records.
    fn discard_from(&self, partition: usize, offset: u64) -> Result<(), LogError>;
    /// About how many bytes `partition` takes on disk (an estimate for size-based retention).
    fn stored_bytes(&self, partition: usize) -> Result<u64, LogError>;

    /// The first stored offset of `partition`, or `next` when it holds nothing.
    fn first_offset(&self, partition: usize, next: u64) -> Result<u64, LogError> {
        let mut first = next;
        self.scan(partition, 0, &mut |f, _| {
            first = f;
            false
        })?;
        Ok(first)
    }

    /// Bounds of every partition, in order.
    fn partitions(&self) -> Result<Vec<PartitionInfo>, LogError> {
        (0..self.partition_count())
            .map(|partition| {
                let next = self.next_offset(partition)?;
                let first = self.first_offset(partition, next)?;
                Ok(PartitionInfo {
                    partition,
                    first,
                    next,
                })
            })
            .collect()
    }
}

/// The key a stored value has: its first record's offset, big-endian so keys sort by offset.
pub fn offset_key(offset: u64) -> [u8; 8] {
    offset.to_be_bytes()
}

pub fn decode_offset_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// The most records one read looks at when it filters (by source or endpoint): a read that
/// finds few matches still returns, with `next` past what it looked at.
pub const MAX_SCANNED: usize = 100_000;

/// Calls `visit(offset, record)` for the records of `partition` from offset `from` on, in
/// order, until it returns false, at most [`MAX_SCANNED`] of them; returns the offset to read
/// next: past the last record `visit` accepted (returned true for). A record that cannot be
/// read is a [`LogError::Corrupt`].
pub fn visit_records(
    log: &dyn LogStore,
    partition: usize,
    from: u64,
    visit: &mut dyn FnMut(u64, &RecordView<'_>) -> Result<bool, String>,
) -> Result<u64, LogError> {
    let mut scanned = 0;
    let mut next = from;
    let mut failed = None;
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    log.scan(partition, from, &mut |first, value| {
        for (i, record) in batch::records(value).enumerate() {
            let offset = first + i as u64;
            let corrupt = |detail: String| LogError::Corrupt {
                partition,
                offset,
                detail,
            };
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    failed = Some(corrupt(e.to_string()));
                    return false;
                }
            };
            if offset < from {
                continue;
            }
            if scanned >= MAX_SCANNED {
                return false;
            }
            scanned += 1;
            // Records sit unaligned in the value; rkyv needs them aligned.
            aligned.clear();
            aligned.extend_from_slice(record.bytes);
            let visited = RecordView::open(record, &aligned)
                .map_err(|e| e.to_string())
                .and_then(|view| visit(offset, &view));
            match visited {
                Err(detail) => {
                    failed = Some(corrupt(detail));
                    return false;
                }
                Ok(false) => return false,
                Ok(true) => next = offset + 1,
            }
        }
        true
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(next),
    }
}

/// Appends up to `max` records of `partition` from offset `from` to `out`, fewer once `out` is
/// [`full`](RecordsJson::full); returns the offset to read next.
pub fn read_records(
    log: &dyn LogStore,
    partition: usize,
    from: u64,
    max: usize,
    out: &mut RecordsJson,
) -> Result<u64, LogError> {
    let mut taken = 0;
    visit_records(log, partition, from, &mut |offset, view| {
        if taken >= max || out.full() {
            return Ok(false);
        }
        if out.wants(view) {
            out.push(partition, offset, view)?;
            taken += 1;
        }
        Ok(true)
    })
}

#[cfg(test)]
mod tests {
    use roost_model::{Message, Source, SystemProperties};

    use super::*;
    use crate::MemStore;

    fn record(n: u64) -> Vec<u8> {
        let m = Message {
            source: Source::Telemetry,
            enqueued_ms: 1_700_000_000_000 + n,
            system: SystemProperties {
                connection_device_id: format!("d{n}"),
                ..SystemProperties::default()
            },
            app: vec![("n".into(), n.to_string())],
            body: format!("{{\"n\":{n}}}").into_bytes(),
        };
        m.archive_into(rkyv::util::AlignedVec::new())
            .expect("archive")
            .to_vec()
    }

    fn commit(log: &MemStore, partition: usize, range: std::ops::Range<u64>) {
        let mut b = Vec::new();
        for n in range.clone() {
            batch::push(&mut b, batch::plain(&record(n)));
        }
        log.write_batch(partition, range.start, &b, true)
            .expect("write");
    }

    fn offsets(log: &MemStore, partition: usize, from: u64, max: usize) -> (Vec<u64>, u64) {
        let mut out = RecordsJson::new();
        let next = read_records(log, partition, from, max, &mut out).expect("read");
        let v: serde_json::Value =
            serde_json::from_str(&out.finish("next", &next.to_string())).expect("json");
        let got = v["records"]
            .as_array()
            .expect("records")
            .iter()
            .map(|r| r["offset"].as_u64().expect("offset"))
            .collect();
        (got, next)
    }

    #[test]
    fn a_read_stops_at_the_byte_limit_but_always_takes_one_record() {
        let log = MemStore::new(1);
        commit(&log, 0, 0..50);
        let read = |limit: usize| {
            let mut out = RecordsJson::with_limit(limit);
            let next = read_records(&log, 0, 0, 1000, &mut out).expect("read");
            (out.count(), next)
        };
        assert_eq!(read(1), (1, 1), "one record, however small the limit");
        let (n, next) = read(2_000);
        assert!(n > 1 && n < 50, "{n} records in 2,000 bytes");
        assert_eq!(
            next, n as u64,
            "the next read starts after the last one returned"
        );
        assert_eq!(read(usize::MAX), (50, 50));
    }

    #[test]
    fn reads_start_inside_a_batch_and_cross_batches() {
        let log = MemStore::new(2);
        commit(&log, 0, 0..3);
        commit(&log, 0, 3..5);
        commit(&log, 0, 5..9);
        assert_eq!(offsets(&log, 0, 0, 100), ((0..9).collect(), 9));
        assert_eq!(offsets(&log, 0, 4, 3), (vec![4, 5, 6], 7));
        assert_eq!(
            offsets(&log, 0, 9, 10),
            (vec![], 9),
            "at the end: nothing, same next"
        );
        assert_eq!(offsets(&log, 1, 0, 10), (vec![], 0));
        assert_eq!(
            log.partitions().expect("partitions"),
            vec![
                PartitionInfo {
                    partition: 0,
                    first: 0,
                    next: 9
                },
                PartitionInfo {
                    partition: 1,
                    first: 0,
                    next: 0
                },
            ]
        );
    }

    #[test]
    fn a_batch_that_does_not_follow_is_refused_and_a_corrupt_one_reported() {
        let log = MemStore::new(1);
        commit(&log, 0, 0..2);
        let mut b = Vec::new();
        batch::push(&mut b, batch::plain(&record(7)));
        assert!(matches!(
            log.write_batch(0, 7, &b, true),
            Err(LogError::Gap {
                first: 7,
                next: 2,
                ..
            })
        ));
        // A value whose length prefix runs past its end.
        log.write_batch(0, 2, &[9, 0, 0, 0, 1], true)
            .expect("stored as given");
        let mut out = RecordsJson::new();
        assert!(matches!(
            read_records(&log, 0, 0, 10, &mut out),
            Err(LogError::Corrupt {
                partition: 0,
                offset: 2,
                ..
            })
        ));
        assert!(matches!(log.next_offset(5), Err(LogError::NoPartition(5))));
    }

    #[test]
    fn checkpoints_are_per_group_and_partition() {
        let log = MemStore::new(2);
        assert_eq!(log.checkpoint("g", 0), Ok(None));
        log.commit_checkpoint("g", &[(0, 5), (1, 2)])
            .expect("commit");
        log.commit_checkpoint("h", &[(0, 1)]).expect("commit");
        assert_eq!(log.checkpoint("g", 0), Ok(Some(5)));
        assert_eq!(log.checkpoint("g", 1), Ok(Some(2)));
        assert_eq!(log.checkpoint("h", 0), Ok(Some(1)));
        assert_eq!(log.checkpoint("h", 1), Ok(None));
    }
}
