//! The Myconet relay fast path: an XDP program on each underlay interface.
//!
//! It parses Ethernet → IPv6 → UDP (Myconet port) → Myconet header with a bounds check
//! before every access. Data packets for a prefix this node does not own, sent by an
//! authenticated neighbour, are relayed in the kernel: the outer headers are rewritten
//! from a `bpf_fib_lookup`, the hop limit is decremented, the UDP checksum is patched
//! incrementally and the frame leaves by XDP_TX or a DEVMAP redirect. The decision for
//! a flow (destination, neighbour, ingress) is kept in a per-CPU forwarding cache, so
//! the flow's next packets skip the route trie, the peer map and the FIB. Everything that
//! needs judgement (handshakes, control, local traffic) goes up with XDP_PASS.
//! HandshakeInits addressed to this node pass a per-CPU rate gate first, so a flood of
//! them is shed here rather than in the kernel's UDP stack and the agent.
//! Every verdict is counted per CPU; nothing is logged per packet.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE,
        BPF_FIB_LOOKUP_OUTPUT, BPF_FIB_LOOKUP_SRC, bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::generated::{bpf_csum_diff, bpf_fib_lookup, bpf_ktime_get_ns},
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruPerCpuHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use myconet_common::{
    checksum::WordSum,
    maps::{
        CSUM_COMPLETE_MAX, Config, Counter, DEVMAP_CAPACITY, EGRESS_REDIRECT, EGRESS_TX,
        FORWARDING_CACHE_SLOTS, ForwardingEntry, HANDSHAKE_CLASS_COOKIE,
        HANDSHAKE_CLASS_COOKIELESS, HANDSHAKE_NODE_COOKIE, HANDSHAKE_NODE_COOKIELESS,
        HANDSHAKE_SLOTS, HandshakeLimits, HandshakeSlot, IFACE_GENERIC, INIT_COOKIE_LEN,
        INIT_COOKIE_OFFSET, LOCAL_ADDRS_CAPACITY, LocalAddrKey, NEXTHOP_CACHE_CAPACITY,
        NextHopEntry, NextHopKey, PEERS_CAPACITY, PeerKey, PeerValue, ROUTES_CAPACITY, RouteAction,
        RouteValue, Stat, forwarding_slot, handshake_slot, link_scope,
    },
    wire::{self, PacketType, field},
};

#[map]
static ROUTES: LpmTrie<[u8; 16], RouteValue> = LpmTrie::with_max_entries(ROUTES_CAPACITY, 0);

#[map]
static PEERS: HashMap<PeerKey, PeerValue> = HashMap::with_max_entries(PEERS_CAPACITY, 0);

#[map]
static LOCAL_ADDRS: HashMap<LocalAddrKey, u32> = HashMap::with_max_entries(LOCAL_ADDRS_CAPACITY, 0);

#[map]
static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
static DEVMAP: DevMapHash = DevMapHash::with_max_entries(DEVMAP_CAPACITY, 0);

#[map]
static EGRESS: HashMap<u32, u32> = HashMap::with_max_entries(DEVMAP_CAPACITY, 0);

