//! Every content-protocol message: its type byte, body layout, limits, parse and emit.
//!
//! Body layouts (big-endian; a group set is a u32 count and (start, end) u64 pairs):
//!
//! | type | message | body |
//! |------|---------|------|
//! | 0x01 | GetManifest | id u32, package id \[32\] |
//! | 0x02 | GetGroups | id u32, blob hash \[32\], blob size u64, group set |
//! | 0x03 | GetHave | id u32, target 0 = blob: hash \[32\] size u64 / 1 = package: id \[32\] |
//! | 0x04 | Cancel | id u32 |
//! | 0x81 | Manifest | id u32, signed manifest bytes |
//! | 0x82 | Groups | id u32, group set (the groups that follow, a subset of those asked) |
//! | 0x83 | Data | id u32, 1 to [`MAX_DATA_BYTES`] bytes of the encoding |
//! | 0x84 | Have | id u32, state u8 (0 none, 1 complete, 2 partial), group set (partial only) |
//! | 0x85 | Error | id u32, code u8, retry after ms u32 |

use std::fmt;

use super::{
    Frame, HEADER_LEN, MAX_DATA_BYTES, MAX_HAVE_RANGES, MAX_REQUEST_RANGES, Role, WireError,
    check_header,
};
use crate::{GroupSet, Hash, groups::be_u64, manifest::MAX_MANIFEST_BYTES, mri::PackageId};

/// The type byte of each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// Request a signed manifest by package id.
    GetManifest = 0x01,
    /// Request verified groups of a blob.
    GetGroups = 0x02,
    /// Ask which groups of a blob, or whether a package, a node holds.
    GetHave = 0x03,
    /// Withdraw a request (its response may stop early).
    Cancel = 0x04,
    /// A signed manifest.
    Manifest = 0x81,
    /// Start of a groups stream.
    Groups = 0x82,
    /// Part of a groups stream's encoding.
    Data = 0x83,
    /// What a node holds.
    Have = 0x84,
    /// A request refused.
    Error = 0x85,
}

impl MessageType {
    /// Maps a wire byte to a type.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x01 => Self::GetManifest,
            0x02 => Self::GetGroups,
            0x03 => Self::GetHave,
            0x04 => Self::Cancel,
            0x81 => Self::Manifest,
            0x82 => Self::Groups,
            0x83 => Self::Data,
            0x84 => Self::Have,
            0x85 => Self::Error,
            _ => return None,
        })
    }

    /// True for the messages a requester sends (high bit clear).
    pub fn is_request(self) -> bool {
        (self as u8) & 0x80 == 0
    }

    /// Largest body this type may have; checked on the header, before the body is read.
    pub fn max_body(self) -> usize {
        let set = |ranges: usize| GroupSet::COUNT_LEN + ranges * GroupSet::RANGE_LEN;
        match self {
            Self::GetManifest => 36,
            Self::GetGroups => 44 + set(MAX_REQUEST_RANGES),
            Self::GetHave => 45,
            Self::Cancel => 4,
            Self::Manifest => 4 + MAX_MANIFEST_BYTES,
            Self::Groups => 4 + set(MAX_REQUEST_RANGES),
            Self::Data => 4 + MAX_DATA_BYTES,
            Self::Have => 5 + set(MAX_HAVE_RANGES),
            Self::Error => 9,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::GetManifest => "get-manifest",
            Self::GetGroups => "get-groups",
            Self::GetHave => "get-have",
            Self::Cancel => "cancel",
            Self::Manifest => "manifest",
            Self::Groups => "groups",
            Self::Data => "data",
            Self::Have => "have",
            Self::Error => "error",
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a [`Message::GetHave`] asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HaveTarget {
    /// One blob (its size, so a provider holding other bytes under that hash can say so).
    Blob {
        /// The blob's hash.
        hash: Hash,
        /// Its size per the requester's manifest.
        size: u64,
    },
    /// A whole package.
    Package(PackageId),
}

/// How much of the target a node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HaveState {
    /// Nothing.
    None = 0,
    /// All of it, verified.
    Complete = 1,
    /// Some groups (listed for a blob; for a package, ask per blob).
    Partial = 2,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The node does not hold it.
    NotFound = 1,
    /// A per-peer limit was hit; retry after the stated delay.
    Busy = 2,
    /// A request this node cannot make sense of (groups out of range, …).
    BadRequest = 3,
    /// The node holds a blob with this hash but another size: the requester's manifest
    /// disagrees with the data.
    SizeMismatch = 4,
    /// The request asks for more than one request may.
    TooLarge = 5,
    /// The node holds it but cannot serve it now (a local read failed or found its copy
    /// corrupt).
    Unavailable = 6,
    /// The request was cancelled by the requester.
    Cancelled = 7,
}

impl ErrorCode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::NotFound,
            2 => Self::Busy,
            3 => Self::BadRequest,
            4 => Self::SizeMismatch,
            5 => Self::TooLarge,
            6 => Self::Unavailable,
            7 => Self::Cancelled,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotFound => "not found",
            Self::Busy => "busy",
            Self::BadRequest => "bad request",
            Self::SizeMismatch => "size mismatch",
            Self::TooLarge => "too large",
            Self::Unavailable => "unavailable",
            Self::Cancelled => "cancelled",
        })
    }
}

