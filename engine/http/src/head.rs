//! An HTTP/1.1 request head (request line and headers), read with `httparse` once the blank
//! line has arrived, and refused early when it cannot fit the limits.

use bytes::Bytes;

/// Bounds on a request head.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// The request line and headers, with the blank line.
    pub max_bytes: usize,
    pub max_headers: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        Self {
            max_bytes: 8 * 1024,
            max_headers: 64,
        }
    }
}

/// Why a head is refused (each answered 400 or 431 by the caller, then closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the request head is over {0} bytes")]
    TooLarge(usize),
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    #[error("not an HTTP/1.1 request head: {0}")]
    Malformed(&'static str),
    #[error("HTTP/1.{0} is not served; use HTTP/1.1")]
    Version(u8),
}

impl HeadError {
    pub fn error_code(&self) -> &'static str {
        match self {
            HeadError::TooLarge(_) => "head_too_large",
            HeadError::TooManyHeaders(_) => "too_many_headers",
            HeadError::Malformed(_) => "malformed_head",
            HeadError::Version(_) => "http_version",
        }
    }

    /// The HTTP status it is answered with.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge(_) | HeadError::TooManyHeaders(_) => 431,
            HeadError::Version(_) => 505,
            HeadError::Malformed(_) => 400,
        }
    }
}

/// A request head: method, target, headers in order (names as sent), and its length in the
/// input (the body, if any, follows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    pub headers: Vec<(String, Bytes)>,
    pub len: usize,
}

impl Head {
    /// The first header named `name` (case-insensitive), as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    /// Whether a comma-separated header holds `token` (case-insensitive), as `Connection:
    /// keep-alive, Upgrade` holds `upgrade`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// The query, without the `?` (empty when there is none).
    pub fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }

    /// The body length the head announces: `Content-Length`, or `None` without one. A
    /// chunked body is not taken (device requests carry their length).
    pub fn content_length(&self) -> Result<Option<usize>, HeadError> {
        if self.has_token("transfer-encoding", "chunked") {
            return Err(HeadError::Malformed("chunked bodies are not taken"));
        }
        match self.header("content-length") {
            None => Ok(None),
            Some(v) => v
                .parse::<usize>()
                .map(Some)
                .map_err(|_| HeadError::Malformed("Content-Length is not a number")),
        }
    }
}

/// Whether the body is sent in chunks (`Transfer-Encoding: chunked`, as Node's `http` sends a
/// body it was given no length for).
pub fn is_chunked(head: &Head) -> bool {
    head.has_token("transfer-encoding", "chunked")
}

/// A chunked body (RFC 9112 §7.1) at the start of `input`: its data joined and the bytes it
/// took, once its last chunk and trailer have come (`Ok(None)` until then); refused past `max`
/// data bytes, on a malformed chunk, or a size line longer than 1 KiB.
pub fn dechunk(input: &[u8], max: usize) -> Result<Option<(Vec<u8>, usize)>, HeadError> {
    let line_end = |from: usize| -> Result<Option<usize>, HeadError> {
        match input[from..].windows(2).position(|w| w == b"\r\n") {
            Some(i) if i <= 1024 => Ok(Some(from + i)),
            Some(_) => Err(HeadError::Malformed("a chunk line over 1 KiB")),
            None if input.len() - from > 1024 => {
                Err(HeadError::Malformed("a chunk line over 1 KiB"))
            }
            None => Ok(None),
        }
    };
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let Some(end) = line_end(pos)? else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&input[pos..end])
            .map_err(|_| HeadError::Malformed("a chunk size"))?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size, 16).map_err(|_| HeadError::Malformed("a chunk size"))?;
        pos = end + 2;
        if size == 0 {
            // Trailer fields, then the blank line.
            loop {
                let Some(end) = line_end(pos)? else {
                    return Ok(None);
                };
                let blank = end == pos;
                pos = end + 2;
                if blank {
                    return Ok(Some((out, pos)));
                }
            }
        }
        if out.len().saturating_add(size) > max {
            return Err(HeadError::TooLarge(max));
        }
        if input.len() < pos + size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&input[pos..pos + size]);
        if &input[pos + size..pos + size + 2] != b"\r\n" {
            return Err(HeadError::Malformed(
                "a chunk's data is not followed by CRLF",
            ));
        }
        pos += size + 2;
    }
}

