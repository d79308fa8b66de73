//! Keys, values and names of the BPF maps the agent fills and the XDP program reads.
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides agree on the layout;
//! padding is always written as zero because hash maps compare keys byte for byte.

/// LPM trie from overlay prefix to [`RouteValue`] (key: `Key<[u8; 16]>`).
pub const ROUTES_MAP: &str = "ROUTES";
/// Hash from [`PeerKey`] to [`PeerValue`]: the underlay endpoints allowed to use us as a relay.
pub const PEERS_MAP: &str = "PEERS";
/// Per-CPU array of [`Counter`], indexed by [`Stat`].
pub const STATS_MAP: &str = "STATS";
/// One-entry array holding the [`Config`].
pub const CONFIG_MAP: &str = "CONFIG";
/// Device map (hash) from egress ifindex to itself, for redirects between interfaces.
pub const DEVMAP_MAP: &str = "DEVMAP";
/// Hash from ifindex to [`EGRESS_REDIRECT`] | [`EGRESS_TX`] | [`IFACE_GENERIC`] bits: how
/// the program may send frames out of each attached interface, and how it runs there.
/// The agent sets only what it proved the driver takes (a veth whose far end cannot
/// receive XDP frames gets neither egress bit), so relayed frames are never handed to a
/// transmit path that drops them after they were counted.
pub const EGRESS_MAP: &str = "EGRESS";
/// [`EGRESS_MAP`] bit: frames from other interfaces may be redirected into this one
/// (it is also in [`DEVMAP_MAP`]).
pub const EGRESS_REDIRECT: u32 = 1;
/// [`EGRESS_MAP`] bit: frames may be sent back out of this interface with `XDP_TX`.
pub const EGRESS_TX: u32 = 2;
/// [`EGRESS_MAP`] bit: the program runs on this interface in generic (skb) mode, so a
/// frame that arrives on it is still an skb when relayed and keeps the kernel's
/// checksum state (see [`Stat::CsumPartial`]).
pub const IFACE_GENERIC: u32 = 4;
/// Largest UDP datagram whose partial checksum the program completes (driver mode): a
/// frame without XDP fragments fits one page, well under this; a larger one would be
/// passed to the agent rather than relayed with a wrong checksum.
pub const CSUM_COMPLETE_MAX: usize = 4096;
/// Per-CPU LRU hash from [`NextHopKey`] to [`NextHopEntry`]: recent `bpf_fib_lookup`
/// answers, so the relay path does not pay for a FIB lookup on every packet.
pub const NEXTHOP_CACHE_MAP: &str = "NEXTHOP_CACHE";
/// Per-CPU array of [`ForwardingEntry`] slots, indexed by [`forwarding_slot`]: the
/// complete relay decision for recent (destination, neighbour, ingress) flows, so a
/// relayed packet costs one inlined array lookup instead of the route trie, the peer
/// hash and the next-hop cache.
pub const FORWARDING_CACHE_MAP: &str = "FORWARDING_CACHE";
/// Hash from [`LocalAddrKey`] to a reserved `u32`: this node's own underlay addresses.
/// The program relays only packets whose outer IPv6 destination is one of them, so a
/// promiscuous interface (or a switch flooding unknown MACs) does not make it relay
/// frames meant for other hosts.
pub const LOCAL_ADDRS_MAP: &str = "LOCAL_ADDRS";
/// Per-CPU array of [`HandshakeSlot`]s, indexed by [`handshake_slot`]: the handshake
/// gate's token buckets per underlay source (see [`HandshakeLimits`]).
pub const HANDSHAKE_SOURCES_MAP: &str = "HANDSHAKE_SOURCES";
/// Per-CPU array of two GCRA times: the handshake gate's node-wide buckets
/// ([`HANDSHAKE_NODE_COOKIELESS`], [`HANDSHAKE_NODE_COOKIE`]).
pub const HANDSHAKE_NODE_MAP: &str = "HANDSHAKE_NODE";
/// Name of the XDP program in the object.
pub const PROGRAM_NAME: &str = "myconet_xdp";

