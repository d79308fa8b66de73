//! The node-to-node content protocol, in the project's wire style: a checked [`Frame`]
//! view over bytes, a [`Message`] repr with `parse`/`emit` and `Display`, a version byte
//! on every frame, lengths checked once.
//!
//! The transport is a TCP stream to the provider's overlay address: the overlay has
//! already authenticated the source /64 and encrypts end to end, so messages carry no
//! identity and no MAC. On the stream every message is one frame:
//!
//! ```text
//!  0      version    u8   (VERSION)
//!  1      type       u8   (MessageType)
//!  2..4   reserved   u16  zero
//!  4..8   body len   u32  checked against the type's limit before the body is read
//!  8..    body
//! ```
//!
//! A requester sends requests tagged with its own 32-bit id; a provider answers each
//! with one response carrying the id (a groups stream is a [`Message::Groups`] header
//! and then [`Message::Data`] frames, whose total length both ends compute from the
//! blob size and groups, so the stream needs no end marker). [`Deframer`] reassembles
//! frames from stream reads with memory bounded by the largest frame its role accepts.

mod message;

pub use message::{ErrorCode, HaveState, HaveTarget, Message, MessageType};

/// The only protocol version this code speaks.
pub const VERSION: u8 = 1;
/// Bytes of the frame header.
pub const HEADER_LEN: usize = 8;
/// Most ranges in a request's group set.
pub const MAX_REQUEST_RANGES: usize = 1024;
/// Most groups one request may ask for (64 MiB of data): bounds the work one request
/// makes a provider do.
pub const MAX_REQUEST_GROUPS: u64 = 4096;
/// Most ranges in a have reply.
pub const MAX_HAVE_RANGES: usize = 16384;
/// Most encoded bytes in one data frame.
pub const MAX_DATA_BYTES: usize = 64 << 10;

/// Byte offsets of the frame header fields.
pub mod field {
    use core::ops::Range;
    /// Version.
    pub const VERSION: usize = 0;
    /// Message type.
    pub const TYPE: usize = 1;
    /// Reserved, zero.
    pub const RESERVED: Range<usize> = 2..4;
    /// Body length.
    pub const LENGTH: Range<usize> = 4..8;
    /// Start of the body.
    pub const BODY: usize = 8;
}

/// Why bytes are not a valid content-protocol frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than the header and its stated body.
    #[error("truncated frame: {have} bytes, need {need}")]
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A version this code does not speak.
    #[error("unsupported content protocol version {0}")]
    BadVersion(u8),
    /// A type this version does not define.
    #[error("unknown content message type {0:#04x}")]
    UnknownType(u8),
    /// A type the receiving side never accepts (a request sent to a requester, …).
    #[error("{0} is not accepted from this side of the connection")]
    WrongDirection(MessageType),
    /// Reserved bits set.
    #[error("reserved header field is {0:#06x}, must be zero")]
    Reserved(u16),
    /// A body longer than the type allows.
    #[error("{ty} body of {len} bytes, at most {max}")]
    TooLong {
        /// The type.
        ty: MessageType,
        /// Its stated length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A body of the wrong length for a fixed-size message, or with bytes left over.
    #[error("{ty} body of {len} bytes, expected {expected}")]
    BadLength {
        /// The type.
        ty: MessageType,
        /// The body's length.
        len: usize,
        /// What the type needs.
        expected: usize,
    },
    /// A field with a value this version does not define.
    #[error("{ty}: {what}")]
    BadField {
        /// The type.
        ty: MessageType,
        /// What is wrong.
        what: String,
    },
}

/// A read/write view of one frame at the start of a buffer.
#[derive(Debug, Clone)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps a buffer without checking it; accessors may panic on a short one.
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer after checking it holds the header and the whole stated body.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let f = Self::new_unchecked(buffer);
        f.check_len()?;
        Ok(f)
    }

    /// Ensures every accessor stays in bounds.
    pub fn check_len(&self) -> Result<(), WireError> {
        let have = self.buffer.as_ref().len();
        if have < HEADER_LEN {
            return Err(WireError::Truncated {
                have,
                need: HEADER_LEN,
            });
        }
        let need = HEADER_LEN + self.body_len();
        if have < need {
            return Err(WireError::Truncated { have, need });
        }
        Ok(())
    }

    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Version byte.
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VERSION]
    }

    /// Raw type byte.
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[field::TYPE]
    }

    /// Reserved field.
    pub fn reserved(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::RESERVED];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// Stated body length.
    pub fn body_len(&self) -> usize {
        let b = &self.buffer.as_ref()[field::LENGTH];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
    }

    /// The body (exactly the stated length).
    pub fn body(&self) -> &[u8] {
        &self.buffer.as_ref()[field::BODY..field::BODY + self.body_len()]
    }

    /// Header plus body.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    /// Writes the header fields.
    pub fn set_header(&mut self, msg_type: u8, body_len: u32) {
        let b = self.buffer.as_mut();
        b[field::VERSION] = VERSION;
        b[field::TYPE] = msg_type;
        b[field::RESERVED].copy_from_slice(&[0, 0]);
        b[field::LENGTH].copy_from_slice(&body_len.to_be_bytes());
    }

    /// Mutable body (from the body offset to the end of the buffer).
    pub fn body_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::BODY..]
    }
}

