//! RFC 6455 framing, server side, for a byte stream carried in binary messages (MQTT and AMQP
//! over WebSockets: a message may hold part of a packet or several, so message boundaries
//! carry no meaning and each frame's payload is handed on as it completes).
//!
//! Every frame from the client must be masked (§5.1); reserved bits must be clear (no
//! extension is negotiated); text data is refused (both protocols are binary, code 1003);
//! control frames are at most 125 bytes and never fragmented; a frame's length is checked
//! against the limit from its header, before its payload is buffered (code 1009). Pings are
//! answered with pongs; a close is answered with a close and ends the session.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Close status codes the server sends (§7.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    Normal = 1000,
    GoingAway = 1001,
    Protocol = 1002,
    Unsupported = 1003,
    TooBig = 1009,
}

/// Why a frame stream is refused; each closes the session with its close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("a frame from the client is not masked")]
    Unmasked,
    #[error("reserved bits set ({0:#x}) with no extension negotiated")]
    Reserved(u8),
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("a control frame of {0} bytes (at most 125)")]
    ControlTooLong(u64),
    #[error("a fragmented control frame")]
    ControlFragmented,
    #[error("a frame of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: u64, max: usize },
    #[error("a continuation frame with no message begun")]
    StrayContinuation,
    #[error("a new message begun before the last one finished")]
    Interleaved,
    #[error("text data: this endpoint carries binary data only")]
    Text,
    #[error("a close frame with a payload of one byte")]
    BadClose,
}

impl WsError {
    pub fn error_code(&self) -> &'static str {
        match self {
            WsError::Unmasked => "unmasked",
            WsError::Reserved(_) => "reserved_bits",
            WsError::UnknownOpcode(_) => "unknown_opcode",
            WsError::ControlTooLong(_) => "control_too_long",
            WsError::ControlFragmented => "control_fragmented",
            WsError::TooLarge { .. } => "frame_too_large",
            WsError::StrayContinuation => "stray_continuation",
            WsError::Interleaved => "interleaved_message",
            WsError::Text => "text_data",
            WsError::BadClose => "bad_close",
        }
    }

    pub fn close_code(&self) -> CloseCode {
        match self {
            WsError::TooLarge { .. } => CloseCode::TooBig,
            WsError::Text => CloseCode::Unsupported,
            _ => CloseCode::Protocol,
        }
    }
}

/// What the session tells its adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEvent {
    /// Payload bytes of the binary stream, in order.
    Data(Bytes),
    /// The session is over: the peer closed it (with its code, if it gave one), or the server
    /// did for `error`. What [`WsSession::poll_transmit`] still gives should be written, then
    /// the connection closed.
    Closed {
        code: Option<u16>,
        by_peer: bool,
        error: Option<WsError>,
    },
}

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xa;

/// One WebSocket connection after its handshake, server side.
#[derive(Debug)]
pub struct WsSession {
    /// Bytes of a frame not yet whole (never more than one frame's limit).
    input: BytesMut,
    output: BytesMut,
    events: VecDeque<WsEvent>,
    /// Inside a fragmented binary message.
    in_message: bool,
    close_sent: bool,
    closed: bool,
    max_frame: usize,
}

