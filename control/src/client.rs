//! The CLI's HTTP client: one request per connection, over TLS (service API, trusting the hub's
//! CA) or plain (the engine's ops port).

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request to `url` (`http://` or `https://host:port/path?query`).
pub async fn request(
    method: Method,
    url: &str,
    headers: &[(&str, String)],
    body: Option<Vec<u8>>,
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
) -> anyhow::Result<Response> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let host = uri.host().context("URL has no host")?.to_string();
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("cannot reach {host}:{port}"))?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host.clone());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    match tls {
        Some((cfg, server_name)) => {
            let name = ServerName::try_from(server_name).context("bad TLS server name")?;
            let stream = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .context("TLS handshake with the hub failed")?;
            send(TokioIo::new(stream), req).await
        }
        None => send(TokioIo::new(tcp), req).await,
    }
}

async fn send<T>(io: T, req: Request<Full<Bytes>>) -> anyhow::Result<Response>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Response { status, body })
}
