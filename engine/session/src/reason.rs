//! Why a device session ended: one variant per cause, with the stable label that
//! `roost_disconnects_total{protocol, reason}` carries for every protocol.

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    /// The client said goodbye (MQTT DISCONNECT).
    ClientDisconnect,
    /// The peer closed the connection after authenticating.
    ConnectionLost,
    /// The peer closed the connection before it authenticated.
    ClosedBeforeConnect,
    /// A socket error.
    IoError,
    /// A TLS record failed to decrypt or parse, or the peer sent an alert.
    TlsError,
    TlsHandshakeFailed,
    TlsHandshakeTimeout,
    /// The peer stopped reading: a write did not finish in time.
    WriteStalled,
    /// Authentication failed (the refusal is counted with its own reason).
    Refused,
    /// The same client id connected again; this is the older connection.
    ReplacedByNewConnection,
    /// The device was disabled or deleted, or its keys changed.
    DeviceRevoked,
    /// The CA the session's certificate chained to is no longer trusted (removed at control).
    CaRevoked,
    /// The SAS token the session authenticated with expired (IoT Hub disconnects at expiry; the
    /// SDKs reconnect with a fresh token before that).
    TokenExpired,
    /// Refused at accept: the engine holds as many unauthenticated connections as it allows.
    TooManyUnauthenticated,
    /// Refused at accept: the peer's address holds as many unauthenticated connections as one
    /// source may.
    TooManyUnauthenticatedFromSource,
    /// Refused at accept: the hub's new-connection rate quota is spent (spec §8, "New
    /// connections"); the SDKs retry with back-off.
    ConnectThrottled,
    /// Over a message-rate quota for longer than the traffic-shaping backlog allows (spec §8:
    /// IoT Hub delays first, then gives up on the sender).
    Throttled,
    /// A bug: the connection's task panicked. The shard goes on; the panic is logged.
    Panicked,
    /// The engine is stopping.
    ServerShutdown,
    /// Control asked for the connection to be closed.
    ClosedByService,
    /// The events log failed: nothing more can be acknowledged.
    LogWriteFailed,
    /// A message could not be archived into a record.
    ArchiveFailed,
    /// A message before the session authenticated.
    PublishBeforeConnect,
    /// A publish on a topic that is not an IoT Hub device topic.
    NotIotHubTopic,
    /// An IoT Hub topic this hub does not serve (yet).
    UnsupportedTopic,
    /// A publish naming another device or module than the session's.
    TopicDeviceMismatch,
    /// A message body over IoT Hub's 256 KiB.
    PayloadTooLarge,
    /// A rule of the protocol's codec or state machine, or of IoT Hub's property encoding; the
    /// label is that crate's own stable `error_code()`.
    Protocol(&'static str),
}

impl DisconnectReason {
    /// A stable snake_case label for metrics and logs.
    pub fn error_code(&self) -> &'static str {
        match self {
            DisconnectReason::ClientDisconnect => "client_disconnect",
            DisconnectReason::ConnectionLost => "connection_lost",
            DisconnectReason::ClosedBeforeConnect => "closed_before_connect",
            DisconnectReason::IoError => "io_error",
            DisconnectReason::TlsError => "tls_error",
            DisconnectReason::TlsHandshakeFailed => "tls_handshake_failed",
            DisconnectReason::TlsHandshakeTimeout => "tls_handshake_timeout",
            DisconnectReason::WriteStalled => "write_failed_or_stalled",
            DisconnectReason::Refused => "connack_refused",
            DisconnectReason::ReplacedByNewConnection => "replaced_by_new_connection",
            DisconnectReason::DeviceRevoked => "device_revoked",
            DisconnectReason::CaRevoked => "ca_revoked",
            DisconnectReason::TokenExpired => "token_expired",
            DisconnectReason::TooManyUnauthenticated => "unauthenticated_limit",
            DisconnectReason::TooManyUnauthenticatedFromSource => "unauthenticated_source_limit",
            DisconnectReason::ConnectThrottled => "connect_throttled",
            DisconnectReason::Throttled => "throttled",
            DisconnectReason::Panicked => "panicked",
            DisconnectReason::ServerShutdown => "server_shutdown",
            DisconnectReason::ClosedByService => "closed_by_service",
            DisconnectReason::LogWriteFailed => "log_write_failed",
            DisconnectReason::ArchiveFailed => "archive_failed",
            DisconnectReason::PublishBeforeConnect => "publish_before_connect",
            DisconnectReason::NotIotHubTopic => "not_iothub_topic",
            DisconnectReason::UnsupportedTopic => "unsupported_topic",
            DisconnectReason::TopicDeviceMismatch => "topic_device_mismatch",
            DisconnectReason::PayloadTooLarge => "payload_too_large",
            DisconnectReason::Protocol(code) => code,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_snake_case_labels() {
        let all = [
            DisconnectReason::ClientDisconnect,
            DisconnectReason::ConnectionLost,
            DisconnectReason::ClosedBeforeConnect,
            DisconnectReason::IoError,
            DisconnectReason::TlsError,
            DisconnectReason::TlsHandshakeFailed,
            DisconnectReason::TlsHandshakeTimeout,
            DisconnectReason::WriteStalled,
            DisconnectReason::Refused,
            DisconnectReason::ReplacedByNewConnection,
            DisconnectReason::DeviceRevoked,
            DisconnectReason::CaRevoked,
            DisconnectReason::TokenExpired,
            DisconnectReason::TooManyUnauthenticated,
            DisconnectReason::TooManyUnauthenticatedFromSource,
            DisconnectReason::ConnectThrottled,
            DisconnectReason::Throttled,
            DisconnectReason::Panicked,
            DisconnectReason::ServerShutdown,
            DisconnectReason::ClosedByService,
            DisconnectReason::LogWriteFailed,
            DisconnectReason::ArchiveFailed,
            DisconnectReason::PublishBeforeConnect,
            DisconnectReason::NotIotHubTopic,
            DisconnectReason::UnsupportedTopic,
            DisconnectReason::TopicDeviceMismatch,
            DisconnectReason::PayloadTooLarge,
        ];
        let codes: std::collections::HashSet<_> = all.iter().map(|r| r.error_code()).collect();
        assert_eq!(codes.len(), all.len());
        for c in codes {
            assert!(
                c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{c}"
            );
        }
        assert_eq!(
            DisconnectReason::Protocol("keepalive_timeout").error_code(),
            "keepalive_timeout"
        );
    }
}
