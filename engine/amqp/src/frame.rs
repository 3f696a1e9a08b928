//! The transport layer (AMQP 1.0 part 2.2–2.3): the protocol header and frames.
//!
//! A frame is `size:u32 doff:u8 type:u8 channel:u16`, then `doff*4 - 8` bytes of extended
//! header (ignored), then the body. [`check`] reads the size and refuses a frame over the limit
//! before anything is buffered; [`Frame::parse`] splits a whole frame, zero-copy.

use bytes::{BufMut, Bytes, BytesMut};

use crate::Error;

/// `AMQP 0 1 0 0`: plain AMQP.
pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// `AMQP 3 1 0 0`: SASL first.
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// `AMQP 2 1 0 0`: TLS inside AMQP (not offered; TLS is on the socket).
pub const TLS_HEADER: [u8; 8] = *b"AMQP\x02\x01\x00\x00";

/// The smallest max-frame-size a peer may announce (§2.7.1).
pub const MIN_MAX_FRAME_SIZE: usize = 512;

/// Which protocol a header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Amqp,
    Sasl,
    Tls,
}

/// The protocol header at the start of `buf`: `Ok(None)` until 8 bytes are there.
pub fn protocol_header(buf: &[u8]) -> Result<Option<Protocol>, Error> {
    let Some(h) = buf.get(..8) else {
        // A prefix that cannot become a header is refused at once.
        if !b"AMQP".starts_with(&buf[..buf.len().min(4)]) {
            return Err(Error::BadProtocolHeader);
        }
        return Ok(None);
    };
    match <[u8; 8]>::try_from(h).map_err(|_| Error::BadProtocolHeader)? {
        AMQP_HEADER => Ok(Some(Protocol::Amqp)),
        SASL_HEADER => Ok(Some(Protocol::Sasl)),
        TLS_HEADER => Ok(Some(Protocol::Tls)),
        _ => Err(Error::BadProtocolHeader),
    }
}

impl Protocol {
    pub fn header(self) -> [u8; 8] {
        match self {
            Protocol::Amqp => AMQP_HEADER,
            Protocol::Sasl => SASL_HEADER,
            Protocol::Tls => TLS_HEADER,
        }
    }
}

/// How long the frame at the start of `buf` is, once all of it is there (`Ok(None)` before).
/// A size over `max_frame` or under the header's 8 bytes is an error as soon as the size field
/// is read, so nothing larger than `max_frame` is ever buffered.
pub fn check(buf: &[u8], max_frame: usize) -> Result<Option<usize>, Error> {
    let Some(size) = buf.get(..4) else {
        return Ok(None);
    };
    let size = u32::from_be_bytes([size[0], size[1], size[2], size[3]]) as usize;
    if size < 8 {
        return Err(Error::BadFrameHeader);
    }
    if size > max_frame {
        return Err(Error::FrameTooLarge {
            len: size,
            max: max_frame,
        });
    }
    Ok((buf.len() >= size).then_some(size))
}

/// The frame type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameType {
    Amqp = 0,
    Sasl = 1,
}

/// One frame, its body a slice of the bytes it came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameType,
    pub channel: u16,
    /// Empty for a heartbeat.
    pub body: Bytes,
}

impl Frame {
    /// Splits a whole frame (as [`check`] measured it).
    pub fn parse(frame: Bytes) -> Result<Frame, Error> {
        if frame.len() < 8 {
            return Err(Error::BadFrameHeader);
        }
        let size = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        let doff = usize::from(frame[4]) * 4;
        if size != frame.len() || doff < 8 || doff > size {
            return Err(Error::BadFrameHeader);
        }
        let kind = match frame[5] {
            0 => FrameType::Amqp,
            1 => FrameType::Sasl,
            other => return Err(Error::UnknownFrameType(other)),
        };
        Ok(Frame {
            kind,
            channel: u16::from_be_bytes([frame[6], frame[7]]),
            body: frame.slice(doff..),
        })
    }
}

/// Appends a frame: its header (doff 2, no extended header: pyamqp assumes it), then what
/// `body` writes.
pub fn write_frame(
    kind: FrameType,
    channel: u16,
    out: &mut BytesMut,
    body: impl FnOnce(&mut BytesMut),
) {
    let start = out.len();
    out.put_u32(0);
    out.put_u8(2);
    out.put_u8(kind as u8);
    out.put_u16(channel);
    body(out);
    let size = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
}

/// An empty AMQP frame: a heartbeat that keeps an idle connection open.
pub fn write_heartbeat(out: &mut BytesMut) {
    write_frame(FrameType::Amqp, 0, out, |_| {});
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_recognised_and_anything_else_refused_early() {
        assert_eq!(
            protocol_header(b"AMQP\x03\x01\x00\x00"),
            Ok(Some(Protocol::Sasl))
        );
        assert_eq!(
            protocol_header(b"AMQP\x00\x01\x00\x00rest"),
            Ok(Some(Protocol::Amqp))
        );
        assert_eq!(protocol_header(b"AMQ"), Ok(None));
        assert_eq!(
            protocol_header(b"GET / HTTP/1.1"),
            Err(Error::BadProtocolHeader)
        );
        assert_eq!(protocol_header(b"GE"), Err(Error::BadProtocolHeader));
        assert_eq!(
            protocol_header(b"AMQP\x00\x01\x00\x01"),
            Err(Error::BadProtocolHeader)
        );
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_from_its_size_field() {
        assert_eq!(check(&[0, 0, 1], 512), Ok(None));
        assert_eq!(
            check(&[0, 0x10, 0, 0], 512),
            Err(Error::FrameTooLarge {
                len: 0x100000,
                max: 512
            })
        );
        assert_eq!(check(&[0, 0, 0, 7], 512), Err(Error::BadFrameHeader));
        let mut out = BytesMut::new();
        write_frame(FrameType::Sasl, 3, &mut out, |b| b.put_slice(b"xyz"));
        assert_eq!(check(&out[..10], 512), Ok(None));
        assert_eq!(check(&out, 512), Ok(Some(11)));
        let f = Frame::parse(out.freeze()).expect("frame");
        assert_eq!(
            (f.kind, f.channel, &f.body[..]),
            (FrameType::Sasl, 3, &b"xyz"[..])
        );
    }

    #[test]
    fn malformed_headers_are_named() {
        // doff 1 (points inside the header), type 9, size that disagrees.
        let bad_doff = Bytes::from_static(&[0, 0, 0, 8, 1, 0, 0, 0]);
        assert_eq!(Frame::parse(bad_doff), Err(Error::BadFrameHeader));
        let bad_type = Bytes::from_static(&[0, 0, 0, 8, 2, 9, 0, 0]);
        assert_eq!(Frame::parse(bad_type), Err(Error::UnknownFrameType(9)));
        let long_doff = Bytes::from_static(&[0, 0, 0, 8, 3, 0, 0, 0]);
        assert_eq!(Frame::parse(long_doff), Err(Error::BadFrameHeader));
        let heartbeat = Bytes::from_static(&[0, 0, 0, 8, 2, 0, 0, 0]);
        assert!(Frame::parse(heartbeat).expect("heartbeat").body.is_empty());
    }
}
