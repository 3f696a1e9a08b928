//! The byte stream of one device connection: plain TCP, or TLS over it, read through the
//! shard's receive buffer so that a connection holds no buffer while it waits.
//!
//! What it is: the transport under `conn`. Reads wait for readiness (glommio's non-buffered
//! stream hands the buffer to `recv` only once bytes are there), `recv` into the shard-wide
//! [`RxBuf`], and for TLS decrypt from there with rustls's *unbuffered* API; the connection
//! keeps only the tail of a TLS record that has not fully arrived. An idle TLS connection thus
//! holds the rustls state (keys, sequence numbers) and no record buffers — where the buffered
//! `rustls::ServerConnection` would keep a 4 KiB deframer buffer per connection.
//!
//! A connection upgraded to a WebSocket on port 443 (`https.rs`) keeps the same `Wire` with a
//! `roost_http::WsSession` inside it: reads hand on the binary stream the frames carry, writes
//! go out as one binary frame each, and pings are answered on the next read or write.
//!
//! What it is not: MQTT. It moves bytes; framing is `roost_mqtt`'s.
//!
//! Cancellation: `read` is raced against other wake-ups and may be dropped at any await. Every
//! byte it has taken from the socket is either in the caller's buffer or in `Tls::incoming`
//! before it awaits, and TLS bytes still to be sent wait in `Tls::outgoing`, so a dropped read
//! loses nothing.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::BytesMut;
use futures_lite::io::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedStatus,
};
use rustls::ServerConfig;

/// Size of a shard's receive buffer: one `recv` takes at most this much. Larger than a whole
/// TLS record (18,437 bytes on the wire), so a record always fits with what was left over.
pub const RX_BUF: usize = 64 * 1024;
/// Most TLS input a connection may hold unprocessed: rustls joins a handshake message of up to
/// 64 KiB across records and refuses larger ones; past handshakes it is one unfinished record.
const MAX_HELD: usize = 0xffff + 2 * 18_437;

/// The shard-wide buffer every connection of the shard receives into. Borrowed only inside a
/// single poll, never across an await.
pub struct RxBuf(RefCell<Vec<u8>>);

impl RxBuf {
    pub fn new() -> Self {
        RxBuf(RefCell::new(vec![0; RX_BUF]))
    }
}

impl Default for RxBuf {
    fn default() -> Self {
        Self::new()
    }
}

/// One connection's transport.
pub struct Wire {
    stream: TcpStream,
    /// Boxed so a plain connection does not carry the (1 KiB) TLS state inline.
    tls: Option<Box<Tls>>,
    /// The WebSocket framing of an upgraded connection.
    ws: Option<Box<roost_http::WsSession>>,
}

struct Tls {
    conn: UnbufferedServerConnection,
    /// TLS bytes received that do not yet make a whole record; empty (no allocation) between
    /// records, which is how an idle connection spends its time.
    incoming: Vec<u8>,
    /// TLS bytes encoded but not yet written to the socket.
    outgoing: Vec<u8>,
    /// The handshake has completed (rustls allows application data both ways).
    established: bool,
    /// The peer sent close_notify: no more plaintext will come.
    peer_closed: bool,
}

/// Why the TLS layer gave up on a connection.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("tls: {0}")]
    Protocol(&'static str),
}