/// Reads a request head from the start of `input`: `Ok(None)` until its blank line has come
/// (refused at once when what has come already cannot fit the limits).
pub fn parse(input: &[u8], limits: HeadLimits) -> Result<Option<Head>, HeadError> {
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    let status = match req.parse(input) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::TooManyHeaders(limits.max_headers))
        }
        Err(httparse::Error::Version) => return Err(HeadError::Malformed("the HTTP version")),
        Err(httparse::Error::Token) => return Err(HeadError::Malformed("the request line")),
        Err(httparse::Error::HeaderName | httparse::Error::HeaderValue) => {
            return Err(HeadError::Malformed("a header field"))
        }
        Err(_) => return Err(HeadError::Malformed("the request line")),
    };
    let len = match status {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => {
            if input.len() > limits.max_bytes {
                return Err(HeadError::TooLarge(limits.max_bytes));
            }
            return Ok(None);
        }
    };
    if len > limits.max_bytes {
        return Err(HeadError::TooLarge(limits.max_bytes));
    }
    match req.version {
        Some(1) => {}
        Some(v) => return Err(HeadError::Version(v)),
        None => return Err(HeadError::Malformed("the HTTP version")),
    }
    Ok(Some(Head {
        method: req.method.unwrap_or_default().to_string(),
        target: req.path.unwrap_or_default().to_string(),
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_string(), Bytes::copy_from_slice(h.value)))
            .collect(),
        len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_body_is_joined_once_whole_and_bounded() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        for cut in 0..body.len() - 4 {
            assert_eq!(dechunk(&body[..cut], 100), Ok(None), "{cut}");
        }
        let (data, used) = dechunk(body, 100).expect("whole").expect("done");
        assert_eq!(
            (data.as_slice(), &body[used..]),
            (&b"hello world"[..], &b"NEXT"[..])
        );
        assert_eq!(dechunk(body, 8), Err(HeadError::TooLarge(8)));
        assert!(dechunk(b"zz\r\n", 100).is_err());
        assert!(dechunk(b"2\r\nabXY", 100).is_err());
        assert!(dechunk(&[b'1'; 2000], 100).is_err());
    }

    #[test]
    fn a_head_is_read_once_whole_and_refused_early_when_too_large() {
        let raw = b"GET /$iothub/websocket?iothub-no-client-cert=true HTTP/1.1\r\nHost: hub\r\nConnection: keep-alive, Upgrade\r\nContent-Length: 0\r\n\r\nrest";
        assert_eq!(parse(&raw[..20], HeadLimits::default()), Ok(None));
        let h = parse(raw, HeadLimits::default())
            .expect("the expected value")
            .expect("the expected value");
        assert_eq!(h.method, "GET");
        assert_eq!(h.path(), "/$iothub/websocket");
        assert_eq!(h.query(), "iothub-no-client-cert=true");
        assert_eq!(h.len, raw.len() - 4);
        assert!(h.has_token("connection", "upgrade"));
        assert_eq!(h.header("HOST"), Some("hub"));
        assert_eq!(h.content_length(), Ok(Some(0)));
        let limits = HeadLimits {
            max_bytes: 64,
            max_headers: 4,
        };
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 100));
        assert_eq!(parse(&long, limits), Err(HeadError::TooLarge(64)));
        let many = b"GET / HTTP/1.1\r\na: 1\r\nb: 1\r\nc: 1\r\nd: 1\r\ne: 1\r\n\r\n";
        assert_eq!(parse(many, limits), Err(HeadError::TooManyHeaders(4)));
        assert_eq!(
            parse(b"GET / HTTP/1.0\r\n\r\n", limits),
            Err(HeadError::Version(0))
        );
        assert!(matches!(
            parse(b"\x16\x03\x01 hello", limits),
            Err(HeadError::Malformed(_))
        ));
        let chunked = parse(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            limits,
        )
        .expect("the expected value")
        .expect("the expected value");
        assert!(chunked.content_length().is_err());
    }
}