/// Capacity of the route map.
pub const ROUTES_CAPACITY: u32 = 65_536;
/// Capacity of the peer map.
pub const PEERS_CAPACITY: u32 = 16_384;
/// Capacity of the local-address map.
pub const LOCAL_ADDRS_CAPACITY: u32 = 1024;
/// Capacity of the device map.
pub const DEVMAP_CAPACITY: u32 = 64;
/// Capacity of the next-hop cache (per CPU).
pub const NEXTHOP_CACHE_CAPACITY: u32 = 4096;
/// Slots of the forwarding cache per CPU (a power of two). Direct-mapped: two flows
/// that share a slot evict each other and fall back to the full lookups, which stay
/// correct, only slower. 4,096 × 120 bytes = 480 KiB per CPU.
pub const FORWARDING_CACHE_SLOTS: u32 = 4096;
/// log2 of [`FORWARDING_CACHE_SLOTS`].
pub const FORWARDING_CACHE_BITS: u32 = 12;
/// Slots of the handshake gate's source table per CPU (a power of two).
pub const HANDSHAKE_SLOTS: u32 = 1024;
/// log2 of [`HANDSHAKE_SLOTS`].
pub const HANDSHAKE_SLOT_BITS: u32 = 10;
/// Index in [`HANDSHAKE_NODE_MAP`] of the node's bucket for inits without a cookie.
pub const HANDSHAKE_NODE_COOKIELESS: u32 = 0;
/// Index in [`HANDSHAKE_NODE_MAP`] of the node's bucket for inits with a cookie.
pub const HANDSHAKE_NODE_COOKIE: u32 = 1;
/// Where a HandshakeInit's cookie lies, counted from the start of the Myconet header
/// (`docs/handshake.md`: the 32 bytes at offset 144): all zero when it carries none.
/// The agent's own parser (`session::msg`) is checked against it.
pub const INIT_COOKIE_OFFSET: usize = 144;
/// Length of the cookie field.
pub const INIT_COOKIE_LEN: usize = 32;
/// How often the agent bumps [`Config::generation`] even when nothing changed (it also
/// bumps it on every rtnetlink notification that matters): bounds how long a change a
/// lost notification would hide goes unnoticed by the caches, without the relay path
/// reading a clock per packet. The agent refreshes next hops' neighbour entries
/// (`NTF_USE`) at the same cadence.
pub const NEXTHOP_REFRESH_INTERVAL_MS: u64 = 1000;

/// What the XDP program does with a packet matching a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RouteAction {
    /// A prefix this node owns: hand the packet to the stack and the agent.
    Local = 1,
    /// Relay the packet to the next hop.
    Forward = 2,
}

impl RouteAction {
    /// Maps the stored byte back to an action.
    #[inline(always)]
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Local),
            2 => Some(Self::Forward),
            _ => None,
        }
    }
}

/// Value of the route map: where packets for a prefix go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct RouteValue {
    /// Next hop's underlay IPv6 address (unused for [`RouteAction::Local`]).
    pub next_hop: [u8; 16],
    /// This node's underlay address towards the next hop, resolved by the agent when it
    /// installs the route. All zero: ask the FIB per packet (`BPF_FIB_LOOKUP_SRC`),
    /// which costs about twice the rest of the relay path.
    pub src: [u8; 16],
    /// Interface towards the next hop (0: let the FIB choose).
    pub ifindex: u32,
    /// Next hop's underlay UDP port, host byte order.
    pub port: u16,
    /// A [`RouteAction`] as its byte.
    pub action: u8,
    /// Always zero.
    pub reserved: u8,
}

