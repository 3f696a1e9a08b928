//! The server's outbound QoS 1 window: packet ids, the messages the client has not
//! acknowledged, and [`Inflight`], what of them outlives a connection.
//!
//! MQTT 3.1.1 retransmits only on reconnect (§4.4): within one connection TCP does not lose a
//! PUBLISH, so there is no retransmit timer, only redelivery (DUP=1, same packet id, original
//! order, §4.6) when a CleanSession=0 client comes back.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::decode::is_topic_name;
use crate::encode::{encode_publish, publish_remaining, PublishFlags};
use crate::frame::frame_len;
use crate::packet::QoS;
use crate::Str;

/// Why [`ServerSession::send_publish`](crate::ServerSession::send_publish) refused a message.
/// Nothing was queued and the message was dropped: keep a clone (for `Str` and `Bytes`, a
/// reference count) if it may have to be retried, or ask
/// [`can_send`](crate::ServerSession::can_send) first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The session is not `Connected`: before CONNACK 0, or after it closed. For a
    /// CleanSession=0 client, keep the message for its next connection.
    #[error("session is not connected")]
    NotConnected,
    /// `max_inflight` QoS 1 messages are unacknowledged. Hold the message back until an
    /// [`Event::PubAck`](crate::Event::PubAck) frees a slot;
    /// [`can_send`](crate::ServerSession::can_send) says when. QoS 0 is never refused for this.
    #[error("in-flight window is full")]
    WindowFull,
    /// QoS 2: IoT Hub does not speak it (wire spec §2.3), so neither does this session.
    #[error("QoS 2 is not supported")]
    QoS2Unsupported,
    /// The topic is empty or contains a wildcard, which a topic name may not (§4.7.3): the
    /// client would close the connection on it.
    #[error("invalid topic name")]
    InvalidTopicName,
    /// The PUBLISH would be a frame of `len` bytes, more than the session's
    /// [`Limits::max_frame`](crate::Limits) (`max`), or more than MQTT can frame.
    #[error("PUBLISH of {len} bytes exceeds the {max}-byte limit")]
    PacketTooLarge { len: usize, max: usize },
}

impl SendError {
    /// A stable snake_case label for metrics. Never changes once published.
    pub fn error_code(&self) -> &'static str {
        match self {
            SendError::NotConnected => "not_connected",
            SendError::WindowFull => "window_full",
            SendError::QoS2Unsupported => "qos2_unsupported",
            SendError::InvalidTopicName => "invalid_topic_name",
            SendError::PacketTooLarge { .. } => "packet_too_large",
        }
    }
}

/// Why a list of messages is not a valid [`Inflight`] (say, one read back from storage).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflightError {
    /// A QoS 1 PUBLISH cannot carry packet id 0 (§2.3.1).
    #[error("packet identifier 0")]
    ZeroPacketId,
    /// Two messages share a packet id, so one PUBACK could not tell them apart (§2.3.1).
    #[error("packet identifier {0} is used twice")]
    DuplicatePacketId(u16),
    /// A topic is empty or contains a wildcard (§4.7.3).
    #[error("invalid topic name")]
    InvalidTopicName,
    /// A message is larger than MQTT can frame.
    #[error("message of {len} bytes cannot be framed")]
    PacketTooLarge { len: usize },
}

impl InflightError {
    /// A stable snake_case label for metrics. Never changes once published.
    pub fn error_code(&self) -> &'static str {
        match self {
            InflightError::ZeroPacketId => "zero_packet_id",
            InflightError::DuplicatePacketId(_) => "duplicate_packet_id",
            InflightError::InvalidTopicName => "invalid_topic_name",
            InflightError::PacketTooLarge { .. } => "packet_too_large",
        }
    }
}

/// A QoS 1 message sent to the client (or queued to be) and not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InflightMessage {
    pub pkid: u16,
    pub topic: Str,
    pub payload: Bytes,
    pub retain: bool,
    /// The client may have seen it: it went out through `poll_transmit` at least once, so every
    /// later send carries DUP=1 (§3.3.1.1). A message queued but never transmitted is resent
    /// without it.
    pub dup: bool,
}

/// The unacknowledged QoS 1 messages of a session, in the order they were first sent: what a
/// server keeps per client id between connections of a CleanSession=0 client.
///
/// Plain data, so it can be stored; [`Inflight::new`] checks what comes back from storage, so
/// once an `Inflight` exists its packet ids are non-zero and distinct and every message can be
/// framed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inflight {
    messages: Vec<InflightMessage>,
}

