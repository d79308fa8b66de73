//! Routing message encoding: a 2-byte payload header followed by type-length-value
//! records (TLVs), laid out byte by byte in `docs/routing.md`.
//!
//! Parsing never allocates and never panics: every length is checked before a slice is
//! taken, so a hostile neighbour can at worst make us count a malformed payload.

use thiserror::Error;

/// Version byte at offset 0 of every routing payload; bumped on incompatible changes so
/// old and new nodes reject each other's messages instead of misreading them. Version 2
/// widened sequence numbers to 32 bits (see [`super::seqno_newer`]).
pub const VERSION: u8 = 2;

/// Bytes before the first TLV (version, reserved).
pub const HEADER_LEN: usize = 2;

/// Largest payload the router emits, so a routing message plus the link-level control
/// framing fits the overlay's 1280-byte minimum IPv6 MTU with room to spare.
pub const MAX_PAYLOAD: usize = 1200;

/// TLV type of a signed route announcement.
pub const TLV_UPDATE: u8 = 1;
/// TLV type of a retraction (this neighbour no longer has a route).
pub const TLV_RETRACTION: u8 = 2;
/// TLV type of a route request (one prefix or the whole table).
pub const TLV_ROUTE_REQUEST: u8 = 3;
/// TLV type of a seqno request (ask the origin for a newer sequence number).
pub const TLV_SEQNO_REQUEST: u8 = 4;

/// Body length of an update TLV.
pub const UPDATE_BODY: usize = 112;
/// Body length of a retraction TLV.
pub const RETRACTION_BODY: usize = 10;
/// Body length of a route request TLV.
pub const ROUTE_REQUEST_BODY: usize = 10;
/// Body length of a seqno request TLV.
pub const SEQNO_REQUEST_BODY: usize = 14;

/// Length of a whole seqno request TLV including its 2-byte type/length header.
pub const SEQNO_REQUEST_TLV_LEN: usize = 2 + SEQNO_REQUEST_BODY;

/// Length of a whole update TLV including its 2-byte type/length header.
pub const UPDATE_TLV_LEN: usize = 2 + UPDATE_BODY;

/// Why a payload (or its tail) could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// Shorter than the 2-byte header.
    #[error("payload shorter than the routing header")]
    TooShort,
    /// Version byte is not [`VERSION`].
    #[error("unsupported routing version {0}")]
    Version(u8),
    /// A TLV header or body runs past the end of the payload.
    #[error("TLV truncated")]
    Truncated,
    /// A known TLV type with a body shorter than its fixed layout.
    #[error("TLV type {0} body too short")]
    BodyTooShort(u8),
}

/// One parsed TLV, borrowing from the payload so the hot path copies nothing until it
/// knows the record is new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tlv<'a> {
    /// A signed announcement of `prefix/plen` by `key`, relayed with `metric`.
    Update {
        /// Prefix length; only 64 is accepted today.
        plen: u8,
        /// Origin sequence number.
        seqno: u32,
        /// Sender's metric to the origin; [`super::INFINITY`] means retraction.
        metric: u16,
        /// Upper 64 bits of the prefix.
        prefix: u64,
        /// Origin's Ed25519 public key.
        key: &'a [u8; 32],
        /// Origin's signature over [`signing_message`].
        signature: &'a [u8; 64],
    },
    /// The sender no longer has a route to `prefix/plen`.
    Retraction {
        /// Prefix length.
        plen: u8,
        /// Upper 64 bits of the prefix.
        prefix: u64,
    },
    /// Asks for the sender's current route to one prefix (`plen` > 0) or the whole table
    /// (`plen` = 0, wildcard).
    RouteRequest {
        /// Prefix length, 0 for a wildcard request.
        plen: u8,
        /// Upper 64 bits of the prefix (zero in a wildcard).
        prefix: u64,
    },
    /// Asks for a route to `prefix/plen` with a sequence number at least `seqno`, to be
    /// forwarded towards the origin while `hops` allows.
    SeqnoRequest {
        /// Prefix length.
        plen: u8,
        /// Remaining hop count.
        hops: u8,
        /// Requested (minimum) sequence number.
        seqno: u32,
        /// Upper 64 bits of the prefix.
        prefix: u64,
    },
    /// A TLV type this version does not know; skipped so later versions can add types.
    Unknown(u8),
}

/// Domain-separation string in front of every origin signature, so a route signature can
/// never be confused with a handshake or discovery-beacon signature by the same key.
pub const ORIGIN_DOMAIN: &[u8; 32] = b"myconet 2026-11 route origin v2\0";

/// Length of [`signing_message`]'s output.
pub const SIGNING_MESSAGE_LEN: usize = 32 + 16 + 1 + 4 + 32;