/// Key of the peer map: an authenticated neighbour's underlay endpoint.
///
/// A link-local address (`fe80::/10`) names a neighbour only together with the link it
/// is on: the same `fe80::` address may belong to another host on another interface.
/// Such keys carry the interface index, and the program looks them up with the
/// interface the packet came in on; every other address is host-wide and carries 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct PeerKey {
    /// Underlay IPv6 address.
    pub addr: [u8; 16],
    /// Underlay UDP port, host byte order.
    pub port: u16,
    /// Always zero (part of the hashed key).
    pub pad: u16,
    /// Interface the neighbour is reached on for a link-local `addr`, else 0.
    pub ifindex: u32,
}

impl PeerKey {
    /// The key for an endpoint seen on interface `ifindex`: the index is kept only for
    /// link-local addresses (see [`link_scope`]), and the padding is zeroed.
    pub const fn new(addr: [u8; 16], port: u16, ifindex: u32) -> Self {
        Self {
            addr,
            port,
            pad: 0,
            ifindex: link_scope(&addr, ifindex),
        }
    }
}

/// Key of the local-address map: one of this node's underlay addresses, with the
/// interface it is on for a link-local address (such an address is ours only on that
/// link) and 0 for every other one (Linux accepts those on any interface).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct LocalAddrKey {
    /// The address.
    pub addr: [u8; 16],
    /// Interface for a link-local address, else 0.
    pub ifindex: u32,
}

impl LocalAddrKey {
    /// The key for `addr` configured on (or, in the program, arriving on) `ifindex`.
    pub const fn new(addr: [u8; 16], ifindex: u32) -> Self {
        Self {
            addr,
            ifindex: link_scope(&addr, ifindex),
        }
    }
}

/// Whether `addr` is a link-local unicast address (`fe80::/10`), which means something
/// only on one interface.
#[inline(always)]
pub const fn is_link_local(addr: &[u8; 16]) -> bool {
    addr[0] == 0xfe && addr[1] & 0xc0 == 0x80
}

/// The interface scope a map key carries for `addr` seen on (or reached through)
/// `ifindex`: the index for link-local addresses, 0 for host-wide ones.
#[inline(always)]
pub const fn link_scope(addr: &[u8; 16], ifindex: u32) -> u32 {
    if is_link_local(addr) { ifindex } else { 0 }
}

/// Key of the next-hop cache: the next hop and the interface the FIB lookup is made
/// from (the route's interface, or the ingress interface when the route names none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct NextHopKey {
    /// Next hop's underlay address.
    pub addr: [u8; 16],
    /// Interface the lookup is made from.
    pub ifindex: u32,
}

/// A cached `bpf_fib_lookup` success. The two MAC addresses sit together in Ethernet
/// header order, so the relay path writes them with two stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct NextHopEntry {
    /// Source address to put on relayed packets.
    pub src: [u8; 16],
    /// [`Config::generation`] when the entry was made; any other value makes it stale.
    pub generation: u32,
    /// Egress interface.
    pub egress: u32,
    /// Next hop's MAC address.
    pub dmac: [u8; 6],
    /// Egress interface's MAC address.
    pub smac: [u8; 6],
    /// Largest outer IPv6 packet the FIB approved for this path (MTU check): larger
    /// packets are looked up afresh.
    pub max_len: u16,
    /// The egress interface's [`EGRESS_MAP`] bits at lookup time (0 if absent), so the
    /// relay path need not look them up per packet.
    pub egress_flags: u8,
    /// Always zero.
    pub pad: u8,
}