/// Which side of a connection reads: it decides which message types are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The requester reads responses.
    Requester,
    /// The provider reads requests.
    Provider,
}

/// Checks a frame header: version, type known and sent in the right direction,
/// reserved zero, body within the type's limit. Used by [`Deframer`] before it buffers
/// a body and by [`Message::parse`].
pub fn check_header(header: &[u8; HEADER_LEN], role: Role) -> Result<MessageType, WireError> {
    let f = Frame::new_unchecked(&header[..]);
    if f.version() != VERSION {
        return Err(WireError::BadVersion(f.version()));
    }
    let ty = MessageType::from_u8(f.msg_type()).ok_or(WireError::UnknownType(f.msg_type()))?;
    if ty.is_request() != (role == Role::Provider) {
        return Err(WireError::WrongDirection(ty));
    }
    if f.reserved() != 0 {
        return Err(WireError::Reserved(f.reserved()));
    }
    let len = f.body_len();
    if len > ty.max_body() {
        return Err(WireError::TooLong {
            ty,
            len,
            max: ty.max_body(),
        });
    }
    Ok(ty)
}

/// Reassembles frames from a byte stream (sans-IO: the shell hands it what it read).
/// Memory is at most one frame of the largest type its role accepts, and grows with the
/// bytes received (never reserved from the announced length); beyond
/// [`Deframer::KEEP_CAPACITY`] it is released when the next frame starts.
#[derive(Debug)]
pub struct Deframer {
    role: Role,
    buf: Vec<u8>,
    need: usize,
    ready: bool,
}

impl Deframer {
    /// Buffer capacity kept between frames (a data frame and then some); the buffer of a
    /// larger frame (a manifest) is released when the next frame starts.
    pub const KEEP_CAPACITY: usize = 128 << 10;

    /// A deframer for the reading side `role`.
    pub fn new(role: Role) -> Self {
        Self {
            role,
            buf: Vec::with_capacity(HEADER_LEN),
            need: HEADER_LEN,
            ready: false,
        }
    }

    /// Takes bytes from the front of `input` until a frame is whole and returns it
    /// (header and body, ready for [`Frame::new_checked`] and [`Message::parse`]);
    /// `None` when `input` ran out first. A bad header is an error: the stream is out of
    /// step and the connection must be closed.
    pub fn next_frame(&mut self, input: &mut &[u8]) -> Result<Option<&[u8]>, WireError> {
        if self.ready {
            // The previous frame was handed out; start the next.
            self.buf.clear();
            self.buf.shrink_to(Self::KEEP_CAPACITY);
            self.need = HEADER_LEN;
            self.ready = false;
        }
        loop {
            let take = (self.need - self.buf.len()).min(input.len());
            self.buf.extend_from_slice(&input[..take]);
            *input = &input[take..];
            if self.buf.len() < self.need {
                return Ok(None);
            }
            if self.need == HEADER_LEN {
                let mut h = [0u8; HEADER_LEN];
                h.copy_from_slice(&self.buf);
                check_header(&h, self.role)?;
                let body = Frame::new_unchecked(&h[..]).body_len();
                self.need = HEADER_LEN + body;
                // No reservation of the announced length: the buffer grows with the
                // bytes that arrive (at most twice them), so a header alone costs a
                // sender 8 bytes and us nothing.
                if body > 0 {
                    continue;
                }
            }
            self.ready = true;
            return Ok(Some(&self.buf));
        }
    }

    /// Bytes buffered towards the next frame.
    pub fn buffered(&self) -> usize {
        if self.ready { 0 } else { self.buf.len() }
    }
}

#[cfg(test)]
mod tests;
