//! A keep-alive HTTP/1.1 client for one origin (the service API over TLS, or the engine's ops
//! port in plain HTTP): one connection, reopened once if the server closed it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// Longest a single request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Response {
    pub status: u16,
    pub body: Bytes,
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
    ) -> anyhow::Result<Self> {
        let uri: hyper::Uri = base.parse().with_context(|| format!("bad URL {base}"))?;
        let host = uri
            .host()
            .context("URL has no host")?
            .trim_matches(['[', ']'])
            .to_string();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = match (https, tls) {
            (false, _) => None,
            (true, None) => bail!("{base} is https but no TLS configuration was given"),
            (true, Some((cfg, name))) => Some((
                cfg,
                ServerName::try_from(name).context("bad TLS server name")?,
            )),
        };
        Ok(Client {
            host,
            port,
            tls,
            sender: None,
        })
    }

    /// Sends one request; `path` includes the query.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Response> {
        let body = Bytes::from(body.unwrap_or_default());
        // A kept-alive connection may have been closed by the server since: retry once fresh.
        for attempt in 0..2 {
            let req = self.build(method.clone(), path, headers, body.clone())?;
            let sender = match self.sender.as_mut() {
                Some(s) if !s.is_closed() => s,
                _ => self.sender.insert(self.open().await?),
            };
            let sent = tokio::time::timeout(REQUEST_TIMEOUT, async {
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(Response { status, body })
            })
            .await;
            match sent {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(_)) if attempt == 0 => self.sender = None,
                Ok(Err(e)) => {
                    return Err(e)
                        .with_context(|| format!("{method} {path} on {}:{}", self.host, self.port))
                }
                Err(_) => bail!(
                    "{method} {path} on {}:{} took longer than {REQUEST_TIMEOUT:?}",
                    self.host,
                    self.port
                ),
            }
        }
        bail!("{method} {path}: connection kept failing")
    }

    fn build(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("{}:{}", self.host, self.port));
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        Ok(req.body(Full::new(body))?)
    }

    async fn open(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("cannot reach {}:{}", self.host, self.port))?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => handshake(TokioIo::new(tcp)).await,
            Some((cfg, name)) => {
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {}:{}", self.host, self.port))?;
                handshake(TokioIo::new(tls)).await
            }
        }
    }
}

async fn handshake<T>(io: T) -> anyhow::Result<SendRequest<Full<Bytes>>>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    Ok(sender)
}