/// One slot of the forwarding cache: a flow key (the packet's overlay destination, the
/// neighbour that sent it, the interface it came in on, the outer destination it was
/// sent to) and everything the rewrite needs,
/// valid only in the [`Config::generation`] it was made in. A slot is filled only after
/// the full checks passed (route, neighbour authenticated, FIB success, redirect
/// allowed), so a hit stands for all of them; any route, peer or redirect change bumps
/// the generation. Words sit at 8-byte offsets so the program compares and copies them
/// whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct ForwardingEntry {
    /// Overlay destination address (key).
    pub dst: [u8; 16],
    /// Underlay address of the neighbour that sent the packet (key).
    pub peer: [u8; 16],
    /// That neighbour's underlay UDP port, as it lies in the packet (key).
    pub peer_port_be: u16,
    /// Next hop's underlay UDP port, as it is written into the packet.
    pub next_port_be: u16,
    /// Interface the packet came in on (key; never 0 for a real packet, so a zeroed slot
    /// never matches).
    pub ingress: u32,
    /// [`Config::generation`] when the slot was filled.
    pub generation: u32,
    /// Egress interface.
    pub egress: u32,
    /// Next hop's underlay address.
    pub next_hop: [u8; 16],
    /// Source address for the outer header.
    pub src: [u8; 16],
    /// Next hop's MAC address.
    pub dmac: [u8; 6],
    /// Egress interface's MAC address.
    pub smac: [u8; 6],
    /// Largest outer IPv6 packet the FIB approved on this path (0 in an empty slot).
    pub max_len: u16,
    /// Whether the slot's flow leaves by XDP_TX (egress is the ingress) rather than by
    /// a redirect; 1 or 0.
    pub is_tx: u8,
    /// Whether the program runs on the ingress interface in generic (skb) mode
    /// ([`IFACE_GENERIC`]); 1 or 0.
    pub ingress_generic: u8,
    /// Native-order one's-complement sum ([`crate::checksum::WordSum`]) of every
    /// checksum-covered change that is fixed for the flow: the outer source address
    /// (neighbour → ours), the outer destination (ours → the next hop's), the UDP
    /// ports. Per packet only the hop limit remains to account for.
    pub csum_delta: u32,
    /// Folded native-order sum of the flow's incoming pseudo-header without the length
    /// (outer source and destination, next header 17): with the packet's UDP length
    /// added, it is what the checksum field holds when the sender's kernel left the
    /// checksum partial (see [`Stat::CsumPartial`]).
    pub pseudo_in: u16,
    /// The same for the outgoing pseudo-header (our source address, the next hop's).
    pub pseudo_out: u16,
    /// The outer IPv6 destination the packets carried (key): one of this node's
    /// addresses when the slot was filled, so a hit needs no local-address lookup, and
    /// fixed per flow, so its checksum share is part of `csum_delta`.
    pub outer_dst: [u8; 16],
}

/// The slot of the forwarding cache for a flow, from the words the program loads from
/// the packet: the overlay destination as two native-order 64-bit words, the
/// neighbour's interface identifier (second word of its address), its UDP port as it
/// lies in the packet, and the ingress ifindex. A multiplicative (Fibonacci) hash: a few
/// instructions, and its top bits mix every input bit.
#[inline(always)]
pub const fn forwarding_slot(
    dst0: u64,
    dst1: u64,
    peer1: u64,
    peer_port_be: u16,
    ingress: u32,
) -> u32 {
    let x = dst0
        ^ dst1.rotate_left(17)
        ^ peer1.rotate_left(31)
        ^ ((peer_port_be as u64) << 32 | ingress as u64);
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - FORWARDING_CACHE_BITS)) as u32
}

/// Value of the peer map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct PeerValue {
    /// Reserved flag bits, zero today.
    pub flags: u32,
}

/// Data-plane configuration written by the agent before it attaches the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Config {
    /// Myconet underlay UDP port, host byte order; 0 disables the program (all pass).
    pub port: u16,
    /// Always zero.
    pub pad: u16,
    /// Reserved flag bits, zero today.
    pub flags: u32,
    /// Bumped by the agent whenever a route, a peer or a redirect target changes, and
    /// every [`NEXTHOP_REFRESH_INTERVAL_MS`]: forwarding-cache slots and next-hop cache
    /// entries of another generation are looked up afresh, so invalidating both caches
    /// is one word write.
    pub generation: u32,
    /// Always zero.
    pub pad2: u32,
    /// The handshake gate's parameters (all zero: no gate).
    pub handshake: HandshakeLimits,
}

