//! Differential check of the XDP program against the userspace decision: a frame goes
//! through the loaded program with BPF_PROG_TEST_RUN, and the verdict, the counter that
//! moved and every byte of the frame it leaves behind are compared with what the agent's
//! own code says must happen to it: `myconet_common::wire` parses the Myconet header and
//! `forward::decide` (the function the userspace relay path uses) decides, over a RIB and
//! peer set that hold exactly what the program's maps hold. The outer
//! Ethernet/IPv6/UDP checks, which only the program makes (the kernel makes them for
//! the agent's socket), are spelled out here from the program's documented contract.
//!
//! Shared source: `myconet-agent/tests/xdp_differential.rs` runs it over generated
//! frames on every `cargo test`, and the `xdp` fuzz target (`fuzz/src/xdp.rs`, which
//! includes this file) runs it over whatever libFuzzer makes. It needs root and must run
//! inside `myconet_testbed::fixture::fib_namespace`, whose FIB answers are known.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{Ipv6Addr, SocketAddrV6},
};

use myconet_agent::os::dataplane::{XdpDataplane, ifindex};
use myconet_common::{
    checksum,
    maps::{HandshakeLimits, LocalAddrKey, PeerKey, Stat},
    wire::{self, Packet, PacketType, Repr, WireError, field},
};
use myconet_core::{
    forward::{self, Decision, DropReason},
    id::LinkEndpoint,
    rib::{NextHop, Origin, Prefix, Rib, RibEntry, RouteTarget},
};
use myconet_testbed::fixture::{NEIGH2_MAC, PEER_MAC, V0_MAC, V2_MAC};

/// XDP actions (`enum xdp_action`).
pub const XDP_DROP: u32 = 1;
/// Up to the kernel stack.
pub const XDP_PASS: u32 = 2;
/// Back out of the ingress interface.
pub const XDP_TX: u32 = 3;
/// Out of another interface.
pub const XDP_REDIRECT: u32 = 4;

/// The Myconet port the program is loaded with.
pub const PORT: u16 = 9651;
/// The port of every next hop in the model (differs from [`PORT`] so a missed port
/// rewrite shows).
pub const NEXT_PORT: u16 = 9652;

const ETH_LEN: usize = 14;
const IP_OFF: usize = ETH_LEN;
const UDP_OFF: usize = IP_OFF + 40;
const MYC_OFF: usize = UDP_OFF + 8;
const MYC_END: usize = MYC_OFF + wire::HEADER_LEN;
/// Frames are cut to the veth MTU (1500) plus the Ethernet header, so the FIB's MTU
/// check never decides (the model has no MTU).
pub const MAX_FRAME: usize = ETH_LEN + 1500;

fn a(s: &str) -> Ipv6Addr {
    s.parse().expect("address literal")
}

/// What the model says the program must do with one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The XDP action.
    pub action: u32,
    /// The one counter that moves.
    pub stat: Stat,
    /// For relayed frames: how the outer headers must be rewritten.
    pub rewrite: Option<Rewrite>,
}

/// The outer headers of a relayed frame, and the Myconet hop limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewrite {
    /// Ethernet destination (the next hop's MAC).
    pub eth_dst: [u8; 6],
    /// Ethernet source (the egress interface's MAC).
    pub eth_src: [u8; 6],
    /// Outer IPv6 source.
    pub ip_src: Ipv6Addr,
    /// Outer IPv6 destination (the next hop).
    pub ip_dst: Ipv6Addr,
    /// UDP destination port (the next hop's).
    pub dport: u16,
    /// The Myconet hop limit `forward::decide` wrote.
    pub hop_limit: u8,
}

fn expect(action: u32, stat: Stat) -> Expected {
    Expected {
        action,
        stat,
        rewrite: None,
    }
}

/// Where the fixture namespace's FIB sends a next hop.
#[derive(Debug, Clone, Copy)]
enum Fib {
    /// Resolved: egress interface, neighbour MAC, egress MAC, source address.
    Via(u32, [u8; 6], [u8; 6], Ipv6Addr),
    /// No neighbour entry.
    NoNeighbour,
    /// Blackhole route.
    Unreachable,
}

