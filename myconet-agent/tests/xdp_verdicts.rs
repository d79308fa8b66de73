//! Every verdict of the XDP program, proven with BPF_PROG_TEST_RUN on crafted frames.
//!
//! The program runs inside a private network namespace with two veth links, static
//! neighbours and a blackhole route (`myconet_testbed::fixture`), so `bpf_fib_lookup`
//! answers deterministically. Each
//! fixture checks the action, the exact bytes of the frame the program leaves behind
//! (every rewritten byte of a relayed frame, and that its UDP checksum validates) and that
//! exactly the expected per-CPU counter moved. Needs root (CI runs as root).

use std::{collections::BTreeSet, net::Ipv6Addr};

use myconet_agent::os::{
    dataplane::{AttachedMode, XdpDataplane, ifindex},
    egress::EgressPolicy,
};
use myconet_common::{
    maps::{
        Gcra, HandshakeLimits, INIT_COOKIE_LEN, INIT_COOKIE_OFFSET, LocalAddrKey, PeerKey, Stat,
        forwarding_slot,
    },
    wire::{DEFAULT_HOP_LIMIT, HEADER_LEN, PacketType, Repr, field},
};
use myconet_core::rib::{NextHop, RouteTarget};
use myconet_testbed::{
    fixture::{NEIGH2_MAC, PEER_MAC, V0_MAC, V2_MAC, fib_namespace},
    packet::{self, ETH_LEN, IPV6_LEN, UDP_LEN},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const PORT: u16 = 9651;
const NEXT_PORT: u16 = 9652;

fn a(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

struct Fixture {
    dp: XdpDataplane,
    v0: u32,
    v2: u32,
}

impl Fixture {
    fn new() -> Self {
        let mut dp = XdpDataplane::load(PORT).expect("load XDP program (root needed)");
        let v0 = ifindex("v0").expect("v0");
        let v2 = ifindex("v2").expect("v2");
        dp.allow_redirect(v0).unwrap();
        dp.allow_redirect(v2).unwrap();
        // Routes via fd00:2::2 carry the source address the agent resolved; the others
        // leave it to the FIB (BPF_FIB_LOOKUP_SRC), so both ways are covered.
        let fwd = |addr: &str, ifindex: u32| {
            let target = RouteTarget::Forward(NextHop {
                addr: a(addr),
                port: NEXT_PORT,
                ifindex,
            });
            if addr == "fd00:2::2" {
                target.to_map_value_with_src(Some(a("fd00:2::1")))
            } else {
                target.to_map_value()
            }
        };
        dp.set_route(a("fd6d:b::"), 64, RouteTarget::Local.to_map_value())
            .unwrap();
        dp.set_route(a("fd6d:c::"), 64, fwd("fd00:1::2", 0))
            .unwrap();
        dp.set_route(a("fd6d:d::"), 64, fwd("fd00:2::2", 0))
            .unwrap();
        dp.set_route(a("fd6d:d1::"), 64, fwd("fd00:2::2", v2))
            .unwrap();
        dp.set_route(a("fd6d:e::"), 64, fwd("fd00:1::3", 0))
            .unwrap();
        dp.set_route(a("fd6d:f::"), 64, fwd("fd00:99::1", 0))
            .unwrap();
        dp.add_peer(PeerKey::new(a("fd00:1::2").octets(), PORT, 0))
            .unwrap();
        // The relay's own underlay addresses (the agent mirrors them from rtnetlink).
        dp.sync_local_addrs(&local_addrs(&[
            ("fd00:1::1", 0),
            ("fd00:2::1", 0),
            ("fe80::1", v0),
        ]))
        .unwrap();
        Self { dp, v0, v2 }
    }

    /// Runs one frame arriving on v0 and returns (action, frame out, the single stat
    /// that moved).
    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>, Stat) {
        self.run_on(frame, self.v0)
    }

    /// Like [`Fixture::run`] for a frame arriving on interface `ingress`.
    fn run_on(&self, frame: &[u8], ingress: u32) -> (u32, Vec<u8>, Stat) {
        let (action, out, moved) = self.run_counting(frame, ingress);
        assert_eq!(
            moved.len(),
            1,
            "exactly one counter must move, got {moved:?}"
        );
        (action, out, moved[0])
    }

    /// Runs one frame arriving on `ingress` and returns (action, frame out, every stat
    /// that moved, in index order); each moved by exactly one packet of this frame.
    fn run_counting(&self, frame: &[u8], ingress: u32) -> (u32, Vec<u8>, Vec<Stat>) {
        let before = self.dp.stats().unwrap();
        let out = self.dp.test_run(frame, ingress, 1).expect("test_run");
        let after = self.dp.stats().unwrap();
        let moved: Vec<_> = before
            .iter()
            .zip(after.iter())
            .filter(|(b, a)| a.1.packets != b.1.packets)
            .map(|(b, a)| {
                assert_eq!(
                    a.1.packets - b.1.packets,
                    1,
                    "{:?} moved by more than one",
                    a.0
                );
                assert_eq!(a.1.bytes - b.1.bytes, frame.len() as u64, "{:?} bytes", a.0);
                b.0
            })
            .collect();
        assert_eq!(
            moved.iter().filter(|s| s.is_verdict()).count(),
            1,
            "exactly one verdict must be counted, got {moved:?}"
        );
        (out.action, out.frame, moved)
    }
}

fn local_addrs(list: &[(&str, u32)]) -> BTreeSet<LocalAddrKey> {
    list.iter()
        .map(|(addr, ifindex)| LocalAddrKey::new(a(addr).octets(), *ifindex))
        .collect()
}

fn header(dst: &str, hop_limit: u8) -> Repr {
    Repr {
        packet_type: PacketType::Data,
        hop_limit,
        flags: 0x5a,
        session_id: 0xdead_beef,
        counter: 0x0102_0304_0506_0708,
        dst_addr: a(dst),
        src_addr: a("fd6d:a::1"),
    }
}

const PAYLOAD: &[u8] = b"opaque AEAD ciphertext that relays must carry untouched";

fn frame_from(sport: u16, repr: &Repr) -> Vec<u8> {
    packet::frame(
        PEER_MAC,
        V0_MAC,
        a("fd00:1::2"),
        a("fd00:1::1"),
        sport,
        PORT,
        repr,
        PAYLOAD,
    )
}

/// Checks every byte of a relayed frame against what the relay must have written.
fn assert_relayed(
    input: &[u8],
    out: &[u8],
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    ip_src: &str,
    ip_dst: &str,
) {
    assert_eq!(out.len(), input.len(), "relaying never changes the length");
    let p = packet::parse_frame(out).expect("relayed frame parses");
    assert_eq!(p.eth_dst, eth_dst);
    assert_eq!(p.eth_src, eth_src);
    assert_eq!(p.ip_src, a(ip_src));
    assert_eq!(p.ip_dst, a(ip_dst));
    assert_eq!(p.hop_limit, 64);
    assert_eq!(p.sport, PORT);
    assert_eq!(p.dport, NEXT_PORT);
    assert!(
        p.checksum_valid(),
        "UDP checksum must validate after rewrite"
    );
    // The Myconet header is untouched except the hop limit, one less.
    let myc = ETH_LEN + IPV6_LEN + UDP_LEN;
    for i in 0..HEADER_LEN {
        if i == field::HOP_LIMIT {
            assert_eq!(out[myc + i], input[myc + i] - 1, "hop limit decremented");
        } else {
            assert_eq!(out[myc + i], input[myc + i], "Myconet header byte {i}");
        }
    }
    assert_eq!(
        &out[myc + HEADER_LEN..],
        PAYLOAD,
        "payload carried untouched"
    );
    // Ethertype, version/class/flow, payload length, next header, UDP length unchanged.
    assert_eq!(out[12..22], input[12..22]);
    assert_eq!(
        out[ETH_LEN + IPV6_LEN + 4..ETH_LEN + IPV6_LEN + 6],
        input[ETH_LEN + IPV6_LEN + 4..ETH_LEN + IPV6_LEN + 6]
    );
}

fn assert_unchanged(fx: &Fixture, f: &[u8], want_act: u32, want: Stat) {
    let (act, out, stat) = fx.run(f);
    assert_eq!((act, stat), (want_act, want));
    assert_eq!(out, f, "{want:?} must not modify the frame");
}

#[test]
fn every_verdict() {
    let ns = fib_namespace().expect("fixture namespace");
    ns.run_in(|| {
        let fx = Fixture::new();
        let peer_frame = |dst: &str, hops: u8| frame_from(PORT, &header(dst, hops));

        // Relayed back out of the ingress interface: XDP_TX.
        let f = peer_frame("fd6d:c::1", DEFAULT_HOP_LIMIT);
        let (act, out, stat) = fx.run(&f);
        assert_eq!((act, stat), (XDP_TX, Stat::Tx));
        assert_relayed(&f, &out, PEER_MAC, V0_MAC, "fd00:1::1", "fd00:1::2");

        // Relayed out of another interface: DEVMAP redirect, by FIB choice and by a
        // route that names the interface.
        for dst in ["fd6d:d::1", "fd6d:d1::7"] {
            let f = peer_frame(dst, 2);
            let (act, out, stat) = fx.run(&f);
            assert_eq!((act, stat), (XDP_REDIRECT, Stat::Redirect), "{dst}");
            assert_relayed(&f, &out, NEIGH2_MAC, V2_MAC, "fd00:2::1", "fd00:2::2");
        }

        // Frames the program passes or drops must leave it byte-for-byte unchanged.
        let unchanged = |f: &[u8], act: u32, want: Stat| assert_unchanged(&fx, f, act, want);

        unchanged(&peer_frame("fd6d:b::1", 64), XDP_PASS, Stat::PassLocal);
        // Local delivery does not require the sender to be a peer.
        unchanged(
            &frame_from(4444, &header("fd6d:b::1", 64)),
            XDP_PASS,
            Stat::PassLocal,
        );
        unchanged(&peer_frame("fd6d:c::1", 1), XDP_DROP, Stat::DropHopLimit);
        unchanged(&peer_frame("fd6d:c::1", 0), XDP_DROP, Stat::DropHopLimit);
        unchanged(
            &frame_from(4444, &header("fd6d:c::1", 64)),
            XDP_DROP,
            Stat::DropUnknownPeer,
        );
        unchanged(&peer_frame("fd6d:9::1", 64), XDP_DROP, Stat::DropNoRoute);
        unchanged(
            &peer_frame("fd6d:e::1", 64),
            XDP_PASS,
            Stat::PassNoNeighbour,
        );
        unchanged(
            &peer_frame("fd6d:f::1", 64),
            XDP_DROP,
            Stat::DropUnreachable,
        );

        // Handshakes go to the agent (which relays them under its rate limits) only
        // after the local and peer checks; control always goes to the agent.
        for t in [
            PacketType::HandshakeInit,
            PacketType::HandshakeResponse,
            PacketType::CookieReply,
            PacketType::TooBig,
        ] {
            let mut r = header("fd6d:c::1", 64);
            r.packet_type = t;
            unchanged(&frame_from(PORT, &r), XDP_PASS, Stat::PassControl);
            unchanged(&frame_from(4444, &r), XDP_DROP, Stat::DropUnknownPeer);
            r.dst_addr = a("fd6d:b::1");
            unchanged(&frame_from(4444, &r), XDP_PASS, Stat::PassControl);
        }
        let mut control = header("fd6d:c::1", 64);
        control.packet_type = PacketType::Control;
        unchanged(&frame_from(4444, &control), XDP_PASS, Stat::PassControl);

        // Multicast and broadcast copies are never relayed.
        let mut group_mac = peer_frame("fd6d:c::1", 64);
        group_mac[0] = 0x33;
        unchanged(&group_mac, XDP_DROP, Stat::DropNotUnicast);
        let to_all_nodes = packet::frame(
            PEER_MAC,
            V0_MAC,
            a("fd00:1::2"),
            a("ff02::1"),
            PORT,
            PORT,
            &header("fd6d:c::1", 64),
            PAYLOAD,
        );
        unchanged(&to_all_nodes, XDP_DROP, Stat::DropNotUnicast);

        // Bytes after the UDP datagram would be relayed unchecked: dropped.
        let mut trailing = peer_frame("fd6d:c::1", 64);
        trailing.extend_from_slice(&[0; 4]);
        unchanged(&trailing, XDP_DROP, Stat::DropMalformed);

        // Oversized hop limits are clamped to the default by relays.
        let f = peer_frame("fd6d:c::1", 255);
        let (act, out, stat) = fx.run(&f);
        assert_eq!((act, stat), (XDP_TX, Stat::Tx));
        let myc = ETH_LEN + IPV6_LEN + UDP_LEN;
        assert_eq!(out[myc + field::HOP_LIMIT], DEFAULT_HOP_LIMIT);
        assert!(packet::parse_frame(&out).unwrap().checksum_valid());

        // Garbled headers.
        let myc = ETH_LEN + IPV6_LEN + UDP_LEN;
        let base = peer_frame("fd6d:c::1", 64);
        let mut bad_version = base.clone();
        bad_version[myc + field::VERSION] = 2;
        unchanged(&bad_version, XDP_DROP, Stat::DropBadVersion);
        let mut bad_type = base.clone();
        bad_type[myc + field::TYPE] = 0x77;
        unchanged(&bad_type, XDP_DROP, Stat::DropMalformed);
        let mut zero_csum = base.clone();
        zero_csum[ETH_LEN + IPV6_LEN + 6] = 0;
        zero_csum[ETH_LEN + IPV6_LEN + 7] = 0;
        unchanged(&zero_csum, XDP_DROP, Stat::DropMalformed);
        let mut bad_udp_len = base.clone();
        bad_udp_len[ETH_LEN + IPV6_LEN + 5] ^= 1;
        unchanged(&bad_udp_len, XDP_DROP, Stat::DropMalformed);

        // Truncated at (and just past) every header boundary. The kernel never hands
        // XDP less than an Ethernet header, so that is where cutting starts.
        for cut in ETH_LEN..base.len() {
            let f = &base[..cut];
            let (want_act, want) = if cut < myc {
                (XDP_PASS, Stat::PassNotMyconet)
            } else {
                (XDP_DROP, Stat::DropMalformed)
            };
            let (act, out, stat) = fx.run(f);
            assert_eq!((act, stat), (want_act, want), "cut at {cut}");
            assert_eq!(out, f);
        }

        // Non-Myconet traffic is untouched: another UDP port, IPv4, ICMPv6.
        let dns = packet::udp_frame(
            PEER_MAC,
            V0_MAC,
            a("fd00:1::2"),
            a("fd00:1::1"),
            5353,
            53,
            b"query",
        );
        unchanged(&dns, XDP_PASS, Stat::PassNotMyconet);
        let mut ipv4 = base.clone();
        ipv4[12] = 0x08;
        ipv4[13] = 0x00;
        unchanged(&ipv4, XDP_PASS, Stat::PassNotMyconet);
        let mut icmp = base.clone();
        icmp[ETH_LEN + 6] = 58;
        unchanged(&icmp, XDP_PASS, Stat::PassNotMyconet);

        // An egress interface the program may not redirect to goes to the slow path
        // untouched.
        let mut fx = fx;
        fx.dp.remove_redirect(fx.v2).unwrap();
        assert_unchanged(
            &fx,
            &peer_frame("fd6d:d::1", 64),
            XDP_PASS,
            Stat::PassSlowPath,
        );
    })
    .expect("run in namespace");
}

/// Pins the calling thread to CPU 0: the next-hop cache is per CPU, and BPF_PROG_TEST_RUN
/// runs on the caller's CPU.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is valid; we set one bit and apply it to this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pin to CPU 0"
        );
    }
}

