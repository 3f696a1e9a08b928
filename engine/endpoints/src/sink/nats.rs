//! The `nats` endpoint: JetStream publish over the NATS client protocol (plain TCP). Each
//! record is an `HPUB` to the endpoint's subject with the body as payload and the properties as
//! headers, plus `Nats-Msg-Id: <endpoint>:<partition>:<offset>` so the stream drops a record a
//! retry sends twice. A batch is published in one write, then every record's ack is awaited on
//! a reply inbox: the stream's `{"stream":…,"seq":…}` delivers it; an `{"error":…}`, a 503 (no
//! stream listens on the subject) or no ack within the timeout fails the batch.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::item::{Form, Item};
use crate::sink::{host_port, Connected, Sink, SinkError};

const ACK_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A frame from the server longer than this is a broken connection.
const MAX_FRAME: usize = 8 << 20;

pub struct JetStream {
    endpoint: String,
    addr: String,
    subject: String,
    inbox: String,
    /// Numbers the batches, so an ack for an earlier batch is never taken for this one's.
    batches: u64,
    conn: Option<Conn>,
}

pub(crate) struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The most payload the server takes (its INFO's `max_payload`).
    max_payload: usize,
}

fn broken(addr: &str, e: impl std::fmt::Display) -> SinkError {
    SinkError::Connect(format!("nats {addr}: {e}"))
}