/// The loaded program and the model of what its maps hold.
pub struct Harness {
    dp: XdpDataplane,
    rib: Rib,
    peers: BTreeSet<LinkEndpoint>,
    local: BTreeSet<LocalAddrKey>,
    /// Ingress interfaces frames can arrive on (v0, v2).
    pub ifaces: [u32; 2],
}

impl Harness {
    /// Loads the program and fills its maps and the model with the same routes, peers and
    /// local addresses. Call inside the fixture namespace.
    pub fn new() -> anyhow::Result<Self> {
        let mut dp = XdpDataplane::load(PORT)?;
        // Excluded on purpose: the handshake gate. It is a rate over time (per-CPU token
        // buckets against the kernel clock), which the per-packet decision has no
        // analogue of: the agent's userspace path gets packets after the kernel's UDP
        // stack, where its own admission limits inits. Left on, the thousands of inits
        // below would be shed after the burst and disagree by design. Its verdicts are
        // proven in `xdp_verdicts.rs`.
        dp.set_handshake_limits(HandshakeLimits::default())?;
        let v0 = ifindex("v0")?;
        let v2 = ifindex("v2")?;
        dp.allow_redirect(v0)?;
        dp.allow_redirect(v2)?;
        let mut h = Self {
            dp,
            rib: Rib::default(),
            peers: BTreeSet::new(),
            local: BTreeSet::new(),
            ifaces: [v0, v2],
        };
        let fwd = |addr: &str, ifindex: u32| {
            RouteTarget::Forward(NextHop {
                addr: a(addr),
                port: NEXT_PORT,
                ifindex,
            })
        };
        // Own prefixes, next hops of every FIB outcome, and a /20 with a local /64
        // inside it so longest-prefix matching is compared too.
        h.route("fd6d:b::", 64, RouteTarget::Local, None)?;
        h.route("fd6d:a0b0::", 64, RouteTarget::Local, None)?;
        h.route("fd6d:c::", 64, fwd("fd00:1::2", 0), None)?;
        h.route("fd6d:d::", 64, fwd("fd00:2::2", 0), Some("fd00:2::1"))?;
        h.route("fd6d:d1::", 64, fwd("fd00:2::2", v2), None)?;
        h.route("fd6d:e::", 64, fwd("fd00:1::3", 0), None)?;
        h.route("fd6d:f::", 64, fwd("fd00:99::1", 0), None)?;
        h.route("fd6d:a000::", 20, fwd("fd00:2::2", 0), None)?;
        h.peer("fd00:1::2", PORT, 0)?;
        h.peer("fd00:2::2", PORT, 0)?;
        h.peer("fe80::2", PORT, v0)?;
        for (addr, scope) in [("fd00:1::1", 0), ("fd00:2::1", 0), ("fe80::1", v0)] {
            h.local.insert(LocalAddrKey::new(a(addr).octets(), scope));
        }
        h.dp.sync_local_addrs(&h.local)?;
        Ok(h)
    }

    fn route(
        &mut self,
        prefix: &str,
        len: u8,
        target: RouteTarget,
        src: Option<&str>,
    ) -> anyhow::Result<()> {
        self.dp
            .set_route(a(prefix), len, target.to_map_value_with_src(src.map(a)))?;
        let origin = match target {
            RouteTarget::Local => Origin::Local,
            RouteTarget::Forward(_) => Origin::Static,
        };
        self.rib
            .insert(Prefix::new(a(prefix), len)?, RibEntry { target, origin });
        Ok(())
    }

    fn peer(&mut self, addr: &str, port: u16, scope: u32) -> anyhow::Result<()> {
        self.dp
            .add_peer(PeerKey::new(a(addr).octets(), port, scope))?;
        self.peers.insert(LinkEndpoint::new(a(addr), port, scope));
        Ok(())
    }

    /// The loaded program, to make its maps disagree with the model on purpose (the
    /// test that shows the check can fail).
    pub fn dataplane_mut(&mut self) -> &mut XdpDataplane {
        &mut self.dp
    }