/// A token bucket as the generic cell rate algorithm keeps it: one time per bucket
/// (the "theoretical arrival time", `bpf_ktime_get_ns` nanoseconds), no division per
/// packet. A packet at `now` passes if `max(tat, now) - now <= tolerance_ns`, and then
/// moves `tat` to `max(tat, now) + interval_ns`: `1e9 / interval_ns` packets per
/// second, `tolerance_ns / interval_ns + 1` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Gcra {
    /// Nanoseconds per packet (0: this bucket does not limit).
    pub interval_ns: u64,
    /// How far ahead of now the bucket may run: `(burst - 1) * interval_ns`.
    pub tolerance_ns: u64,
}

impl Gcra {
    /// `per_second` packets per second with bursts of `burst` (0 per second: no limit).
    pub const fn new(per_second: u32, burst: u32) -> Self {
        if per_second == 0 {
            return Self {
                interval_ns: 0,
                tolerance_ns: 0,
            };
        }
        let interval_ns = 1_000_000_000 / per_second as u64;
        let burst = if burst == 0 { 1 } else { burst };
        Self {
            interval_ns,
            tolerance_ns: (burst as u64 - 1) * interval_ns,
        }
    }

    /// Whether a packet at `now` fits a bucket at `tat`; if so, the bucket's new `tat`.
    #[inline(always)]
    pub const fn admit(&self, tat: u64, now: u64) -> Option<u64> {
        if self.interval_ns == 0 {
            return Some(tat);
        }
        let from = if tat > now { tat } else { now };
        if from - now > self.tolerance_ns {
            None
        } else {
            Some(from + self.interval_ns)
        }
    }

    /// Whether a bucket at `tat` is full at `now` (it holds nothing a fresh one would not).
    #[inline(always)]
    pub const fn is_full(tat: u64, now: u64) -> bool {
        tat <= now
    }
}

/// The XDP program's bound on HandshakeInits addressed to this node, shed before the
/// kernel's UDP stack (`docs/handshake.md`, "Shedding in the kernel"). Every bucket is
/// per CPU. The agent derives it from its own admission rates so the two layers agree:
/// the program never drops what the agent's per-source limits would have used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct HandshakeLimits {
    /// Random key of [`handshake_slot`], so nobody can aim at another source's slot.
    pub seed: u64,
    /// Per underlay source /64 (per link for a link-local source): inits without a
    /// cookie.
    pub source_cookieless: Gcra,
    /// Per (underlay source /64, cookie): inits carrying that cookie. Keyed by the
    /// cookie too, so a spoofer who sends garbage cookies from a victim's /64 cannot
    /// empty the bucket of the victim's real cookie, which it never saw.
    pub cookie: Gcra,
    /// The node's inits without a cookie, whatever their source.
    pub node_cookieless: Gcra,
    /// The node's inits with a cookie (valid or not: the program cannot tell).
    pub node_cookie: Gcra,
}

impl HandshakeLimits {
    /// Whether the gate is on.
    pub const fn enabled(&self) -> bool {
        self.source_cookieless.interval_ns != 0
            || self.cookie.interval_ns != 0
            || self.node_cookieless.interval_ns != 0
            || self.node_cookie.interval_ns != 0
    }
}

/// One slot of the handshake gate's source table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct HandshakeSlot {
    /// The source /64 (first 8 bytes of the address, as the program loads them).
    pub prefix: u64,
    /// The cookie's first 8 bytes (0 for the cookieless bucket).
    pub tag: u64,
    /// The ingress interface for a link-local source, else 0.
    pub scope: u32,
    /// 1 for a cookie bucket, 2 for a cookieless one (0: empty slot).
    pub class: u32,
    /// The bucket's GCRA time.
    pub tat: u64,
}

/// [`HandshakeSlot::class`] of a cookieless bucket.
pub const HANDSHAKE_CLASS_COOKIELESS: u32 = 2;
/// [`HandshakeSlot::class`] of a cookie bucket.
pub const HANDSHAKE_CLASS_COOKIE: u32 = 1;

