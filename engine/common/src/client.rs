//! A keep-alive HTTP/1.1 client for one origin (the service API over TLS, or an ops port in
//! plain HTTP): one connection, reopened once if the server closed it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// Longest a single request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL {url}: {detail}")]
    BadUrl { url: String, detail: String },
    #[error("{url} is https but no TLS configuration was given")]
    NoTlsConfig { url: String },
    #[error("cannot reach {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("{what} on {addr}: {source}")]
    Http {
        what: String,
        addr: String,
        source: hyper::Error,
    },
    #[error("bad request {what}: {detail}")]
    BadRequest { what: String, detail: String },
    #[error("{what} on {addr} took longer than {REQUEST_TIMEOUT:?}")]
    Timeout { what: String, addr: String },
}

/// A response with its body read.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// The `ETag` header, quotes stripped (a twin's etag, a feedback lock token).
    pub etag: Option<String>,
    /// Every header of the answer (a query's `x-ms-continuation`, …).
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

fn etag_of(headers: &hyper::HeaderMap) -> Option<String> {
    let v = headers.get(hyper::header::ETAG)?.to_str().ok()?;
    Some(v.trim().trim_matches('"').to_string())
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub struct Client {
    host: String,
    port: u16,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// A client for `base` (`http://host:port` or `https://host:port`; a path is ignored).
    /// `https` needs `tls` (the config and the name the certificate must carry).
    pub fn new(
        base: &str,
        tls: Option<(Arc<rustls::ClientConfig>, String)>,
    ) -> Result<Self, ClientError> {
        let bad = |detail: String| ClientError::BadUrl {
            url: base.to_string(),
            detail,
        };
        let uri: hyper::Uri = base
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(e.to_string()))?;
        let host = uri
            .host()
            .ok_or_else(|| bad("no host".into()))?
            .trim_matches(['[', ']'])
            .to_string();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = match (https, tls) {
            (false, _) => None,
            (true, None) => {
                return Err(ClientError::NoTlsConfig {
                    url: base.to_string(),
                })
            }
            (true, Some((cfg, name))) => Some((
                cfg,
                ServerName::try_from(name).map_err(|e| bad(format!("TLS server name: {e}")))?,
            )),
        };
        Ok(Client {
            host,
            port,
            tls,
            sender: None,
        })
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Sends one request; `path` includes the query.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        let body = Bytes::from(body.unwrap_or_default());
        let what = format!("{method} {path}");
        // A kept-alive connection may have been closed by the server since: retry once fresh.
        let mut attempt = 0;
        loop {
            let req = self.build(method.clone(), path, headers, body.clone())?;
            let sender = match self.sender.as_mut() {
                Some(s) if !s.is_closed() => s,
                _ => self.sender.insert(self.open().await?),
            };
            let sent = tokio::time::timeout(REQUEST_TIMEOUT, async {
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                let status = resp.status().as_u16();
                let etag = etag_of(resp.headers());
                let headers = resp.headers().clone();
                let body = resp.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(Response {
                    status,
                    etag,
                    headers,
                    body,
                })
            })
            .await;
            match sent {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(_)) if attempt == 0 => {
                    self.sender = None;
                    attempt += 1;
                }
                Ok(Err(source)) => {
                    return Err(ClientError::Http {
                        what,
                        addr: self.addr(),
                        source,
                    })
                }
                Err(_) => {
                    return Err(ClientError::Timeout {
                        what,
                        addr: self.addr(),
                    })
                }
            }
        }
    }

    fn build(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", self.addr());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        req.body(Full::new(body))
            .map_err(|e| ClientError::BadRequest {
                what: format!("{method} {path}"),
                detail: e.to_string(),
            })
    }

    async fn open(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let addr = self.addr();
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(TokioIo::new(tcp), addr).await,
            Some((cfg, name)) => {
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| ClientError::Tls {
                        addr: addr.clone(),
                        source,
                    })?;
                handshake(TokioIo::new(tls), addr).await
            }
        }
    }
}

async fn handshake<T>(io: T, addr: String) -> Result<SendRequest<Full<Bytes>>, ClientError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|source| ClientError::Http {
            what: "handshake".into(),
            addr,
            source,
        })?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One request on a fresh connection to `url` (`http://host:port/path?query`, or `https` with
/// `tls`): for callers that make a single call.
pub async fn request_once(
    method: Method,
    url: &str,
    headers: &[(&str, String)],
    body: Option<Vec<u8>>,
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
) -> Result<Response, ClientError> {
    let uri: hyper::Uri =
        url.parse()
            .map_err(|e: hyper::http::uri::InvalidUri| ClientError::BadUrl {
                url: url.to_string(),
                detail: e.to_string(),
            })?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    Client::new(url, tls)?
        .request(method, &path, headers, body)
        .await
}