/// Per-CPU working space for [`resolve`].
#[repr(C)]
struct Scratch {
    fib: FibParams,
    entry: NextHopEntry,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
static FORWARDING_CACHE: PerCpuArray<ForwardingEntry> =
    PerCpuArray::with_max_entries(FORWARDING_CACHE_SLOTS, 0);

#[map]
static HANDSHAKE_SOURCES: PerCpuArray<HandshakeSlot> =
    PerCpuArray::with_max_entries(HANDSHAKE_SLOTS, 0);

#[map]
static HANDSHAKE_NODE: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

#[map]
static NEXTHOP_CACHE: LruPerCpuHashMap<NextHopKey, NextHopEntry> =
    LruPerCpuHashMap::with_max_entries(NEXTHOP_CACHE_CAPACITY, 0);

const ETH_HLEN: usize = 14;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const AF_INET6: u8 = 10;

const IP_OFF: usize = ETH_HLEN;
const UDP_OFF: usize = IP_OFF + IPV6_HLEN;
const MYC_OFF: usize = UDP_OFF + UDP_HLEN;
const MYC_END: usize = MYC_OFF + wire::HEADER_LEN;

/// Hop limit of the underlay packet a relay originates.
const UNDERLAY_HOP_LIMIT: u8 = 64;

/// The next-header word of an IPv6 pseudo-header for UDP (bytes `0, 17`), as the
/// machine loads it.
const PSEUDO_UDP_WORD: u16 = u16::from_ne_bytes([0, IPPROTO_UDP]);

#[xdp]
pub fn myconet_xdp(ctx: XdpContext) -> u32 {
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    let (action, stat) = relay(&ctx);
    count(stat, frame_len);
    action
}

#[inline(always)]
fn count(stat: Stat, frame_len: u64) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += frame_len;
        }
    }
}

// Packet fields are read and written as whole words at their (often odd) offsets: the
// object is built with `allows-misaligned-mem-access` (see build.rs), which the verifier
// accepts on hosts with efficient unaligned access. Every caller has bounds-checked the
// bytes it touches.