impl From<WireError> for io::Error {
    fn from(e: WireError) -> io::Error {
        match e {
            WireError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

/// What one pass over received TLS bytes produced.
#[derive(Debug, PartialEq, Eq)]
enum Pumped {
    /// rustls needs more bytes from the peer (mid-handshake, or a record not yet whole).
    NeedData,
    /// Handshake done and every whole record consumed.
    Traffic,
    /// Both sides have sent close_notify.
    Closed,
}

impl Wire {
    pub fn plain(stream: TcpStream) -> Self {
        Wire {
            stream,
            tls: None,
            ws: None,
        }
    }

    pub fn tls(stream: TcpStream, config: Arc<ServerConfig>) -> Result<Self, WireError> {
        Ok(Wire {
            stream,
            tls: Some(Box::new(Tls {
                conn: UnbufferedServerConnection::new(config)?,
                incoming: Vec::new(),
                outgoing: Vec::new(),
                established: false,
                peer_closed: false,
            })),
            ws: None,
        })
    }

    /// The certificates the client presented in the TLS handshake (the leaf first, then its
    /// intermediates), if any.
    pub fn client_certs(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.tls
            .as_deref()?
            .conn
            .peer_certificates()
            .filter(|c| !c.is_empty())
    }

    /// From now on the stream is carried in WebSocket frames (after the `101` went out).
    /// `early` is what the client sent behind its upgrade request; the stream bytes it holds
    /// are appended to `plain`.
    pub fn start_websocket(
        &mut self,
        mut ws: roost_http::WsSession,
        early: &[u8],
        plain: &mut BytesMut,
    ) -> Result<(), WireError> {
        ws.handle_bytes(early);
        self.ws = Some(Box::new(ws));
        match self.take_ws_data(plain) {
            true => Err(WireError::Protocol("the WebSocket was closed")),
            false => Ok(()),
        }
    }

    /// Frees a quiet WebSocket's buffers (no-op for a plain stream: its TLS state keeps no
    /// buffer between records already).
    pub fn release_idle_memory(&mut self) {
        if let Some(ws) = self.ws.as_deref_mut() {
            ws.release_idle_memory();
        }
    }

    /// Changes the WebSocket frame limit (no-op for a plain stream).
    pub fn set_ws_max_frame(&mut self, max: usize) {
        if let Some(ws) = self.ws.as_deref_mut() {
            ws.set_max_frame(max);
        }
    }

    /// Moves the WebSocket's stream bytes to `plain`; true once the WebSocket is closed.
    fn take_ws_data(&mut self, plain: &mut BytesMut) -> bool {
        let Some(ws) = self.ws.as_deref_mut() else {
            return false;
        };
        let mut closed = false;
        while let Some(e) = ws.poll_event() {
            match e {
                roost_http::WsEvent::Data(d) => plain.extend_from_slice(&d),
                roost_http::WsEvent::Closed { .. } => closed = true,
            }
        }
        closed || ws.is_closed()
    }

    /// Writes what the WebSocket owes the peer (pongs, a close).
    async fn flush_ws(&mut self) -> Result<(), WireError> {
        let Some(out) = self.ws.as_deref_mut().and_then(|ws| ws.poll_transmit()) else {
            return Ok(());
        };
        self.write_stream(&out).await
    }

    /// Runs the TLS handshake to completion (no-op for plain TCP). Application data that arrived
    /// with the client's last handshake flight is appended to `plain`. On failure the alert
    /// rustls chose (no common version or cipher suite, a malformed message) is sent first.
    pub async fn handshake(&mut self, rx: &RxBuf, plain: &mut BytesMut) -> Result<(), WireError> {
        let result = self.drive_handshake(rx, plain).await;
        if result.is_err() {
            // Best effort: the caller bounds the whole handshake in time.
            let _ = self.flush_tls().await;
        }
        result
    }

    async fn drive_handshake(&mut self, rx: &RxBuf, plain: &mut BytesMut) -> Result<(), WireError> {
        loop {
            let Some(tls) = self.tls.as_deref_mut() else {
                return Ok(());
            };
            let pumped = tls.pump(None, plain)?;
            self.flush_tls().await?;
            match pumped {
                Pumped::Traffic => return Ok(()),
                Pumped::Closed => return Err(WireError::Protocol("closed during the handshake")),
                Pumped::NeedData => {
                    if self.recv_tls(rx, plain).await? == 0 {
                        return Err(WireError::Protocol("peer left during the handshake"));
                    }
                }
            }
        }
    }

    /// Appends at least one byte of plaintext from the peer to `plain`; `Ok(0)` at the end of
    /// the stream (TCP FIN, TLS close_notify, or a WebSocket close).
    pub async fn read(&mut self, rx: &RxBuf, plain: &mut BytesMut) -> Result<usize, WireError> {
        if self.ws.is_none() {
            return self.read_stream(rx, plain).await;
        }
        loop {
            self.flush_ws().await?;
            if self.ws.as_deref().is_some_and(|ws| ws.is_closed()) {
                return Ok(0);
            }
            // Received and framed with no await in between: a dropped read loses nothing.
            let mut raw = BytesMut::new();
            if self.recv_once(rx, &mut raw).await? == 0 {
                return Ok(0);
            }
            let before = plain.len();
            if let Some(ws) = self.ws.as_deref_mut() {
                ws.handle_bytes(&raw);
            }
            let closed = self.take_ws_data(plain);
            if plain.len() > before {
                return Ok(plain.len() - before);
            }
            if closed {
                let _ = self.flush_ws().await;
                return Ok(0);
            }
        }
    }

    /// One receive (plain, or TLS decrypted), with nothing awaited after it.
    async fn recv_once(&mut self, rx: &RxBuf, plain: &mut BytesMut) -> Result<usize, WireError> {
        if self.tls.is_none() {
            return Ok(self.recv_plain(rx, plain).await?);
        }
        if self.tls.as_deref().is_some_and(|t| t.peer_closed) {
            return Ok(0);
        }
        self.flush_tls().await?;
        self.recv_tls(rx, plain).await
    }

    /// [`Self::read`] of the stream itself (plain or TLS).
    async fn read_stream(&mut self, rx: &RxBuf, plain: &mut BytesMut) -> Result<usize, WireError> {
        if self.tls.is_none() {
            return Ok(self.recv_plain(rx, plain).await?);
        }
        loop {
            if self.tls.as_deref().is_some_and(|t| t.peer_closed) {
                return Ok(0);
            }
            // TLS bytes an earlier, dropped read left unsent (a key update, say) go first.
            self.flush_tls().await?;
            let before = plain.len();
            if self.recv_tls(rx, plain).await? == 0 {
                return Ok(0);
            }
            self.flush_tls().await?;
            if plain.len() > before {
                return Ok(plain.len() - before);
            }
        }
    }

    /// Writes all of `data` (encrypting it for TLS; one binary frame on a WebSocket).
    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), WireError> {
        let Some(ws) = self.ws.as_deref_mut() else {
            return self.write_stream(data).await;
        };
        ws.send(data);
        match ws.poll_transmit() {
            Some(out) => self.write_stream(&out).await,
            None => Ok(()),
        }
    }

    /// Writes bytes of the stream itself.
    async fn write_stream(&mut self, data: &[u8]) -> Result<(), WireError> {
        match self.tls.as_deref_mut() {
            None => self.stream.write_all(data).await?,
            Some(tls) => {
                tls.encrypt(data)?;
                self.flush_tls().await?;
            }
        }
        Ok(())
    }

    /// Ends the stream: a WebSocket close, TLS close_notify when the handshake completed, then
    /// the TCP shutdown.
    pub async fn close(&mut self) -> Result<(), WireError> {
        if let Some(ws) = self.ws.as_deref_mut() {
            ws.close(roost_http::CloseCode::Normal);
            self.flush_ws().await?;
        }
        if let Some(tls) = self.tls.as_deref_mut() {
            tls.close_notify()?;
            self.flush_tls().await?;
        }
        self.stream.close().await?;
        Ok(())
    }

    /// One `recv` into the shard buffer, appended to `plain`. Holds no buffer while waiting.
    async fn recv_plain(&mut self, rx: &RxBuf, plain: &mut BytesMut) -> io::Result<usize> {
        let stream = &mut self.stream;
        poll_fn(|cx| {
            let mut buf = rx.0.borrow_mut();
            match Pin::new(&mut *stream).poll_read(cx, &mut buf[..]) {
                Poll::Ready(Ok(n)) => {
                    plain.extend_from_slice(&buf[..n]);
                    Poll::Ready(Ok(n))
                }
                other => other,
            }
        })
        .await
    }

    /// One `recv` of TLS bytes, processed at once: plaintext to `plain`, a record's unfinished
    /// tail to `incoming`, handshake output to `outgoing`. Returns the TLS bytes received.
    async fn recv_tls(&mut self, rx: &RxBuf, plain: &mut BytesMut) -> Result<usize, WireError> {
        let stream = &mut self.stream;
        let tls = self.tls.as_deref_mut().expect("recv_tls on a TLS wire");
        poll_fn(|cx| {
            let mut buf = rx.0.borrow_mut();
            let n = match Pin::new(&mut *stream).poll_read(cx, &mut buf[..]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(WireError::Io(e))),
                Poll::Ready(Ok(n)) => n,
            };
            if n > 0 {
                tls.pump(Some(&mut buf[..n]), plain)?;
            }
            Poll::Ready(Ok(n))
        })
        .await
    }

    async fn flush_tls(&mut self) -> io::Result<()> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return Ok(());
        };
        while !tls.outgoing.is_empty() {
            let n = self.stream.write(&tls.outgoing).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            tls.outgoing.drain(..n);
        }
        // A connection that sent a burst should not keep the buffer for its quiet hours.
        tls.outgoing = Vec::new();
        Ok(())
    }
}