fn set_neighbour_mac(mac: &str) {
    let out = std::process::Command::new("ip")
        .args([
            "-6",
            "neigh",
            "replace",
            "fd00:1::2",
            "lladdr",
            mac,
            "dev",
            "v0",
            "nud",
            "permanent",
        ])
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn fib_answers_are_cached_flushed_on_route_change_and_rechecked_for_larger_packets() {
    let ns = fib_namespace().expect("fixture namespace");
    ns.run_in(|| {
        pin_to_cpu0();
        let mut fx = Fixture::new();
        let small = frame_from(PORT, &header("fd6d:c::1", 64));
        let eth_dst = |fx: &Fixture, f: &[u8]| -> [u8; 6] {
            let (act, out, stat) = fx.run(f);
            assert_eq!((act, stat), (XDP_TX, Stat::Tx));
            out[..6].try_into().unwrap()
        };
        assert_eq!(eth_dst(&fx, &small), PEER_MAC);

        // The neighbour's MAC changes; the cached answer is still used (until the agent's
        // next periodic invalidation), which proves the FIB is not consulted per packet.
        const NEW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
        set_neighbour_mac("02:00:00:00:00:99");
        assert_eq!(
            eth_dst(&fx, &small),
            PEER_MAC,
            "served from the next-hop cache"
        );

        // Any route change flushes the cache: the next packet sees the new neighbour.
        fx.dp
            .set_route(a("fd6d:77::"), 64, RouteTarget::Local.to_map_value())
            .unwrap();
        assert_eq!(eth_dst(&fx, &small), NEW_MAC, "flushed by the route change");

        // A packet larger than any the FIB approved on this path is looked up afresh
        // (the MTU check is never skipped).
        set_neighbour_mac("02:00:00:00:00:02");
        assert_eq!(
            eth_dst(&fx, &small),
            NEW_MAC,
            "small packets still hit the cache"
        );
        let mut big_header = header("fd6d:c::1", 64);
        big_header.counter += 1;
        let big = packet::frame(
            PEER_MAC,
            V0_MAC,
            a("fd00:1::2"),
            a("fd00:1::1"),
            PORT,
            PORT,
            &big_header,
            &[0x42; 1200],
        );
        let (act, out, stat) = fx.run(&big);
        assert_eq!((act, stat), (XDP_TX, Stat::Tx));
        assert_eq!(
            out[..6],
            PEER_MAC,
            "a larger packet triggers a fresh lookup"
        );

        // The periodic refresh (one generation bump, no route change) also makes the
        // next packet consult the FIB again.
        set_neighbour_mac("02:00:00:00:00:99");
        assert_eq!(eth_dst(&fx, &big), PEER_MAC, "cached until the refresh");
        fx.dp.invalidate_caches();
        assert_eq!(eth_dst(&fx, &big), NEW_MAC, "looked up after the refresh");
    })
    .expect("run in namespace");
}

/// The forwarding-cache slot the program picks for a frame from the fixture's peer.
fn slot_of(dst: Ipv6Addr, ingress: u32) -> u32 {
    let d = dst.octets();
    let p = a("fd00:1::2").octets();
    let word = |b: &[u8; 16], i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap());
    forwarding_slot(word(&d, 0), word(&d, 8), word(&p, 8), PORT.to_be(), ingress)
}

