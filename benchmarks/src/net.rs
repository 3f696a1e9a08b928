//! Sockets: TCP or TLS streams to the broker, bound to source addresses spread over
//! 127.0.0.0/8.
//!
//! One source address has about 28 000 ephemeral ports, and a socket bound to an address with
//! port 0 holds its port for every destination; so connection `n` binds to the `n`-th address of
//! 127.1.0.1 … 127.1.255.254 and 50 000 connections (or a connect-rate loop leaving sockets in
//! TIME_WAIT) never run out of ports. Only for loopback targets: elsewhere the kernel picks.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Source addresses in the spread: 127.1.0.1 … 127.1.255.254 (no .0 or .255 last octet).
const SPREAD: u64 = 256 * 254;

/// The `n`-th source address of the spread (wrapping).
pub fn source_addr(n: u64) -> Ipv4Addr {
    let k = n % SPREAD;
    Ipv4Addr::new(127, 1, (k / 254) as u8, (k % 254) as u8 + 1)
}

/// Hands out source addresses in turn, or none for a non-loopback target.
pub struct Sources {
    next: AtomicU64,
    enabled: bool,
}

impl Sources {
    pub fn for_target(target: SocketAddr) -> Self {
        Sources {
            next: AtomicU64::new(0),
            enabled: target.ip().is_loopback() && target.is_ipv4(),
        }
    }

    pub fn next(&self) -> Option<Ipv4Addr> {
        self.enabled
            .then(|| source_addr(self.next.fetch_add(1, Ordering::Relaxed)))
    }
}

/// How to reach the broker.
#[derive(Clone)]
pub enum Transport {
    Plain,
    Tls {
        connector: TlsConnector,
        name: ServerName<'static>,
    },
    /// TLS, then a WebSocket upgrade on IoT Hub's `/$iothub/websocket` with subprotocol
    /// `mqtt` (roost's port 443); the stream is carried in binary frames.
    TlsWebSocket {
        connector: TlsConnector,
        name: ServerName<'static>,
    },
}

impl Transport {
    /// TLS trusting only the CA in `ca` (PEM), checking the certificate against `server_name`.
    /// Session resumption is off unless `resume`: every connect is a full handshake, as for a
    /// fleet of devices that each connect once.
    pub fn tls(ca: &Path, server_name: &str, resume: bool) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("cannot read CA {}", ca.display()))?;
        for cert in certs {
            let cert = cert.with_context(|| format!("bad certificate in {}", ca.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("unusable CA certificate in {}", ca.display()))?;
        }
        if roots.is_empty() {
            bail!("no certificate in {}", ca.display());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        if !resume {
            cfg.resumption = rustls::client::Resumption::disabled();
        }
        let name = ServerName::try_from(server_name.to_string())
            .with_context(|| format!("bad TLS server name {server_name:?}"))?;
        Ok(Transport::Tls {
            connector: TlsConnector::from(Arc::new(cfg)),
            name,
        })
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls { .. } | Transport::TlsWebSocket { .. })
    }

    /// The same TLS, with MQTT carried over a WebSocket.
    pub fn over_websocket(self) -> anyhow::Result<Self> {
        match self {
            Transport::Tls { connector, name } | Transport::TlsWebSocket { connector, name } => {
                Ok(Transport::TlsWebSocket { connector, name })
            }
            Transport::Plain => bail!("--websocket needs --tls (port 443 is TLS)"),
        }
    }
}

/// A connected byte stream, plain, TLS, or in a WebSocket over TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    WebSocket(Box<crate::ws::WsStream<TlsStream<TcpStream>>>),
}

/// Opens TCP (from `source` when given) and, for TLS, completes the handshake; all within
/// `timeout`.
pub async fn connect(
    target: SocketAddr,
    source: Option<Ipv4Addr>,
    transport: &Transport,
    timeout: Duration,
) -> anyhow::Result<Stream> {
    let work = async {
        let socket = TcpSocket::new_v4().context("socket")?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(IpAddr::V4(ip), 0))
                .with_context(|| format!("bind to {ip}"))?;
        }
        let tcp = socket
            .connect(target)
            .await
            .with_context(|| format!("TCP connect to {target}"))?;
        tcp.set_nodelay(true)?;
        match transport {
            Transport::Plain => Ok(Stream::Plain(tcp)),
            Transport::Tls { connector, name } => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {target}"))?;
                Ok(Stream::Tls(Box::new(tls)))
            }
            Transport::TlsWebSocket { connector, name } => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {target}"))?;
                let host = match name {
                    ServerName::DnsName(d) => d.as_ref().to_string(),
                    _ => target.ip().to_string(),
                };
                let ws = crate::ws::WsStream::upgrade(tls, &host)
                    .await
                    .with_context(|| format!("WebSocket upgrade with {target}"))?;
                Ok(Stream::WebSocket(Box::new(ws)))
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => bail!("connecting to {target} took longer than {timeout:?}"),
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::WebSocket(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::WebSocket(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::WebSocket(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::WebSocket(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The soft limit on open files of this process (from /proc, so no libc call is needed).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_stay_in_127_1_and_avoid_0_and_255() {
        assert_eq!(source_addr(0), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(source_addr(253), Ipv4Addr::new(127, 1, 0, 254));
        assert_eq!(source_addr(254), Ipv4Addr::new(127, 1, 1, 1));
        assert_eq!(source_addr(SPREAD), source_addr(0));
        let mut seen = std::collections::HashSet::new();
        for n in 0..SPREAD {
            let a = source_addr(n);
            assert!(a.is_loopback());
            assert!(a.octets()[3] != 0 && a.octets()[3] != 255);
            assert!(seen.insert(a), "{a} handed out twice in one cycle");
        }
    }

    #[test]
    fn sources_only_for_loopback_ipv4() {
        let local = Sources::for_target("127.0.0.1:1883".parse().expect("addr"));
        assert_eq!(local.next(), Some(Ipv4Addr::new(127, 1, 0, 1)));
        assert_eq!(local.next(), Some(Ipv4Addr::new(127, 1, 0, 2)));
        let remote = Sources::for_target("10.0.0.1:1883".parse().expect("addr"));
        assert_eq!(remote.next(), None);
    }

    #[test]
    fn reads_the_open_files_limit() {
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
