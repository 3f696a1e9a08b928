//! The client side of MQTT that the generator needs: framing what the server sends, and the
//! CONNECT → CONNACK handshake. Everything else (publishing, acks) lives with its mode.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::BytesMut;
use roost_mqtt::{check, parse, ConnectReturnCode, Limits, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const READ_CHUNK: usize = 64 * 1024;

/// The broker refused a CONNECT.
#[derive(Debug, thiserror::Error)]
#[error("the broker refused the CONNECT: CONNACK {0:?}")]
pub struct Refused(pub ConnectReturnCode);

/// Splits what the server sends into parsed packets.
pub struct FrameReader {
    buf: BytesMut,
    limits: Limits,
}

impl FrameReader {
    pub fn new(max_frame: usize) -> Self {
        FrameReader {
            buf: BytesMut::new(),
            limits: Limits { max_frame },
        }
    }

    /// The next complete packet already buffered, without reading.
    pub fn buffered(&mut self) -> anyhow::Result<Option<Packet>> {
        let Some(len) = check(&self.buf, &self.limits).context("bad frame from the broker")? else {
            return Ok(None);
        };
        let frame = self.buf.split_to(len).freeze();
        Ok(Some(parse(frame).context("bad packet from the broker")?))
    }

    /// Reads once from `r` into the buffer; `Ok(0)` at end of stream.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> anyhow::Result<usize> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        Ok(r.read_buf(&mut self.buf).await?)
    }

    /// The next packet, reading as needed; `Ok(None)` if the stream ended.
    pub async fn next<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> anyhow::Result<Option<Packet>> {
        loop {
            if let Some(p) = self.buffered()? {
                return Ok(Some(p));
            }
            if self.fill(r).await? == 0 {
                return Ok(None);
            }
        }
    }
}

/// Sends `connect` and waits for an accepting CONNACK; the reader keeps whatever came after it.
/// A refusal is an error that downcasts to [`Refused`].
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    connect: &[u8],
    max_frame: usize,
    timeout: Duration,
) -> anyhow::Result<FrameReader> {
    let work = async {
        s.write_all(connect).await.context("sending CONNECT")?;
        let mut reader = FrameReader::new(max_frame);
        match reader.next(s).await? {
            Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Accepted => Ok(reader),
            Some(Packet::ConnAck(ack)) => Err(anyhow::Error::new(Refused(ack.code))),
            Some(other) => bail!(
                "expected CONNACK, the broker sent {:?}",
                other.packet_type()
            ),
            None => bail!("the broker closed the connection before CONNACK"),
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => bail!("no CONNACK within {timeout:?}"),
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use roost_mqtt::{encode_connack, encode_puback};

    use super::*;

    #[tokio::test]
    async fn frames_split_across_reads() {
        let mut wire = BytesMut::new();
        encode_puback(7, &mut wire);
        encode_puback(8, &mut wire);
        let (mut a, mut b) = tokio::io::duplex(64);
        let bytes = wire.to_vec();
        let writer = tokio::spawn(async move {
            for chunk in bytes.chunks(3) {
                a.write_all(chunk).await.expect("write");
            }
        });
        let mut r = FrameReader::new(1024);
        assert_eq!(r.next(&mut b).await.expect("read"), Some(Packet::PubAck(7)));
        assert_eq!(r.next(&mut b).await.expect("read"), Some(Packet::PubAck(8)));
        writer.await.expect("writer");
        assert_eq!(r.next(&mut b).await.expect("read"), None);
    }

    #[tokio::test]
    async fn handshake_reports_refusal() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let srv = tokio::spawn(async move {
            let mut buf = [0u8; 256];
            let _ = server.read(&mut buf).await;
            let mut out = BytesMut::new();
            encode_connack(false, ConnectReturnCode::NotAuthorized, &mut out);
            server.write_all(&out).await.expect("write");
            server
        });
        let err = handshake(&mut client, b"\x10\x00", 1024, Duration::from_secs(5))
            .await
            .err()
            .expect("refused");
        assert!(matches!(
            err.downcast_ref::<Refused>(),
            Some(Refused(ConnectReturnCode::NotAuthorized))
        ));
        drop(srv.await);
    }
}
