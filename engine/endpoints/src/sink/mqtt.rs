//! The `mqtt` endpoint: republish to an external MQTT 3.1.1 broker (plain TCP), with the codec
//! of `roost-mqtt`. Each record's body is published to the endpoint's topic, where
//! `{deviceId}` stands for the sending device (with `/`, `+` and `#` percent-encoded, so a
//! device id never adds a level or a wildcard). At QoS 1 a batch is delivered once the broker
//! PUBACKed every message; at QoS 0 once it is written to the socket. MQTT 3.1.1 has no
//! properties, so only the body travels.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use roost_mqtt::{check, parse, Connect, ConnectReturnCode, Limits, Packet, Publish, QoS, Str};

use crate::item::{Form, Item};
use crate::sink::{host_port, Connected, Sink, SinkError};

const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Republish {
    addr: String,
    topic: String,
    qos: QoS,
    client_id: String,
    conn: Option<Conn>,
    next_pkid: u16,
}

pub(crate) struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

fn broken(addr: &str, e: impl std::fmt::Display) -> SinkError {
    SinkError::Connect(format!("mqtt {addr}: {e}"))
}

/// `template` with `{deviceId}` replaced by `device`, whose `%`, `/`, `+` and `#` are
/// percent-encoded.
pub fn topic_for(template: &str, device: &str) -> String {
    let mut safe = String::with_capacity(device.len());
    for c in device.chars() {
        match c {
            '%' => safe.push_str("%25"),
            '/' => safe.push_str("%2F"),
            '+' => safe.push_str("%2B"),
            '#' => safe.push_str("%23"),
            c => safe.push(c),
        }
    }
    template.replace("{deviceId}", &safe)
}

impl Republish {
    pub fn new(url: &str, topic: &str, qos: u8, client_id: String) -> Result<Self, SinkError> {
        if topic.is_empty() || topic.contains(['+', '#']) {
            return Err(SinkError::Refused(format!(
                "mqtt topic {topic:?}: a topic name to publish to (no wildcards)"
            )));
        }
        Ok(Republish {
            addr: host_port(url, "mqtt://", 1883)?,
            topic: topic.to_string(),
            qos: if qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            client_id,
            conn: None,
            next_pkid: 1,
        })
    }

    fn connect(&self) -> Result<Conn, SinkError> {
        let addr = &self.addr;
        let sock = addr
            .to_socket_addrs()
            .map_err(|e| broken(addr, e))?
            .next()
            .ok_or_else(|| broken(addr, "cannot resolve"))?;
        let stream = TcpStream::connect_timeout(&sock, TIMEOUT).map_err(|e| broken(addr, e))?;
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(|e| broken(addr, e))?;
        let _ = stream.set_nodelay(true);
        let mut conn = Conn {
            stream,
            buf: BytesMut::new(),
        };
        let connect = Packet::Connect(Connect {
            protocol_name: Str::from_static("MQTT"),
            protocol_level: 4,
            clean_session: true,
            // No keep-alive: an idle endpoint is not disconnected by the broker.
            keep_alive: 0,
            client_id: Str::new(&self.client_id).map_err(|e| SinkError::Refused(e.to_string()))?,
            will: None,
            username: None,
            password: None,
        });
        conn.send(addr, &[connect])?;
        match conn.packet(addr, Instant::now() + TIMEOUT)? {
            Packet::ConnAck(a) if a.code == ConnectReturnCode::Accepted => Ok(conn),
            Packet::ConnAck(a) => Err(SinkError::Refused(format!(
                "mqtt {addr}: CONNACK {:?}",
                a.code
            ))),
            other => Err(broken(
                addr,
                format!("expected CONNACK, got {:?}", other.packet_type()),
            )),
        }
    }

    fn publish(&mut self, conn: &mut Conn, items: &[Item]) -> Result<(), SinkError> {
        let addr = self.addr.clone();
        let mut waiting = Vec::new();
        let mut packets = Vec::with_capacity(items.len());
        for item in items {
            let topic = Str::new(&topic_for(&self.topic, &item.device))
                .map_err(|e| SinkError::Refused(format!("mqtt topic: {e}")))?;
            let pkid = match self.qos {
                QoS::AtMostOnce => 0,
                _ => {
                    let id = self.next_pkid;
                    self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
                    waiting.push(id);
                    id
                }
            };
            packets.push(Packet::Publish(Publish {
                dup: false,
                qos: self.qos,
                retain: false,
                topic,
                pkid,
                payload: Bytes::copy_from_slice(&item.body),
            }));
        }
        conn.send(&addr, &packets)?;
        let deadline = Instant::now() + TIMEOUT;
        while !waiting.is_empty() {
            match conn.packet(&addr, deadline)? {
                Packet::PubAck(id) => waiting.retain(|w| *w != id),
                Packet::PingResp => {}
                other => {
                    return Err(broken(
                        &addr,
                        format!("unexpected {:?}", other.packet_type()),
                    ))
                }
            }
        }
        Ok(())
    }
}

impl Conn {
    fn send(&mut self, addr: &str, packets: &[Packet]) -> Result<(), SinkError> {
        let mut out = BytesMut::new();
        for p in packets {
            p.encode(&mut out);
        }
        self.stream.write_all(&out).map_err(|e| broken(addr, e))
    }

    fn packet(&mut self, addr: &str, deadline: Instant) -> Result<Packet, SinkError> {
        let limits = Limits::default();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(len) = check(&self.buf, &limits).map_err(|e| broken(addr, e))? {
                let frame = self.buf.split_to(len).freeze();
                return parse(frame).map_err(|e| broken(addr, e));
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(broken(addr, "connection closed")),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(SinkError::Timeout(format!(
                            "mqtt {addr}: no answer in time"
                        )));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(broken(addr, e)),
            }
        }
    }
}

impl Connected for Republish {
    type Conn = Conn;

    fn kept(&mut self) -> &mut Option<Conn> {
        &mut self.conn
    }

    fn connect(&self) -> Result<Conn, SinkError> {
        Republish::connect(self)
    }

    fn publish(&mut self, conn: &mut Conn, items: &[Item]) -> Result<(), SinkError> {
        Republish::publish(self, conn, items)
    }
}

impl Sink for Republish {
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
    fn a_device_id_never_adds_a_level_or_a_wildcard() {
        assert_eq!(
            topic_for("fleet/{deviceId}/telemetry", "pump-1"),
            "fleet/pump-1/telemetry"
        );
        assert_eq!(
            topic_for("fleet/{deviceId}", "a/b+c#d%"),
            "fleet/a%2Fb%2Bc%23d%25"
        );
        assert_eq!(topic_for("all", "x"), "all");
        assert!(Republish::new("mqtt://127.0.0.1", "a/+", 1, "c".into()).is_err());
    }
}
