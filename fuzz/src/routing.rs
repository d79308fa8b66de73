//! Routing payloads from a neighbour (`routing::wire`), into the router as the agent
//! hands them over (`Router::handle_message`).
//!
//! Properties:
//! 1. every TLV that parses re-emits (with the router's own `put_*` writers) to a
//!    record that parses to the same value;
//! 2. a payload whose header does not parse is refused as a whole;
//! 3. every route the router holds afterwards is for the prefix its origin key owns
//!    (nothing unsigned or mis-bound gets in, whatever the payload).

use std::{
    net::Ipv6Addr,
    time::{Duration, Instant},
};

use myconet_core::routing::{
    Admission, Router, RoutingConfig, owned_prefix,
    wire::{self, Tlv, Tlvs},
};

use crate::session::keypair;

/// The neighbour the payload comes from.
const NEIGHBOUR: u32 = 1;

/// Re-emits a parsed TLV with the writer the router uses for it (`None` for unknown
/// types, which have no writer).
pub fn emit(tlv: &Tlv<'_>) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match *tlv {
        Tlv::Update {
            plen,
            seqno,
            metric,
            prefix,
            key,
            signature,
        } => wire::put_update(&mut out, plen, seqno, metric, prefix, key, signature),
        Tlv::Retraction { plen, prefix } => wire::put_retraction(&mut out, plen, prefix),
        Tlv::RouteRequest { plen, prefix } => wire::put_route_request(&mut out, plen, prefix),
        Tlv::SeqnoRequest {
            plen,
            hops,
            seqno,
            prefix,
        } => wire::put_seqno_request(&mut out, plen, hops, seqno, prefix),
        Tlv::Unknown(_) => return None,
    }
    Some(out)
}

/// The fuzz target; see the module documentation.
pub fn run(data: &[u8]) {
    let header = wire::parse_header(data);
    if let Ok(body) = header {
        for tlv in Tlvs::new(body) {
            let Ok(tlv) = tlv else { break };
            if let Some(bytes) = emit(&tlv) {
                let mut again = Tlvs::new(&bytes);
                assert_eq!(again.next(), Some(Ok(tlv)), "TLV round trip");
                assert_eq!(again.next(), None, "one TLV emits one record");
            }
        }
    }

    let now = Instant::now();
    // Keys in fuzz inputs carry no identity proof of work: accept them, so inputs reach
    // the signature check and the table (the work check is one comparison before it).
    let config = RoutingConfig {
        min_identity_work: 0,
        ..RoutingConfig::default()
    };
    let mut router: Router<u32> = Router::new(keypair(2), config, 7, 1, now).expect("config");
    let neighbour = keypair(1);
    let neighbour_key: [u8; 32] = ring::signature::KeyPair::public_key(&*neighbour)
        .as_ref()
        .try_into()
        .expect("key");
    router.neighbour_up(NEIGHBOUR, neighbour_key, Admission::SelfAdmitted, now);
    while router.poll_transmit().is_some() {}
    let result = router.handle_message(NEIGHBOUR, data, now);
    if header.is_err() {
        assert!(
            result.is_err(),
            "a payload with a bad header must be refused"
        );
    }
    let later = now + Duration::from_millis(10);
    router.handle_timeout(later);
    while router.poll_transmit().is_some() {}
    while router.poll_event().is_some() {}
    for route in router.routes(later) {
        let bits = (u128::from(route.prefix) >> 64) as u64;
        assert_eq!(
            owned_prefix(&route.origin),
            bits,
            "route to {} held for an origin key that does not own it",
            route.prefix
        );
        assert_ne!(route.prefix, Ipv6Addr::UNSPECIFIED);
    }
}
