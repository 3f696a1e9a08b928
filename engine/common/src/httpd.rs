//! A small HTTP/1.1 server on tokio + hyper, shared by the engine's ops port and the control
//! plane's service API: a request is admitted from its headers (credentials, route, body
//! limit) before its body is read whole, handlers are plain async functions from request to
//! response, and every connection lives within [`Limits`] (a cap, handshake, header and body
//! timeouts).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// A request with its body read.
pub type Req = Request<Bytes>;
pub type Resp = Response<Full<Bytes>>;

/// Largest request body any route accepts (a bulk registry operation is the biggest one).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// What a server holds for its clients at most, and for how long.
#[derive(Clone)]
pub struct Limits {
    /// Connections open at once; one more is closed at accept (counted `connection_limit`).
    pub max_connections: usize,
    /// Time for the TLS handshake.
    pub tls_handshake: Duration,
    /// Time for a request's headers, counted from when the server waits for them: for a
    /// kept-alive connection that is also how long it may sit idle between requests.
    pub header_read: Duration,
    /// Time for a request's body once its headers are admitted.
    pub body_read: Duration,
    /// The largest body any request may send, whatever its admission allows.
    pub max_body: usize,
    /// Told the reason each time a connection is refused or cut by a limit.
    pub on_limit: Arc<dyn Fn(&'static str) + Send + Sync>,
}

impl Limits {
    /// 1,024 connections, 10 s for the handshake, 20 s for headers (and idle keep-alive), 30 s
    /// for a body; limits hit are not counted.
    pub fn new() -> Self {
        Limits {
            max_connections: 1024,
            tls_handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(20),
            body_read: Duration::from_secs(30),
            max_body: MAX_BODY,
            on_limit: Arc::new(|_| {}),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new()
    }
}

/// Decides from the request line and headers alone whether the body is read: `Ok(limit)` reads
/// at most `limit` bytes of it (more is a 413), `Err(response)` answers at once (a 401 without
/// credentials, a 404) and the body is never read.
pub trait Admit: Fn(&Parts) -> Result<usize, Resp> + Send + Sync + 'static {}
impl<T: Fn(&Parts) -> Result<usize, Resp> + Send + Sync + 'static> Admit for T {}

/// Serves `listener` forever, optionally over TLS, within `limits`; each request is admitted
/// by `admit` from its headers, then its body is read and it goes to `handler`.
pub async fn serve<A, H, F>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    admit: A,
    handler: H,
) where
    A: Admit,
    H: Fn(Req) -> F + Send + Sync + 'static,
    F: Future<Output = Resp> + Send + 'static,
{
    let handler = Arc::new(handler);
    let admit = Arc::new(admit);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            (limits.on_limit)("connection_limit");
            drop(stream);
            continue;
        };
        let (handler, admit, tls, limits) =
            (handler.clone(), admit.clone(), tls.clone(), limits.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => connection(stream, None, handler, admit, limits).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.tls_handshake, acceptor.accept(stream)).await
                    {
                        Ok(Ok(s)) => {
                            let peer = s
                                .get_ref()
                                .1
                                .peer_certificates()
                                .filter(|c| !c.is_empty())
                                .map(|c| PeerCerts(Arc::new(c.to_vec())));
                            connection(s, peer, handler, admit, limits).await
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "https handshake failed"),
                        Err(_) => (limits.on_limit)("tls_handshake_timeout"),
                    }
                }
            }
        });
    }
}