/// The slot of the handshake gate's source table for a bucket key: the source /64 as
/// the program loads it, the cookie tag (0 without), the link scope and the class, under
/// the agent's random `seed`. A multiplicative hash, like [`forwarding_slot`].
#[inline(always)]
pub const fn handshake_slot(seed: u64, prefix: u64, tag: u64, scope: u32, class: u32) -> u32 {
    let x = (prefix ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ tag.rotate_left(23)
        ^ ((scope as u64) << 32 | class as u64);
    (x.wrapping_mul(0xbf58_476d_1ce4_e5b9) >> (64 - HANDSHAKE_SLOT_BITS)) as u32
}

/// Packets and bytes seen for one [`Stat`] on one CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes of the whole frame.
    pub bytes: u64,
}

/// Every verdict and drop reason the XDP program counts, as indices of [`STATS_MAP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Stat {
    /// Not Myconet: not IPv6/UDP, another port, IPv6 extension headers, or too short for
    /// the outer headers. Left to the kernel untouched.
    PassNotMyconet = 0,
    /// Data for a prefix this node owns.
    PassLocal = 1,
    /// Handshake, cookie and control packets: the agent's judgement.
    PassControl = 2,
    /// Next hop's link-layer address unknown; the kernel resolves it and later packets
    /// take the fast path.
    PassNoNeighbour = 3,
    /// The FIB could not decide in the kernel fast path (forwarding disabled), or
    /// the egress cannot take the frame from XDP ([`EGRESS_MAP`]); the agent's
    /// userspace path handles it.
    PassSlowPath = 4,
    /// Relayed back out of the interface it came in on (XDP_TX).
    Tx = 5,
    /// Relayed out of another interface (DEVMAP redirect).
    Redirect = 6,
    /// Addressed to the Myconet port but not a whole header, or an unknown packet type.
    DropMalformed = 7,
    /// A header version this data plane does not speak.
    DropBadVersion = 8,
    /// Hop limit would reach zero.
    DropHopLimit = 9,
    /// Sent by an underlay endpoint that is not an authenticated neighbour.
    DropUnknownPeer = 10,
    /// No route to the destination prefix.
    DropNoRoute = 11,
    /// The underlay FIB says the next hop is unreachable, blackholed or prohibited.
    DropUnreachable = 12,
    /// Sent to a multicast or broadcast address: relaying it would let one packet be
    /// copied by every relay on the link.
    DropNotUnicast = 13,
    /// The outer IPv6 destination is not one of this node's addresses (a frame for
    /// another host seen on a promiscuous interface, or one this node routes as an
    /// ordinary IPv6 router): not ours to relay, left to the kernel, which forwards or
    /// drops it by its own rules.
    PassNotLocal = 14,
    /// Data larger than the egress link takes (the FIB's MTU check): the agent drops it
    /// and sends its source a too-big report, which the kernel fast path cannot sign.
    PassTooBig = 15,
    /// Not a verdict: counted in addition to [`Stat::Tx`] or [`Stat::Redirect`] for a
    /// relayed frame whose UDP checksum arrived *partial*. A sender on this host that
    /// transmits through a veth with TX checksum offload on (the default) leaves only
    /// the pseudo-header sum in the field and marks the skb `CHECKSUM_PARTIAL`; a frame
    /// relayed from driver-mode XDP becomes an `xdp_frame` and loses that mark, so the
    /// next receiver would find a bad checksum and drop it (`Udp6InCsumErrors`). The
    /// program completes the checksum over the whole datagram in driver mode, and keeps
    /// it a valid partial sum for the new addresses in generic mode (the skb keeps its
    /// mark there and the egress completes it).
    CsumPartial = 16,
    /// A HandshakeInit for this node over the handshake gate's bounds
    /// ([`HandshakeLimits`]): shed before the kernel's UDP stack.
    DropHandshakeRate = 17,
}

impl Stat {
    /// Number of entries in [`STATS_MAP`].
    pub const COUNT: u32 = 18;