    /// The fixture namespace's FIB for `next_hop` (the same from either interface).
    fn fib(&self, next_hop: NextHop) -> Fib {
        let [v0, v2] = self.ifaces;
        match next_hop.addr.octets() {
            o if o == a("fd00:1::2").octets() => Fib::Via(v0, PEER_MAC, V0_MAC, a("fd00:1::1")),
            o if o == a("fd00:2::2").octets() => Fib::Via(v2, NEIGH2_MAC, V2_MAC, a("fd00:2::1")),
            o if o == a("fd00:1::3").octets() => Fib::NoNeighbour,
            _ => Fib::Unreachable,
        }
    }

    /// What the userspace code says the program must do with `frame` arriving on
    /// `ingress`.
    pub fn expected(&self, frame: &[u8], ingress: u32) -> Expected {
        let be16 = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
        let addr = |at: usize| {
            Ipv6Addr::from(<[u8; 16]>::try_from(&frame[at..at + 16]).expect("16 bytes"))
        };
        // Outer headers: not a whole Ethernet/IPv6/UDP header to our port is not ours.
        if frame.len() < MYC_OFF
            || be16(12) != 0x86dd
            || frame[IP_OFF] >> 4 != 6
            || frame[IP_OFF + 6] != 17
            || be16(UDP_OFF + 2) != PORT
        {
            return expect(XDP_PASS, Stat::PassNotMyconet);
        }
        if frame.len() < MYC_END {
            return expect(XDP_DROP, Stat::DropMalformed);
        }
        if frame[0] & 1 != 0 || frame[IP_OFF + 24] == 0xff {
            return expect(XDP_DROP, Stat::DropNotUnicast);
        }
        let ip_payload_len = usize::from(be16(IP_OFF + 4));
        let udp_len = usize::from(be16(UDP_OFF + 4));
        if udp_len != ip_payload_len
            || udp_len < 8 + wire::HEADER_LEN
            || UDP_OFF + udp_len != frame.len()
            || be16(UDP_OFF + 6) == 0
        {
            return expect(XDP_DROP, Stat::DropMalformed);
        }
        // The Myconet header, by the agent's own parser.
        let repr = match Repr::parse(&Packet::new_unchecked(&frame[MYC_OFF..])) {
            Ok(r) => r,
            Err(WireError::BadVersion(_)) => return expect(XDP_DROP, Stat::DropBadVersion),
            Err(_) => return expect(XDP_DROP, Stat::DropMalformed),
        };
        let outer_dst = addr(IP_OFF + 24);
        if !self
            .local
            .contains(&LocalAddrKey::new(outer_dst.octets(), ingress))
        {
            return expect(XDP_PASS, Stat::PassNotLocal);
        }
        if repr.packet_type == PacketType::Control {
            return expect(XDP_PASS, Stat::PassControl);
        }
        let from = LinkEndpoint::new(addr(IP_OFF + 8), be16(UDP_OFF), ingress);
        let is_data = repr.packet_type == PacketType::Data;
        // The userspace relay's decision.
        match forward::decide(&self.rib, &self.peers, from, &repr) {
            Decision::Deliver if is_data => expect(XDP_PASS, Stat::PassLocal),
            Decision::Drop(DropReason::UnknownPeer) => expect(XDP_DROP, Stat::DropUnknownPeer),
            // Handshakes and cookies that passed the local and peer checks are relayed
            // (or delivered) by the agent, under its rate limits.
            _ if !is_data => expect(XDP_PASS, Stat::PassControl),
            Decision::Deliver => unreachable!("handled above"),
            Decision::Drop(DropReason::NoRoute) => expect(XDP_DROP, Stat::DropNoRoute),
            Decision::Drop(DropReason::HopLimit) => expect(XDP_DROP, Stat::DropHopLimit),
            Decision::Drop(DropReason::NotRelayable) => expect(XDP_PASS, Stat::PassControl),
            Decision::Forward {
                next_hop,
                hop_limit,
            } => match self.fib(next_hop) {
                Fib::Via(egress, eth_dst, eth_src, ip_src) => Expected {
                    action: if egress == ingress {
                        XDP_TX
                    } else {
                        XDP_REDIRECT
                    },
                    stat: if egress == ingress {
                        Stat::Tx
                    } else {
                        Stat::Redirect
                    },
                    rewrite: Some(Rewrite {
                        eth_dst,
                        eth_src,
                        ip_src,
                        ip_dst: next_hop.addr,
                        dport: next_hop.port,
                        hop_limit,
                    }),
                },
                Fib::NoNeighbour => expect(XDP_PASS, Stat::PassNoNeighbour),
                Fib::Unreachable => expect(XDP_DROP, Stat::DropUnreachable),
            },
        }
    }