#[test]
fn forwarding_cache_honours_peer_removal_hop_limits_and_shared_slots() {
    let ns = fib_namespace().expect("fixture namespace");
    ns.run_in(|| {
        pin_to_cpu0();
        let mut fx = Fixture::new();
        let peer = PeerKey::new(a("fd00:1::2").octets(), PORT, 0);
        let f = frame_from(PORT, &header("fd6d:c::1", 64));

        // The first packet fills the slot, the second is served from it: both relayed.
        for _ in 0..2 {
            let (act, out, stat) = fx.run(&f);
            assert_eq!((act, stat), (XDP_TX, Stat::Tx));
            assert_relayed(&f, &out, PEER_MAC, V0_MAC, "fd00:1::1", "fd00:1::2");
        }
        // A cached flow still has its hop limit checked per packet.
        assert_unchanged(
            &fx,
            &frame_from(PORT, &header("fd6d:c::1", 1)),
            XDP_DROP,
            Stat::DropHopLimit,
        );

        // Revoking the neighbour takes effect on its very next packet, though its flow
        // was cached; re-admitting it relays again.
        assert!(fx.dp.remove_peer(peer).unwrap());
        assert_unchanged(&fx, &f, XDP_DROP, Stat::DropUnknownPeer);
        fx.dp.add_peer(peer).unwrap();
        let (act, _, stat) = fx.run(&f);
        assert_eq!((act, stat), (XDP_TX, Stat::Tx));

        // Two flows that share a slot (found by search, as the program hashes them)
        // evict each other and each is still relayed by its own route.
        let tx_dst = a("fd6d:c::1");
        let slot = slot_of(tx_dst, fx.v0);
        let colliding = (1u32..200_000)
            .map(|i| {
                let mut o = a("fd6d:d::").octets();
                o[12..16].copy_from_slice(&i.to_be_bytes());
                Ipv6Addr::from(o)
            })
            .find(|d| slot_of(*d, fx.v0) == slot)
            .expect("a destination sharing the slot");
        for round in 0..3 {
            let f = frame_from(PORT, &header("fd6d:c::1", 64));
            let (act, out, stat) = fx.run(&f);
            assert_eq!((act, stat), (XDP_TX, Stat::Tx), "round {round}");
            assert_relayed(&f, &out, PEER_MAC, V0_MAC, "fd00:1::1", "fd00:1::2");
            let f = frame_from(PORT, &header(&colliding.to_string(), 64));
            let (act, out, stat) = fx.run(&f);
            assert_eq!((act, stat), (XDP_REDIRECT, Stat::Redirect), "round {round}");
            assert_relayed(&f, &out, NEIGH2_MAC, V2_MAC, "fd00:2::1", "fd00:2::2");
        }

        // A route change reaches cached flows: the destination becomes local.
        fx.dp
            .set_route(a("fd6d:c::"), 64, RouteTarget::Local.to_map_value())
            .unwrap();
        assert_unchanged(&fx, &f, XDP_PASS, Stat::PassLocal);
    })
    .expect("run in namespace");
}