    /// Every stat in index order.
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::PassNotMyconet,
        Stat::PassLocal,
        Stat::PassControl,
        Stat::PassNoNeighbour,
        Stat::PassSlowPath,
        Stat::Tx,
        Stat::Redirect,
        Stat::DropMalformed,
        Stat::DropBadVersion,
        Stat::DropHopLimit,
        Stat::DropUnknownPeer,
        Stat::DropNoRoute,
        Stat::DropUnreachable,
        Stat::DropNotUnicast,
        Stat::PassNotLocal,
        Stat::PassTooBig,
        Stat::CsumPartial,
        Stat::DropHandshakeRate,
    ];

    /// Stable snake_case name for the API and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::PassNotMyconet => "pass_not_myconet",
            Stat::PassLocal => "pass_local",
            Stat::PassControl => "pass_control",
            Stat::PassNoNeighbour => "pass_no_neighbour",
            Stat::PassSlowPath => "pass_slow_path",
            Stat::Tx => "tx",
            Stat::Redirect => "redirect",
            Stat::DropMalformed => "drop_malformed",
            Stat::DropBadVersion => "drop_bad_version",
            Stat::DropHopLimit => "drop_hop_limit",
            Stat::DropUnknownPeer => "drop_unknown_peer",
            Stat::DropNoRoute => "drop_no_route",
            Stat::DropUnreachable => "drop_unreachable",
            Stat::DropNotUnicast => "drop_not_unicast",
            Stat::PassNotLocal => "pass_not_local",
            Stat::PassTooBig => "pass_too_big",
            Stat::CsumPartial => "csum_partial",
            Stat::DropHandshakeRate => "drop_handshake_rate",
        }
    }

    /// Whether this counts verdicts (every packet the program sees is counted under
    /// exactly one verdict); [`Stat::CsumPartial`] is counted beside one.
    pub const fn is_verdict(self) -> bool {
        !matches!(self, Stat::CsumPartial)
    }

    /// Whether packets counted here were relayed in the kernel.
    pub const fn is_forwarded(self) -> bool {
        matches!(self, Stat::Tx | Stat::Redirect)
    }

    /// Whether packets counted here were dropped.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Stat::DropMalformed
                | Stat::DropBadVersion
                | Stat::DropHopLimit
                | Stat::DropUnknownPeer
                | Stat::DropNoRoute
                | Stat::DropUnreachable
                | Stat::DropNotUnicast
                | Stat::DropHandshakeRate
        )
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain data with explicit padding fields and
    // no invalid bit patterns.
    unsafe impl aya::Pod for super::RouteValue {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::LocalAddrKey {}
    unsafe impl aya::Pod for super::PeerValue {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::NextHopKey {}
    unsafe impl aya::Pod for super::NextHopEntry {}
    unsafe impl aya::Pod for super::ForwardingEntry {}
    unsafe impl aya::Pod for super::HandshakeSlot {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_stable() {
        assert_eq!(core::mem::size_of::<RouteValue>(), 40);
        assert_eq!(core::mem::size_of::<PeerKey>(), 24);
        assert_eq!(core::mem::size_of::<Config>(), 88);
        assert_eq!(core::mem::offset_of!(Config, handshake), 16);
        assert_eq!(core::mem::size_of::<HandshakeSlot>(), 32);
        assert_eq!(core::mem::size_of::<Counter>(), 16);
        assert_eq!(core::mem::size_of::<NextHopKey>(), 20);
        assert_eq!(core::mem::size_of::<NextHopEntry>(), 40);
        assert_eq!(core::mem::size_of::<ForwardingEntry>(), 120);
        assert_eq!(core::mem::size_of::<LocalAddrKey>(), 20);
        assert_eq!(core::mem::offset_of!(ForwardingEntry, outer_dst), 104);
        assert_eq!(core::mem::offset_of!(ForwardingEntry, next_hop), 48);
        assert_eq!(core::mem::offset_of!(ForwardingEntry, src), 64);
        assert_eq!(core::mem::offset_of!(ForwardingEntry, dmac), 80);
        assert_eq!(core::mem::offset_of!(ForwardingEntry, csum_delta), 96);
        assert_eq!(1 << FORWARDING_CACHE_BITS, FORWARDING_CACHE_SLOTS);
    }

    #[test]
    fn forwarding_slots_spread_flows() {
        // 4,096 destinations that differ only in their last byte pair, from one
        // neighbour: a good hash fills most slots (a random one ~63%).
        let mut used = [false; FORWARDING_CACHE_SLOTS as usize];
        for i in 0..FORWARDING_CACHE_SLOTS as u64 {
            let slot = forwarding_slot(0xfd6d_0000_0000_0001, i << 48, 0x2, 0x3325, 3);
            assert!(slot < FORWARDING_CACHE_SLOTS);
            used[slot as usize] = true;
        }
        let filled = used.iter().filter(|u| **u).count();
        assert!(filled > 2400, "only {filled} slots used");
    }

    #[test]
    fn gcra_admits_the_burst_then_the_rate() {
        let g = Gcra::new(10, 3);
        let mut tat = 0;
        let now = 1_000_000_000;
        for _ in 0..3 {
            tat = g.admit(tat, now).expect("within the burst");
        }
        assert_eq!(g.admit(tat, now), None);
        // One interval later, one more.
        let later = now + 100_000_000;
        tat = g.admit(tat, later).expect("refilled one");
        assert_eq!(g.admit(tat, later), None);
        assert!(!Gcra::is_full(tat, later) && Gcra::is_full(tat, later + 1_000_000_000));
        // Off: everything passes and nothing moves.
        assert_eq!(Gcra::new(0, 5).admit(7, now), Some(7));
        assert!(!HandshakeLimits::default().enabled());
    }

    #[test]
    fn handshake_slots_depend_on_the_seed_and_the_cookie() {
        let p = 0xfd00_0001_0000_0000u64.to_be();
        let a = handshake_slot(1, p, 0, 0, HANDSHAKE_CLASS_COOKIELESS);
        assert!(a < HANDSHAKE_SLOTS);
        let differ = (2..64u64)
            .filter(|s| handshake_slot(*s, p, 0, 0, HANDSHAKE_CLASS_COOKIELESS) != a)
            .count();
        assert!(differ > 50, "the seed must move the slot ({differ})");
        let mut used = [false; HANDSHAKE_SLOTS as usize];
        for tag in 0..HANDSHAKE_SLOTS as u64 {
            used[handshake_slot(1, p, tag << 40, 0, HANDSHAKE_CLASS_COOKIE) as usize] = true;
        }
        assert!(used.iter().filter(|u| **u).count() > 550);
    }

    #[test]
    fn peer_keys_are_scoped_only_for_link_local_addresses() {
        let ll = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let ll_top = [0xfe, 0xbf, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let site = [0xfe, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let ula = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        assert!(is_link_local(&ll) && is_link_local(&ll_top));
        assert!(!is_link_local(&site) && !is_link_local(&ula));
        assert_eq!(PeerKey::new(ll, 9651, 3).ifindex, 3);
        assert_eq!(PeerKey::new(ula, 9651, 3).ifindex, 0);
        assert_eq!(PeerKey::new(ula, 9651, 3), PeerKey::new(ula, 9651, 7));
        assert_ne!(PeerKey::new(ll, 9651, 3), PeerKey::new(ll, 9651, 7));
    }

    #[test]
    fn stats_are_indexed_in_order() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
        assert!(Stat::DropNoRoute.is_drop());
        assert!(!Stat::Redirect.is_drop());
        assert!(!Stat::PassNotLocal.is_drop());
        assert!(Stat::DropNotUnicast.is_drop());
        assert!(Stat::Tx.is_forwarded());
        assert!(Stat::Redirect.is_verdict() && !Stat::CsumPartial.is_verdict());
        assert!(!Stat::CsumPartial.is_drop() && !Stat::CsumPartial.is_forwarded());
    }
}
