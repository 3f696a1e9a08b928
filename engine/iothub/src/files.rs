//! File upload's blob store formats (wire spec §3), as the Azure Storage SDKs send them: a
//! blob's path (`/{container}/{blob…}`, percent-decoded, kept inside the store), a Put Block
//! List's `<BlockList>`, and a read's `x-ms-range`. Parsing only; control's `blobs` module
//! serves them.

/// A blob's place: its container and its path inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobPath {
    pub container: String,
    pub blob: String,
}

impl BlobPath {
    /// `/{container}/{blob…}` percent-decoded; `None` for what cannot name a file under the
    /// store (empty or dot segments, NUL, backslash, an empty blob).
    pub fn parse(path: &str) -> Option<Self> {
        let decoded = crate::encoding::percent_decode(path.trim_start_matches('/'));
        let (container, blob) = decoded.split_once('/')?;
        let valid = |s: &str| {
            !s.is_empty() && s != "." && s != ".." && !s.contains(['\0', '\\'])
        };
        if !valid(container) || container.starts_with('.') || blob.is_empty() || blob.len() > 1024 {
            return None;
        }
        if !blob.split('/').all(valid) {
            return None;
        }
        Some(Self {
            container: container.to_string(),
            blob: blob.to_string(),
        })
    }

    /// `/{container}/{blob}`.
    pub fn resource(&self) -> String {
        format!("/{}/{}", self.container, self.blob)
    }
}

/// The block ids of a `<BlockList>` (`Latest`, `Committed` or `Uncommitted` entries, in
/// order); `None` when it is not one.
pub fn block_list(xml: &str) -> Option<Vec<String>> {
    let start = xml.find("<BlockList")?;
    let rest = &xml[start..];
    if rest.starts_with("<BlockList/>") {
        return Some(Vec::new());
    }
    let mut ids = Vec::new();
    let mut at = rest;
    while let Some(open) = at.find('<') {
        at = &at[open + 1..];
        let tag_end = at.find('>')?;
        let tag = &at[..tag_end];
        at = &at[tag_end + 1..];
        if matches!(tag, "Latest" | "Committed" | "Uncommitted") {
            let close = at.find("</")?;
            ids.push(at[..close].trim().to_string());
            at = &at[close..];
        } else if tag == "/BlockList" {
            return Some(ids);
        }
    }
    None
}

/// `bytes=a-b` / `bytes=a-` within a blob of `size` bytes: the first and last byte.
pub fn parse_range(r: &str, size: u64) -> Option<(u64, u64)> {
    let (a, b) = r.trim().strip_prefix("bytes=")?.split_once('-')?;
    let a: u64 = a.trim().parse().ok()?;
    if size == 0 || a >= size {
        return None;
    }
    let b = match b.trim() {
        "" => size - 1,
        b => b.parse::<u64>().ok()?.min(size - 1),
    };
    (a <= b).then_some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_leave_the_store() {
        assert_eq!(
            BlobPath::parse("/fileuploads/dev-1/my%20file.txt"),
            Some(BlobPath { container: "fileuploads".into(), blob: "dev-1/my file.txt".into() })
        );
        for bad in ["/c", "/c/", "/../x", "/c/../x", "/c/a/./b", "/.blocks/x", "/c/a%00b", "/c/a\\b", "/c/a//b"] {
            assert_eq!(BlobPath::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn ranges_as_the_sdks_ask_for_them() {
        assert_eq!(parse_range("bytes=0-33554431", 300), Some((0, 299)));
        assert_eq!(parse_range("bytes=100-", 300), Some((100, 299)));
        assert_eq!(parse_range("bytes=300-400", 300), None);
        assert_eq!(parse_range("bytes=5-2", 300), None);
        assert_eq!(parse_range("bytes=0-0", 0), None);
    }

    #[test]
    fn block_lists_as_the_sdks_send_them() {
        let py = "<?xml version='1.0' encoding='utf-8'?>\n<BlockList><Latest>QUE=</Latest><Latest>QkI=</Latest></BlockList>";
        assert_eq!(block_list(py), Some(vec!["QUE=".to_string(), "QkI=".to_string()]));
        let node_empty = "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?><BlockList/>";
        assert_eq!(block_list(node_empty), Some(vec![]));
        assert_eq!(block_list("<Other/>"), None);
        assert_eq!(block_list("<BlockList><Latest>x"), None);
    }

}
