//! Retention of the `events` log (IoT Hub keeps device-to-cloud messages 1 to 7 days; 1 by
//! default): a partition keeps what is younger than `max_age` and, if set, about `max_bytes`
//! of it. Whole stored values (commits) are deleted, oldest first, and the newest one always
//! stays, so offsets go on from where they were. A reader asking for an offset that retention
//! removed starts at the first retained one.

use std::time::Duration;

use crate::batch;
use crate::log::{LogError, LogStore};
use crate::record::RecordView;

/// What a partition keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    /// Bytes on disk a partition may take (about: the store's own estimate), if bounded.
    pub max_bytes: Option<u64>,
}

impl Default for Retention {
    /// One day, no size bound: IoT Hub's default.
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: None,
        }
    }
}

/// What one pass over a partition did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trimmed {
    /// The partition's first offset after the pass.
    pub first: u64,
    /// Records deleted.
    pub records: u64,
}

/// The enqueued time of the newest record of a stored value.
fn newest_ms(partition: usize, first: u64, value: &[u8]) -> Result<u64, LogError> {
    let corrupt = |detail: String| LogError::Corrupt {
        partition,
        offset: first,
        detail,
    };
    let last = batch::records(value)
        .last()
        .ok_or_else(|| corrupt("empty stored value".into()))?
        .map_err(|e| corrupt(e.to_string()))?;
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    aligned.extend_from_slice(last.bytes);
    let view = RecordView::open(last, &aligned).map_err(|e| corrupt(e.to_string()))?;
    Ok(view.message().enqueued_ms.to_native())
}

/// Applies `policy` to `partition` at Unix milliseconds `now_ms`.
pub fn enforce(
    log: &dyn LogStore,
    partition: usize,
    policy: Retention,
    now_ms: u64,
) -> Result<Trimmed, LogError> {
    let next = log.next_offset(partition)?;
    let mut first = None;
    // By age: values are in offset order, and offsets in arrival order; a value is old when its
    // newest record is. Only the old values and the first young one are read.
    let cutoff = now_ms.saturating_sub(policy.max_age.as_millis() as u64);
    let mut cut = 0;
    let mut failed = None;
    log.scan(partition, 0, &mut |value_first, value| {
        first.get_or_insert(value_first);
        match newest_ms(partition, value_first, value) {
            Ok(ms) if ms < cutoff => {
                cut = value_first + batch::count(value).unwrap_or(1);
                true
            }
            Ok(_) => false,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    let Some(first) = first else {
        return Ok(Trimmed {
            first: next,
            records: 0,
        });
    };
    // By size: the share of the records that is over the bound, from the oldest.
    if let Some(max) = policy.max_bytes {
        let bytes = log.stored_bytes(partition)?;
        let records = next.saturating_sub(first).max(1);
        if bytes > max {
            let per_record = (bytes / records).max(1);
            let excess = (bytes - max).div_ceil(per_record);
            cut = cut.max(first + excess);
        }
    }
    if cut <= first {
        return Ok(Trimmed { first, records: 0 });
    }
    log.truncate_before(partition, cut)?;
    let now_first = log.first_offset(partition, next)?;
    Ok(Trimmed {
        first: now_first,
        records: now_first.saturating_sub(first),
    })
}

#[cfg(test)]
mod tests {
    use roost_model::{Message, Source, SystemProperties};

    use super::*;
    use crate::log::read_records;
    use crate::{json::RecordsJson, MemStore};

    const HOUR_MS: u64 = 3_600_000;

    /// One commit of `n` records enqueued at `at_ms`, appended to partition 0.
    fn commit(log: &MemStore, n: u64, at_ms: u64) {
        let first = log.next_offset(0).expect("next");
        let mut b = Vec::new();
        for _ in 0..n {
            let m = Message {
                source: Source::Telemetry,
                enqueued_ms: at_ms,
                system: SystemProperties::default(),
                app: vec![],
                body: vec![b'x'; 100],
            };
            let bytes = m
                .archive_into(rkyv::util::AlignedVec::new())
                .expect("archive");
            batch::push(&mut b, batch::plain(&bytes));
        }
        log.write_batch(0, first, &b, true).expect("write");
    }

    fn first(log: &MemStore) -> u64 {
        log.partitions().expect("partitions")[0].first
    }

    #[test]
    fn old_commits_go_whole_and_the_newest_stays() {
        let log = MemStore::new(1);
        let now = 100 * HOUR_MS;
        commit(&log, 3, now - 30 * HOUR_MS); // 0..3: old
        commit(&log, 2, now - 25 * HOUR_MS); // 3..5: old
        commit(&log, 4, now - 2 * HOUR_MS); // 5..9: young
        let t = enforce(&log, 0, Retention::default(), now).expect("enforce");
        assert_eq!(
            t,
            Trimmed {
                first: 5,
                records: 5
            }
        );
        assert_eq!(log.next_offset(0).expect("next"), 9, "offsets go on");
        // Everything old: the newest commit still stays.
        let t = enforce(&log, 0, Retention::default(), now + 48 * HOUR_MS).expect("enforce");
        assert_eq!(t.first, 5, "the newest value holds the next offset");
        commit(&log, 1, now + 48 * HOUR_MS);
        let t = enforce(&log, 0, Retention::default(), now + 48 * HOUR_MS).expect("enforce");
        assert_eq!(
            t,
            Trimmed {
                first: 9,
                records: 4
            }
        );
    }

    #[test]
    fn a_read_before_the_retained_start_gets_the_first_retained_offset() {
        let log = MemStore::new(1);
        let now = 100 * HOUR_MS;
        commit(&log, 3, now - 30 * HOUR_MS);
        commit(&log, 3, now);
        enforce(&log, 0, Retention::default(), now).expect("enforce");
        let mut out = RecordsJson::new();
        let next = read_records(&log, 0, 0, 100, &mut out).expect("read from 0");
        let v: serde_json::Value =
            serde_json::from_str(&out.finish("next", &next.to_string())).expect("json");
        let offsets: Vec<u64> = v["records"]
            .as_array()
            .expect("records")
            .iter()
            .map(|r| r["offset"].as_u64().expect("offset"))
            .collect();
        assert_eq!(offsets, vec![3, 4, 5]);
        assert_eq!(next, 6);
    }

    #[test]
    fn a_size_bound_trims_the_oldest_share() {
        let log = MemStore::new(1);
        let now = 100 * HOUR_MS;
        for _ in 0..10 {
            commit(&log, 10, now);
        }
        let total = log.stored_bytes(0).expect("bytes");
        let policy = Retention {
            max_bytes: Some(total / 2),
            ..Retention::default()
        };
        let t = enforce(&log, 0, policy, now).expect("enforce");
        assert_eq!(t.first, 50, "half the records, in whole commits");
        assert!(log.stored_bytes(0).expect("bytes") <= total / 2 + 1);
        assert_eq!(first(&log), 50);
        assert_eq!(enforce(&log, 0, policy, now).expect("again").records, 0);
    }

    #[test]
    fn an_empty_partition_is_left_alone() {
        let log = MemStore::new(1);
        assert_eq!(
            enforce(&log, 0, Retention::default(), HOUR_MS).expect("enforce"),
            Trimmed {
                first: 0,
                records: 0
            }
        );
    }
}
