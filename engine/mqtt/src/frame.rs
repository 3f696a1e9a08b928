//! The fixed header (§2.2): framing a byte stream into packets before anything is parsed.

use bytes::{BufMut, BytesMut};

use crate::Error;

/// The largest remaining length four bytes can express (§2.2.3).
pub(crate) const MAX_REMAINING: usize = 268_435_455;

/// Limits checked before a frame is buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted frame in bytes, fixed header included.
    pub max_frame: usize,
}

impl Default for Limits {
    /// IoT Hub accepts D2C messages of 256 KB and packets of about 300 KB (wire spec §2.3); the
    /// extra KiB leaves room for the topic and its property bag.
    fn default() -> Self {
        Limits {
            max_frame: 300 * 1024 + 1024,
        }
    }
}

/// The first byte and the decoded remaining length of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FixedHeader {
    /// Packet type in the high nibble, flags in the low nibble.
    pub byte0: u8,
    /// Bytes after the fixed header.
    pub remaining: usize,
    /// Length of the fixed header itself, 2 to 5.
    pub header_len: usize,
}

impl FixedHeader {
    /// Reads the fixed header at the start of `buf`; `Ok(None)` if it is not all there yet.
    pub fn read(buf: &[u8]) -> Result<Option<FixedHeader>, Error> {
        let Some(&byte0) = buf.first() else {
            return Ok(None);
        };
        let mut remaining = 0usize;
        for i in 0..4 {
            let Some(&b) = buf.get(1 + i) else {
                return Ok(None);
            };
            remaining |= usize::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(Some(FixedHeader {
                    byte0,
                    remaining,
                    header_len: 2 + i,
                }));
            }
        }
        Err(Error::MalformedRemainingLength)
    }

    pub fn total_len(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// Cheap check before buffering: reads only the fixed header.
///
/// - `Ok(None)`: more bytes are needed.
/// - `Ok(Some(n))`: a complete frame of `n` bytes is at `buf[..n]`; split it off as `Bytes` and
///   hand it to [`parse`](crate::parse).
/// - `Err(FrameTooLarge)`: as soon as the remaining length is known to exceed
///   `limits.max_frame`, even if the body has not arrived, so an oversized frame is never
///   buffered.
/// - `Err(MalformedRemainingLength)`: the length field has a fifth byte.
pub fn check(buf: &[u8], limits: &Limits) -> Result<Option<usize>, Error> {
    let Some(header) = FixedHeader::read(buf)? else {
        return Ok(None);
    };
    let len = header.total_len();
    if len > limits.max_frame {
        return Err(Error::FrameTooLarge {
            len,
            max: limits.max_frame,
        });
    }
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(len))
}

/// The whole frame length for a body of `remaining` bytes, fixed header included; `None` if
/// MQTT cannot frame it (more than 268,435,455 bytes).
pub(crate) fn frame_len(remaining: usize) -> Option<usize> {
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        2_097_152..=MAX_REMAINING => 4,
        _ => return None,
    };
    Some(1 + length_bytes + remaining)
}

/// Writes a fixed header.
///
/// # Panics
/// If `remaining` exceeds 268,435,455, the most MQTT can express: a frame that large is a bug in
/// the caller (our own limits are far below), and writing a corrupt length would be worse.
pub(crate) fn put_header(out: &mut BytesMut, byte0: u8, remaining: usize) {
    assert!(
        remaining <= MAX_REMAINING,
        "MQTT remaining length {remaining} exceeds {MAX_REMAINING}"
    );
    out.reserve(5 + remaining);
    out.put_u8(byte0);
    let mut len = remaining;
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if len == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_bytes(remaining: usize) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_header(&mut out, 0x30, remaining);
        out.to_vec()
    }

    #[test]
    fn remaining_length_boundaries() {
        let cases: [(usize, &[u8]); 8] = [
            (0, &[0x00]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (MAX_REMAINING, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ];
        for (len, encoded) in cases {
            let bytes = header_bytes(len);
            assert_eq!(&bytes[1..], encoded, "encoding {len}");
            let header = FixedHeader::read(&bytes).expect("valid").expect("complete");
            assert_eq!(header.remaining, len);
            assert_eq!(header.header_len, 1 + encoded.len());
            assert_eq!(frame_len(len), Some(header.total_len()), "frame_len({len})");
        }
    }

    #[test]
    fn frame_len_refuses_unencodable_length() {
        assert_eq!(frame_len(MAX_REMAINING + 1), None);
        assert_eq!(frame_len(usize::MAX), None);
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn put_header_refuses_unencodable_length() {
        header_bytes(MAX_REMAINING + 1);
    }

    #[test]
    fn check_needs_more() {
        let limits = Limits::default();
        assert_eq!(check(&[], &limits), Ok(None));
        assert_eq!(check(&[0xC0], &limits), Ok(None));
        // PUBLISH announcing 200 bytes (two-byte length), only the header and one byte present.
        assert_eq!(check(&[0x30, 0xC8, 0x01, 0x00], &limits), Ok(None));
        // Length field cut after a continuation byte.
        assert_eq!(check(&[0x30, 0x80], &limits), Ok(None));
    }

    #[test]
    fn check_complete_frame_with_more_behind() {
        let buf = [0xC0, 0x00, 0xE0, 0x00, 0x30];
        assert_eq!(check(&buf, &Limits::default()), Ok(Some(2)));
        assert_eq!(check(&buf[2..], &Limits::default()), Ok(Some(2)));
    }

    #[test]
    fn check_rejects_oversized_frame_from_header_alone() {
        // PUBLISH claiming 1 MiB; only the 4-byte fixed header and one body byte are present.
        let buf = [0x30, 0x80, 0x80, 0x40, 0x00];
        let limits = Limits {
            max_frame: 300 * 1024,
        };
        assert_eq!(
            check(&buf, &limits),
            Err(Error::FrameTooLarge {
                len: 4 + (1 << 20),
                max: 300 * 1024
            })
        );
    }

    #[test]
    fn check_limit_is_inclusive_of_the_header() {
        let limits = Limits { max_frame: 130 };
        // 2-byte length 127 + 2-byte header = 129 <= 130.
        let mut frame = header_bytes(127);
        frame.resize(129, 0);
        assert_eq!(check(&frame, &limits), Ok(Some(129)));
        // 128 remaining needs a 3-byte header: 131 > 130.
        let frame = header_bytes(128);
        assert_eq!(
            check(&frame, &limits),
            Err(Error::FrameTooLarge { len: 131, max: 130 })
        );
    }

    #[test]
    fn check_rejects_fifth_length_byte() {
        let buf = [0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
        let limits = Limits {
            max_frame: usize::MAX,
        };
        assert_eq!(check(&buf, &limits), Err(Error::MalformedRemainingLength));
        // Rejected before the fifth byte arrives: the fourth's continuation bit says one follows.
        assert_eq!(
            check(&buf[..5], &limits),
            Err(Error::MalformedRemainingLength)
        );
        assert_eq!(check(&buf[..4], &limits), Ok(None));
    }

    #[test]
    fn default_limit_fits_iot_hub_messages() {
        assert_eq!(Limits::default().max_frame, 308_224);
    }
}