/// A header name NATS carries: visible ASCII without ':'.
fn header_name_ok(k: &str) -> bool {
    !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// A header value NATS carries: no line breaks.
fn header_value_ok(v: &str) -> bool {
    !v.contains(['\r', '\n'])
}

impl JetStream {
    pub fn new(endpoint: &str, url: &str, subject: &str) -> Result<Self, SinkError> {
        if subject.is_empty() || subject.contains([' ', '\t', '\r', '\n', '*', '>']) {
            return Err(SinkError::Refused(format!(
                "nats subject {subject:?}: a literal subject (no spaces or wildcards)"
            )));
        }
        Ok(JetStream {
            endpoint: endpoint.to_string(),
            addr: host_port(url, "nats://", 4222)?,
            subject: subject.to_string(),
            inbox: format!("_INBOX.roost.{}.{}", endpoint, std::process::id()),
            batches: 0,
            conn: None,
        })
    }

    fn connect(&self) -> Result<Conn, SinkError> {
        let addr = &self.addr;
        let sock = addr
            .to_socket_addrs_first()
            .ok_or_else(|| broken(addr, "cannot resolve"))?;
        let stream =
            TcpStream::connect_timeout(&sock, CONNECT_TIMEOUT).map_err(|e| broken(addr, e))?;
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(|e| broken(addr, e))?;
        let _ = stream.set_nodelay(true);
        let mut conn = Conn {
            stream,
            buf: Vec::new(),
            max_payload: 1 << 20,
        };
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let info = conn.line(addr, deadline)?;
        let info = info
            .strip_prefix("INFO ")
            .ok_or_else(|| broken(addr, format!("expected INFO, got {info:?}")))?;
        let info: serde_json::Value =
            serde_json::from_str(info).map_err(|e| broken(addr, format!("INFO: {e}")))?;
        if info["headers"].as_bool() == Some(false) {
            return Err(SinkError::Refused(format!(
                "nats {addr}: the server does not support headers"
            )));
        }
        if let Some(m) = info["max_payload"].as_u64() {
            conn.max_payload = m as usize;
        }
        let hello = serde_json::json!({
            "verbose": false, "pedantic": false, "lang": "rust", "version": env!("CARGO_PKG_VERSION"),
            "name": format!("roost-{}", self.endpoint), "protocol": 1, "headers": true, "no_responders": true,
        });
        let start = format!("CONNECT {hello}\r\nSUB {}.> 1\r\nPING\r\n", self.inbox);
        conn.stream
            .write_all(start.as_bytes())
            .map_err(|e| broken(addr, e))?;
        loop {
            match conn.line(addr, deadline)?.as_str() {
                "PONG" => return Ok(conn),
                "+OK" => {}
                "PING" => conn.pong(addr)?,
                l if l.starts_with("INFO ") => {}
                l => return Err(SinkError::Refused(format!("nats {addr}: {l}"))),
            }
        }
    }

    fn publish(&mut self, conn: &mut Conn, items: &[Item]) -> Result<(), SinkError> {
        self.batches += 1;
        let reply = format!("{}.{}", self.inbox, self.batches);
        let addr = &self.addr;
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let mut headers = format!(
                "NATS/1.0\r\nNats-Msg-Id: {}:{}:{}\r\n",
                self.endpoint, item.partition, item.offset
            );
            for (k, v) in &item.props {
                if header_name_ok(k) && header_value_ok(v) {
                    headers.push_str(k);
                    headers.push_str(": ");
                    headers.push_str(v);
                    headers.push_str("\r\n");
                }
            }
            headers.push_str("\r\n");
            let total = headers.len() + item.body.len();
            if total > conn.max_payload {
                return Err(SinkError::Refused(format!(
                    "nats {addr}: a {total}-byte message is over the server's max_payload {}",
                    conn.max_payload
                )));
            }
            out.extend_from_slice(
                format!(
                    "HPUB {} {reply}.{i} {} {total}\r\n",
                    self.subject,
                    headers.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(headers.as_bytes());
            out.extend_from_slice(&item.body);
            out.extend_from_slice(b"\r\n");
        }
        conn.stream.write_all(&out).map_err(|e| broken(addr, e))?;
        let mut acked = vec![false; items.len()];
        let mut left = items.len();
        let deadline = Instant::now() + ACK_TIMEOUT;
        while left > 0 {
            let line = conn.line(addr, deadline)?;
            let mut parts = line.split_ascii_whitespace();
            let (head, subject) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (hlen, total) = match head {
                "PING" => {
                    conn.pong(addr)?;
                    continue;
                }
                "+OK" | "PONG" | "INFO" => continue,
                "-ERR" => return Err(SinkError::Refused(format!("nats {addr}: {line}"))),
                "MSG" => {
                    let n = parts.next_back().and_then(|n| n.parse::<usize>().ok());
                    (0, n)
                }
                "HMSG" => {
                    let t = parts.next_back().and_then(|n| n.parse::<usize>().ok());
                    let h = parts.next_back().and_then(|n| n.parse::<usize>().ok());
                    (h.unwrap_or(usize::MAX), t)
                }
                _ => return Err(broken(addr, format!("unexpected {line:?}"))),
            };
            let total = total
                .filter(|t| *t <= MAX_FRAME && hlen <= *t)
                .ok_or_else(|| broken(addr, format!("bad frame {line:?}")))?;
            let frame = conn.exact(addr, total + 2, deadline)?;
            let (hdrs, payload) = frame[..total].split_at(hlen);
            let index = subject
                .strip_prefix(reply.as_str())
                .and_then(|s| s.strip_prefix('.'))
                .and_then(|s| s.parse::<usize>().ok())
                .filter(|i| *i < items.len());
            let Some(index) = index else { continue };
            if let Some(status) = std::str::from_utf8(hdrs)
                .ok()
                .and_then(|h| h.lines().next())
                .and_then(|l| l.strip_prefix("NATS/1.0 "))
            {
                return Err(SinkError::Refused(format!(
                    "nats {addr}: subject {}: {} (is a stream listening on it?)",
                    self.subject,
                    status.trim()
                )));
            }
            let ack: serde_json::Value = serde_json::from_slice(payload)
                .map_err(|e| broken(addr, format!("ack is not JSON: {e}")))?;
            if let Some(err) = ack.get("error") {
                return Err(SinkError::Refused(format!("nats {addr}: JetStream: {err}")));
            }
            if ack.get("stream").is_none() {
                return Err(broken(addr, format!("not a JetStream ack: {ack}")));
            }
            if !acked[index] {
                acked[index] = true;
                left -= 1;
            }
        }
        Ok(())
    }
}

trait FirstAddr {
    fn to_socket_addrs_first(&self) -> Option<std::net::SocketAddr>;
}

impl FirstAddr for String {
    fn to_socket_addrs_first(&self) -> Option<std::net::SocketAddr> {
        std::net::ToSocketAddrs::to_socket_addrs(self.as_str())
            .ok()?
            .next()
    }
}

impl Conn {
    fn fill(&mut self, addr: &str, deadline: Instant) -> Result<(), SinkError> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(broken(addr, "connection closed")),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(SinkError::Timeout(format!(
                            "nats {addr}: no answer in time"
                        )));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(broken(addr, e)),
            }
        }
    }

    /// The next protocol line, without its CRLF.
    fn line(&mut self, addr: &str, deadline: Instant) -> Result<String, SinkError> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..at]).into_owned();
                self.buf.drain(..at + 2);
                return Ok(line);
            }
            if self.buf.len() > MAX_FRAME {
                return Err(broken(addr, "line too long"));
            }
            self.fill(addr, deadline)?;
        }
    }

    fn exact(&mut self, addr: &str, n: usize, deadline: Instant) -> Result<Vec<u8>, SinkError> {
        while self.buf.len() < n {
            self.fill(addr, deadline)?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn pong(&mut self, addr: &str) -> Result<(), SinkError> {
        self.stream
            .write_all(b"PONG\r\n")
            .map_err(|e| broken(addr, e))
    }
}

impl Connected for JetStream {
    type Conn = Conn;

    fn kept(&mut self) -> &mut Option<Conn> {
        &mut self.conn
    }

    fn connect(&self) -> Result<Conn, SinkError> {
        JetStream::connect(self)
    }

    fn publish(&mut self, conn: &mut Conn, items: &[Item]) -> Result<(), SinkError> {
        JetStream::publish(self, conn, items)
    }
}

impl Sink for JetStream {
    fn form(&self) -> Form {
        Form::Raw
    }

    fn deliver(&mut self, items: &[Item]) -> Result<(), SinkError> {
        self.deliver_connected(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_nats_cannot_carry_are_left_out() {
        assert!(header_name_ok("iothub-connection-device-id"));
        assert!(!header_name_ok("a b"));
        assert!(!header_name_ok("a:b"));
        assert!(!header_name_ok(""));
        assert!(header_value_ok("x y"));
        assert!(!header_value_ok("x\r\nInjected: 1"));
    }

    #[test]
    fn subjects_are_literal() {
        assert!(JetStream::new("n", "nats://127.0.0.1", "roost.telemetry").is_ok());
        assert!(JetStream::new("n", "nats://127.0.0.1", "roost.*").is_err());
        assert!(JetStream::new("n", "nats://127.0.0.1", "a b").is_err());
    }
}
