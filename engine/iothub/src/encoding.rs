//! Percent-encoding as the SDKs write it, shared by every module.

use std::borrow::Cow;
use std::str::Utf8Error;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything except RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`): what Python's
/// `quote(s, safe="")` escapes. Node's `encodeURIComponent` escapes a subset of this, so output
/// encoded this way is accepted by every SDK.
const ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes all but the unreserved characters.
pub(crate) fn encode(s: &str) -> String {
    utf8_percent_encode(s, ESCAPE).to_string()
}

/// Percent-decodes a path segment (an id the SDKs URL-encode into a path or address); bytes
/// that do not decode as UTF-8 leave `s` as written.
pub fn percent_decode(s: &str) -> String {
    decode(s).map_or_else(|_| s.to_string(), |d| d.into_owned())
}

/// Percent-decodes `s`. `+` stays `+`: no SDK writes a space as `+`, and base64 signatures
/// contain literal `+` when a client leaves them unescaped. A `%` not followed by two hex digits
/// is kept as written, as IoT Hub's own .NET decoder does.
pub(crate) fn decode(s: &str) -> Result<Cow<'_, str>, Utf8Error> {
    percent_decode_str(s).decode_utf8()
}
