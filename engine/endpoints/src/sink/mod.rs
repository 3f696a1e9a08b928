//! Where a dispatcher delivers: one [`Sink`] per endpoint kind. A sink is blocking and owns its
//! connection; it runs on its dispatcher's thread only, so a slow or dead destination holds
//! that thread and nothing else.

use std::path::Path;
use std::sync::Arc;

use roost_routing::config::EndpointKind;

use crate::item::{Form, Item};

pub mod file;
pub mod mqtt;
pub mod nats;
pub mod webhook;

/// Why a batch was not delivered. The dispatcher keeps the batch and tries again.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The destination could not be reached or the connection broke.
    #[error("{0}")]
    Connect(String),
    /// It answered, but not with "stored".
    #[error("{0}")]
    Refused(String),
    /// No answer in time.
    #[error("{0}")]
    Timeout(String),
    /// A local write failed (the file endpoint).
    #[error("{0}")]
    Io(String),
}

impl SinkError {
    /// A stable label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            SinkError::Connect(_) => "connect",
            SinkError::Refused(_) => "refused",
            SinkError::Timeout(_) => "timeout",
            SinkError::Io(_) => "io",
        }
    }
}

/// A destination of batches.
pub trait Sink: Send {
    /// The form the sink wants records in.
    fn form(&self) -> Form;
    /// Most records in one batch.
    fn batch(&self) -> usize {
        100
    }
    /// Delivers `items` (all from one partition, in offset order). `Ok` only once the
    /// destination holds them (a 2xx answer, a stream ack, a PUBACK, a synced file): the
    /// checkpoint then moves past them.
    fn deliver(&mut self, items: &[Item]) -> Result<(), SinkError>;
}

/// A sink that keeps one connection to its destination (NATS, MQTT): the connection is reused
/// from batch to batch, and one that died while idle (a broker that closed it, pings that went
/// unanswered) gets one fresh try before the batch counts as failed.
pub(crate) trait Connected {
    type Conn;
    /// The kept connection, if any.
    fn kept(&mut self) -> &mut Option<Self::Conn>;
    fn connect(&self) -> Result<Self::Conn, SinkError>;
    /// Sends `items` on `conn` and waits for the destination's acknowledgements.
    fn publish(&mut self, conn: &mut Self::Conn, items: &[Item]) -> Result<(), SinkError>;

    fn deliver_connected(&mut self, items: &[Item]) -> Result<(), SinkError> {
        let mut reused = self.kept().is_some();
        loop {
            let mut conn = match self.kept().take() {
                Some(c) => c,
                None => self.connect()?,
            };
            match self.publish(&mut conn, items) {
                Ok(()) => {
                    *self.kept() = Some(conn);
                    return Ok(());
                }
                Err(SinkError::Connect(_)) if reused => reused = false,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The sink of an endpoint. Relative file paths are taken from `base` (the hub's data
/// directory); `tls` is the client config for `https` webhooks.
pub fn open(
    endpoint: &str,
    kind: &EndpointKind,
    base: &Path,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Box<dyn Sink>, SinkError> {
    Ok(match kind {
        EndpointKind::Builtin => {
            return Err(SinkError::Refused(
                "the built-in endpoint has no dispatcher".into(),
            ))
        }
        EndpointKind::Webhook {
            url,
            batch,
            timeout_ms,
            headers,
        } => Box::new(webhook::Webhook::new(
            url,
            *batch,
            *timeout_ms,
            headers.clone(),
            tls,
        )?),
        EndpointKind::File {
            path,
            max_bytes,
            max_files,
        } => Box::new(file::Files::open(
            &base.join(path),
            endpoint,
            *max_bytes,
            *max_files,
        )?),
        EndpointKind::Nats { url, subject } => {
            Box::new(nats::JetStream::new(endpoint, url, subject)?)
        }
        EndpointKind::Mqtt {
            url,
            topic,
            qos,
            client_id,
        } => Box::new(mqtt::Republish::new(
            url,
            topic,
            *qos,
            client_id
                .clone()
                .unwrap_or_else(|| format!("roost-{endpoint}")),
        )?),
    })
}

/// `scheme://host:port` → `host:port` (the port defaulted), for the TCP sinks.
pub(crate) fn host_port(url: &str, scheme: &str, default_port: u16) -> Result<String, SinkError> {
    let rest = url
        .strip_prefix(scheme)
        .ok_or_else(|| SinkError::Refused(format!("{url}: not a {scheme} URL")))?;
    let hostport = rest.split('/').next().unwrap_or_default();
    if hostport.is_empty() || hostport.contains('@') {
        return Err(SinkError::Refused(format!(
            "{url}: needs host[:port] (credentials in the URL are not supported)"
        )));
    }
    Ok(match hostport.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() && !hostport.ends_with(']') => {
            hostport.to_string()
        }
        _ => format!("{hostport}:{default_port}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_defaults_the_port() {
        assert_eq!(
            host_port("nats://127.0.0.1:4223", "nats://", 4222).expect("ok"),
            "127.0.0.1:4223"
        );
        assert_eq!(
            host_port("mqtt://broker", "mqtt://", 1883).expect("ok"),
            "broker:1883"
        );
        assert_eq!(
            host_port("mqtt://[::1]", "mqtt://", 1883).expect("ok"),
            "[::1]:1883"
        );
        assert!(host_port("mqtt://u:p@broker", "mqtt://", 1883).is_err());
        assert!(host_port("mqtt://", "mqtt://", 1883).is_err());
    }
}