    /// Runs `frame` through the program arriving on `ingress` and compares everything
    /// with [`Harness::expected`]; the error describes every difference.
    pub fn check(&self, frame: &[u8], ingress: u32) -> Result<(), String> {
        let want = self.expected(frame, ingress);
        let before = self.dp.stats().map_err(|e| e.to_string())?;
        let out = self
            .dp
            .test_run(frame, ingress, 1)
            .map_err(|e| e.to_string())?;
        let after = self.dp.stats().map_err(|e| e.to_string())?;
        let mut diff = String::new();
        let moved: Vec<(Stat, u64, u64)> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| a.1.packets != b.1.packets || a.1.bytes != b.1.bytes)
            .map(|(b, a)| (b.0, a.1.packets - b.1.packets, a.1.bytes - b.1.bytes))
            .collect();
        if moved != [(want.stat, 1, frame.len() as u64)] {
            let _ = writeln!(
                diff,
                "counters moved {moved:?}, expected {:?} by one packet of {} bytes",
                want.stat,
                frame.len()
            );
        }
        if out.action != want.action {
            let _ = writeln!(diff, "action {}, expected {}", out.action, want.action);
        }
        match want.rewrite {
            None if out.frame != frame => {
                let _ = writeln!(diff, "a frame that is not relayed was modified");
            }
            None => {}
            Some(r) => check_rewrite(frame, &out.frame, &r, &mut diff),
        }
        if diff.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "ingress {ingress}, expected {want:?}:\n{diff}frame {}",
                hex(frame)
            ))
        }
    }
}