#[test]
fn link_local_peers_relay_only_on_their_own_interface() {
    let ns = fib_namespace().expect("fixture namespace");
    ns.run_in(|| {
        let mut fx = Fixture::new();
        // A neighbour found by discovery: known by its link-local address on v0.
        let ll_peer = a("fe80::2");
        fx.dp
            .add_peer(PeerKey::new(ll_peer.octets(), PORT, fx.v0))
            .unwrap();
        let from_ll = packet::frame(
            PEER_MAC,
            V0_MAC,
            ll_peer,
            a("fd00:1::1"),
            PORT,
            PORT,
            &header("fd6d:c::1", 64),
            PAYLOAD,
        );

        // On its own link it may relay through us.
        let (act, out, stat) = fx.run_on(&from_ll, fx.v0);
        assert_eq!((act, stat), (XDP_TX, Stat::Tx));
        assert_relayed(&from_ll, &out, PEER_MAC, V0_MAC, "fd00:1::1", "fd00:1::2");

        // The same fe80:: address on another link is somebody else: a stranger.
        let (act, out, stat) = fx.run_on(&from_ll, fx.v2);
        assert_eq!((act, stat), (XDP_DROP, Stat::DropUnknownPeer));
        assert_eq!(out, from_ll, "a dropped frame is left untouched");

        // A key scoped to the wrong interface admits nothing on v0.
        let other_ll = a("fe80::3");
        fx.dp
            .add_peer(PeerKey::new(other_ll.octets(), PORT, fx.v2))
            .unwrap();
        let from_other = packet::frame(
            PEER_MAC,
            V0_MAC,
            other_ll,
            a("fd00:1::1"),
            PORT,
            PORT,
            &header("fd6d:c::1", 64),
            PAYLOAD,
        );
        let (act, _, stat) = fx.run_on(&from_other, fx.v0);
        assert_eq!((act, stat), (XDP_DROP, Stat::DropUnknownPeer));

        // Global and unique-local addresses are host-wide: the fixture's peer
        // fd00:1::2 is admitted whichever interface its packet arrives on.
        let from_global = frame_from(PORT, &header("fd6d:c::1", 64));
        let (act, _, stat) = fx.run_on(&from_global, fx.v2);
        assert_eq!((act, stat), (XDP_REDIRECT, Stat::Redirect));
    })
    .expect("run in namespace");
}