#[inline(always)]
fn load<T: Copy>(addr: usize) -> T {
    // SAFETY: bounds-checked by the caller against data_end (or a map value of this size).
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

#[inline(always)]
fn store<T>(addr: usize, value: T) {
    // SAFETY: bounds-checked by the caller against data_end.
    unsafe { core::ptr::write_unaligned(addr as *mut T, value) }
}

#[inline(always)]
fn byte(addr: usize) -> u8 {
    load(addr)
}

#[inline(always)]
fn be16(addr: usize) -> u16 {
    u16::from_be(load(addr))
}

/// 16 bytes at `addr` as two 64-bit words. Never `load::<[u64; 2]>`: a 16-byte
/// aggregate access becomes a call to a byte-wise `memcpy` subprogram.
#[inline(always)]
fn load_words(addr: usize) -> [u64; 2] {
    [load(addr), load(addr + 8)]
}

/// Stores two 64-bit words at `addr` (see [`load_words`]).
#[inline(always)]
fn store_words(addr: usize, w: [u64; 2]) {
    store(addr, w[0]);
    store(addr + 8, w[1]);
}

/// Two 64-bit words as the 16 bytes they hold (an IPv6 address in a map key).
#[inline(always)]
fn addr_bytes(words: [u64; 2]) -> [u8; 16] {
    // SAFETY: any 16 bytes are a valid [u8; 16]; built from words so that no byte-wise
    // zeroing (a memset call in BPF) precedes the two loads.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) }
}

/// 16 bytes at `addr` (an IPv6 address), as two 64-bit loads.
#[inline(always)]
fn load_addr(addr: usize) -> [u8; 16] {
    addr_bytes(load_words(addr))
}

#[inline(always)]
fn relay(ctx: &XdpContext) -> (u32, Stat) {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;

    let start = ctx.data();
    let end = ctx.data_end();

    // Outer headers: anything that is not a whole Ethernet/IPv6/UDP header is the
    // kernel's business, not ours.
    if start + MYC_OFF > end {
        return (PASS, Stat::PassNotMyconet);
    }
    if be16(start + 12) != ETH_P_IPV6
        || byte(start + IP_OFF) >> 4 != 6
        || byte(start + IP_OFF + 6) != IPPROTO_UDP
    {
        return (PASS, Stat::PassNotMyconet);
    }
    let Some(config) = CONFIG.get(0) else {
        return (PASS, Stat::PassNotMyconet);
    };
    let port = config.port;
    if port == 0 || be16(start + UDP_OFF + 2) != port {
        return (PASS, Stat::PassNotMyconet);
    }

    // From here on the packet claims to be Myconet: malformed ones are dropped, not
    // handed to the agent.
    if start + MYC_END > end {
        return (DROP, Stat::DropMalformed);
    }
    // Group bit of the Ethernet destination, or an IPv6 multicast destination.
    if byte(start) & 1 != 0 || byte(start + IP_OFF + 24) == 0xff {
        return (DROP, Stat::DropNotUnicast);
    }
    let ip_payload_len = be16(start + IP_OFF + 4) as usize;
    let udp_len = be16(start + UDP_OFF + 4) as usize;
    let old_csum = be16(start + UDP_OFF + 6);
    if udp_len != ip_payload_len
        || udp_len < UDP_HLEN + wire::HEADER_LEN
        // Exactly the UDP datagram: trailing bytes would be relayed unchecked.
        || start + UDP_OFF + udp_len != end
        || old_csum == 0
    {
        return (DROP, Stat::DropMalformed);
    }
    if byte(start + MYC_OFF + field::VERSION) != wire::VERSION {
        return (DROP, Stat::DropBadVersion);
    }
    // Control is link-level: always the agent's. Handshakes travel end to end like data
    // but are relayed by the agent (its rate limits apply), after the same local and
    // peer checks here, so strangers cannot make a relay's agent do work for them.
    let packet_type = PacketType::from_u8(byte(start + MYC_OFF + field::TYPE));
    let (is_data, is_control) = match packet_type {
        Some(PacketType::Data) => (true, false),
        Some(PacketType::Control) => (false, true),
        Some(_) => (false, false),
        None => return (DROP, Stat::DropMalformed),
    };

    let [dst0, dst1] = load_words(start + MYC_OFF + field::DST.start);
    let [peer0, peer1] = load_words(start + IP_OFF + 8);
    let [odst0, odst1] = load_words(start + IP_OFF + 24);
    let peer_port_be: u16 = load(start + UDP_OFF);
    let hop_limit = byte(start + MYC_OFF + field::HOP_LIMIT);
    let ingress = ctx.ingress_ifindex() as u32;

    // The fast path: a slot of the forwarding cache that holds this flow, made in the
    // current generation for a packet at least this large, stands for every check below
    // (the outer destination is part of the flow key, so a hit also means it is ours).
    let tot_len = (IPV6_HLEN + ip_payload_len) as u16;
    let slot = if is_data {
        let slot_index = forwarding_slot(dst0, dst1, peer1, peer_port_be, ingress);
        let Some(slot) = FORWARDING_CACHE.get_ptr_mut(slot_index) else {
            return (PASS, Stat::PassSlowPath);
        };
        // SAFETY: this CPU's slot; only this CPU's program touches it, and it runs to
        // completion before the next packet on this CPU.
        let slot = unsafe { &mut *slot };
        if slot.generation == config.generation
            && slot.ingress == ingress
            && slot.peer_port_be == peer_port_be
            && tot_len <= slot.max_len
            && load::<u64>(slot.dst.as_ptr() as usize) == dst0
            && load::<u64>(slot.dst.as_ptr() as usize + 8) == dst1
            && load::<u64>(slot.peer.as_ptr() as usize) == peer0
            && load::<u64>(slot.peer.as_ptr() as usize + 8) == peer1
            && load::<u64>(slot.outer_dst.as_ptr() as usize) == odst0
            && load::<u64>(slot.outer_dst.as_ptr() as usize + 8) == odst1
        {
            if hop_limit <= 1 {
                return (DROP, Stat::DropHopLimit);
            }
            return rewrite(start, end, slot, config.port, hop_limit);
        }
        Some(slot)
    } else {
        None
    };

    // Only packets sent to one of this node's addresses are ours: on a promiscuous
    // interface the program also sees frames for other hosts. A link-local destination
    // is ours only on the interface it is configured on.
    let local = LocalAddrKey::new(addr_bytes([odst0, odst1]), ingress);
    // SAFETY: read-only lookup of a plain-data value.
    if unsafe { LOCAL_ADDRS.get(local) }.is_none() {
        return (PASS, Stat::PassNotLocal);
    }
    if is_control {
        return (PASS, Stat::PassControl);
    }

    let route_key = Key::new(128, addr_bytes([dst0, dst1]));
    let route = ROUTES.get(&route_key);
    if let Some(r) = route
        && r.action == RouteAction::Local as u8
    {
        if is_data {
            return (PASS, Stat::PassLocal);
        }
        if packet_type == Some(PacketType::HandshakeInit)
            && !handshake_admitted(start, end, &config.handshake, [peer0, peer1], ingress)
        {
            return (DROP, Stat::DropHandshakeRate);
        }
        return (PASS, Stat::PassControl);
    }

    // Only authenticated neighbours may use this node as a relay. A link-local sender
    // is known only on the interface it came in on.
    let peer = PeerKey::new(
        addr_bytes([peer0, peer1]),
        u16::from_be(peer_port_be),
        ingress,
    );
    // SAFETY: read-only lookup of a plain-data value.
    if unsafe { PEERS.get(peer) }.is_none() {
        return (DROP, Stat::DropUnknownPeer);
    }
    let Some(slot) = slot else {
        return (PASS, Stat::PassControl);
    };
    let Some(route) = route else {
        return (DROP, Stat::DropNoRoute);
    };
    if route.action != RouteAction::Forward as u8 {
        return (DROP, Stat::DropNoRoute);
    }
    if hop_limit <= 1 {
        return (DROP, Stat::DropHopLimit);
    }

    // Where does the next hop live on the underlay?
    let hop = match resolve(ctx, route, ingress, tot_len, config.generation) {
        Ok(h) => h,
        Err(verdict) => return verdict,
    };
    // Only out of an interface the agent proved can take the frame this way (a veth
    // whose far end cannot receive XDP frames would drop it after we counted it).
    let needed = if hop.egress == ingress {
        EGRESS_TX
    } else {
        EGRESS_REDIRECT
    };
    if u32::from(hop.egress_flags) & needed == 0 {
        return (PASS, Stat::PassSlowPath);
    }

    // Every check passed: remember the decision for the flow's next packets.
    let next_hop = load_words(route.next_hop.as_ptr() as usize);
    let next_port_be = route.port.to_be();
    store_words(slot.dst.as_mut_ptr() as usize, [dst0, dst1]);
    store_words(slot.peer.as_mut_ptr() as usize, [peer0, peer1]);
    slot.peer_port_be = peer_port_be;
    slot.next_port_be = next_port_be;
    slot.ingress = ingress;
    slot.generation = config.generation;
    slot.egress = hop.egress;
    store_words(slot.next_hop.as_mut_ptr() as usize, next_hop);
    store_words(slot.src.as_mut_ptr() as usize, hop.src);
    store(slot.dmac.as_mut_ptr() as usize, hop.macs_lo);
    store(slot.dmac.as_mut_ptr() as usize + 8, hop.macs_hi);
    slot.max_len = hop.max_len;
    slot.is_tx = u8::from(hop.egress == ingress);
    // SAFETY: read-only lookup of a plain-data value.
    slot.ingress_generic =
        unsafe { EGRESS.get(ingress) }.map_or(0, |f| u8::from(*f & IFACE_GENERIC != 0));
    store_words(slot.outer_dst.as_mut_ptr() as usize, [odst0, odst1]);
    slot.csum_delta = u32::from(
        WordSum::new()
            .sub64(peer0)
            .sub64(peer1)
            .add64(hop.src[0])
            .add64(hop.src[1])
            .sub64(odst0)
            .sub64(odst1)
            .add64(next_hop[0])
            .add64(next_hop[1])
            .sub16(peer_port_be)
            .add16(next_port_be)
            .fold(),
    );
    slot.pseudo_in = pseudo_header_sum([peer0, peer1], [odst0, odst1]);
    slot.pseudo_out = pseudo_header_sum(hop.src, next_hop);
    rewrite(start, end, slot, config.port, hop_limit)
}

/// The handshake gate: whether a HandshakeInit addressed to this node may go up to the
/// kernel's UDP stack and the agent, or is shed here (`docs/handshake.md`, "Shedding in
/// the kernel"). Per CPU, two buckets must both have room, and only then are both
/// charged:
/// - without a cookie: its source's bucket (the /64 of the outer source; a link-local
///   source per link) and the node's cookieless bucket;
/// - with a cookie (any nonzero byte in the field): the bucket of that (source /64,
///   cookie) pair and the node's cookie bucket. The program cannot check a cookie, but a
///   spoofer never saw a victim's, so garbage cookies from the victim's /64 land in other
///   buckets than the victim's real one; what they can drain is the node's bucket, which
///   every cookie holder shares alike.
///
/// A source slot held by another key is taken over with a fresh bucket: the node's
/// buckets bound what an attacker cycling through many sources gets, and the seed keeps
/// anyone from aiming at a given source's slot. An init too short to hold a cookie is
/// charged as cookieless (the agent drops it as malformed).
#[inline(always)]
fn handshake_admitted(
    start: usize,
    end: usize,
    limits: &HandshakeLimits,
    source: [u64; 2],
    ingress: u32,
) -> bool {
    if !limits.enabled() {
        return true;
    }
    let (tag, class, per_source, node_index, node_limit) = match init_cookie(start, end) {
        Some(tag) => (
            tag,
            HANDSHAKE_CLASS_COOKIE,
            &limits.cookie,
            HANDSHAKE_NODE_COOKIE,
            &limits.node_cookie,
        ),
        None => (
            0,
            HANDSHAKE_CLASS_COOKIELESS,
            &limits.source_cookieless,
            HANDSHAKE_NODE_COOKIELESS,
            &limits.node_cookieless,
        ),
    };
    let prefix = source[0];
    let scope = link_scope(&addr_bytes(source), ingress);
    let Some(slot) =
        HANDSHAKE_SOURCES.get_ptr_mut(handshake_slot(limits.seed, prefix, tag, scope, class))
    else {
        return true;
    };
    let Some(node) = HANDSHAKE_NODE.get_ptr_mut(node_index) else {
        return true;
    };
    // SAFETY: this CPU's slots; only this CPU's program touches them, and it runs to
    // completion before the next packet on this CPU.
    let (slot, node) = unsafe { (&mut *slot, &mut *node) };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let ours =
        slot.class == class && slot.prefix == prefix && slot.tag == tag && slot.scope == scope;
    let source_tat = if ours { slot.tat } else { 0 };
    let (Some(source_next), Some(node_next)) = (
        per_source.admit(source_tat, now),
        node_limit.admit(*node, now),
    ) else {
        return false;
    };
    if !ours {
        slot.prefix = prefix;
        slot.tag = tag;
        slot.scope = scope;
        slot.class = class;
    }
    slot.tat = source_next;
    *node = node_next;
    true
}

/// The first 8 bytes of a HandshakeInit's cookie if it carries one (any nonzero byte
/// in the field), `None` if it carries none or is too short to hold the field.
#[inline(always)]
fn init_cookie(start: usize, end: usize) -> Option<u64> {
    let at = start + MYC_OFF + INIT_COOKIE_OFFSET;
    if at + INIT_COOKIE_LEN > end {
        return None;
    }
    let words: [u64; 4] = [load(at), load(at + 8), load(at + 16), load(at + 24)];
    if words[0] | words[1] | words[2] | words[3] == 0 {
        None
    } else {
        Some(words[0])
    }
}

/// Folded native-order sum of an IPv6 pseudo-header for UDP without its length word.
#[inline(always)]
fn pseudo_header_sum(src: [u64; 2], dst: [u64; 2]) -> u16 {
    WordSum::new()
        .add64(src[0])
        .add64(src[1])
        .add64(dst[0])
        .add64(dst[1])
        .add16(PSEUDO_UDP_WORD)
        .fold()
}

/// Rewrites a relayed frame from its forwarding-cache slot and picks the verdict:
/// Ethernet addresses, outer IPv6 source/destination and hop limit, UDP ports, Myconet
/// hop limit, and the UDP checksum patched in native byte order (see
/// [`WordSum`]): the slot carries the flow's fixed changes (addresses and ports, the
/// outer destination being part of the flow key), so only the hop-limit word is summed
/// per packet. The caller has checked that the frame holds the whole Myconet header and
/// ends exactly where the UDP datagram does.
///
/// A checksum the sender's kernel left partial (see [`Stat::CsumPartial`]) cannot be
/// patched incrementally: it is completed over the datagram ([`complete_checksum`]) in
/// driver mode and rewritten as the new pseudo-header sum in generic mode.
#[inline(always)]
fn rewrite(
    start: usize,
    end: usize,
    slot: &ForwardingEntry,
    port: u16,
    hop_limit: u8,
) -> (u32, Stat) {
    let udp_len_word: u16 = load(start + UDP_OFF + 4);
    let old_csum: u16 = load(start + UDP_OFF + 6);
    let partial = is_partial(slot, udp_len_word, old_csum);
    if partial && slot.ingress_generic == 0 && end - start - UDP_OFF > CSUM_COMPLETE_MAX {
        // Cannot happen for a frame without XDP fragments; never relay a bad checksum.
        return (xdp_action::XDP_PASS, Stat::PassSlowPath);
    }
    // Relays clamp the hop limit to the default, so a packet sent with 255 cannot
    // circle a transient loop four times longer than any real path needs.
    let new_hop = if hop_limit > wire::DEFAULT_HOP_LIMIT {
        wire::DEFAULT_HOP_LIMIT
    } else {
        hop_limit - 1
    };
    let hop_at = start + MYC_OFF + field::HOP_LIMIT;
    let old_hop_word: u16 = load(hop_at);
    let [_, beside] = old_hop_word.to_ne_bytes();
    let new_hop_word = u16::from_ne_bytes([new_hop, beside]);
    let dst_at = start + IP_OFF + 24;
    let csum = WordSum::new()
        .add16(slot.csum_delta as u16)
        .sub16(old_hop_word)
        .add16(new_hop_word)
        .patch_udp(old_csum);

    store(start, load::<u64>(slot.dmac.as_ptr() as usize));
    store(start + 8, load::<u32>(slot.dmac.as_ptr() as usize + 8));
    store(start + IP_OFF + 7, UNDERLAY_HOP_LIMIT);
    store_words(start + IP_OFF + 8, load_words(slot.src.as_ptr() as usize));
    store_words(dst_at, load_words(slot.next_hop.as_ptr() as usize));
    store(start + UDP_OFF, port.to_be());
    store(start + UDP_OFF + 2, slot.next_port_be);
    store(hop_at, new_hop);
    if partial {
        count(Stat::CsumPartial, (end - start) as u64);
        let pseudo = WordSum::new().add16(slot.pseudo_out).add16(udp_len_word);
        if slot.ingress_generic != 0 {
            store(start + UDP_OFF + 6, pseudo.fold());
        } else {
            store(start + UDP_OFF + 6, 0u16);
            let Some(full) = complete_checksum(start, end, pseudo) else {
                // bpf_csum_diff refused a chunk: not for sizes that are multiples of 4.
                return (xdp_action::XDP_DROP, Stat::DropMalformed);
            };
            store(start + UDP_OFF + 6, full);
        }
    } else {
        store(start + UDP_OFF + 6, csum);
    }

    if slot.is_tx != 0 {
        return (xdp_action::XDP_TX, Stat::Tx);
    }
    match DEVMAP.redirect(slot.egress, u64::from(xdp_action::XDP_DROP)) {
        Ok(action) if action == xdp_action::XDP_REDIRECT => (action, Stat::Redirect),
        _ => (xdp_action::XDP_DROP, Stat::DropUnreachable),
    }
}

/// Whether a relayed frame's UDP checksum field holds only its pseudo-header sum: what
/// a sender's kernel leaves for the NIC (or the veth's peer) to complete when it
/// transmits with TX checksum offload. A full checksum equals it about once in 65,536
/// frames; completing such a frame again gives the same, still valid, checksum.
#[inline(always)]
fn is_partial(slot: &ForwardingEntry, udp_len_word: u16, csum: u16) -> bool {
    WordSum::new()
        .add16(slot.pseudo_in)
        .add16(udp_len_word)
        .fold()
        == csum
}

/// Bytes per `bpf_csum_diff` call: the largest size every kernel accepts (older ones
/// copy into a 512-byte scratch buffer).
const CSUM_CHUNK: usize = 512;

/// The full UDP checksum of the datagram from `start + UDP_OFF` to `end`, whose checksum
/// field the caller has zeroed, given its pseudo-header sum: the datagram is summed by
/// the kernel's `csum_partial` (through `bpf_csum_diff`) in chunks at even offsets, the
/// last 0–3 bytes here. `None` if the helper refused a chunk.
#[inline(always)]
fn complete_checksum(start: usize, end: usize, pseudo: WordSum) -> Option<u16> {
    let mut sum = pseudo;
    let mut at = start + UDP_OFF;
    for _ in 0..CSUM_COMPLETE_MAX / CSUM_CHUNK {
        if at + CSUM_CHUNK > end {
            break;
        }
        sum = sum.add64(csum_of(at, CSUM_CHUNK as u32)?);
        at += CSUM_CHUNK;
    }
    // What is left is shorter than a chunk: its multiple of four in halving pieces.
    macro_rules! piece {
        ($len:expr) => {
            if at + $len <= end {
                sum = sum.add64(csum_of(at, $len)?);
                at += $len;
            }
        };
    }
    piece!(256);
    piece!(128);
    piece!(64);
    piece!(32);
    piece!(16);
    piece!(8);
    piece!(4);
    if at + 2 <= end {
        sum = sum.add16(load(at));
        at += 2;
    }
    // Written as the bounds check the verifier reads, not `at < end`.
    #[allow(clippy::int_plus_one)]
    if at + 1 <= end {
        // An odd last byte is the high half of a zero-padded word.
        sum = sum.add16(u16::from_ne_bytes([byte(at), 0]));
    }
    let c = !sum.fold();
    Some(if c == 0 { 0xffff } else { c })
}

/// `csum_partial` of `len` packet bytes at `at` (a multiple of four, bounds-checked by
/// the caller), as a value [`WordSum::add64`] takes: older kernels return the 32-bit
/// sum, newer ones fold it to 16 bits, both congruent.
#[inline(always)]
fn csum_of(at: usize, len: u32) -> Option<u64> {
    // SAFETY: `len` bytes at `at` lie inside the packet (checked against data_end by
    // the caller); the helper only reads them.
    let r = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, at as *mut u32, len, 0) };
    if r < 0 { None } else { Some(r as u64) }
}

