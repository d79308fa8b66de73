//! Path MTU across relays, sans-IO: a packet that fits the sender's TUN device but not a
//! narrower link further on must not vanish.
//!
//! - **At the relay** ([`TooBigReporter`]): a `Data` packet larger than the next link
//!   takes is dropped (the underlay is never asked to fragment it), and the packet's
//!   source gets a signed "too big" message ([`myconet_common::too_big`]) quoting the
//!   packet's header. Reports are rate-limited per source /64 and in all, so a flood of
//!   oversized packets costs a relay a bounded number of signatures.
//! - **At the source** ([`PathMtu`]): a report is believed only if it is addressed to
//!   this node, keeps the path at or above the IPv6 minimum, quotes a packet this node
//!   really sent on a live session recently (a session index and counter only the path
//!   sees), is newer than the last report believed for that destination (no replays),
//!   fits a verification budget, and is signed by the key the routing table holds for
//!   the reporting relay's /64 — in that order, cheapest first, so a forger without the
//!   quote costs no signature check. A believed report lowers the path MTU towards the
//!   destination /64 for [`PATH_MTU_LIFETIME`], after which the full size is tried
//!   again (a path that widened is used again).
//! - **Towards the local application** ([`packet_too_big`]): the source no longer has
//!   the plaintext of the packet the relay dropped, so the next packet from the TUN
//!   device that exceeds the lowered MTU is dropped and answered with an ICMPv6 Packet
//!   Too Big quoting it, which the kernel applies to the destination's route; from then
//!   on the application's packets (and the kernel's fragments of them) fit.
//!
//! The worst a forger who sees the traffic can do is what it could do by dropping it:
//! hold a path at 1280 bytes for [`PATH_MTU_LIFETIME`]. One who does not see it cannot
//! produce an acceptable quote.

use std::{
    collections::HashMap,
    net::Ipv6Addr,
    time::{Duration, Instant},
};

use myconet_common::{
    addr::{NODE_PREFIX_LEN, key_owns, mask, prefix_contains},
    checksum,
    too_big::{self, SIGNATURE_LEN, SIGNING_MESSAGE_LEN, TooBigError},
    wire::{self, DEFAULT_HOP_LIMIT, HEADER_LEN, PacketType},
};
use ring::signature::{ED25519, UnparsedPublicKey};

use crate::id::Signer;
use crate::session::{RateLimitConfig, RateLimiter, TAG_LEN};

/// Outer headers of every Myconet datagram on the underlay: IPv6 (40) and UDP (8).
pub const OUTER_HEADERS: usize = 48;

/// The IPv6 minimum link MTU (RFC 8200 §5): no path is ever lowered below it.
pub const IPV6_MIN_MTU: u16 = 1280;

/// The smallest Myconet datagram a path must carry: an IPv6-minimum packet, sealed.
pub const MIN_DATAGRAM: u16 = IPV6_MIN_MTU + (HEADER_LEN + TAG_LEN) as u16;

/// Datagrams this long or shorter fit every usable link (its IPv6 packet is at most
/// the IPv6 minimum MTU), so a relay need not look up the egress MTU for them.
pub const ALWAYS_FITS: usize = IPV6_MIN_MTU as usize - OUTER_HEADERS;

/// How long a lowered path MTU holds before the full size is tried again (RFC 8201
/// §4 suggests probing for an increase after ten minutes; the kernel's own PMTU
/// entries age the same, `net.ipv6.route.mtu_expires`).
pub const PATH_MTU_LIFETIME: Duration = Duration::from_secs(600);

/// Destinations whose path MTU is remembered at most (memory bound).
pub const MAX_PATHS: usize = 4096;

/// Reports a relay sends about one source /64: enough for the packets in flight when a
/// path first narrows, few enough that one source cannot make a relay sign at will.
pub const REPORTS_PER_SOURCE: RateLimitConfig = RateLimitConfig {
    burst: 4,
    per_second: 4,
    max_sources: 1024,
    ipv6_prefix_len: NODE_PREFIX_LEN,
};

/// Reports a relay sends in all: each costs an Ed25519 signature.
pub const REPORTS_IN_ALL: RateLimitConfig = RateLimitConfig {
    burst: 64,
    per_second: 64,
    max_sources: 1,
    ipv6_prefix_len: 0,
};