/// A frame from the fixture's peer fd00:1::2 to outer destination `to`.
fn frame_to(to: &str, repr: &Repr) -> Vec<u8> {
    packet::frame(
        PEER_MAC,
        V0_MAC,
        a("fd00:1::2"),
        a(to),
        PORT,
        PORT,
        repr,
        PAYLOAD,
    )
}

#[test]
fn only_packets_sent_to_our_own_addresses_are_relayed() {
    let ns = fib_namespace().expect("fixture namespace");
    ns.run_in(|| {
        pin_to_cpu0();
        let mut fx = Fixture::new();
        let data = header("fd6d:c::1", 64);

        // A frame for another host (promiscuous interface, flooding switch) is left to
        // the kernel untouched, whatever it carries: data, a handshake, control, or
        // data for this node's own prefix.
        let elsewhere = frame_to("fd00:1::99", &data);
        assert_unchanged(&fx, &elsewhere, XDP_PASS, Stat::PassNotLocal);
        for (t, dst) in [
            (PacketType::HandshakeInit, "fd6d:c::1"),
            (PacketType::Control, "fd6d:c::1"),
            (PacketType::Data, "fd6d:b::1"),
        ] {
            let mut r = header(dst, 64);
            r.packet_type = t;
            assert_unchanged(
                &fx,
                &frame_to("fd00:1::99", &r),
                XDP_PASS,
                Stat::PassNotLocal,
            );
        }
        // Our address on the other interface is still ours (host-wide addresses).
        let (act, out, stat) = fx.run(&frame_to("fd00:2::1", &data));
        assert_eq!((act, stat), (XDP_TX, Stat::Tx));
        assert!(packet::parse_frame(&out).unwrap().checksum_valid());

        // A link-local address is ours only on the link it is configured on.
        let to_ll = frame_to("fe80::1", &data);
        let (act, out, stat) = fx.run_on(&to_ll, fx.v0);
        assert_eq!((act, stat), (XDP_TX, Stat::Tx));
        assert_relayed(&to_ll, &out, PEER_MAC, V0_MAC, "fd00:1::1", "fd00:1::2");
        let (act, out, stat) = fx.run_on(&to_ll, fx.v2);
        assert_eq!((act, stat), (XDP_PASS, Stat::PassNotLocal));
        assert_eq!(out, to_ll);

        // A cached flow (hit on the second packet) is keyed by its outer destination:
        // the same flow sent to another host's address is not served from the cache.
        let ours = frame_to("fd00:1::1", &data);
        for _ in 0..2 {
            let (act, out, stat) = fx.run(&ours);
            assert_eq!((act, stat), (XDP_TX, Stat::Tx));
            assert_relayed(&ours, &out, PEER_MAC, V0_MAC, "fd00:1::1", "fd00:1::2");
        }
        assert_unchanged(&fx, &elsewhere, XDP_PASS, Stat::PassNotLocal);

        // The address goes away (the agent follows rtnetlink): the cached flow's very
        // next packet is no longer relayed.
        let changed = fx
            .dp
            .sync_local_addrs(&local_addrs(&[("fd00:2::1", 0), ("fe80::1", fx.v0)]))
            .unwrap();
        assert!(changed);
        assert_unchanged(&fx, &ours, XDP_PASS, Stat::PassNotLocal);
        assert!(
            !fx.dp
                .sync_local_addrs(&local_addrs(&[("fd00:2::1", 0), ("fe80::1", fx.v0)]))
                .unwrap(),
            "an unchanged set is no change"
        );
    })
    .expect("run in namespace");
}

