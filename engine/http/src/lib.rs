//! roost-http: what port 443 speaks before a protocol adapter takes over (DESIGN.md §3,
//! `engine/http`), sans-IO: HTTP/1.1 request heads ([`head`], parsed by `httparse` with
//! roost's limits), the WebSocket opening handshake with IoT Hub's subprotocols
//! ([`upgrade`]: `mqtt`, `AMQPWSB10`), and RFC 6455 server-side framing ([`ws`]: masking,
//! fragmentation, ping/pong, the close handshake, limits checked from a frame's header before
//! its payload is buffered).
//!
//! What it is not: a server. Bytes come in and go out through the caller; nothing here
//! reads a socket or keeps a clock. Each way input can be wrong is a named error with a
//! stable `error_code()` for metrics.

pub mod head;
pub mod upgrade;
pub mod ws;

pub use head::{Head, HeadError, HeadLimits};
pub use upgrade::{Subprotocol, UpgradeError};
pub use ws::{CloseCode, WsError, WsEvent, WsSession};