/// Signature checks a source spends on reports: each report that passes the cheap
/// checks costs one.
pub const VERIFICATIONS: RateLimitConfig = RateLimitConfig {
    burst: 32,
    per_second: 32,
    max_sources: 1,
    ipv6_prefix_len: 0,
};

/// ICMPv6 Packet Too Big messages written to the TUN device per destination /64: the
/// kernel needs one; a few more cover packets already on their way.
pub const PTB_PER_DESTINATION: RateLimitConfig = RateLimitConfig {
    burst: 8,
    per_second: 8,
    max_sources: MAX_PATHS,
    ipv6_prefix_len: NODE_PREFIX_LEN,
};

/// The largest inner (TUN) packet a path that carries `max_datagram`-byte Myconet
/// datagrams takes.
pub const fn inner_mtu(max_datagram: u16) -> u16 {
    max_datagram.saturating_sub((HEADER_LEN + TAG_LEN) as u16)
}

/// The largest Myconet datagram an underlay link or path of `ipv6_mtu` bytes takes.
pub fn max_datagram(ipv6_mtu: u32) -> u16 {
    u16::try_from(ipv6_mtu.saturating_sub(OUTER_HEADERS as u32)).unwrap_or(u16::MAX)
}

fn limiter<K: Copy + Eq + std::hash::Hash>(config: RateLimitConfig) -> RateLimiter<K> {
    RateLimiter::new(config).expect("the rate limits of this module are valid (tested)")
}

// ---------------------------------------------------------------------------------------
// Relay side
// ---------------------------------------------------------------------------------------

/// Why a relay sent no report for an oversized packet (the packet is dropped anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotReported {
    /// Not a `Data` packet with a whole header.
    #[error("not a data packet")]
    NotData,
    /// The packet fits the link: nothing to report.
    #[error("the packet fits")]
    Fits,
    /// The next link cannot even carry an IPv6-minimum packet: a misconfigured
    /// underlay, which no source can work around.
    #[error("egress MTU {0} is below what the overlay needs")]
    BelowMinimum(u32),
    /// The source or the relay as a whole is over its report rate.
    #[error("report rate exceeded")]
    RateLimited,
    /// The signer returned something that is not an Ed25519 signature.
    #[error("signer failed")]
    Signer,
}

/// The relay's side: builds signed reports within its rate limits.
#[derive(Debug, Clone)]
pub struct TooBigReporter {
    per_source: RateLimiter<Ipv6Addr>,
    in_all: RateLimiter<()>,
}

impl Default for TooBigReporter {
    fn default() -> Self {
        Self {
            per_source: limiter(REPORTS_PER_SOURCE),
            in_all: limiter(REPORTS_IN_ALL),
        }
    }
}

impl TooBigReporter {
    /// The signed report telling the source of `offending` (a `Data` datagram this
    /// relay cannot send on) that the next link takes IPv6 packets of `egress_mtu`
    /// bytes at most; `reporter` is this node's address, `signer` its key.
    pub fn report(
        &mut self,
        signer: &dyn Signer,
        reporter: Ipv6Addr,
        offending: &[u8],
        egress_mtu: u32,
        now: Instant,
    ) -> Result<Vec<u8>, NotReported> {
        let quoted = wire::Packet::new_checked(offending)
            .and_then(|p| wire::Repr::parse(&p))
            .map_err(|_| NotReported::NotData)?;
        if quoted.packet_type != PacketType::Data {
            return Err(NotReported::NotData);
        }
        let max = max_datagram(egress_mtu);
        if max < MIN_DATAGRAM {
            return Err(NotReported::BelowMinimum(egress_mtu));
        }
        let quoted_len = u16::try_from(offending.len()).unwrap_or(u16::MAX);
        if quoted_len <= max {
            return Err(NotReported::Fits);
        }
        // The source's own bucket first, so a source over its rate spends none of the
        // relay's overall budget.
        if !self
            .per_source
            .allow_key(mask(quoted.src_addr, NODE_PREFIX_LEN), now)
            || !self.in_all.allow_key((), now)
        {
            return Err(NotReported::RateLimited);
        }
        let repr = too_big::Repr {
            hop_limit: DEFAULT_HOP_LIMIT,
            reporter,
            source: quoted.src_addr,
            max_datagram: max,
            quoted_len,
            quoted: wire::Repr {
                hop_limit: 0,
                ..quoted
            },
            signature: [0; SIGNATURE_LEN],
        };
        let mut buf = vec![0u8; too_big::LEN];
        let mut packet = too_big::Packet::new_unchecked(&mut buf[..]);
        repr.emit(&mut packet);
        let signature =
            <[u8; SIGNATURE_LEN]>::try_from(signer.sign(&packet.signing_message()).as_slice())
                .map_err(|_| NotReported::Signer)?;
        packet.set_signature(&signature);
        Ok(buf)
    }
}