#[test]
fn frames_leave_only_the_ways_their_egress_can_take_them() {
    let ns = fib_namespace().expect("fixture namespace");
    ns.run_in(|| {
        pin_to_cpu0();
        let mut fx = Fixture::new();
        let back = frame_from(PORT, &header("fd6d:c::1", 64)); // egress v0 = ingress
        let across = frame_from(PORT, &header("fd6d:d::1", 64)); // egress v2
        let (act, _, stat) = fx.run(&back);
        assert_eq!((act, stat), (XDP_TX, Stat::Tx));

        // An egress that cannot send XDP frames back out (a veth whose far end has no
        // NAPI): the flow, cached a moment ago, goes to the slow path untouched.
        fx.dp
            .set_egress(
                fx.v0,
                EgressPolicy {
                    redirect: false,
                    tx: false,
                },
            )
            .unwrap();
        assert_unchanged(&fx, &back, XDP_PASS, Stat::PassSlowPath);
        // Redirects into v2 are unaffected.
        let (act, _, stat) = fx.run(&across);
        assert_eq!((act, stat), (XDP_REDIRECT, Stat::Redirect));

        // Neither way out of v2 either: redirects stop too.
        fx.dp.set_egress(fx.v2, EgressPolicy::default()).unwrap();
        assert_unchanged(&fx, &across, XDP_PASS, Stat::PassSlowPath);

        // Proven safe again (the far end enabled GRO): relayed in the kernel again.
        fx.dp.allow_redirect(fx.v0).unwrap();
        fx.dp.allow_redirect(fx.v2).unwrap();
        let (act, _, stat) = fx.run(&back);
        assert_eq!((act, stat), (XDP_TX, Stat::Tx));
        let (act, _, stat) = fx.run(&across);
        assert_eq!((act, stat), (XDP_REDIRECT, Stat::Redirect));
    })
    .expect("run in namespace");
}

/// A data frame the egress link cannot take (the FIB's MTU check) is passed up as
/// `pass_too_big`, untouched, for the agent to report to its source; one that just
/// fits is relayed. Checked after smaller frames of the same flow filled the caches,
/// which must not let a larger one through.
#[test]
fn frames_larger_than_the_egress_are_passed_up_as_too_big() {
    let ns = fib_namespace().expect("fixture namespace");
    ns.run_in(|| {
        let fx = Fixture::new();
        // v2's MTU is the veth default, 1500: the largest IPv6 packet it sends.
        let sized = |ipv6_len: usize| {
            let payload = vec![0x5a; ipv6_len - IPV6_LEN - UDP_LEN - HEADER_LEN];
            packet::frame(
                PEER_MAC,
                V0_MAC,
                a("fd00:1::2"),
                a("fd00:1::1"),
                PORT,
                PORT,
                &header("fd6d:d::1", 64),
                &payload,
            )
        };
        let (act, _, stat) = fx.run(&sized(200));
        assert_eq!((act, stat), (XDP_REDIRECT, Stat::Redirect));
        let (act, _, stat) = fx.run(&sized(1500));
        assert_eq!((act, stat), (XDP_REDIRECT, Stat::Redirect), "just fits");
        assert_unchanged(&fx, &sized(1501), XDP_PASS, Stat::PassTooBig);
        // The flow's smaller packets are still relayed from the cache.
        let (act, _, stat) = fx.run(&sized(1400));
        assert_eq!((act, stat), (XDP_REDIRECT, Stat::Redirect));
    })
    .expect("run in namespace");
}

/// A peer's data frame for `dst` with a `payload_len`-byte patterned payload and the
/// partial UDP checksum a sender's kernel leaves with TX checksum offload.
fn partial_frame(dst: &str, payload_len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7 + 3) as u8).collect();
    packet::with_partial_checksum(packet::frame(
        PEER_MAC,
        V0_MAC,
        a("fd00:1::2"),
        a("fd00:1::1"),
        PORT,
        PORT,
        &header(dst, 64),
        &payload,
    ))
}