/// What to send once rustls allows application data.
enum Out<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

impl Tls {
    /// Feeds received TLS bytes (`fresh`, or none to look at what is already held) through
    /// rustls until it needs more. Whole records are consumed; an unfinished tail is kept in
    /// `incoming`. Decrypted application data goes to `plain`, bytes to send to `outgoing`.
    fn pump(
        &mut self,
        fresh: Option<&mut [u8]>,
        plain: &mut BytesMut,
    ) -> Result<Pumped, WireError> {
        self.pump_and_send(fresh, plain, Out::Nothing)
    }

    /// Encrypts `data` onto `outgoing`.
    fn encrypt(&mut self, data: &[u8]) -> Result<(), WireError> {
        self.send(Out::Data(data))
    }

    /// Queues close_notify when the handshake completed (nothing otherwise).
    fn close_notify(&mut self) -> Result<(), WireError> {
        if !self.established {
            return Ok(());
        }
        self.send(Out::CloseNotify)
    }

    fn send(&mut self, out: Out<'_>) -> Result<(), WireError> {
        // What is held is at most the unfinished tail of a record (every pump consumes whole
        // records), so this decrypts nothing; rustls still sees its buffer as it left it.
        let mut plain = BytesMut::new();
        match self.pump_and_send(None, &mut plain, out)? {
            Pumped::Traffic => Ok(()),
            _ => Err(WireError::Protocol("not ready to send application data")),
        }
    }