/// The egress MTU towards each next hop, asked of the kernel at most once a second per
/// next hop (it changes with links and with what underlay routers report).
#[derive(Debug, Clone)]
pub struct EgressMtus<K> {
    known: HashMap<K, (u32, Instant)>,
    /// The last answer given: a relay's packets mostly go to one next hop in a row.
    last: Option<(K, u32, Instant)>,
}

impl<K> Default for EgressMtus<K> {
    fn default() -> Self {
        Self {
            known: HashMap::new(),
            last: None,
        }
    }
}

/// How long an egress MTU read from the kernel is used.
pub const EGRESS_MTU_TTL: Duration = Duration::from_secs(1);

impl<K: Copy + Eq + std::hash::Hash> EgressMtus<K> {
    /// The MTU towards `next_hop`, from `query` when not known from the last second;
    /// `None` when the kernel cannot say (the send then decides).
    pub fn get(
        &mut self,
        next_hop: K,
        now: Instant,
        query: impl FnOnce() -> Option<u32>,
    ) -> Option<u32> {
        let fresh = |at: Instant| now.saturating_duration_since(at) < EGRESS_MTU_TTL;
        if let Some((hop, mtu, at)) = self.last
            && hop == next_hop
            && fresh(at)
        {
            return Some(mtu);
        }
        if let Some(&(mtu, at)) = self.known.get(&next_hop)
            && fresh(at)
        {
            self.last = Some((next_hop, mtu, at));
            return Some(mtu);
        }
        let mtu = query()?;
        self.last = Some((next_hop, mtu, now));
        if self.known.len() >= MAX_PATHS {
            self.known
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < EGRESS_MTU_TTL);
        }
        if self.known.len() < MAX_PATHS {
            self.known.insert(next_hop, (mtu, now));
        }
        Some(mtu)
    }
}

// ---------------------------------------------------------------------------------------
// Source side
// ---------------------------------------------------------------------------------------

/// Why a source refused a report (each has its own counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Not a structurally valid too-big message.
    #[error("malformed: {0}")]
    Malformed(#[from] TooBigError),
    /// Addressed to, or quoting a packet from, an address this node does not own.
    #[error("not about a packet of this node")]
    NotOurs,
    /// It would lower the path below the IPv6 minimum MTU.
    #[error("inner MTU {0} is below the IPv6 minimum")]
    BelowMinimum(u16),
    /// The quoted session index and counter match no packet this node sent recently.
    #[error("quotes no packet this node sent recently")]
    UnknownQuote,
    /// Not newer than the last report believed for this destination and session.
    #[error("replayed or reordered report")]
    Replayed,
    /// Over the signature-verification budget.
    #[error("verification budget exceeded")]
    RateLimited,
    /// The routing table holds no key for the reporting relay's /64.
    #[error("reporter {0} is not in the routing table")]
    UnknownReporter(Ipv6Addr),
    /// The signature does not verify under the reporter's key.
    #[error("bad signature")]
    BadSignature,
}

/// A path MTU in force for a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Largest inner (TUN) packet the path takes.
    pub inner_mtu: u16,
    /// The relay that reported it (the source address of the ICMPv6 message).
    pub reporter: Ipv6Addr,
}

#[derive(Debug, Clone, Copy)]
struct Path {
    limit: Limit,
    expires: Instant,
    /// Session index and counter of the newest quote believed (replay memory; kept a
    /// while past `expires`).
    quote: (u32, u64),
}

/// A report that passed every check but the signature, which the caller verifies
/// without holding the table (the reporter's key comes from the routing table).
#[derive(Debug, Clone)]
pub struct Screened {
    repr: too_big::Repr,
    message: [u8; SIGNING_MESSAGE_LEN],
}

impl Screened {
    /// The relay whose key must have signed the report.
    pub fn reporter(&self) -> Ipv6Addr {
        self.repr.reporter
    }

    /// The report.
    pub fn repr(&self) -> &too_big::Repr {
        &self.repr
    }