/// What the rewrite needs about the next hop, copied out of the cache at once: an LRU
/// entry can be reused by another CPU's insert while this packet is still in flight.
struct NextHop {
    /// Source address for the outer header, as stored (network byte order).
    src: [u64; 2],
    egress: u32,
    /// Ethernet destination and source MAC: bytes 0..8 and 8..12 of the frame.
    macs_lo: u64,
    macs_hi: u32,
    max_len: u16,
    egress_flags: u8,
}

impl NextHop {
    #[inline(always)]
    fn from_entry(e: &NextHopEntry) -> Self {
        let at = e as *const NextHopEntry as usize;
        let macs = e.dmac.as_ptr() as usize;
        Self {
            src: [load(at), load(at + 8)],
            egress: e.egress,
            macs_lo: load(macs),
            macs_hi: load(macs + 8),
            max_len: e.max_len,
            egress_flags: e.egress_flags,
        }
    }
}

/// The egress interface, MAC addresses and source address for `route`'s next hop:
/// from the next-hop cache when it holds an answer of the current generation that
/// covers a packet this size, else from `bpf_fib_lookup` (whose successes are cached; a
/// missing neighbour never is, so the kernel keeps resolving it and the next packets
/// take the fast path).
#[inline(always)]
// By reference on purpose: passing the key by value makes a stack copy per call, and
// this path shares the 512-byte BPF stack with the rest of the program.
#[allow(clippy::needless_borrows_for_generic_args)]
fn resolve(
    ctx: &XdpContext,
    route: &RouteValue,
    ingress: u32,
    tot_len: u16,
    generation: u32,
) -> Result<NextHop, (u32, Stat)> {
    let lookup_ifindex = if route.ifindex != 0 {
        route.ifindex
    } else {
        ingress
    };
    let key = NextHopKey {
        addr: load_addr(route.next_hop.as_ptr() as usize),
        ifindex: lookup_ifindex,
    };
    // SAFETY: read-only lookup of a plain-data value in this CPU's slot.
    if let Some(e) = unsafe { NEXTHOP_CACHE.get(&key) }
        && e.generation == generation
        && tot_len <= e.max_len
    {
        return Ok(NextHop::from_entry(e));
    }

    // The lookup parameters and the new entry live in per-CPU scratch space, off the
    // 512-byte BPF stack.
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err((xdp_action::XDP_PASS, Stat::PassSlowPath));
    };
    // SAFETY: this CPU's scratch slot, used by nothing else while the program runs.
    let scratch = unsafe { &mut *scratch };
    let fib = &mut scratch.fib;
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    unsafe { core::ptr::write_bytes(fib as *mut FibParams, 0, 1) };
    fib.family = AF_INET6;
    fib.l4_protocol = IPPROTO_UDP;
    fib.__bindgen_anon_1.tot_len = tot_len;
    fib.__bindgen_anon_4.ipv6_dst = addr_words(&route.next_hop);
    fib.ifindex = lookup_ifindex;
    let src_known = route.src != [0u8; 16];
    let mut flags = if src_known { 0 } else { BPF_FIB_LOOKUP_SRC };
    if route.ifindex != 0 {
        flags |= BPF_FIB_LOOKUP_OUTPUT;
    }
    // SAFETY: helper call with a buffer of the size we pass.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            fib as *mut FibParams,
            size_of::<FibParams>() as i32,
            flags,
        )
    };
    if rc < 0 {
        return Err((xdp_action::XDP_PASS, Stat::PassSlowPath));
    }
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => return Err((xdp_action::XDP_PASS, Stat::PassNoNeighbour)),
        // Larger than the egress takes: the agent drops it and signs a too-big report
        // for its source (docs/protocol.md, "Path MTU").
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Err((xdp_action::XDP_PASS, Stat::PassTooBig)),
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            return Err((xdp_action::XDP_DROP, Stat::DropUnreachable));
        }
        _ => return Err((xdp_action::XDP_PASS, Stat::PassSlowPath)),
    }
    let egress = scratch.fib.ifindex;
    let entry = &mut scratch.entry;
    if src_known {
        entry.src = route.src;
    } else {
        // SAFETY: reading the union member the helper filled for AF_INET6.
        entry.src = words_addr(unsafe { scratch.fib.__bindgen_anon_3.ipv6_src });
    }
    entry.generation = generation;
    entry.egress = egress;
    entry.dmac = scratch.fib.dmac;
    entry.smac = scratch.fib.smac;
    entry.max_len = tot_len;
    // Checked once here, not per packet: the agent bumps the generation whenever it
    // changes an egress policy.
    // SAFETY: read-only lookup of a plain-data value.
    entry.egress_flags = unsafe { EGRESS.get(egress) }.map_or(0, |f| *f as u8);
    entry.pad = 0;
    // A full cache only costs a later packet another lookup.
    let _ = NEXTHOP_CACHE.insert(&key, &scratch.entry, 0);
    Ok(NextHop::from_entry(&scratch.entry))
}

/// An IPv6 address as the four native-endian words `bpf_fib_lookup` uses (same bytes).
#[inline(always)]
fn addr_words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// The inverse of [`addr_words`].
#[inline(always)]
fn words_addr(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// bpf_fib_lookup is GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
