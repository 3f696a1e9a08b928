//! The client side of a WebSocket, as much as the generator needs to hold MQTT over roost's
//! port 443: the opening handshake on `/$iothub/websocket` with subprotocol `mqtt`, writes sent
//! as masked binary frames, and the server's (unmasked) binary frames read back as one byte
//! stream. Pings are skipped (roost does not send them), a close frame ends the stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use anyhow::bail;
use base64::Engine as _;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Largest response head taken from the server.
const MAX_HEAD: usize = 8 * 1024;

pub struct WsStream<S> {
    inner: S,
    /// Bytes from the server not yet unframed.
    raw: BytesMut,
    /// Payload bytes of the current data frame not yet handed out.
    payload_left: usize,
    /// Framed bytes not yet written, from `out_at`.
    out: Vec<u8>,
    out_at: usize,
    mask_seed: u32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Upgrades `inner` (TLS done) to a WebSocket carrying MQTT; `host` is the `Host` header.
    pub async fn upgrade(mut inner: S, host: &str) -> anyhow::Result<Self> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let key = base64::engine::general_purpose::STANDARD.encode(seed.to_le_bytes().repeat(4));
        let request = format!(
            "GET /$iothub/websocket HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: mqtt\r\n\r\n"
        );
        inner.write_all(request.as_bytes()).await?;
        let mut raw = BytesMut::with_capacity(1024);
        let end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if raw.len() > MAX_HEAD {
                bail!("the upgrade response head is over {MAX_HEAD} bytes");
            }
            if inner.read_buf(&mut raw).await? == 0 {
                bail!("the server closed before answering the upgrade");
            }
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_string();
        let status = head.lines().next().unwrap_or_default();
        if !status.starts_with("HTTP/1.1 101") {
            bail!("the upgrade was refused: {status}");
        }
        if !head
            .to_ascii_lowercase()
            .contains("sec-websocket-protocol: mqtt")
        {
            bail!("the server did not choose the mqtt subprotocol");
        }
        raw.advance(end);
        Ok(WsStream {
            inner,
            raw,
            payload_left: 0,
            out: Vec::new(),
            out_at: 0,
            mask_seed: seed | 1,
        })
    }
}

impl<S> WsStream<S> {
    /// The next frame's header from `raw`: data frames start handing out their payload;
    /// control frames are skipped whole. `Ok(None)`: more bytes are needed; `Err(Eof)`: the
    /// server closed.
    fn next_header(&mut self) -> io::Result<Option<()>> {
        let [b0, b1, ..] = self.raw[..] else {
            return Ok(None);
        };
        if b1 & 0x80 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a masked server frame",
            ));
        }
        let (len, ext) = match b1 & 0x7f {
            126 if self.raw.len() >= 4 => (
                usize::from(u16::from_be_bytes([self.raw[2], self.raw[3]])),
                2,
            ),
            127 if self.raw.len() >= 10 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.raw[2..10]);
                (u64::from_be_bytes(b) as usize, 8)
            }
            126 | 127 => return Ok(None),
            n => (usize::from(n), 0),
        };
        match b0 & 0x0f {
            // Continuation or binary: the payload follows.
            0x0 | 0x2 => {
                self.raw.advance(2 + ext);
                self.payload_left = len;
                Ok(Some(()))
            }
            0x8 => Err(io::ErrorKind::UnexpectedEof.into()),
            _ if self.raw.len() >= 2 + ext + len => {
                self.raw.advance(2 + ext + len);
                Ok(Some(()))
            }
            _ => Ok(None),
        }
    }

    /// Appends `payload` as one masked binary frame to what is to be written.
    fn frame(&mut self, payload: &[u8]) {
        if self.out_at == self.out.len() {
            self.out.clear();
            self.out_at = 0;
        }
        self.out.push(0x82);
        match payload.len() {
            n if n < 126 => self.out.push(0x80 | n as u8),
            n if n <= usize::from(u16::MAX) => {
                self.out.push(0x80 | 126);
                self.out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                self.out.push(0x80 | 127);
                self.out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        // A fresh key per frame (xorshift): RFC 6455 asks for keys the peer cannot predict.
        self.mask_seed ^= self.mask_seed << 13;
        self.mask_seed ^= self.mask_seed >> 17;
        self.mask_seed ^= self.mask_seed << 5;
        let mask = self.mask_seed.to_le_bytes();
        self.out.extend_from_slice(&mask);
        self.out
            .extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    }
}

impl<S: AsyncWrite + Unpin> WsStream<S> {
    /// Writes out what is framed; `Ready(Ok)` once all of it is.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.out.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_at..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.out_at += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.payload_left > 0 && !this.raw.is_empty() {
                let n = this.payload_left.min(this.raw.len()).min(buf.remaining());
                buf.put_slice(&this.raw[..n]);
                this.raw.advance(n);
                this.payload_left -= n;
                return Poll::Ready(Ok(()));
            }
            if this.payload_left == 0 {
                match this.next_header() {
                    Ok(Some(())) => continue,
                    Ok(None) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Poll::Ready(Ok(()))
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => this.raw.extend_from_slice(read.filled()),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Earlier frames first: a write is taken only once they are out.
        match this.drain(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other.map(|r| r.map(|()| 0)),
        }
        this.frame(buf);
        // Taken: what the socket does not take now goes with the next write or flush.
        if let Poll::Ready(Err(e)) = this.drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_go_out_masked_and_come_back_as_a_stream() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let serve = tokio::spawn(async move {
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(server.read_u8().await.unwrap());
            }
            let head = String::from_utf8(head).unwrap();
            assert!(head.contains("Sec-WebSocket-Protocol: mqtt\r\n"), "{head}");
            // The answer, then two binary frames (one split in two by a continuation), a ping,
            // and a frame with a 16-bit length.
            let mut out =
                b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
                    .to_vec();
            out.extend_from_slice(&[0x02, 3, b'a', b'b', b'c']);
            out.extend_from_slice(&[0x80, 1, b'd']);
            out.extend_from_slice(&[0x89, 2, 0, 0]);
            out.extend_from_slice(&[0x82, 126, 0, 200]);
            out.extend_from_slice(&[b'x'; 200]);
            server.write_all(&out).await.unwrap();
            // What the client sent: one masked binary frame.
            let mut hdr = [0u8; 6];
            server.read_exact(&mut hdr).await.unwrap();
            assert_eq!((hdr[0], hdr[1]), (0x82, 0x80 | 5));
            let mut body = [0u8; 5];
            server.read_exact(&mut body).await.unwrap();
            let unmasked: Vec<u8> = body
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ hdr[2 + i % 4])
                .collect();
            assert_eq!(unmasked, b"hello");
            server.write_all(&[0x88, 0]).await.unwrap();
        });
        let mut ws = WsStream::upgrade(client, "hub").await.unwrap();
        let mut got = vec![0u8; 204];
        ws.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..4], b"abcd");
        assert!(got[4..].iter().all(|&b| b == b'x'));
        ws.write_all(b"hello").await.unwrap();
        ws.flush().await.unwrap();
        let mut rest = Vec::new();
        ws.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "a close ends the stream");
        serve.await.unwrap();
    }
}
