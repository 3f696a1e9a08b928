//! `Str`: an MQTT string that shares the frame's memory.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use bytes::Bytes;

use crate::Error;

/// The longest string a two-byte length prefix can carry.
const MAX_LEN: usize = u16::MAX as usize;

/// A valid MQTT string (§1.5.3): UTF-8, no U+0000, at most 65,535 bytes.
///
/// Decoded strings are slices of the frame's `Bytes`, so holding one keeps the frame alive and
/// costs no copy. Once a `Str` exists it is valid; every constructor checks.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Str(Bytes);

impl Str {
    /// Wraps bytes without copying them, after checking they form a valid MQTT string.
    pub fn from_utf8(bytes: Bytes) -> Result<Self, Error> {
        validate(&bytes)?;
        Ok(Str(bytes))
    }

    /// Copies a string, after checking it is a valid MQTT string.
    pub fn new(s: &str) -> Result<Self, Error> {
        validate(s.as_bytes())?;
        Ok(Str(Bytes::copy_from_slice(s.as_bytes())))
    }

    /// Wraps a static string without copying.
    ///
    /// # Panics
    /// If `s` contains U+0000 or is longer than 65,535 bytes: a static string is code, not
    /// input, so this is a bug at the call site.
    pub fn from_static(s: &'static str) -> Self {
        assert_valid(s);
        Str(Bytes::from_static(s.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // hot path: topics are matched through this on every publish. The workspace denies
        // `unsafe`, so we cannot skip the check; std's UTF-8 check has an ASCII fast path and
        // topics are short ASCII. It cannot fail (every constructor validated), hence "".
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Length in bytes. Shadows `str::len` so it skips the UTF-8 check `Deref` pays.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The underlying bytes, still shared with the frame.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

fn validate(bytes: &[u8]) -> Result<(), Error> {
    if bytes.len() > MAX_LEN {
        return Err(Error::StringTooLong { len: bytes.len() });
    }
    let s = std::str::from_utf8(bytes).map_err(|_| Error::InvalidUtf8)?;
    if s.contains('\0') {
        return Err(Error::NullInString);
    }
    Ok(())
}

fn assert_valid(s: &str) {
    if let Err(e) = validate(s.as_bytes()) {
        panic!("invalid MQTT string {s:?}: {e}");
    }
}

/// Copies the string.
///
/// # Panics
/// If `s` contains U+0000 or is longer than 65,535 bytes. Use [`Str::new`] for strings that came
/// from input.
impl From<&str> for Str {
    fn from(s: &str) -> Self {
        assert_valid(s);
        Str(Bytes::copy_from_slice(s.as_bytes()))
    }
}

/// Takes over the string's allocation without copying.
///
/// # Panics
/// Like `From<&str>`: if `s` contains U+0000 or is longer than 65,535 bytes.
impl From<String> for Str {
    fn from(s: String) -> Self {
        assert_valid(&s);
        Str(Bytes::from(s))
    }
}

impl Deref for Str {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Str {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

/// Lets maps keyed by `Str` be queried with a `&str`; `Hash` below hashes as `str` does.
impl Borrow<str> for Str {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl Hash for Str {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialEq<str> for Str {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for Str {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl fmt::Debug for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn from_utf8_shares_memory() {
        let frame = Bytes::from_static(b"xxdevices/d1/messages/events/");
        let s = Str::from_utf8(frame.slice(2..)).expect("valid");
        assert_eq!(s, "devices/d1/messages/events/");
        assert_eq!(s.as_bytes().as_ptr(), frame[2..].as_ptr());
    }

    #[test]
    fn rejects_invalid_utf8() {
        assert_eq!(
            Str::from_utf8(Bytes::from_static(b"a\xff")),
            Err(Error::InvalidUtf8)
        );
        // An encoded surrogate half (U+D800) is not UTF-8 either.
        assert_eq!(
            Str::from_utf8(Bytes::from_static(b"\xed\xa0\x80")),
            Err(Error::InvalidUtf8)
        );
    }

    #[test]
    fn rejects_nul() {
        assert_eq!(Str::new("a\0b"), Err(Error::NullInString));
    }

    #[test]
    fn rejects_too_long() {
        let long = "a".repeat(65_536);
        assert_eq!(Str::new(&long), Err(Error::StringTooLong { len: 65_536 }));
        assert!(Str::new(&long[..65_535]).is_ok());
    }

    #[test]
    #[should_panic(expected = "invalid MQTT string")]
    fn from_str_panics_on_nul() {
        let _ = Str::from("a\0");
    }

    #[test]
    fn map_lookup_by_str() {
        let mut map = HashMap::new();
        map.insert(Str::from("devices/d1"), 1);
        assert_eq!(map.get("devices/d1"), Some(&1));
        assert_eq!(map.get("devices/d2"), None);
    }

    #[test]
    fn debug_and_display_show_the_text() {
        let s = Str::from_static("a\"b");
        assert_eq!(format!("{s:?}"), r#""a\"b""#);
        assert_eq!(s.to_string(), "a\"b");
    }
}
