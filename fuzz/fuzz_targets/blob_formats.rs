//! The blob store's request formats (roost_iothub::files): blob paths never name anything
//! outside the store (no empty, `.` or `..` segment, no NUL or backslash, no hidden
//! container), block lists parse or are refused, ranges lie within the blob.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_iothub::files::{block_list, parse_range, BlobPath};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(p) = BlobPath::parse(text) {
        assert!(!p.container.starts_with('.'));
        for segment in std::iter::once(p.container.as_str()).chain(p.blob.split('/')) {
            assert!(!segment.is_empty() && segment != "." && segment != "..", "{text:?}");
            assert!(!segment.contains(['\0', '\\']), "{text:?}");
        }
    }
    let _ = block_list(text);
    let size = u64::from(data.first().copied().unwrap_or(0)) * 1000;
    if let Some((a, b)) = parse_range(text, size) {
        assert!(a <= b && b < size, "{text:?} in {size}");
    }
});
