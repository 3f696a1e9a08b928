//! The stored unit of the events log: one RocksDB value per group commit, holding that commit's
//! records back to back, keyed by the offset of its first record.
//!
//! Why: a RocksDB put (memtable insert plus WAL framing) per message costs more than the rest
//! of a message's path; one put per commit turns the append into a memcpy. Readers find the
//! batch holding an offset with a reverse seek and skip to the record.
//!
//! Format: `[u32 le length][record bytes]` repeated. Records are rkyv archives; they sit
//! unaligned here, so readers copy each into an aligned buffer before access. The length's top
//! bit ([`ROUTED`]) says the record is a `roost_model::Routed` (the message with the endpoints
//! its routes matched); records written before routing existed are bare `Message`s without it,
//! and stay readable.

/// The length bit of a routed record.
pub const ROUTED: u32 = 1 << 31;

/// One record of a batch: its bytes, and whether it is a routed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub routed: bool,
    pub bytes: &'a [u8],
}

/// Why a stored batch could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt log batch: a record length runs past the end of the batch")]
pub struct CorruptBatch;

/// Appends one record to a batch being built.
// hot path: two small memcpys into a reused buffer.
pub fn push(batch: &mut Vec<u8>, record: Record<'_>) {
    let flag = if record.routed { ROUTED } else { 0 };
    batch.extend_from_slice(&(record.bytes.len() as u32 | flag).to_le_bytes());
    batch.extend_from_slice(record.bytes);
}

/// A record of opaque bytes (tests, tools): not routed.
pub fn plain(bytes: &[u8]) -> Record<'_> {
    Record {
        routed: false,
        bytes,
    }
}

/// The length and the routed bit of a length prefix.
fn split(prefix: [u8; 4]) -> (usize, bool) {
    let raw = u32::from_le_bytes(prefix);
    ((raw & !ROUTED) as usize, raw & ROUTED != 0)
}

/// The records of a stored batch, in offset order.
pub fn records(batch: &[u8]) -> impl Iterator<Item = Result<Record<'_>, CorruptBatch>> {
    let mut rest = batch;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            rest = &[];
            return Some(Err(CorruptBatch));
        };
        let (len, routed) = split(*len);
        if tail.len() < len {
            rest = &[];
            return Some(Err(CorruptBatch));
        }
        let (bytes, next) = tail.split_at(len);
        rest = next;
        Some(Ok(Record { routed, bytes }))
    })
}

/// Largest stored value: a commit with more records is stored as several values, so no value
/// nears RocksDB's limits however much a commit carries.
pub const MAX_VALUE: usize = 4 << 20;

/// Splits a commit's records into stored values of at most [`MAX_VALUE`] bytes (a single larger
/// record gets a value of its own); yields each value's first-record index and bytes.
pub fn chunks(batch: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let mut rest = batch;
    let mut index = 0u64;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (mut len, mut n) = (0usize, 0u64);
        while len < rest.len() {
            let Some(prefix) = rest[len..].first_chunk::<4>() else {
                break;
            };
            let next = len + 4 + split(*prefix).0;
            if n > 0 && next > MAX_VALUE {
                break;
            }
            len = next.min(rest.len());
            n += 1;
        }
        let (chunk, tail) = rest.split_at(len);
        rest = tail;
        let first = index;
        index += n;
        Some((first, chunk))
    })
}

/// How many records a stored batch holds.
pub fn count(batch: &[u8]) -> Result<u64, CorruptBatch> {
    let mut n = 0;
    for r in records(batch) {
        r?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_in_order() {
        let mut b = Vec::new();
        push(&mut b, plain(b"one"));
        push(&mut b, plain(b""));
        push(
            &mut b,
            Record {
                routed: true,
                bytes: b"three",
            },
        );
        let got: Vec<Record> = records(&b).collect::<Result<_, _>>().expect("valid");
        assert_eq!(
            got,
            vec![
                plain(b"one"),
                plain(b""),
                Record {
                    routed: true,
                    bytes: b"three"
                }
            ]
        );
        assert_eq!(count(&b), Ok(3));
    }

    #[test]
    fn large_commits_split_into_bounded_values_on_record_boundaries() {
        let record = vec![7u8; 1000];
        let mut b = Vec::new();
        for _ in 0..10_000 {
            push(
                &mut b,
                Record {
                    routed: true,
                    bytes: &record,
                },
            );
        }
        let parts: Vec<(u64, &[u8])> = chunks(&b).collect();
        assert!(parts.len() > 2, "10 MB must not be one value");
        let mut expect_first = 0;
        for (first, value) in &parts {
            assert_eq!(*first, expect_first);
            assert!(value.len() <= MAX_VALUE);
            expect_first += count(value).expect("whole records");
        }
        assert_eq!(expect_first, 10_000);
        let mut one = Vec::new();
        push(&mut one, plain(&vec![1u8; MAX_VALUE + 10]));
        assert_eq!(
            chunks(&one).count(),
            1,
            "an oversized record still gets its own value"
        );
    }

    #[test]
    fn truncation_is_an_error_at_every_cut() {
        let mut b = Vec::new();
        push(&mut b, plain(b"hello"));
        push(&mut b, plain(b"world"));
        for cut in 1..b.len() {
            let is_boundary = cut == 9;
            assert_eq!(count(&b[..cut]).is_ok(), is_boundary, "cut at {cut}");
        }
    }
}