impl WsSession {
    /// A session taking frames of at most `max_frame` payload bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            input: BytesMut::new(),
            output: BytesMut::new(),
            events: VecDeque::new(),
            in_message: false,
            close_sent: false,
            closed: false,
            max_frame,
        }
    }

    /// Changes the frame limit (an adapter raises it once its client authenticated).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Bytes held of a frame not yet whole.
    pub fn buffered(&self) -> usize {
        self.input.len()
    }

    /// Frees the buffers of a quiet session (no partial frame, nothing to send, no event
    /// waiting).
    pub fn release_idle_memory(&mut self) {
        if self.input.is_empty() {
            self.input = BytesMut::new();
        }
        if self.output.is_empty() {
            self.output = BytesMut::new();
        }
        if self.events.is_empty() {
            self.events = VecDeque::new();
        }
    }

    /// Bytes read from the client.
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        if self.closed {
            return;
        }
        self.input.extend_from_slice(bytes);
        while !self.closed {
            match self.next_frame() {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    self.fail(e);
                    break;
                }
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<WsEvent> {
        self.events.pop_front()
    }

    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.output.is_empty()).then(|| self.output.split().freeze())
    }

    /// Sends `payload` as one binary message (one frame, unmasked as a server's are).
    pub fn send(&mut self, payload: &[u8]) {
        if self.close_sent || self.closed {
            return;
        }
        write_header(&mut self.output, BINARY, payload.len());
        self.output.put_slice(payload);
    }

    /// Closes the session from the server's side with `code`.
    pub fn close(&mut self, code: CloseCode) {
        self.send_close(code as u16);
        if !self.closed {
            self.closed = true;
            self.events.push_back(WsEvent::Closed {
                code: Some(code as u16),
                by_peer: false,
                error: None,
            });
        }
    }

    fn send_close(&mut self, code: u16) {
        if self.close_sent {
            return;
        }
        self.close_sent = true;
        write_header(&mut self.output, CLOSE, 2);
        self.output.put_u16(code);
    }

    fn fail(&mut self, e: WsError) {
        self.send_close(e.close_code() as u16);
        self.closed = true;
        self.input = BytesMut::new();
        self.events.push_back(WsEvent::Closed {
            code: Some(e.close_code() as u16),
            by_peer: false,
            error: Some(e),
        });
    }

    /// Handles one whole frame from the input; false when more bytes are needed.
    fn next_frame(&mut self) -> Result<bool, WsError> {
        let Some(header) = check(&self.input, self.max_frame)? else {
            return Ok(false);
        };
        let mut frame = self.input.split_to(header.len);
        frame.advance(header.header_len);
        for (i, b) in frame.iter_mut().enumerate() {
            *b ^= header.mask[i & 3];
        }
        let payload = frame.freeze();
        match header.opcode {
            BINARY | CONTINUATION => {
                if header.opcode == BINARY && self.in_message {
                    return Err(WsError::Interleaved);
                }
                if header.opcode == CONTINUATION && !self.in_message {
                    return Err(WsError::StrayContinuation);
                }
                self.in_message = !header.fin;
                if !payload.is_empty() {
                    self.events.push_back(WsEvent::Data(payload));
                }
            }
            TEXT => return Err(WsError::Text),
            PING => {
                if !self.close_sent {
                    write_header(&mut self.output, PONG, payload.len());
                    self.output.put_slice(&payload);
                }
            }
            PONG => {}
            CLOSE => {
                let code = match payload.len() {
                    0 => None,
                    1 => return Err(WsError::BadClose),
                    _ => Some(u16::from_be_bytes([payload[0], payload[1]])),
                };
                // Echo the peer's code (§5.5.1), or say normal when it gave none.
                self.send_close(code.unwrap_or(CloseCode::Normal as u16));
                self.closed = true;
                self.input = BytesMut::new();
                self.events.push_back(WsEvent::Closed {
                    code,
                    by_peer: true,
                    error: None,
                });
            }
            other => return Err(WsError::UnknownOpcode(other)),
        }
        Ok(true)
    }
}

/// A frame's header as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: u8,
    pub mask: [u8; 4],
    pub header_len: usize,
    /// Header and payload.
    pub len: usize,
}

/// Reads the header of the frame at the start of `input` from as few bytes as tell each
/// rule: `Ok(None)` until the whole frame is there, an error as soon as one is broken —
/// a length over `max_frame` before any of its payload is held.
pub fn check(input: &[u8], max_frame: usize) -> Result<Option<FrameHeader>, WsError> {
    let [b0, b1, ..] = *input else {
        return Ok(None);
    };
    let (fin, rsv, opcode) = (b0 & 0x80 != 0, b0 & 0x70, b0 & 0x0f);
    if rsv != 0 {
        return Err(WsError::Reserved(rsv));
    }
    if !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
        return Err(WsError::UnknownOpcode(opcode));
    }
    if b1 & 0x80 == 0 {
        return Err(WsError::Unmasked);
    }
    let control = opcode & 0x8 != 0;
    if control && !fin {
        return Err(WsError::ControlFragmented);
    }
    let (len, ext) = match b1 & 0x7f {
        126 => match input.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 2),
            None => return Ok(None),
        },
        127 => match input.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().unwrap_or_default()), 8),
            None => return Ok(None),
        },
        n => (u64::from(n), 0),
    };
    if control && len > 125 {
        return Err(WsError::ControlTooLong(len));
    }
    if len > max_frame as u64 {
        return Err(WsError::TooLarge {
            len,
            max: max_frame,
        });
    }
    let header_len = 2 + ext + 4;
    let Some(mask) = input.get(2 + ext..header_len) else {
        return Ok(None);
    };
    let total = header_len + len as usize;
    if input.len() < total {
        return Ok(None);
    }
    Ok(Some(FrameHeader {
        fin,
        opcode,
        mask: [mask[0], mask[1], mask[2], mask[3]],
        header_len,
        len: total,
    }))
}

/// A server frame's header (FIN set, unmasked).
fn write_header(out: &mut BytesMut, opcode: u8, len: usize) {
    out.put_u8(0x80 | opcode);
    match len {
        0..=125 => out.put_u8(len as u8),
        126..=0xffff => {
            out.put_u8(126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
    }
}