/// A frame from a sender on this host that used a veth with TX checksum offload carries
/// only the pseudo-header sum in its UDP checksum (the skb is `CHECKSUM_PARTIAL`).
/// Relayed from driver-mode XDP it becomes an `xdp_frame` without that state, so the
/// program must complete the checksum over the datagram (every payload length, odd and
/// even, across the chunk sizes it sums in); from a generic-mode interface the skb keeps
/// its state and the program must leave a valid partial sum for the new addresses.
/// Either way `csum_partial` is counted beside the verdict; full checksums stay on the
/// incremental path and are not counted there.
#[test]
fn partial_checksums_are_completed_or_kept_partial() {
    let ns = fib_namespace().expect("fixture namespace");
    ns.run_in(|| {
        let mut fx = Fixture::new();
        // Frames up to what BPF_PROG_TEST_RUN takes (one page less head- and tailroom)
        // must pass the FIB's MTU check, so every chunk count is reached.
        for dev in ["v0", "v2"] {
            let out = std::process::Command::new("ip")
                .args(["link", "set", "dev", dev, "mtu", "4000"])
                .output()
                .expect("run ip");
            assert!(out.status.success(), "{out:?}");
        }
        let lengths = (0..=9)
            .chain(250..=262)
            .chain(500..=524)
            .chain([1000, 1001, 1203, 1392, 1393, 2047, 2048, 3000, 3001, 3300]);
        for len in lengths {
            for (dst, want_act, want_stat, eth, ips) in [
                (
                    "fd6d:d::1",
                    XDP_REDIRECT,
                    Stat::Redirect,
                    (NEIGH2_MAC, V2_MAC),
                    ("fd00:2::1", "fd00:2::2"),
                ),
                (
                    "fd6d:c::1",
                    XDP_TX,
                    Stat::Tx,
                    (PEER_MAC, V0_MAC),
                    ("fd00:1::1", "fd00:1::2"),
                ),
            ] {
                let f = partial_frame(dst, len);
                assert!(packet::parse_frame(&f).unwrap().checksum_partial());
                let (act, out, moved) = fx.run_counting(&f, fx.v0);
                assert_eq!(act, want_act, "{dst} payload {len}");
                assert_eq!(moved, [want_stat, Stat::CsumPartial], "payload {len}");
                let p = packet::parse_frame(&out).unwrap();
                assert_eq!((p.ip_src, p.ip_dst), (a(ips.0), a(ips.1)));
                assert_eq!((p.eth_dst, p.eth_src), eth);
                assert!(p.checksum_valid(), "{dst} payload {len}: not completed");
                let payload = ETH_LEN + IPV6_LEN + UDP_LEN + HEADER_LEN;
                assert_eq!(&out[payload..], &f[payload..], "payload carried untouched");
            }
        }

        // A full checksum is patched, not recomputed, and not counted as partial.
        let full = frame_from(PORT, &header("fd6d:d::1", 64));
        let (act, out, moved) = fx.run_counting(&full, fx.v0);
        assert_eq!(
            (act, moved.as_slice()),
            (XDP_REDIRECT, &[Stat::Redirect][..])
        );
        assert!(packet::parse_frame(&out).unwrap().checksum_valid());

        // Generic mode on the ingress: the relayed frame keeps a partial checksum, now
        // for its new addresses, which the egress completes from the skb's state.
        let both = EgressPolicy {
            redirect: true,
            tx: true,
        };
        fx.dp
            .set_interface(fx.v0, both, AttachedMode::Generic)
            .unwrap();
        for len in [0, 1, 2, 3, 513, 1200] {
            let f = partial_frame("fd6d:d::1", len);
            let (act, out, moved) = fx.run_counting(&f, fx.v0);
            assert_eq!(act, XDP_REDIRECT);
            assert_eq!(moved, [Stat::Redirect, Stat::CsumPartial]);
            let p = packet::parse_frame(&out).unwrap();
            assert_eq!((p.ip_src, p.ip_dst), (a("fd00:2::1"), a("fd00:2::2")));
            assert!(p.checksum_partial(), "payload {len}: not a partial sum");
        }
        let (act, out, moved) = fx.run_counting(&full, fx.v0);
        assert_eq!(
            (act, moved.as_slice()),
            (XDP_REDIRECT, &[Stat::Redirect][..])
        );
        assert!(packet::parse_frame(&out).unwrap().checksum_valid());
    })
    .expect("run in namespace");
}

/// A HandshakeInit for this node (`fd6d:b::1`) from underlay `src`, 240 bytes, with
/// `cookie` in its cookie field (all zero: none).
fn init_from(src: &str, sport: u16, cookie: [u8; INIT_COOKIE_LEN]) -> Vec<u8> {
    let mut r = header("fd6d:b::1", 64);
    r.packet_type = PacketType::HandshakeInit;
    let mut body = vec![0x11u8; 240 - HEADER_LEN];
    let at = INIT_COOKIE_OFFSET - HEADER_LEN;
    body[at..at + INIT_COOKIE_LEN].copy_from_slice(&cookie);
    packet::frame(
        PEER_MAC,
        V0_MAC,
        a(src),
        a("fd00:1::1"),
        sport,
        PORT,
        &r,
        &body,
    )
}

fn cookie(first: u8) -> [u8; INIT_COOKIE_LEN] {
    let mut c = [0u8; INIT_COOKIE_LEN];
    c[0] = first;
    c[INIT_COOKIE_LEN - 1] = 0x5a;
    c
}

/// A bucket that refills once an hour: `burst` packets, then nothing within a test.
fn hourly(burst: u64) -> Gcra {
    let interval_ns = 3_600_000_000_000;
    Gcra {
        interval_ns,
        tolerance_ns: (burst - 1) * interval_ns,
    }
}

fn pass(fx: &Fixture, f: &[u8]) {
    assert_unchanged(fx, f, XDP_PASS, Stat::PassControl);
}

fn shed(fx: &Fixture, f: &[u8]) {
    assert_unchanged(fx, f, XDP_DROP, Stat::DropHandshakeRate);
}