/// The exact bytes an origin signs: domain, full 16-byte prefix, plen, seqno, key.
/// The key is included so a signature only ever vouches for one (key, prefix) binding.
pub fn signing_message(
    key: &[u8; 32],
    prefix: u64,
    plen: u8,
    seqno: u32,
) -> [u8; SIGNING_MESSAGE_LEN] {
    let mut m = [0u8; SIGNING_MESSAGE_LEN];
    m[..32].copy_from_slice(ORIGIN_DOMAIN);
    m[32..40].copy_from_slice(&prefix.to_be_bytes());
    // bytes 40..48 stay zero: the host part of a /64
    m[48] = plen;
    m[49..53].copy_from_slice(&seqno.to_be_bytes());
    m[53..85].copy_from_slice(key);
    m
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Checks the payload header and returns the TLV area.
pub fn parse_header(payload: &[u8]) -> Result<&[u8], WireError> {
    if payload.len() < HEADER_LEN {
        return Err(WireError::TooShort);
    }
    if payload[0] != VERSION {
        return Err(WireError::Version(payload[0]));
    }
    Ok(&payload[HEADER_LEN..])
}

/// Iterator over the TLVs of a payload body; yields one error and then stops, so a
/// truncated tail cannot be misparsed as further records.
pub struct Tlvs<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Tlvs<'a> {
    /// Iterates over `body` (the bytes after the header).
    pub fn new(body: &'a [u8]) -> Self {
        Tlvs {
            rest: body,
            failed: false,
        }
    }
}

impl<'a> Iterator for Tlvs<'a> {
    type Item = Result<Tlv<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let fail = |s: &mut Self, e| {
            s.failed = true;
            Some(Err(e))
        };
        if self.rest.len() < 2 {
            return fail(self, WireError::Truncated);
        }
        let ty = self.rest[0];
        let len = usize::from(self.rest[1]);
        if self.rest.len() < 2 + len {
            return fail(self, WireError::Truncated);
        }
        let body = &self.rest[2..2 + len];
        self.rest = &self.rest[2 + len..];
        let need = match ty {
            TLV_UPDATE => UPDATE_BODY,
            TLV_RETRACTION => RETRACTION_BODY,
            TLV_ROUTE_REQUEST => ROUTE_REQUEST_BODY,
            TLV_SEQNO_REQUEST => SEQNO_REQUEST_BODY,
            other => return Some(Ok(Tlv::Unknown(other))),
        };
        if body.len() < need {
            return fail(self, WireError::BodyTooShort(ty));
        }
        Some(Ok(match ty {
            TLV_UPDATE => {
                let (Ok(key), Ok(signature)) = (
                    <&[u8; 32]>::try_from(&body[16..48]),
                    <&[u8; 64]>::try_from(&body[48..112]),
                ) else {
                    return fail(self, WireError::BodyTooShort(ty));
                };
                Tlv::Update {
                    plen: body[0],
                    seqno: be32(body, 2),
                    metric: be16(body, 6),
                    prefix: be64(body, 8),
                    key,
                    signature,
                }
            }
            TLV_RETRACTION => Tlv::Retraction {
                plen: body[0],
                prefix: be64(body, 2),
            },
            TLV_ROUTE_REQUEST => Tlv::RouteRequest {
                plen: body[0],
                prefix: be64(body, 2),
            },
            _ => Tlv::SeqnoRequest {
                plen: body[0],
                hops: body[1],
                seqno: be32(body, 2),
                prefix: be64(body, 6),
            },
        }))
    }
}

/// Appends the update TLV that carries a verified (or our own) announcement of a node
/// prefix at `metric`: what the router sends for a selected route and for itself.
pub fn put_signed_update(out: &mut Vec<u8>, origin: &super::cache::SignedOrigin, metric: u16) {
    put_update(
        out,
        myconet_common::addr::NODE_PREFIX_LEN,
        origin.seqno,
        metric,
        origin.prefix,
        &origin.key,
        &origin.signature,
    );
}

/// Appends an update TLV.
pub fn put_update(
    out: &mut Vec<u8>,
    plen: u8,
    seqno: u32,
    metric: u16,
    prefix: u64,
    key: &[u8; 32],
    sig: &[u8; 64],
) {
    out.extend_from_slice(&[TLV_UPDATE, UPDATE_BODY as u8, plen, 0]);
    out.extend_from_slice(&seqno.to_be_bytes());
    out.extend_from_slice(&metric.to_be_bytes());
    out.extend_from_slice(&prefix.to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(sig);
}

/// Appends a retraction TLV.
pub fn put_retraction(out: &mut Vec<u8>, plen: u8, prefix: u64) {
    out.extend_from_slice(&[TLV_RETRACTION, RETRACTION_BODY as u8, plen, 0]);
    out.extend_from_slice(&prefix.to_be_bytes());
}

/// Appends a route request TLV (`plen` 0 and `prefix` 0 for a wildcard).
pub fn put_route_request(out: &mut Vec<u8>, plen: u8, prefix: u64) {
    out.extend_from_slice(&[TLV_ROUTE_REQUEST, ROUTE_REQUEST_BODY as u8, plen, 0]);
    out.extend_from_slice(&prefix.to_be_bytes());
}

/// Appends a seqno request TLV.
pub fn put_seqno_request(out: &mut Vec<u8>, plen: u8, hops: u8, seqno: u32, prefix: u64) {
    out.extend_from_slice(&[TLV_SEQNO_REQUEST, SEQNO_REQUEST_BODY as u8, plen, hops]);
    out.extend_from_slice(&seqno.to_be_bytes());
    out.extend_from_slice(&prefix.to_be_bytes());
}

/// Length of the TLV starting at `tlv[0]`, for packing records into payloads.
pub(crate) fn tlv_len(tlv: &[u8]) -> usize {
    tlv.get(1).map_or(0, |l| 2 + usize::from(*l))
}