/// The certificates a client presented in the TLS handshake (leaf first): a request's
/// extension on a server whose TLS asks for client certificates.
#[derive(Clone)]
pub struct PeerCerts(pub Arc<Vec<rustls::pki_types::CertificateDer<'static>>>);

/// Serves one connection's requests.
async fn connection<S, A, H, F>(
    io: S,
    peer: Option<PeerCerts>,
    handler: Arc<H>,
    admit: Arc<A>,
    limits: Limits,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    A: Admit,
    H: Fn(Req) -> F + Send + Sync + 'static,
    F: Future<Output = Resp> + Send + 'static,
{
    let (body_read, max_body) = (limits.body_read, limits.max_body);
    let service = service_fn(move |req: Request<Incoming>| {
        let (handler, admit, peer) = (handler.clone(), admit.clone(), peer.clone());
        async move {
            let (mut parts, body) = req.into_parts();
            if let Some(peer) = peer {
                parts.extensions.insert(peer);
            }
            let limit = match admit(&parts) {
                Ok(limit) => limit.min(max_body),
                Err(refusal) => return Ok(refusal),
            };
            if declared_length(&parts).is_some_and(|n| n > limit as u64) {
                return Ok(text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large",
                ));
            }
            let read = tokio::time::timeout(body_read, Limited::new(body, limit).collect());
            let resp = match read.await {
                Ok(Ok(b)) => handler(Request::from_parts(parts, b.to_bytes())).await,
                Ok(Err(_)) => text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
                Err(_) => text(StatusCode::REQUEST_TIMEOUT, "request body not sent in time"),
            };
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    match builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
    {
        Err(e) if e.is_timeout() => (limits.on_limit)("header_read_timeout"),
        Err(e) => tracing::debug!(error = %e, "http connection ended with an error"),
        Ok(()) => {}
    }
}

/// The request's `Content-Length`, if it sent one that parses.
fn declared_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Paths any client may ask for without a credential: liveness and readiness probes.
pub const PROBE_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// An [`Admit`] for an ops port: every request but a probe must carry `Authorization: Bearer
/// {token}` (401 otherwise, the body unread); bodies up to `limit`.
pub fn admit_bearer(token: String, limit: usize) -> impl Admit {
    move |parts: &Parts| {
        let presented = parts
            .headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if PROBE_PATHS.contains(&parts.uri.path())
            || crate::hubfile::bearer_matches(presented, &token)
        {
            Ok(limit)
        } else {
            Err(text(
                StatusCode::UNAUTHORIZED,
                "this port requires Authorization: Bearer <ops_token from hub.json>\n",
            ))
        }
    }
}

/// An [`Admit`] for a server without credentials: every request, with bodies up to `limit`.
pub fn admit_all(limit: usize) -> impl Admit {
    move |_: &Parts| Ok(limit)
}

pub fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A JSON response; a body that cannot be serialised is a 500, never an empty success.
pub fn json(status: StatusCode, body: &impl serde::Serialize) -> Resp {
    let bytes = match serde_json::to_vec(body) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot serialise a response body");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot serialise the response",
            );
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// A response whose body is JSON the caller already wrote.
pub fn json_raw(status: StatusCode, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

pub fn empty(status: StatusCode) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// The value of query parameter `name`, percent-decoded.
pub fn query_param(req: &Req, name: &str) -> Option<String> {
    uri_query_param(req.uri(), name)
}

/// The first value of the query parameter `name` of `uri`, percent-decoded.
pub fn uri_query_param(uri: &hyper::Uri, name: &str) -> Option<String> {
    let q = uri.query()?;
    q.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

pub fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Unserialisable;
    impl serde::Serialize for Unserialisable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("no"))
        }
    }

    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A server with small limits: bodies of 16 bytes, admitted only with an Authorization
    /// header; the handler answers the body's length. Returns its address and the limits hit.
    async fn small_server() -> (std::net::SocketAddr, Arc<Mutex<Vec<&'static str>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hit = Arc::new(Mutex::new(Vec::new()));
        let h = hit.clone();
        let limits = Limits {
            max_connections: 3,
            tls_handshake: Duration::from_secs(1),
            header_read: Duration::from_millis(300),
            body_read: Duration::from_millis(300),
            max_body: MAX_BODY,
            on_limit: Arc::new(move |r| h.lock().expect("lock").push(r)),
        };
        let admit = |parts: &Parts| match parts.headers.contains_key("authorization") {
            true => Ok(16),
            false => Err(text(StatusCode::UNAUTHORIZED, "no")),
        };
        tokio::spawn(serve(
            listener,
            None,
            limits,
            admit,
            |req: Req| async move { text(StatusCode::OK, req.body().len().to_string()) },
        ));
        (addr, hit)
    }

    /// Sends `head` (and `body`), returns the status code, or None if the server closed first.
    async fn exchange(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> Option<u16> {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(head.as_bytes()).await.expect("head");
        s.write_all(body).await.expect("body");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return None,
            }
        }
        std::str::from_utf8(&got)
            .ok()?
            .split(' ')
            .nth(1)?
            .parse()
            .ok()
    }

    #[tokio::test]
    async fn a_request_is_admitted_from_its_headers_before_its_body_is_read() {
        let (addr, _) = small_server().await;
        // No credential: 401 though the declared 4 MiB body never comes.
        let head = "PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 4194304\r\n\r\n";
        assert_eq!(exchange(addr, head, b"").await, Some(401));
        // Admitted, but declaring more than its limit: 413 at once.
        let head = "PUT /x HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\nContent-Length: 100\r\n\r\n";
        assert_eq!(exchange(addr, head, b"").await, Some(413));
        // Chunked, no length declared: cut at the limit while reading.
        let head =
            "PUT /x HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            exchange(
                addr,
                head,
                b"20\r\n0123456789abcdef0123456789abcdef\r\n0\r\n\r\n"
            )
            .await,
            Some(413)
        );
        let head = "PUT /x HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\nContent-Length: 10\r\n\r\n";
        assert_eq!(exchange(addr, head, b"0123456789").await, Some(200));
    }

    #[tokio::test]
    async fn slow_headers_silent_sockets_and_one_connection_too_many_are_closed() {
        let (addr, hit) = small_server().await;
        let t0 = std::time::Instant::now();
        let mut unfinished = TcpStream::connect(addr).await.expect("connect");
        unfinished
            .write_all(b"GET / HTTP/1.1\r\nHost:")
            .await
            .expect("partial");
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let mut third = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The fourth is over the cap of three: closed at once.
        let mut over = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(2), over.read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "over the cap: {n:?}");
        for s in [&mut unfinished, &mut silent, &mut third] {
            let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
            assert!(
                matches!(n, Ok(Ok(0)) | Ok(Err(_))),
                "held past the header timeout: {n:?}"
            );
        }
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(250),
            "closed after {waited:?}"
        );
        let hit = hit.lock().expect("lock").clone();
        assert!(hit.contains(&"connection_limit"), "{hit:?}");
        assert!(hit.contains(&"header_read_timeout"), "{hit:?}");
    }

    #[test]
    fn a_body_that_fails_to_serialise_is_a_500() {
        let r = json(StatusCode::OK, &Unserialisable);
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let ok = json(StatusCode::OK, &serde_json::json!({"a": 1}));
        assert_eq!(ok.status(), StatusCode::OK);
    }
}