    /// Checks the signature under `key`, which must be the key owning the reporter's
    /// /64 (`None`: the routing table knows no key for it).
    pub fn verify(self, key: Option<&[u8; 32]>) -> Result<Verified, Rejected> {
        let key = key
            .filter(|k| key_owns(&k[..], &self.repr.reporter))
            .ok_or(Rejected::UnknownReporter(self.repr.reporter))?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&self.message, &self.repr.signature)
            .map_err(|_| Rejected::BadSignature)?;
        Ok(Verified(self.repr))
    }
}

/// A report whose signature verified; [`PathMtu::commit`] applies it.
#[derive(Debug, Clone)]
pub struct Verified(too_big::Repr);

impl Verified {
    /// The report.
    pub fn repr(&self) -> &too_big::Repr {
        &self.0
    }
}

/// The source's side: path MTUs per destination /64, learned from reports.
#[derive(Debug, Clone)]
pub struct PathMtu {
    paths: HashMap<Ipv6Addr, Path>,
    verifications: RateLimiter<()>,
    ptbs: RateLimiter<Ipv6Addr>,
    lifetime: Duration,
    max_paths: usize,
}

impl Default for PathMtu {
    fn default() -> Self {
        Self::new(PATH_MTU_LIFETIME, MAX_PATHS)
    }
}

impl PathMtu {
    /// A table whose entries hold for `lifetime`, with room for `max_paths`.
    pub fn new(lifetime: Duration, max_paths: usize) -> Self {
        Self {
            paths: HashMap::new(),
            verifications: limiter(VERIFICATIONS),
            ptbs: limiter(PTB_PER_DESTINATION),
            lifetime,
            max_paths: max_paths.max(1),
        }
    }

