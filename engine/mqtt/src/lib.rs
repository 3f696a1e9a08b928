//! roost-mqtt: an MQTT 3.1.1 codec and the server side of an MQTT session, as IoT Hub devices
//! speak it: packet order, keep-alive, acknowledgements both ways, and the outbound QoS 1
//! window that survives a reconnect.
//!
//! It does no I/O and reads no clock, and knows nothing of glommio or tokio: bytes and `now`
//! go in, packets, events and bytes come out. Socket loops, TLS, authentication and topic
//! routing live in the crates that call it.
//!
//! The key decision is zero-copy: a frame is read into one `Bytes`, and every topic, string and
//! payload of the parsed packet is a slice of it. A 256 KB telemetry payload travels from the
//! socket buffer to the event log without being copied, and holding a topic keeps its frame
//! alive.
//!
//! # Layout
//! - `frame`: the fixed header; [`check`] frames a byte stream and enforces [`Limits`] before
//!   anything is buffered.
//! - `decode`: [`parse`], one frame to one [`Packet`], strict per MQTT 3.1.1.
//! - `encode`: [`Packet::encode`] and the fast-path acknowledgement encoders.
//! - `packet`: the packet types; `string`: [`Str`], the validated zero-copy string.
//! - `reader`: the bounded reader the decoder is built on; it cannot read out of bounds.
//! - `error`: [`Error`], one variant per way input can be wrong.
//! - `session`: [`ServerSession`], packet order, keep-alive and acknowledgements; its doc has
//!   the call order a driver follows. [`SessionConfig`] holds the one frame limit, the connect
//!   timeout and the window size.
//! - `outbound`: the QoS 1 window behind [`ServerSession::send_publish`]: packet ids, PUBACK
//!   matching, and [`Inflight`], the unacknowledged messages a CleanSession=0 client gets
//!   again (DUP=1, same ids, same order) on its next connection.
//!
//! # Reading frames
//! A driver hands frames to [`ServerSession::handle_frame`], which parses them itself; this is
//! the codec alone.
//! ```
//! use bytes::{BufMut, BytesMut};
//! use roost_mqtt::{check, parse, Limits, Packet};
//!
//! let mut buf = BytesMut::new();
//! buf.put_slice(b"\xc0\x00"); // PINGREQ, as read from a socket
//! while let Some(len) = check(&buf, &Limits::default())? {
//!     let packet = parse(buf.split_to(len).freeze())?;
//!     assert_eq!(packet, Packet::PingReq);
//! }
//! # Ok::<(), roost_mqtt::Error>(())
//! ```

mod decode;
mod encode;
mod error;
mod frame;
mod outbound;
mod packet;
mod reader;
mod session;
#[cfg(test)]
mod session_tests;
mod string;

pub use decode::parse;
pub use encode::{encode_connack, encode_pingresp, encode_puback, encode_suback};
pub use error::Error;
pub use frame::{check, Limits};
pub use outbound::{Inflight, InflightError, InflightMessage, SendError};
pub use packet::{
    ConnAck, Connect, ConnectReturnCode, Packet, PacketType, Publish, QoS, SubAck, SubackCode,
    Subscribe, Unsubscribe, Will,
};
pub use session::{Event, ServerSession, SessionConfig, State, Violation};
pub use string::Str;