    fn pump_and_send(
        &mut self,
        fresh: Option<&mut [u8]>,
        plain: &mut BytesMut,
        out: Out<'_>,
    ) -> Result<Pumped, WireError> {
        // rustls panics on some misuse of the unbuffered API (input it had seen, then not shown
        // again); a bug of that kind must cost one connection, not the shard.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.pump_unguarded(fresh, plain, out)
        }))
        .unwrap_or(Err(WireError::Protocol("TLS state machine failure")))
    }

    fn pump_unguarded(
        &mut self,
        fresh: Option<&mut [u8]>,
        plain: &mut BytesMut,
        out: Out<'_>,
    ) -> Result<Pumped, WireError> {
        match fresh {
            // The common case: nothing held over, process straight from the shard buffer.
            Some(buf) if self.incoming.is_empty() => {
                let (used, pumped) = self.process(buf, plain, out)?;
                if used < buf.len() {
                    self.incoming.extend_from_slice(&buf[used..]);
                }
                Ok(pumped)
            }
            fresh => {
                if let Some(buf) = fresh {
                    if self.incoming.len() + buf.len() > MAX_HELD {
                        return Err(WireError::Protocol("TLS input over the limit"));
                    }
                    self.incoming.extend_from_slice(buf);
                }
                let mut held = std::mem::take(&mut self.incoming);
                let (used, pumped) = self.process(&mut held, plain, out)?;
                if used < held.len() {
                    held.drain(..used);
                    self.incoming = held;
                }
                Ok(pumped)
            }
        }
    }

    /// The rustls state machine over `buf`; returns how many bytes of `buf` it consumed.
    fn process(
        &mut self,
        buf: &mut [u8],
        plain: &mut BytesMut,
        mut out: Out<'_>,
    ) -> Result<(usize, Pumped), WireError> {
        let mut used = 0;
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut buf[used..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.queue_alert(&mut buf[used + discard..]);
                    return Err(e.into());
                }
            };
            let step = match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record?;
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    append_encoded(&mut self.outgoing, &mut encode)?;
                    None
                }
                // Encoded bytes wait in `outgoing`; the caller writes them before it reads again.
                ConnectionState::TransmitTlsData(sent) => {
                    sent.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Pumped::NeedData),
                ConnectionState::WriteTraffic(mut traffic) => {
                    self.established = true;
                    match std::mem::replace(&mut out, Out::Nothing) {
                        Out::Nothing => {}
                        Out::Data(data) => {
                            // Per record: a 5-byte header and a 16-byte tag, plus a content-type
                            // byte (1.3) or an 8-byte explicit nonce (1.2); rustls says exactly
                            // how much more if this is short.
                            let room = data.len() + (data.len() / 16_384 + 1) * 32;
                            append_with(&mut self.outgoing, room, |dst| {
                                traffic.encrypt(data, dst).map_err(|e| sizing(&e))
                            })?;
                        }
                        Out::CloseNotify => {
                            append_with(&mut self.outgoing, 64, |dst| {
                                traffic.queue_close_notify(dst).map_err(|e| sizing(&e))
                            })?;
                        }
                    }
                    Some(Pumped::Traffic)
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => Some(Pumped::Closed),
                // Early data is not enabled on the server config.
                _ => return Err(WireError::Protocol("unexpected TLS state")),
            };
            used += discard;
            if let Some(pumped) = step {
                if !matches!(out, Out::Nothing) && pumped != Pumped::Traffic {
                    return Err(WireError::Protocol("not ready to send application data"));
                }
                return Ok((used, pumped));
            }
        }
    }
}