impl Inflight {
    /// Checks `messages` (oldest first) form a window a session can resume.
    pub fn new(messages: Vec<InflightMessage>) -> Result<Self, InflightError> {
        // One bit per packet id: 8 KiB once per restore, where a pairwise check would be
        // quadratic in a window of up to 65,535.
        let mut seen = vec![0u64; 1024];
        for m in &messages {
            if m.pkid == 0 {
                return Err(InflightError::ZeroPacketId);
            }
            let (word, bit) = (usize::from(m.pkid / 64), 1u64 << (m.pkid % 64));
            if seen[word] & bit != 0 {
                return Err(InflightError::DuplicatePacketId(m.pkid));
            }
            seen[word] |= bit;
            if !is_topic_name(&m.topic) {
                return Err(InflightError::InvalidTopicName);
            }
            let remaining = publish_remaining(&m.topic, QoS::AtLeastOnce, m.payload.len());
            if frame_len(remaining).is_none() {
                return Err(InflightError::PacketTooLarge { len: remaining });
            }
        }
        Ok(Inflight { messages })
    }

    /// Oldest first.
    pub fn messages(&self) -> &[InflightMessage] {
        &self.messages
    }

    pub fn into_messages(self) -> Vec<InflightMessage> {
        self.messages
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// One in-flight message and whether this connection has transmitted it.
#[derive(Debug)]
struct Slot {
    message: InflightMessage,
    /// Encoded by `poll_transmit` on this connection. Only then can the client acknowledge it,
    /// and only once: a slot is transmitted at most once per connection.
    transmitted: bool,
}

/// The outbound QoS 1 window of one session, oldest first.
///
/// Lookups are linear: the window is small (16 by default) and a scan of it is cheaper than a
/// map, in time and in the memory of every idle connection.
#[derive(Debug)]
pub(crate) struct Window {
    slots: VecDeque<Slot>,
    max: u16,
    /// Where the search for a free packet id starts; never 0.
    next_pkid: u16,
}

impl Window {
    pub fn new(max: u16) -> Self {
        Window {
            slots: VecDeque::new(),
            max,
            next_pkid: 1,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_full(&self) -> bool {
        self.slots.len() >= usize::from(self.max)
    }

    /// Takes a QoS 1 message into the window; its packet id, or `None` if the window is full.
    pub fn push(&mut self, topic: Str, payload: Bytes, retain: bool) -> Option<u16> {
        self.push_with_dup(topic, payload, retain, false)
    }

    /// [`Self::push`], with DUP set from the first transmission when `dup` (a message an
    /// earlier connection of the client was sent and did not acknowledge).
    pub fn push_with_dup(
        &mut self,
        topic: Str,
        payload: Bytes,
        retain: bool,
        dup: bool,
    ) -> Option<u16> {
        if self.is_full() {
            return None;
        }
        let pkid = self.allocate()?;
        self.slots.push_back(Slot {
            message: InflightMessage {
                pkid,
                topic,
                payload,
                retain,
                dup,
            },
            transmitted: false,
        });
        Some(pkid)
    }

    /// The next packet id after the last one handed out, skipping 0 and ids still in flight.
    fn allocate(&mut self) -> Option<u16> {
        // Bounded: a non-full window (at most 65,535 slots) leaves a free id among any 65,535
        // consecutive candidates; the bound only guards against a bug.
        for _ in 0..u16::MAX {
            let candidate = self.next_pkid;
            self.next_pkid = successor(candidate);
            if !self.slots.iter().any(|s| s.message.pkid == candidate) {
                return Some(candidate);
            }
        }
        None
    }

    /// Encodes the message `pkid` into `out` if it is in the window and not yet transmitted
    /// on this connection; true if it wrote it.
    pub fn transmit(&mut self, pkid: u16, out: &mut BytesMut) -> bool {
        // hot path: one scan of a small window and an encode straight from the stored fields,
        // with no clone of topic or payload.
        let Some(slot) = self
            .slots
            .iter_mut()
            .find(|s| s.message.pkid == pkid && !s.transmitted)
        else {
            return false;
        };
        let m = &mut slot.message;
        let flags = PublishFlags {
            dup: m.dup,
            qos: QoS::AtLeastOnce,
            retain: m.retain,
        };
        encode_publish(flags, &m.topic, m.pkid, &m.payload, out);
        m.dup = true;
        slot.transmitted = true;
        true
    }

    /// The client's PUBACK: frees the slot and returns true if `pkid` is a message this
    /// connection transmitted; false (and nothing changes) otherwise.
    pub fn ack(&mut self, pkid: u16) -> bool {
        let Some(i) = self
            .slots
            .iter()
            .position(|s| s.message.pkid == pkid && s.transmitted)
        else {
            return false;
        };
        self.slots.remove(i);
        true
    }

    /// Replaces the window with a resumed session's messages, none yet transmitted on this
    /// connection; their packet ids, oldest first, for the caller to queue.
    pub fn resume(&mut self, inflight: Inflight) -> impl Iterator<Item = u16> + '_ {
        if let Some(last) = inflight.messages.last() {
            self.next_pkid = successor(last.pkid);
        }
        self.slots = inflight
            .messages
            .into_iter()
            .map(|message| Slot {
                message,
                transmitted: false,
            })
            .collect();
        self.slots.iter().map(|s| s.message.pkid)
    }

    /// Empties the window, oldest first.
    pub fn take(&mut self) -> Inflight {
        let messages = std::mem::take(&mut self.slots)
            .into_iter()
            .map(|s| s.message)
            .collect();
        Inflight { messages }
    }

    /// Frees the slot buffer if the window is empty.
    pub fn release_idle_memory(&mut self) {
        if self.slots.is_empty() && self.slots.capacity() > 0 {
            self.slots = VecDeque::new();
        }
    }
}

/// Packet ids run 1..=65535 and wrap to 1.
fn successor(pkid: u16) -> u16 {
    pkid.checked_add(1).unwrap_or(1)
}

/// Checks a message `send_publish` was given; the length is the whole frame.
pub(crate) fn check_outbound(
    topic: &Str,
    qos: QoS,
    payload_len: usize,
    max_frame: usize,
) -> Result<(), SendError> {
    if !is_topic_name(topic) {
        return Err(SendError::InvalidTopicName);
    }
    let remaining = publish_remaining(topic, qos, payload_len);
    match frame_len(remaining) {
        Some(len) if len <= max_frame => Ok(()),
        len => Err(SendError::PacketTooLarge {
            len: len.unwrap_or(remaining),
            max: max_frame,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(pkid: u16) -> InflightMessage {
        InflightMessage {
            pkid,
            topic: Str::from_static("devices/d1/messages/devicebound/"),
            payload: Bytes::from_static(b"x"),
            retain: false,
            dup: true,
        }
    }

    #[test]
    fn successor_wraps_past_zero() {
        assert_eq!(successor(1), 2);
        assert_eq!(successor(u16::MAX), 1);
    }

    #[test]
    fn inflight_new_checks_packet_ids_and_topics() {
        assert_eq!(
            Inflight::new(vec![message(1), message(0)]),
            Err(InflightError::ZeroPacketId)
        );
        assert_eq!(
            Inflight::new(vec![message(7), message(65_535), message(7)]),
            Err(InflightError::DuplicatePacketId(7))
        );
        let mut wildcard = message(2);
        wildcard.topic = Str::from_static("devices/+/x");
        assert_eq!(
            Inflight::new(vec![wildcard]),
            Err(InflightError::InvalidTopicName)
        );
        let ok = Inflight::new(vec![message(65_535), message(1), message(64)]).expect("valid");
        let pkids: Vec<u16> = ok.messages().iter().map(|m| m.pkid).collect();
        assert_eq!(pkids, [65_535, 1, 64], "order is kept");
        assert_eq!(
            InflightError::DuplicatePacketId(7).error_code(),
            "duplicate_packet_id"
        );
    }

    #[test]
    fn allocation_wraps_and_skips_ids_in_flight() {
        let push = |w: &mut Window| w.push(Str::from_static("t"), Bytes::new(), false);
        let mut w = Window::new(4);
        assert_eq!(push(&mut w), Some(1));
        w.next_pkid = 65_534;
        assert_eq!(push(&mut w), Some(65_534));
        assert_eq!(push(&mut w), Some(65_535));
        assert_eq!(push(&mut w), Some(2), "0 is never an id and 1 is in flight");
        assert!(w.is_full());
        assert_eq!(push(&mut w), None);
        assert_eq!(w.len(), 4);
    }

    #[test]
    fn check_outbound_counts_the_whole_frame() {
        let topic = Str::from_static("t");
        // QoS 1: 2-byte header, 3 for the topic, 2 for the pkid, 121 of payload = 128.
        assert_eq!(check_outbound(&topic, QoS::AtLeastOnce, 121, 128), Ok(()));
        assert_eq!(
            check_outbound(&topic, QoS::AtLeastOnce, 122, 128),
            Err(SendError::PacketTooLarge { len: 129, max: 128 })
        );
        // 128 remaining bytes take a two-byte length: 131.
        assert_eq!(
            check_outbound(&topic, QoS::AtLeastOnce, 123, 130),
            Err(SendError::PacketTooLarge { len: 131, max: 130 })
        );
        assert_eq!(check_outbound(&topic, QoS::AtMostOnce, 123, 128), Ok(()));
        assert_eq!(
            check_outbound(&Str::from_static(""), QoS::AtMostOnce, 0, 128),
            Err(SendError::InvalidTopicName)
        );
    }
}
