//! A bounded, zero-copy reader over one packet body.

use bytes::Bytes;

use crate::{Error, Str};

/// Reads fields from a packet body. Every read is bounds-checked and returns
/// [`Error::Truncated`] rather than panicking; byte fields are `Bytes::slice`s of the body.
pub(crate) struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub fn u8(&mut self) -> Result<u8, Error> {
        let b = *self.buf.get(self.pos).ok_or(Error::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    pub fn u16(&mut self) -> Result<u16, Error> {
        let hi = self.u8()?;
        let lo = self.u8()?;
        Ok(u16::from_be_bytes([hi, lo]))
    }

    /// The next `n` bytes, shared with the body.
    pub fn take(&mut self, n: usize) -> Result<Bytes, Error> {
        let end = self.pos.checked_add(n).ok_or(Error::Truncated)?;
        if end > self.buf.len() {
            return Err(Error::Truncated);
        }
        let bytes = self.buf.slice(self.pos..end);
        self.pos = end;
        Ok(bytes)
    }

    /// Binary data with a two-byte length prefix (§1.5.3 framing, used for will payload and
    /// password).
    pub fn bytes_prefixed(&mut self) -> Result<Bytes, Error> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// A length-prefixed UTF-8 string (§1.5.3).
    pub fn str(&mut self) -> Result<Str, Error> {
        let bytes = self.bytes_prefixed()?;
        Str::from_utf8(bytes)
    }

    /// Everything left, shared with the body.
    pub fn rest(&mut self) -> Bytes {
        let start = self.pos.min(self.buf.len());
        self.pos = self.buf.len();
        self.buf.slice(start..)
    }

    /// Ends the packet: anything left over is an error.
    pub fn finish(self) -> Result<(), Error> {
        if !self.is_empty() {
            return Err(Error::TrailingBytes);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_in_order() {
        let body = Bytes::from_static(b"\x07\x00\x02hi\x00\x01\xffrest");
        let mut r = Reader::new(&body);
        assert_eq!(r.u8(), Ok(7));
        assert_eq!(r.str(), Ok(Str::from_static("hi")));
        assert_eq!(r.bytes_prefixed(), Ok(Bytes::from_static(b"\xff")));
        let rest = r.rest();
        assert_eq!(&rest[..], b"rest");
        assert_eq!(
            rest.as_ptr(),
            body[8..].as_ptr(),
            "rest must share the body"
        );
        assert!(r.is_empty());
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn overruns_are_truncated_not_panics() {
        let body = Bytes::from_static(b"\x00\x05abc");
        assert_eq!(Reader::new(&body).str(), Err(Error::Truncated));
        assert_eq!(Reader::new(&body).take(usize::MAX), Err(Error::Truncated));
        let empty = Bytes::new();
        let mut r = Reader::new(&empty);
        assert_eq!(r.u8(), Err(Error::Truncated));
        assert_eq!(r.u16(), Err(Error::Truncated));
        assert!(r.rest().is_empty());
        let one = Bytes::from_static(b"\x01");
        assert_eq!(Reader::new(&one).u16(), Err(Error::Truncated));
    }

    #[test]
    fn finish_rejects_leftovers() {
        let body = Bytes::from_static(b"\x00\x01");
        let mut r = Reader::new(&body);
        assert_eq!(r.u8(), Ok(0));
        assert_eq!(r.finish(), Err(Error::TrailingBytes));
    }
}