impl Tls {
    /// After rustls failed, moves the alert it queued (if any) to `outgoing`: the unbuffered API
    /// hands it out on the next call, as handshake data to encode, before it looks at input.
    /// `rest` must be the input rustls has not discarded (it keeps offsets into it).
    fn queue_alert(&mut self, rest: &mut [u8]) {
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(rest);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = state {
            let _ = append_encoded(&mut self.outgoing, &mut encode);
        }
    }
}

/// Appends what `write` puts into a buffer of `room` bytes at the end of `dst`, growing the room
/// to what `write` says it needs (`Err(Some(n))`); `Err(None)` is a failure.
fn append_with(
    dst: &mut Vec<u8>,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> Result<(), WireError> {
    let at = dst.len();
    loop {
        dst.resize(at + room, 0);
        match write(&mut dst[at..]) {
            Ok(n) => {
                dst.truncate(at + n);
                return Ok(());
            }
            Err(Some(needed)) if needed > room => room = needed,
            Err(_) => {
                dst.truncate(at);
                return Err(WireError::Protocol("could not encode a TLS record"));
            }
        }
    }
}

/// Appends the handshake record rustls hands out in an `EncodeTlsData` state.
fn append_encoded<Data>(
    dst: &mut Vec<u8>,
    encode: &mut EncodeTlsData<'_, Data>,
) -> Result<(), WireError> {
    append_with(dst, 4096, |out| match encode.encode(out) {
        Ok(n) => Ok(n),
        Err(EncodeError::InsufficientSize(s)) => Err(Some(s.required_size)),
        Err(EncodeError::AlreadyEncoded) => Ok(0),
    })
}

/// The size rustls asked for, or `None` for any other encryption failure.
fn sizing(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // set-up steps: a failure is the test failing
mod tests {
    use std::io::{Read, Write};
    use std::net::SocketAddr;
    use std::time::Duration;

    use glommio::net::TcpListener;
    use glommio::{LocalExecutorBuilder, Placement};
    use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

    use super::*;

    /// A self-signed certificate for "localhost": the server config, and the client's root.
    fn configs() -> (Arc<ServerConfig>, RootCertStore) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key.into())
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(der).unwrap();
        (Arc::new(server), roots)
    }

    fn client(
        addr: SocketAddr,
        roots: RootCertStore,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> StreamOwned<ClientConnection, std::net::TcpStream> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let conn = ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap())
            .unwrap();
        let sock = std::net::TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        StreamOwned::new(conn, sock)
    }

    /// Runs `server` on a glommio executor for the first connection to a fresh listener while
    /// `client` runs on this thread with the listener's address; returns what `server` returned.
    fn with_server<T: Send + 'static>(
        server: impl FnOnce(TcpStream) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
            + Send
            + 'static,
        client: impl FnOnce(SocketAddr),
    ) -> T {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let handle = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(1 << 20)
            .spawn(move || async move {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let stream = listener.accept().await.unwrap();
                server(stream).await
            })
            .unwrap();
        client(addr_rx.recv().unwrap());
        handle.join().unwrap()
    }

    /// A TLS wire over `s` with its handshake done: (receive buffer, wire, plaintext so far).
    async fn accepted(s: TcpStream, cfg: Arc<ServerConfig>) -> (RxBuf, Wire, BytesMut) {
        let rx = RxBuf::new();
        let mut wire = Wire::tls(s, cfg).unwrap();
        let mut plain = BytesMut::new();
        wire.handshake(&rx, &mut plain).await.unwrap();
        (rx, wire, plain)
    }

    /// The TLS bytes the client would send for `data`, encrypted but not sent.
    fn sealed(c: &mut StreamOwned<ClientConnection, std::net::TcpStream>, data: &[u8]) -> Vec<u8> {
        c.conn.writer().write_all(data).unwrap();
        let mut out = Vec::new();
        while c.conn.wants_write() {
            c.conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Echoes plaintext until the peer ends the stream; returns how many bytes went through.
    async fn echo(mut wire: Wire) -> Result<usize, WireError> {
        let rx = RxBuf::new();
        let mut plain = BytesMut::new();
        wire.handshake(&rx, &mut plain).await?;
        let mut total = 0;
        loop {
            if plain.is_empty() && wire.read(&rx, &mut plain).await? == 0 {
                wire.close().await?;
                return Ok(total);
            }
            total += plain.len();
            wire.write_all(&plain).await?;
            plain.clear();
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn tls_echo(version: &'static rustls::SupportedProtocolVersion) {
        let (server_cfg, roots) = configs();
        // 1 byte, a typical frame, and more than several records (16 KiB each).
        let sizes = [1usize, 120, 100_000];
        let total = with_server(
            move |s| Box::pin(async move { echo(Wire::tls(s, server_cfg).unwrap()).await }),
            |addr| {
                let mut c = client(addr, roots, version);
                for len in sizes {
                    let sent = pattern(len);
                    c.write_all(&sent).unwrap();
                    let mut got = vec![0; len];
                    c.read_exact(&mut got).unwrap();
                    assert_eq!(got, sent, "echo of {len} bytes");
                }
                assert_eq!(c.conn.protocol_version(), Some(version.version));
                c.conn.send_close_notify();
                c.flush().unwrap();
                // The server answers with its own close_notify, then the end of the stream.
                let mut rest = Vec::new();
                c.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty());
            },
        );
        assert_eq!(total.unwrap(), sizes.iter().sum::<usize>());
    }

    #[test]
    fn tls13_round_trip_of_small_and_multi_record_data() {
        tls_echo(&rustls::version::TLS13);
    }

    #[test]
    fn tls12_round_trip_of_small_and_multi_record_data() {
        tls_echo(&rustls::version::TLS12);
    }

    #[test]
    fn a_record_split_across_reads_is_held_until_whole() {
        let (server_cfg, roots) = configs();
        let total = with_server(
            move |s| Box::pin(async move { echo(Wire::tls(s, server_cfg).unwrap()).await }),
            |addr| {
                let mut c = client(addr, roots, &rustls::version::TLS13);
                // Finish the handshake first: one echoed byte.
                c.write_all(b"x").unwrap();
                let mut one = [0u8; 1];
                c.read_exact(&mut one).unwrap();
                // Encrypt a record without sending it, then send it in three pieces.
                let sent = pattern(5_000);
                let wire_bytes = sealed(&mut c, &sent);
                for piece in [
                    &wire_bytes[..3],
                    &wire_bytes[3..2_000],
                    &wire_bytes[2_000..],
                ] {
                    c.sock.write_all(piece).unwrap();
                    c.sock.flush().unwrap();
                    std::thread::sleep(Duration::from_millis(50));
                }
                let mut got = vec![0; sent.len()];
                c.read_exact(&mut got).unwrap();
                assert_eq!(got, sent);
                c.conn.send_close_notify();
                c.flush().unwrap();
                let mut rest = Vec::new();
                c.read_to_end(&mut rest).unwrap();
            },
        );
        assert_eq!(total.unwrap(), 5_001);
    }

    #[test]
    fn bytes_that_are_not_tls_fail_the_handshake() {
        let (server_cfg, _) = configs();
        let result = with_server(
            move |s| {
                Box::pin(async move {
                    let mut wire = Wire::tls(s, server_cfg).unwrap();
                    let mut plain = BytesMut::new();
                    wire.handshake(&RxBuf::new(), &mut plain)
                        .await
                        .map_err(|e| e.to_string())
                })
            },
            |addr| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"\x10\x20MQTT not over TLS at all, sorry")
                    .unwrap();
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
                // The server says why before it closes: one fatal alert record.
                assert_eq!(
                    rest.first(),
                    Some(&0x15),
                    "expected a TLS alert, got {rest:?}"
                );
                assert_eq!(rest.get(5), Some(&2), "alert level fatal: {rest:?}");
            },
        );
        let err = result.unwrap_err();
        assert!(err.starts_with("tls:"), "{err}");
    }

    #[test]
    fn a_handshake_message_larger_than_64k_is_refused_not_buffered() {
        let (server_cfg, _) = configs();
        let result = with_server(
            move |s| {
                Box::pin(async move {
                    let mut wire = Wire::tls(s, server_cfg).unwrap();
                    let mut plain = BytesMut::new();
                    let r = wire.handshake(&RxBuf::new(), &mut plain).await;
                    let held = wire.tls.as_ref().map_or(0, |t| t.incoming.len());
                    (r.map_err(|e| e.to_string()), held)
                })
            },
            |addr| {
                // A ClientHello header announcing 16 MiB, then handshake records of filler.
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                let mut first = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff];
                first.resize(5 + 0x4000, 0x41);
                let _ = s.write_all(&first);
                let mut filler = vec![0x16, 0x03, 0x03, 0x40, 0x00];
                filler.resize(5 + 0x4000, 0x41);
                for _ in 0..64 {
                    if s.write_all(&filler).is_err() {
                        break;
                    }
                }
            },
        );
        let (result, held) = result;
        assert!(result.unwrap_err().starts_with("tls:"));
        assert!(held <= MAX_HELD, "held {held} bytes");
    }

    #[test]
    fn a_corrupted_record_fails_the_read_and_the_close_still_works() {
        let (server_cfg, roots) = configs();
        let outcome = with_server(
            move |s| {
                Box::pin(async move {
                    let (rx, mut wire, mut plain) = accepted(s, server_cfg).await;
                    let mut got = 0;
                    let err = loop {
                        match wire.read(&rx, &mut plain).await {
                            Ok(0) => break "end of stream".to_string(),
                            Ok(n) => got += n,
                            Err(e) => break e.to_string(),
                        }
                    };
                    // rustls has seen the bad record; closing must not trip over it.
                    let closed = wire.close().await.is_ok();
                    (got, err, closed)
                })
            },
            |addr| {
                let mut c = client(addr, roots, &rustls::version::TLS13);
                c.write_all(b"ok").unwrap();
                c.flush().unwrap();
                std::thread::sleep(Duration::from_millis(100));
                let mut record = sealed(&mut c, b"tampered");
                let last = record.len() - 1;
                record[last] ^= 0x01; // the tag no longer matches
                c.sock.write_all(&record).unwrap();
                let mut rest = Vec::new();
                let _ = c.sock.read_to_end(&mut rest);
            },
        );
        let (got, err, _closed) = outcome;
        assert_eq!(got, 2, "the good record was delivered");
        assert!(err.starts_with("tls:"), "{err}");
    }

    #[test]
    fn plain_wire_passes_bytes_through() {
        let total = with_server(
            |s| Box::pin(async move { echo(Wire::plain(s)).await }),
            |addr| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let sent = pattern(70_000); // more than one receive buffer
                s.write_all(&sent).unwrap();
                let mut got = vec![0; sent.len()];
                s.read_exact(&mut got).unwrap();
                assert_eq!(got, sent);
                s.shutdown(std::net::Shutdown::Write).unwrap();
            },
        );
        assert_eq!(total.unwrap(), 70_000);
    }

    #[test]
    fn a_read_dropped_by_a_race_loses_no_bytes() {
        // The connection task races every read against other wake-ups; here a 1 ms timer wins
        // most races while the client trickles records, and every byte must still arrive once.
        let (server_cfg, roots) = configs();
        let got = with_server(
            move |s| {
                Box::pin(async move {
                    let (rx, mut wire, mut plain) = accepted(s, server_cfg).await;
                    loop {
                        let read = async { Some(wire.read(&rx, &mut plain).await) };
                        let tick = async {
                            glommio::timer::Timer::new(Duration::from_millis(1)).await;
                            None
                        };
                        if let Some(n) = futures_lite::future::or(read, tick).await {
                            if n.unwrap() == 0 {
                                return plain.to_vec();
                            }
                        }
                    }
                })
            },
            |addr| {
                let mut c = client(addr, roots, &rustls::version::TLS13);
                for chunk in pattern(3_000).chunks(100) {
                    c.write_all(chunk).unwrap();
                    c.flush().unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                }
                c.conn.send_close_notify();
                c.flush().unwrap();
            },
        );
        assert_eq!(got, pattern(3_000));
    }
}
