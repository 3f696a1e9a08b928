//! The stamp at the start of every payload: who sent it, which one it was, and when.
//!
//! Layout (big-endian, 24 bytes): `[run u64][conn u32][seq u32][sent_unix_nanos u64]`, then
//! padding up to `--payload`. The run id lets a reader drop messages of earlier runs; conn and
//! seq make loss and duplicates countable; the send time gives end-to-end latency without
//! any state shared between the publishing and the reading side.

/// Bytes the stamp takes; the smallest payload.
pub const STAMP_LEN: usize = 24;
/// Offset of `seq` inside the payload (patched per message).
pub const SEQ_AT: usize = 12;
/// Offset of the send time inside the payload (patched per message).
pub const SENT_AT: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub run: u64,
    pub conn: u32,
    pub seq: u32,
    pub sent_ns: u64,
}

impl Stamp {
    /// Writes the stamp at the start of `payload`. `payload` must hold [`STAMP_LEN`] bytes.
    pub fn write(&self, payload: &mut [u8]) {
        payload[0..8].copy_from_slice(&self.run.to_be_bytes());
        payload[8..12].copy_from_slice(&self.conn.to_be_bytes());
        patch(payload, self.seq, self.sent_ns);
    }

    /// Reads the stamp at the start of a payload; `None` if it is too short to carry one.
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        let be64 = |at: usize| {
            payload
                .get(at..at + 8)?
                .try_into()
                .ok()
                .map(u64::from_be_bytes)
        };
        let be32 = |at: usize| {
            payload
                .get(at..at + 4)?
                .try_into()
                .ok()
                .map(u32::from_be_bytes)
        };
        Some(Stamp {
            run: be64(0)?,
            conn: be32(8)?,
            seq: be32(SEQ_AT)?,
            sent_ns: be64(SENT_AT)?,
        })
    }
}

/// Overwrites only the per-message fields of a stamped payload.
pub fn patch(payload: &mut [u8], seq: u32, sent_ns: u64) {
    // hot path: two fixed-size copies per message, no bounds re-derivation beyond these.
    payload[SEQ_AT..SEQ_AT + 4].copy_from_slice(&seq.to_be_bytes());
    payload[SENT_AT..SENT_AT + 8].copy_from_slice(&sent_ns.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips() {
        let s = Stamp {
            run: 0x0102_0304_0506_0708,
            conn: 70_000,
            seq: u32::MAX,
            sent_ns: 1_700_000_000_123_456_789,
        };
        let mut payload = vec![0xAA; 100];
        s.write(&mut payload);
        assert_eq!(Stamp::read(&payload), Some(s));
        // Padding is left alone.
        assert!(payload[STAMP_LEN..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn patch_changes_only_seq_and_time() {
        let s = Stamp {
            run: 7,
            conn: 3,
            seq: 1,
            sent_ns: 2,
        };
        let mut payload = vec![0; STAMP_LEN];
        s.write(&mut payload);
        patch(&mut payload, 99, 12345);
        assert_eq!(
            Stamp::read(&payload),
            Some(Stamp {
                run: 7,
                conn: 3,
                seq: 99,
                sent_ns: 12345
            })
        );
    }

    #[test]
    fn short_payload_has_no_stamp() {
        assert_eq!(Stamp::read(&[0; STAMP_LEN - 1]), None);
        assert_eq!(Stamp::read(&[]), None);
        assert!(Stamp::read(&[0; STAMP_LEN]).is_some());
    }

    #[test]
    fn layout_is_big_endian_at_documented_offsets() {
        let mut payload = [0u8; STAMP_LEN];
        Stamp {
            run: 1,
            conn: 2,
            seq: 3,
            sent_ns: 4,
        }
        .write(&mut payload);
        assert_eq!(payload[7], 1);
        assert_eq!(payload[11], 2);
        assert_eq!(payload[SEQ_AT + 3], 3);
        assert_eq!(payload[SENT_AT + 7], 4);
    }
}