/// Compares a relayed frame with the rewrite the model expects: every byte outside the
/// rewritten fields unchanged, and a UDP checksum that validates whenever the input's did
/// (and is never zero, which in IPv6 would mean none).
fn check_rewrite(input: &[u8], out: &[u8], r: &Rewrite, diff: &mut String) {
    if out.len() != input.len() {
        let _ = writeln!(
            diff,
            "relayed frame length {} != {}",
            out.len(),
            input.len()
        );
        return;
    }
    let mut want = input.to_vec();
    want[0..6].copy_from_slice(&r.eth_dst);
    want[6..12].copy_from_slice(&r.eth_src);
    want[IP_OFF + 7] = 64;
    want[IP_OFF + 8..IP_OFF + 24].copy_from_slice(&r.ip_src.octets());
    want[IP_OFF + 24..IP_OFF + 40].copy_from_slice(&r.ip_dst.octets());
    want[UDP_OFF..UDP_OFF + 2].copy_from_slice(&PORT.to_be_bytes());
    want[UDP_OFF + 2..UDP_OFF + 4].copy_from_slice(&r.dport.to_be_bytes());
    want[MYC_OFF + field::HOP_LIMIT] = r.hop_limit;
    // The checksum is compared by validity, below.
    want[UDP_OFF + 6..UDP_OFF + 8].copy_from_slice(&out[UDP_OFF + 6..UDP_OFF + 8]);
    for (i, (o, w)) in out.iter().zip(&want).enumerate() {
        if o != w {
            let _ = writeln!(diff, "relayed byte {i}: {o:#04x}, expected {w:#04x}");
        }
    }
    let valid = |f: &[u8]| {
        let src = <[u8; 16]>::try_from(&f[IP_OFF + 8..IP_OFF + 24]).expect("16 bytes");
        let dst = <[u8; 16]>::try_from(&f[IP_OFF + 24..IP_OFF + 40]).expect("16 bytes");
        checksum::udp_ipv6_valid(&src, &dst, &f[UDP_OFF..])
    };
    if valid(input) && !valid(out) {
        let _ = writeln!(diff, "a valid UDP checksum became invalid in the rewrite");
    }
    if out[UDP_OFF + 6..UDP_OFF + 8] == [0, 0] {
        let _ = writeln!(diff, "the rewritten UDP checksum is zero (none, in IPv6)");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A well-formed frame from `src` (an underlay endpoint) to our address `outer_dst`,
/// carrying a Myconet header of type `ty` for `dst` with `hop_limit`, as seeds and the
/// generated test cases start from.
pub fn frame(
    src: SocketAddrV6,
    outer_dst: Ipv6Addr,
    ty: PacketType,
    dst: Ipv6Addr,
    hop_limit: u8,
    payload: &[u8],
) -> Vec<u8> {
    let repr = Repr {
        packet_type: ty,
        hop_limit,
        flags: 0x5a,
        session_id: 0xdead_beef,
        counter: 0x0102_0304_0506_0708,
        dst_addr: dst,
        src_addr: a("fd6d:a::1"),
    };
    myconet_testbed::packet::frame(
        PEER_MAC,
        V0_MAC,
        *src.ip(),
        outer_dst,
        src.port(),
        PORT,
        &repr,
        payload,
    )
}

/// Well-formed frames that between them reach every verdict of the program from v0:
/// the seeds of the fuzz target and the bases the generated test mutates.
pub fn base_frames() -> Vec<(&'static str, Vec<u8>)> {
    let peer = SocketAddrV6::new(a("fd00:1::2"), PORT, 0, 0);
    let ll_peer = SocketAddrV6::new(a("fe80::2"), PORT, 0, 0);
    let stranger = SocketAddrV6::new(a("fd00:1::9"), 4444, 0, 0);
    let us = a("fd00:1::1");
    let body = b"opaque AEAD ciphertext";
    let data = |src, dst: &str, hops| frame(src, us, PacketType::Data, a(dst), hops, body);
    let mut out = vec![
        ("tx", data(peer, "fd6d:c::1", 64)),
        ("redirect", data(peer, "fd6d:d::1", 2)),
        ("redirect_named_iface", data(peer, "fd6d:d1::7", 64)),
        ("redirect_by_short_prefix", data(peer, "fd6d:a123::1", 64)),
        ("local", data(stranger, "fd6d:b::1", 64)),
        ("local_inside_short_prefix", data(peer, "fd6d:a0b0::5", 64)),
        ("hop_limit", data(peer, "fd6d:c::1", 1)),
        ("clamped_hop_limit", data(peer, "fd6d:c::1", 255)),
        ("unknown_peer", data(stranger, "fd6d:c::1", 64)),
        ("link_local_peer", data(ll_peer, "fd6d:c::1", 64)),
        ("no_route", data(peer, "fd6d:9::1", 64)),
        ("no_neighbour", data(peer, "fd6d:e::1", 64)),
        ("unreachable", data(peer, "fd6d:f::1", 64)),
        (
            "not_local",
            frame(
                peer,
                a("fd00:1::99"),
                PacketType::Data,
                a("fd6d:c::1"),
                64,
                body,
            ),
        ),
        (
            "control",
            frame(stranger, us, PacketType::Control, a("fd6d:c::1"), 64, body),
        ),
        (
            "handshake_relayed_by_agent",
            frame(
                peer,
                us,
                PacketType::HandshakeInit,
                a("fd6d:c::1"),
                64,
                body,
            ),
        ),
        (
            "handshake_from_stranger",
            frame(
                stranger,
                us,
                PacketType::HandshakeInit,
                a("fd6d:c::1"),
                64,
                body,
            ),
        ),
        (
            "cookie_for_us",
            frame(
                stranger,
                us,
                PacketType::CookieReply,
                a("fd6d:b::1"),
                64,
                body,
            ),
        ),
        (
            "not_myconet",
            myconet_testbed::packet::udp_frame(
                PEER_MAC,
                V0_MAC,
                a("fd00:1::2"),
                us,
                53,
                53,
                b"dns",
            ),
        ),
    ];
    let mut group = data(peer, "fd6d:c::1", 64);
    group[0] = 0x33;
    out.push(("not_unicast", group));
    let mut bad_version = data(peer, "fd6d:c::1", 64);
    bad_version[MYC_OFF + field::VERSION] = 2;
    out.push(("bad_version", bad_version));
    let mut truncated = data(peer, "fd6d:c::1", 64);
    truncated.truncate(MYC_END - 1);
    out.push(("truncated", truncated));
    out
}