/// A parsed content-protocol message. Byte payloads borrow from the frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// Request a signed manifest.
    GetManifest {
        /// Request id, echoed in the response.
        id: u32,
        /// The package.
        package: PackageId,
    },
    /// Request groups of a blob, with proofs.
    GetGroups {
        /// Request id.
        id: u32,
        /// The blob.
        blob: Hash,
        /// Its size per the requester's manifest.
        size: u64,
        /// The groups wanted.
        groups: GroupSet,
    },
    /// Ask what a node holds.
    GetHave {
        /// Request id.
        id: u32,
        /// Of what.
        target: HaveTarget,
    },
    /// Withdraw a request.
    Cancel {
        /// The request's id.
        id: u32,
    },
    /// A signed manifest.
    Manifest {
        /// The request's id.
        id: u32,
        /// The signed manifest bytes.
        bytes: &'a [u8],
    },
    /// Start of a groups stream: these groups' encoding follows in data frames.
    Groups {
        /// The request's id.
        id: u32,
        /// The groups that follow (a subset of those asked for).
        groups: GroupSet,
    },
    /// Part of a groups stream.
    Data {
        /// The request's id.
        id: u32,
        /// Encoded bytes.
        bytes: &'a [u8],
    },
    /// What a node holds.
    Have {
        /// The request's id.
        id: u32,
        /// How much.
        state: HaveState,
        /// Which groups, for a partial blob.
        groups: GroupSet,
    },
    /// A refused request.
    Error {
        /// The request's id.
        id: u32,
        /// Why.
        code: ErrorCode,
        /// For [`ErrorCode::Busy`]: when to try again, in milliseconds.
        retry_after_ms: u32,
    },
}

struct Body<'a> {
    ty: MessageType,
    b: &'a [u8],
}

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::BadLength {
                ty: self.ty,
                len: self.b.len(),
                expected: n,
            });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(be_u64(self.take(8)?))
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn hash(&mut self) -> Result<Hash, WireError> {
        let mut h = [0u8; 32];
        h.copy_from_slice(self.take(32)?);
        Ok(Hash(h))
    }
    fn groups(&mut self, max: usize) -> Result<GroupSet, WireError> {
        let (set, used) =
            GroupSet::decode_prefix(self.b, max).map_err(|e| WireError::BadField {
                ty: self.ty,
                what: e.to_string(),
            })?;
        self.b = &self.b[used..];
        Ok(set)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    fn end(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::BadField {
                ty: self.ty,
                what: format!("{} bytes after the last field", self.b.len()),
            })
        }
    }
    fn bad(&self, what: impl Into<String>) -> WireError {
        WireError::BadField {
            ty: self.ty,
            what: what.into(),
        }
    }
}