/// The handshake gate sheds inits for this node over their buckets (per source /64
/// without a cookie, per source /64 and cookie with one, and the node's), and never
/// touches data, relayed handshakes or the other handshake messages.
#[test]
fn handshake_inits_for_this_node_are_shed_over_their_buckets() {
    let ns = fib_namespace().expect("fixture namespace");
    ns.run_in(|| {
        // The buckets are per CPU, and BPF_PROG_TEST_RUN runs on the caller's.
        pin_to_cpu0();
        let mut fx = Fixture::new();
        let off = HandshakeLimits {
            seed: 7,
            ..HandshakeLimits::default()
        };
        fx.dp
            .set_handshake_limits(HandshakeLimits {
                source_cookieless: hourly(3),
                cookie: hourly(2),
                ..off
            })
            .unwrap();

        // One /64's cookieless inits: its burst, then shed, whichever address and port
        // in the /64 they come from.
        for i in 0..3 {
            pass(
                &fx,
                &init_from(&format!("fd00:77:0:1::{}", i + 1), 4000 + i, [0; 32]),
            );
        }
        shed(&fx, &init_from("fd00:77:0:1::1", 4000, [0; 32]));
        shed(&fx, &init_from("fd00:77:0:1::ffff", 5000, [0; 32]));
        // Another /64 has its own bucket.
        pass(&fx, &init_from("fd00:77:0:2::1", 4000, [0; 32]));

        // From the drained /64, an init carrying a cookie is charged to that cookie's
        // bucket: an initiator behind the flooder's /64 gets through by echoing its
        // cookie, and garbage cookies (a spoofer's) fill other buckets than its own.
        pass(&fx, &init_from("fd00:77:0:1::9", 4000, cookie(1)));
        pass(&fx, &init_from("fd00:77:0:1::9", 4000, cookie(1)));
        shed(&fx, &init_from("fd00:77:0:1::9", 4000, cookie(1)));
        pass(&fx, &init_from("fd00:77:0:1::9", 4000, cookie(2)));
        pass(&fx, &init_from("fd00:77:0:1::1", 4000, cookie(2)));
        shed(&fx, &init_from("fd00:77:0:1::1", 4000, cookie(2)));
        // The same cookie from another /64 is another bucket.
        pass(&fx, &init_from("fd00:77:0:3::1", 4000, cookie(1)));

        // Never shed: data for this node, handshakes relayed for others (the agent
        // limits what it relays), and responses and cookie replies, which answer this
        // node's own initiations.
        let from_drained = |t: PacketType, dst: &str, body: &[u8]| {
            let mut r = header(dst, 64);
            r.packet_type = t;
            packet::frame(
                PEER_MAC,
                V0_MAC,
                a("fd00:77:0:1::1"),
                a("fd00:1::1"),
                4000,
                PORT,
                &r,
                body,
            )
        };
        assert_unchanged(
            &fx,
            &from_drained(PacketType::Data, "fd6d:b::1", PAYLOAD),
            XDP_PASS,
            Stat::PassLocal,
        );
        for t in [PacketType::HandshakeResponse, PacketType::CookieReply] {
            pass(&fx, &from_drained(t, "fd6d:b::1", &[0u8; 192]));
        }
        let mut relayed = header("fd6d:c::1", 64);
        relayed.packet_type = PacketType::HandshakeInit;
        for _ in 0..5 {
            pass(&fx, &frame_from(PORT, &relayed));
        }

        // The node's buckets hold whatever the sources: two cookieless inits and one
        // with a cookie from fresh /64s, then nothing of that kind, from anywhere.
        fx.dp
            .set_handshake_limits(HandshakeLimits {
                seed: 8,
                node_cookieless: hourly(2),
                node_cookie: hourly(1),
                ..HandshakeLimits::default()
            })
            .unwrap();
        pass(&fx, &init_from("fd00:78:0:1::1", 4000, [0; 32]));
        pass(&fx, &init_from("fd00:78:0:2::1", 4000, [0; 32]));
        shed(&fx, &init_from("fd00:78:0:3::1", 4000, [0; 32]));
        pass(&fx, &init_from("fd00:78:0:4::1", 4000, cookie(3)));
        shed(&fx, &init_from("fd00:78:0:5::1", 4000, cookie(4)));

        // Without limits (all zero) nothing is shed.
        fx.dp.set_handshake_limits(off).unwrap();
        for _ in 0..5 {
            pass(&fx, &init_from("fd00:78:0:3::1", 4000, [0; 32]));
        }
    })
    .expect("run in namespace");
}

/// The agent loads the program with its own admission rates as the gate's bounds: a
/// direct sender gets what the agent would answer from one last hop (its cookieless
/// share and its cookie replies) and no more.
#[test]
fn the_agent_sets_the_gate_from_its_admission_rates() {
    let ns = fib_namespace().expect("fixture namespace");
    ns.run_in(|| {
        pin_to_cpu0();
        let fx = Fixture::new();
        let admission = myconet_agent::shell::overlay::session_config();
        let limits = fx.dp.handshake_limits();
        let with_seed = myconet_agent::os::dataplane::handshake_limits(&admission, limits.seed);
        assert_eq!(limits, with_seed);
        assert!(limits.enabled() && limits.seed != 0);
        let burst = admission.source_rate_limit.burst + admission.cookie_reply_rate_limit.burst;
        let src = "fd00:79:0:1::1";
        let f = init_from(src, 4000, [0; 32]);
        // Ten bursts' worth back to back (well under a millisecond): the burst goes up,
        // plus at most the odd token refilled meanwhile (one per ~10 ms), the rest is
        // shed.
        let count = |stat: Stat| {
            fx.dp
                .stats()
                .unwrap()
                .into_iter()
                .find(|(s, _)| *s == stat)
                .map_or(0, |(_, c)| c.packets)
        };
        let (passed0, shed0) = (count(Stat::PassControl), count(Stat::DropHandshakeRate));
        let out = fx.dp.test_run(&f, fx.v0, 10 * burst).expect("test_run");
        let passed = count(Stat::PassControl) - passed0;
        let shed = count(Stat::DropHandshakeRate) - shed0;
        assert_eq!(out.action, XDP_DROP);
        assert_eq!(passed + shed, 10 * u64::from(burst));
        assert!(
            (u64::from(burst)..=u64::from(burst) + 3).contains(&passed),
            "{passed} of {} passed, burst {burst}",
            10 * burst
        );
    })
    .expect("run in namespace");
}
