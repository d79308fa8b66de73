//! The userspace forwarding decision, with exactly the XDP program's semantics (local
//! delivery first, then the peer check, the route lookup and the hop limit). Pure: no
//! sockets, so it is tested directly and shared by every path that relays in userspace.

use std::collections::BTreeSet;

use myconet_common::wire::{DEFAULT_HOP_LIMIT, PacketType, Repr};

use crate::id::LinkEndpoint;
use crate::rib::{NextHop, Rib, RouteTarget};

/// What to do with an end-to-end packet (data, handshake, cookie) that reached the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// For this node.
    Deliver,
    /// Relay to `next_hop` with the hop limit already decremented.
    Forward {
        /// Where to send it.
        next_hop: NextHop,
        /// The hop limit to write into the header.
        hop_limit: u8,
    },
    /// Drop and count.
    Drop(DropReason),
}

/// Why the userspace path dropped a packet (mirrors the XDP drop reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Link-level control: addressed to a neighbour, never relayed.
    NotRelayable,
    /// The sender is not an authenticated neighbour.
    UnknownPeer,
    /// No route to the destination.
    NoRoute,
    /// Hop limit would reach zero.
    HopLimit,
}

/// Decides the fate of an end-to-end packet received from `from`.
///
/// Data, handshake and cookie packets all travel end to end and get the same rules; the
/// XDP program relays only data in the kernel and passes the rest up to be relayed here.
/// `peers` and `from` are underlay endpoints with their interface scope, as the peer
/// check compares them: a link-local sender matches a peer only on the interface the
/// peer was authenticated on, exactly as the XDP peer map keys it (`maps::PeerKey`).
pub fn decide(
    rib: &Rib,
    peers: &BTreeSet<LinkEndpoint>,
    from: LinkEndpoint,
    header: &Repr,
) -> Decision {
    if header.packet_type == PacketType::Control {
        return Decision::Drop(DropReason::NotRelayable);
    }
    let route = rib.lookup(header.dst_addr);
    if let Some((_, entry)) = route
        && entry.target == RouteTarget::Local
    {
        return Decision::Deliver;
    }
    if !peers.contains(&from) {
        return Decision::Drop(DropReason::UnknownPeer);
    }
    let Some((_, entry)) = route else {
        return Decision::Drop(DropReason::NoRoute);
    };
    let RouteTarget::Forward(next_hop) = entry.target else {
        return Decision::Drop(DropReason::NoRoute);
    };
    if header.hop_limit <= 1 {
        return Decision::Drop(DropReason::HopLimit);
    }
    // Relays clamp to the default, as the XDP program does.
    Decision::Forward {
        next_hop,
        hop_limit: (header.hop_limit - 1).min(DEFAULT_HOP_LIMIT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rib::{Origin, RibEntry};
    use std::net::Ipv6Addr;

    fn ep(addr: &str, port: u16, scope: u32) -> LinkEndpoint {
        LinkEndpoint::new(addr.parse::<Ipv6Addr>().unwrap(), port, scope)
    }

    fn setup() -> (Rib, BTreeSet<LinkEndpoint>, NextHop) {
        let mut rib = Rib::default();
        let nh = NextHop {
            addr: "fd00::2".parse().unwrap(),
            port: 9651,
            ifindex: 0,
        };
        rib.insert(
            "fd6d:c::/64".parse().unwrap(),
            RibEntry {
                target: RouteTarget::Forward(nh),
                origin: Origin::Static,
            },
        );
        rib.insert(
            "fd6d:b::/64".parse().unwrap(),
            RibEntry {
                target: RouteTarget::Local,
                origin: Origin::Local,
            },
        );
        let peers = BTreeSet::from([ep("fd00::1", 9651, 0), ep("fe80::1", 9651, 3)]);
        (rib, peers, nh)
    }

    fn header(dst: &str, hop_limit: u8) -> Repr {
        Repr {
            packet_type: PacketType::Data,
            hop_limit,
            flags: 0,
            session_id: 1,
            counter: 1,
            dst_addr: dst.parse().unwrap(),
            src_addr: "fd6d:a::1".parse().unwrap(),
        }
    }

    /// Decisions checked against values worked out by hand. That they are also the XDP
    /// program's verdicts on the same packets is checked against the program itself, on
    /// thousands of frames, by `tests/xdp_differential.rs` (and the `xdp` fuzz target).
    #[test]
    fn decisions_worked_out_by_hand() {
        let (rib, peers, nh) = setup();
        let peer = ep("fd00::1", 9651, 0);
        let stranger = ep("fd00::9", 9651, 0);
        assert_eq!(
            decide(&rib, &peers, peer, &header("fd6d:c::1", 64)),
            Decision::Forward {
                next_hop: nh,
                hop_limit: 63
            }
        );
        assert_eq!(
            decide(&rib, &peers, stranger, &header("fd6d:b::1", 64)),
            Decision::Deliver
        );
        assert_eq!(
            decide(&rib, &peers, stranger, &header("fd6d:c::1", 64)),
            Decision::Drop(DropReason::UnknownPeer)
        );
        assert_eq!(
            decide(&rib, &peers, peer, &header("fd6d:d::1", 64)),
            Decision::Drop(DropReason::NoRoute)
        );
        assert_eq!(
            decide(&rib, &peers, peer, &header("fd6d:c::1", 1)),
            Decision::Drop(DropReason::HopLimit)
        );
        assert_eq!(
            decide(&rib, &peers, peer, &header("fd6d:c::1", 255)),
            Decision::Forward {
                next_hop: nh,
                hop_limit: DEFAULT_HOP_LIMIT
            },
            "relays clamp oversized hop limits"
        );
        let mut control = header("fd6d:c::1", 64);
        control.packet_type = PacketType::Control;
        assert_eq!(
            decide(&rib, &peers, peer, &control),
            Decision::Drop(DropReason::NotRelayable)
        );
        // Handshakes and too-big reports follow the same rules as data.
        for t in [
            PacketType::HandshakeInit,
            PacketType::HandshakeResponse,
            PacketType::CookieReply,
            PacketType::TooBig,
        ] {
            let mut h = header("fd6d:c::1", 64);
            h.packet_type = t;
            assert!(matches!(
                decide(&rib, &peers, peer, &h),
                Decision::Forward { .. }
            ));
            assert_eq!(
                decide(&rib, &peers, stranger, &h),
                Decision::Drop(DropReason::UnknownPeer)
            );
            h.dst_addr = "fd6d:b::1".parse().unwrap();
            assert_eq!(decide(&rib, &peers, stranger, &h), Decision::Deliver);
        }
    }

    #[test]
    fn link_local_peers_are_known_only_on_their_interface() {
        let (rib, peers, nh) = setup();
        let forward = Decision::Forward {
            next_hop: nh,
            hop_limit: 63,
        };
        let h = header("fd6d:c::1", 64);
        assert_eq!(decide(&rib, &peers, ep("fe80::1", 9651, 3), &h), forward);
        assert_eq!(
            decide(&rib, &peers, ep("fe80::1", 9651, 4), &h),
            Decision::Drop(DropReason::UnknownPeer),
            "the same link-local address on another interface is someone else"
        );
        assert_eq!(
            decide(&rib, &peers, ep("fe80::1", 9652, 3), &h),
            Decision::Drop(DropReason::UnknownPeer)
        );
        // Global addresses are host-wide: whatever interface the kernel reports.
        assert_eq!(decide(&rib, &peers, ep("fd00::1", 9651, 5), &h), forward);
    }
}
