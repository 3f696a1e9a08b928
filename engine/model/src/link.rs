//! Frames of the control link (DESIGN.md §6): engine ⇄ control over QUIC.
//!
//! On the wire each frame is a little-endian `u32` length followed by the rkyv archive of the
//! frame. The link is not a hot path, so frames are decoded into owned values.

use rkyv::{Archive, Deserialize, Serialize};

/// The slice of a device identity the data plane needs to authenticate it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct DeviceAuth {
    pub device_id: String,
    pub enabled: bool,
    /// Decoded SAS keys; empty when the device has none.
    pub primary_key: Vec<u8>,
    pub secondary_key: Vec<u8>,
    pub generation_id: String,
}

/// One change to the registry, in sequence order.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum RegistryChange {
    Upsert(DeviceAuth),
    Delete { device_id: String },
}

/// Control → engine.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ControlFrame {
    /// The whole registry as of `seq`; replaces the replica.
    Snapshot { seq: u64, devices: Vec<DeviceAuth> },
    /// Changes `from_seq + 1 ..= from_seq + changes.len()`.
    Deltas {
        from_seq: u64,
        changes: Vec<RegistryChange>,
    },
}

/// Engine → control.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum EngineFrame {
    /// First frame on a link: who the engine is and how far its replica goes.
    Hello { node: String, registry_seq: u64 },
    /// A device connected or disconnected; `at_ms` is Unix milliseconds.
    ConnectionState {
        device_id: String,
        connected: bool,
        at_ms: u64,
    },
    /// The last time a device was heard from (sent at most once per device per second).
    Activity { device_id: String, at_ms: u64 },
    /// Sent every few seconds so control can tell a live link from a dead one.
    Heartbeat { registry_seq: u64 },
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the link limit")]
    TooLarge(usize),
    #[error("frame is not a valid archive: {0}")]
    Invalid(String),
}

/// Largest frame the link accepts (a snapshot of about a million devices).
pub const MAX_FRAME: usize = 512 * 1024 * 1024;

macro_rules! frame_codec {
    ($ty:ty, $archived:ty) => {
        impl $ty {
            /// Length-prefixed archive of the frame.
            pub fn encode(&self) -> Vec<u8> {
                let body = rkyv::to_bytes::<rkyv::rancor::Error>(self)
                    .expect("archiving owned link frames cannot fail");
                let mut out = Vec::with_capacity(4 + body.len());
                out.extend_from_slice(&(body.len() as u32).to_le_bytes());
                out.extend_from_slice(&body);
                out
            }

            /// Decodes a frame body (without its length prefix).
            pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
                let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
                aligned.extend_from_slice(body);
                rkyv::from_bytes::<$ty, rkyv::rancor::Error>(&aligned)
                    .map_err(|e| FrameError::Invalid(e.to_string()))
            }
        }
    };
}

frame_codec!(ControlFrame, ArchivedControlFrame);
frame_codec!(EngineFrame, ArchivedEngineFrame);

/// Reads the length prefix of a frame.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = ControlFrame::Deltas {
            from_seq: 7,
            changes: vec![
                RegistryChange::Upsert(DeviceAuth {
                    device_id: "d1".into(),
                    enabled: true,
                    primary_key: vec![1; 32],
                    secondary_key: vec![2; 32],
                    generation_id: "g".into(),
                }),
                RegistryChange::Delete {
                    device_id: "d2".into(),
                },
            ],
        };
        let bytes = f.encode();
        let len = frame_len(bytes[..4].try_into().expect("4 bytes")).expect("len");
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(ControlFrame::decode(&bytes[4..]).expect("decode"), f);
        let e = EngineFrame::Hello {
            node: "n".into(),
            registry_seq: 3,
        };
        assert_eq!(EngineFrame::decode(&e.encode()[4..]).expect("decode"), e);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(ControlFrame::decode(&[0xff; 13]).is_err());
        assert!(frame_len((MAX_FRAME as u32 + 1).to_le_bytes()).is_err());
    }
}
