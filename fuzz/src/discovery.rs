//! Discovery beacons: signed announcements anyone on a link can multicast, handed to the
//! peer manager as the agent's discovery task does (`PeerManager::on_beacon`).
//!
//! Properties:
//! 1. a beacon is accepted only if it parses, is not our own, its key owns the announced
//!    address and its signature verifies;
//! 2. the very same datagram delivered again is never accepted again (anti-replay).
//!
//! Input layout: two bytes of the sender's link-local interface identifier, then the
//! datagram.

use std::{
    net::{Ipv6Addr, SocketAddrV6},
    time::{Duration, Instant, UNIX_EPOCH},
};

use myconet_core::id::NodeKey;
use myconet_core::peers::{
    PeerConfig, PeerManager,
    wire::{Beacon, LinkMessage},
};

use crate::session::keypair;

/// The interface discovery runs on.
pub const IFINDEX: u32 = 3;

/// The wall clock every input sees, so signed timestamps in saved seeds stay fresh.
pub const WALL_US: u64 = 1_800_000_000_000_000;

/// The beacon a node with identity seed `seed` sends at `WALL_US + offset_us`.
pub fn beacon(seed: u8, port: u16, offset_us: u64) -> Vec<u8> {
    let key = keypair(seed);
    let b = Beacon::for_key(&*key, port, WALL_US + offset_us).expect("beacon");
    LinkMessage::Beacon(b.sign(&*key)).to_vec()
}

/// The fuzz target; see the module documentation.
pub fn run(data: &[u8]) {
    let Some((id, datagram)) = data.split_first_chunk::<2>() else {
        return;
    };
    let now = Instant::now();
    let wall = UNIX_EPOCH + Duration::from_micros(WALL_US);
    let own = keypair(2);
    let local_key =
        NodeKey::from_slice(ring::signature::KeyPair::public_key(&*own).as_ref()).expect("key");
    let mut manager =
        PeerManager::new(PeerConfig::default(), local_key, now, 1).expect("default config");
    manager.enable_discovery(IFINDEX);
    let from = SocketAddrV6::new(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, u16::from_be_bytes(*id)),
        9652,
        0,
        IFINDEX,
    );
    let first = manager.on_beacon(from, IFINDEX, datagram, now, wall);
    if first.is_ok() {
        let Ok(LinkMessage::Beacon(signed)) = LinkMessage::parse(datagram) else {
            panic!("accepted a datagram that is not a beacon");
        };
        assert_ne!(signed.beacon.node_key, local_key, "accepted our own beacon");
        assert!(
            signed.verify().is_ok(),
            "accepted a beacon that does not verify"
        );
        let again = manager.on_beacon(
            from,
            IFINDEX,
            datagram,
            now + Duration::from_millis(1),
            wall + Duration::from_millis(1),
        );
        assert!(
            again.is_err(),
            "the same beacon was accepted twice: {again:?}"
        );
    }
}