impl<'a> Message<'a> {
    /// The message's type.
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::GetManifest { .. } => MessageType::GetManifest,
            Self::GetGroups { .. } => MessageType::GetGroups,
            Self::GetHave { .. } => MessageType::GetHave,
            Self::Cancel { .. } => MessageType::Cancel,
            Self::Manifest { .. } => MessageType::Manifest,
            Self::Groups { .. } => MessageType::Groups,
            Self::Data { .. } => MessageType::Data,
            Self::Have { .. } => MessageType::Have,
            Self::Error { .. } => MessageType::Error,
        }
    }

    /// The request id it carries.
    pub fn id(&self) -> u32 {
        match self {
            Self::GetManifest { id, .. }
            | Self::GetGroups { id, .. }
            | Self::GetHave { id, .. }
            | Self::Cancel { id }
            | Self::Manifest { id, .. }
            | Self::Groups { id, .. }
            | Self::Data { id, .. }
            | Self::Have { id, .. }
            | Self::Error { id, .. } => *id,
        }
    }

    /// Parses a whole frame read by `role`: header checks, then the body, which must be
    /// used exactly.
    pub fn parse(frame: &Frame<&'a [u8]>, role: Role) -> Result<Self, WireError> {
        frame.check_len()?;
        let raw: &'a [u8] = frame.buffer;
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&raw[..HEADER_LEN]);
        let ty = check_header(&h, role)?;
        let body = &raw[HEADER_LEN..HEADER_LEN + frame.body_len()];
        let mut b = Body { ty, b: body };
        let id = b.u32()?;
        let msg = match ty {
            MessageType::GetManifest => Self::GetManifest {
                id,
                package: PackageId(b.hash()?),
            },
            MessageType::GetGroups => Self::GetGroups {
                id,
                blob: b.hash()?,
                size: b.u64()?,
                groups: b.groups(MAX_REQUEST_RANGES)?,
            },
            MessageType::GetHave => {
                let target = match b.u8()? {
                    0 => HaveTarget::Blob {
                        hash: b.hash()?,
                        size: b.u64()?,
                    },
                    1 => HaveTarget::Package(PackageId(b.hash()?)),
                    t => return Err(b.bad(format!("unknown target kind {t}"))),
                };
                Self::GetHave { id, target }
            }
            MessageType::Cancel => Self::Cancel { id },
            MessageType::Manifest => Self::Manifest {
                id,
                bytes: b.rest(),
            },
            MessageType::Groups => Self::Groups {
                id,
                groups: b.groups(MAX_REQUEST_RANGES)?,
            },
            MessageType::Data => {
                let bytes = b.rest();
                if bytes.is_empty() {
                    return Err(b.bad("empty data frame"));
                }
                Self::Data { id, bytes }
            }
            MessageType::Have => {
                let state = match b.u8()? {
                    0 => HaveState::None,
                    1 => HaveState::Complete,
                    2 => HaveState::Partial,
                    s => return Err(b.bad(format!("unknown have state {s}"))),
                };
                let groups = b.groups(MAX_HAVE_RANGES)?;
                if state != HaveState::Partial && !groups.is_empty() {
                    return Err(b.bad("groups listed with a state other than partial"));
                }
                Self::Have { id, state, groups }
            }
            MessageType::Error => {
                let c = b.u8()?;
                let code = ErrorCode::from_u8(c)
                    .ok_or_else(|| b.bad(format!("unknown error code {c}")))?;
                Self::Error {
                    id,
                    code,
                    retry_after_ms: b.u32()?,
                }
            }
        };
        b.end()?;
        Ok(msg)
    }

    /// Body bytes [`Message::emit`] writes.
    pub fn body_len(&self) -> usize {
        4 + match self {
            Self::GetManifest { .. } => 32,
            Self::GetGroups { groups, .. } => 40 + groups.encoded_len(),
            Self::GetHave { target, .. } => match target {
                HaveTarget::Blob { .. } => 41,
                HaveTarget::Package(_) => 33,
            },
            Self::Cancel { .. } => 0,
            Self::Manifest { bytes, .. } | Self::Data { bytes, .. } => bytes.len(),
            Self::Groups { groups, .. } => groups.encoded_len(),
            Self::Have { groups, .. } => 1 + groups.encoded_len(),
            Self::Error { .. } => 5,
        }
    }

    /// Header plus body.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }

    /// Appends the frame (header and body) to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + HEADER_LEN, 0);
        let body_len = self.body_len();
        Frame::new_unchecked(&mut out[start..])
            .set_header(self.message_type() as u8, body_len as u32);
        out.extend_from_slice(&self.id().to_be_bytes());
        match self {
            Self::GetManifest { package, .. } => out.extend_from_slice(package.0.as_bytes()),
            Self::GetGroups {
                blob, size, groups, ..
            } => {
                out.extend_from_slice(blob.as_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                groups.encode(out);
            }
            Self::GetHave { target, .. } => match target {
                HaveTarget::Blob { hash, size } => {
                    out.push(0);
                    out.extend_from_slice(hash.as_bytes());
                    out.extend_from_slice(&size.to_be_bytes());
                }
                HaveTarget::Package(p) => {
                    out.push(1);
                    out.extend_from_slice(p.0.as_bytes());
                }
            },
            Self::Cancel { .. } => {}
            Self::Manifest { bytes, .. } | Self::Data { bytes, .. } => out.extend_from_slice(bytes),
            Self::Groups { groups, .. } => groups.encode(out),
            Self::Have { state, groups, .. } => {
                out.push(*state as u8);
                groups.encode(out);
            }
            Self::Error {
                code,
                retry_after_ms,
                ..
            } => {
                out.push(*code as u8);
                out.extend_from_slice(&retry_after_ms.to_be_bytes());
            }
        }
        debug_assert_eq!(out.len() - start, HEADER_LEN + body_len);
    }

    /// The frame as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.frame_len());
        self.emit(&mut v);
        v
    }
}

impl fmt::Display for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} id={}", self.message_type(), self.id())?;
        match self {
            Self::GetManifest { package, .. } => write!(f, " package={package}"),
            Self::GetGroups {
                blob, size, groups, ..
            } => write!(f, " blob={blob} size={size} groups={groups}"),
            Self::GetHave { target, .. } => match target {
                HaveTarget::Blob { hash, size } => write!(f, " blob={hash} size={size}"),
                HaveTarget::Package(p) => write!(f, " package={p}"),
            },
            Self::Cancel { .. } => Ok(()),
            Self::Manifest { bytes, .. } | Self::Data { bytes, .. } => {
                write!(f, " len={}", bytes.len())
            }
            Self::Groups { groups, .. } => write!(f, " groups={groups}"),
            Self::Have { state, groups, .. } => write!(f, " state={state:?} groups={groups}"),
            Self::Error {
                code,
                retry_after_ms,
                ..
            } => write!(f, " code={code} retry_after_ms={retry_after_ms}"),
        }
    }
}