    /// Whether no destination has a path MTU (the TUN path then checks nothing).
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The first checks of a report received at this node (whose /64 is
    /// `local_prefix`), cheapest first; `sent_recently` says whether the quoted header
    /// is one of a packet this node sent on a live session recently. Signature last:
    /// see [`Screened::verify`].
    pub fn screen(
        &mut self,
        datagram: &[u8],
        local_prefix: Ipv6Addr,
        sent_recently: impl FnOnce(&wire::Repr) -> bool,
        now: Instant,
    ) -> Result<Screened, Rejected> {
        let packet = too_big::Packet::new_checked(datagram)?;
        let repr = too_big::Repr::parse(&packet)?;
        // The parser checked that the report goes to the quoted packet's source.
        if !prefix_contains(local_prefix, NODE_PREFIX_LEN, repr.source) {
            return Err(Rejected::NotOurs);
        }
        let mtu = inner_mtu(repr.max_datagram);
        if mtu < IPV6_MIN_MTU {
            return Err(Rejected::BelowMinimum(mtu));
        }
        if !sent_recently(&repr.quoted) {
            return Err(Rejected::UnknownQuote);
        }
        if let Some(path) = self.paths.get(&mask(repr.quoted.dst_addr, NODE_PREFIX_LEN))
            && path.quote.0 == repr.quoted.session_id
            && repr.quoted.counter <= path.quote.1
        {
            return Err(Rejected::Replayed);
        }
        if !self.verifications.allow_key((), now) {
            return Err(Rejected::RateLimited);
        }
        Ok(Screened {
            message: packet.signing_message(),
            repr,
        })
    }

    /// Applies a verified report: the path MTU towards the quoted destination's /64
    /// becomes the reported one if that is lower (or the old one has expired), for
    /// [`PathMtu::lifetime`]. Returns the limit now in force.
    pub fn commit(&mut self, report: Verified, now: Instant) -> Limit {
        let repr = report.0;
        let key = mask(repr.quoted.dst_addr, NODE_PREFIX_LEN);
        let reported = Limit {
            inner_mtu: inner_mtu(repr.max_datagram),
            reporter: repr.reporter,
        };
        let quote = (repr.quoted.session_id, repr.quoted.counter);
        if !self.paths.contains_key(&key) && self.paths.len() >= self.max_paths {
            self.make_room(now);
        }
        let lifetime = self.lifetime;
        let path = self.paths.entry(key).or_insert(Path {
            limit: reported,
            expires: now,
            quote,
        });
        let lower = reported.inner_mtu < path.limit.inner_mtu;
        if now >= path.expires || lower {
            path.limit = reported;
            path.expires = now + lifetime;
        }
        if quote.0 != path.quote.0 || quote.1 > path.quote.1 {
            path.quote = quote;
        }
        path.limit
    }

    /// Forgets entries long past their expiry (their replay memory is no longer
    /// needed: the quoted sessions have rekeyed since), then, if still full, the one
    /// that expires first.
    fn make_room(&mut self, now: Instant) {
        let lifetime = self.lifetime;
        self.paths.retain(|_, p| now < p.expires + lifetime);
        if self.paths.len() >= self.max_paths
            && let Some(oldest) = self
                .paths
                .iter()
                .min_by_key(|(_, p)| p.expires)
                .map(|(k, _)| *k)
        {
            self.paths.remove(&oldest);
        }
    }

    /// How long entries hold.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The path MTU in force towards `dst` at `now`, if one was learned and has not
    /// expired.
    pub fn limit(&self, dst: Ipv6Addr, now: Instant) -> Option<Limit> {
        self.paths
            .get(&mask(dst, NODE_PREFIX_LEN))
            .filter(|p| now < p.expires)
            .map(|p| p.limit)
    }

    /// Whether another ICMPv6 Packet Too Big may be written for `dst` now.
    pub fn allow_ptb(&mut self, dst: Ipv6Addr, now: Instant) -> bool {
        self.ptbs.allow_key(mask(dst, NODE_PREFIX_LEN), now)
    }

    /// Destinations held (expired ones included until room is needed).
    pub fn len(&self) -> usize {
        self.paths.len()
    }
}

// ---------------------------------------------------------------------------------------
// ICMPv6 towards the local application
// ---------------------------------------------------------------------------------------

const IPV6_HEADER: usize = 40;
const ICMPV6: u8 = 58;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const FRAGMENT_HEADER: u8 = 44;
/// An ICMPv6 error must not exceed the IPv6 minimum MTU (RFC 4443 §2.4 (c)).
const ICMPV6_ERROR_MAX: usize = IPV6_MIN_MTU as usize;

/// The ICMPv6 Packet Too Big (RFC 4443 §3.2) to write to the TUN device for
/// `offending`, an IPv6 packet read from it that exceeds the path MTU `mtu`: from
/// `from` (the reporting relay's overlay address, routed over the TUN device like
/// every overlay address) to the packet's source, quoting as much of the packet as an
/// ICMPv6 error may carry. The kernel applies it to the destination's route (the
/// upper layer's error handler finds the flow in the quote) once the checksum is right.
///
/// `None` where no message is due or none would help: not an IPv6 packet, a source
/// that cannot be answered (unspecified, multicast), a `mtu` below the minimum (the
/// kernel ignores those), or a fragment other than the first (the kernel cannot tie
/// its quote to a flow, so it would be ignored).
pub fn packet_too_big(offending: &[u8], mtu: u16, from: Ipv6Addr) -> Option<Vec<u8>> {
    if offending.len() < IPV6_HEADER || offending[0] >> 4 != 6 || mtu < IPV6_MIN_MTU {
        return None;
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&offending[8..24]);
    let to = Ipv6Addr::from(src);
    if to.is_unspecified() || to.is_multicast() {
        return None;
    }
    if offending[6] == FRAGMENT_HEADER {
        let offset = offending.get(IPV6_HEADER + 2..IPV6_HEADER + 4)?;
        if u16::from_be_bytes([offset[0], offset[1]]) & 0xfff8 != 0 {
            return None;
        }
    }
    let quote = &offending[..offending.len().min(ICMPV6_ERROR_MAX - IPV6_HEADER - 8)];
    let icmp_len = 8 + quote.len();
    let mut out = vec![0u8; IPV6_HEADER + icmp_len];
    out[0] = 0x60;
    out[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    out[6] = ICMPV6;
    out[7] = DEFAULT_HOP_LIMIT;
    out[8..24].copy_from_slice(&from.octets());
    out[24..40].copy_from_slice(&src);
    let icmp = &mut out[IPV6_HEADER..];
    icmp[0] = ICMPV6_PACKET_TOO_BIG;
    icmp[4..8].copy_from_slice(&u32::from(mtu).to_be_bytes());
    icmp[8..].copy_from_slice(quote);
    let sum = checksum::ipv6_upper_layer(&from.octets(), &src, ICMPV6, icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(out)
}

#[cfg(test)]
mod tests;
