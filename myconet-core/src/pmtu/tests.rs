//! Deterministic tests of the too-big exchange: what a relay signs, what a source
//! believes, and the ICMPv6 bytes it writes to its TUN device.

use super::*;
use myconet_common::addr::{node_address, node_prefix};
use ring::signature::{Ed25519KeyPair, KeyPair};

const NARROW: u32 = 1420;

fn key(seed: u8) -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).expect("32-byte seed")
}

fn public(k: &Ed25519KeyPair) -> [u8; 32] {
    KeyPair::public_key(k)
        .as_ref()
        .try_into()
        .expect("32-byte key")
}

/// Source a, relay b, destination c.
struct Net {
    a: Ed25519KeyPair,
    b: Ed25519KeyPair,
    c: Ed25519KeyPair,
}

impl Net {
    fn new() -> Self {
        Self {
            a: key(1),
            b: key(2),
            c: key(3),
        }
    }

    fn a_addr(&self) -> Ipv6Addr {
        node_address(&public(&self.a))
    }

    fn a_prefix(&self) -> Ipv6Addr {
        node_prefix(&public(&self.a))
    }

    fn b_addr(&self) -> Ipv6Addr {
        node_address(&public(&self.b))
    }

    fn c_addr(&self) -> Ipv6Addr {
        node_address(&public(&self.c))
    }

    /// A sealed-looking data datagram a → c of `len` bytes.
    fn data(&self, session_id: u32, counter: u64, len: usize) -> Vec<u8> {
        let mut d = vec![0xee; len];
        wire::Repr {
            packet_type: PacketType::Data,
            hop_limit: 63,
            flags: 0,
            session_id,
            counter,
            dst_addr: self.c_addr(),
            src_addr: self.a_addr(),
        }
        .emit(&mut wire::Packet::new_unchecked(&mut d[..]));
        d
    }

    /// b's report about a 1448-byte packet with `counter` on session 7.
    fn report(&self, reporter: &mut TooBigReporter, counter: u64, now: Instant) -> Vec<u8> {
        reporter
            .report(
                &self.b,
                self.b_addr(),
                &self.data(7, counter, 1448),
                NARROW,
                now,
            )
            .expect("reported")
    }

    /// What a's agent does with a report: screen (a sent counters 0..100 on session 7
    /// to c), look up b's key, verify, commit.
    fn receive(
        &self,
        pmtu: &mut PathMtu,
        datagram: &[u8],
        now: Instant,
    ) -> Result<Limit, Rejected> {
        let c = self.c_addr();
        let screened = pmtu.screen(
            datagram,
            self.a_prefix(),
            |q| q.dst_addr == c && q.session_id == 7 && q.counter < 100,
            now,
        )?;
        let b_key = public(&self.b);
        let key = (screened.reporter() == self.b_addr()).then_some(&b_key);
        Ok(pmtu.commit(screened.verify(key)?, now))
    }
}

#[test]
fn the_rate_limit_constants_are_valid() {
    for c in [
        REPORTS_PER_SOURCE,
        REPORTS_IN_ALL,
        VERIFICATIONS,
        PTB_PER_DESTINATION,
    ] {
        assert!(c.validate().is_ok(), "{c:?}");
    }
}

#[test]
fn sizes_follow_the_encapsulation() {
    assert_eq!(MIN_DATAGRAM, 1344);
    assert_eq!(max_datagram(NARROW), 1372);
    assert_eq!(
        inner_mtu(max_datagram(NARROW)),
        1308,
        "c's TUN MTU behind it"
    );
    assert_eq!(inner_mtu(max_datagram(1500)), 1388, "a's TUN MTU on 1500");
    assert_eq!(max_datagram(u32::MAX), u16::MAX);
    assert_eq!(ALWAYS_FITS, 1232);
}

#[test]
fn a_report_lowers_the_path_mtu_to_what_the_narrow_link_takes() {
    let net = Net::new();
    let now = Instant::now();
    let mut reporter = TooBigReporter::default();
    let msg = net.report(&mut reporter, 5, now);
    assert_eq!(msg.len(), too_big::LEN);
    let repr = too_big::Repr::parse(&too_big::Packet::new_checked(&msg[..]).unwrap()).unwrap();
    assert_eq!(repr.reporter, net.b_addr());
    assert_eq!(repr.source, net.a_addr());
    assert_eq!(repr.max_datagram, 1372);
    assert_eq!(repr.quoted_len, 1448);
    assert_eq!((repr.quoted.session_id, repr.quoted.counter), (7, 5));
    assert_eq!(repr.quoted.hop_limit, 0, "the quote's hop limit is zeroed");

    let mut pmtu = PathMtu::default();
    assert!(pmtu.is_empty());
    assert_eq!(pmtu.limit(net.c_addr(), now), None);
    let limit = net.receive(&mut pmtu, &msg, now).expect("believed");
    assert_eq!(
        limit,
        Limit {
            inner_mtu: 1308,
            reporter: net.b_addr()
        }
    );
    // Every address of c's /64 shares the path; other destinations do not.
    let other_c: Ipv6Addr = mask(net.c_addr(), 64).to_bits().wrapping_add(0x99).into();
    assert_eq!(pmtu.limit(other_c, now), Some(limit));
    assert_eq!(pmtu.limit(net.b_addr(), now), None);
}

#[test]
fn a_bad_signature_or_an_unknown_reporter_is_refused() {
    let net = Net::new();
    let now = Instant::now();
    let mut reporter = TooBigReporter::default();
    let msg = net.report(&mut reporter, 5, now);
    let mut pmtu = PathMtu::default();

    let mut forged = msg.clone();
    forged[too_big::field::SIGNATURE.start] ^= 1;
    assert_eq!(
        net.receive(&mut pmtu, &forged, now),
        Err(Rejected::BadSignature)
    );
    // A changed MTU under b's signature.
    let mut forged = msg.clone();
    forged[too_big::field::MAX_DATAGRAM.start + 1] ^= 0x10;
    assert_eq!(
        net.receive(&mut pmtu, &forged, now),
        Err(Rejected::BadSignature)
    );
    // Signed by a key that does not own the reporter's address (c signs as b).
    let by_c = reporter
        .report(&net.c, net.b_addr(), &net.data(7, 6, 1448), NARROW, now)
        .unwrap();
    assert_eq!(
        net.receive(&mut pmtu, &by_c, now),
        Err(Rejected::BadSignature)
    );
    // From a relay the routing table does not know (c's own report, c unknown here).
    let from_c = reporter
        .report(&net.c, net.c_addr(), &net.data(7, 7, 1448), NARROW, now)
        .unwrap();
    assert_eq!(
        net.receive(&mut pmtu, &from_c, now),
        Err(Rejected::UnknownReporter(net.c_addr()))
    );
    // A key from the table that does not own the reporter's /64 is not used.
    let screened = pmtu
        .screen(&msg, net.a_prefix(), |_| true, now)
        .expect("screened");
    assert_eq!(
        screened.verify(Some(&public(&net.c))).unwrap_err(),
        Rejected::UnknownReporter(net.b_addr())
    );
    assert!(pmtu.is_empty(), "nothing was learned");
    // The genuine one still is.
    assert!(net.receive(&mut pmtu, &msg, now).is_ok());
}

#[test]
fn a_quote_of_no_recent_packet_costs_no_signature_check() {
    let net = Net::new();
    let now = Instant::now();
    let mut reporter = TooBigReporter::default();
    let mut pmtu = PathMtu::default();
    // Counters 100 and more were never sent (see Net::receive), nor was session 8.
    let unsent = net.report(&mut reporter, 100, now);
    let other_session = reporter
        .report(&net.b, net.b_addr(), &net.data(8, 1, 1448), NARROW, now)
        .unwrap();
    for _ in 0..1000 {
        for msg in [&unsent, &other_session] {
            assert_eq!(
                net.receive(&mut pmtu, msg, now),
                Err(Rejected::UnknownQuote)
            );
        }
    }
    // The verification budget is untouched by all of that.
    let msg = net.report(&mut reporter, 5, now + Duration::from_secs(1));
    assert!(net.receive(&mut pmtu, &msg, now).is_ok());
}

#[test]
fn no_path_is_lowered_below_the_ipv6_minimum() {
    let net = Net::new();
    let now = Instant::now();
    let mut reporter = TooBigReporter::default();
    let packet = net.data(7, 5, 1448);
    // A relay whose link cannot carry 1280-byte inner packets says nothing.
    let below = u32::from(MIN_DATAGRAM) + OUTER_HEADERS as u32 - 1;
    assert_eq!(
        reporter.report(&net.b, net.b_addr(), &packet, below, now),
        Err(NotReported::BelowMinimum(below))
    );
    assert!(
        reporter
            .report(&net.b, net.b_addr(), &packet, below + 1, now)
            .is_ok()
    );
    // A validly signed report that claims less is refused all the same.
    let mut repr = too_big::Repr::parse(&too_big::Packet::new_unchecked(
        &net.report(&mut reporter, 6, now)[..],
    ))
    .unwrap();
    repr.max_datagram = MIN_DATAGRAM - 1;
    let mut buf = vec![0u8; too_big::LEN];
    let mut p = too_big::Packet::new_unchecked(&mut buf[..]);
    repr.emit(&mut p);
    let signature: [u8; 64] = Signer::sign(&net.b, &p.signing_message())
        .as_slice()
        .try_into()
        .unwrap();
    p.set_signature(&signature);
    let mut pmtu = PathMtu::default();
    assert_eq!(
        net.receive(&mut pmtu, &buf, now),
        Err(Rejected::BelowMinimum(1279))
    );
    assert!(pmtu.is_empty());
}

#[test]
fn replays_and_older_quotes_are_refused() {
    let net = Net::new();
    let now = Instant::now();
    let mut reporter = TooBigReporter::default();
    let mut pmtu = PathMtu::default();
    let first = net.report(&mut reporter, 10, now);
    let older = net.report(&mut reporter, 9, now);
    let newer = net.report(&mut reporter, 11, now);
    assert!(net.receive(&mut pmtu, &first, now).is_ok());
    assert_eq!(net.receive(&mut pmtu, &first, now), Err(Rejected::Replayed));
    assert_eq!(net.receive(&mut pmtu, &older, now), Err(Rejected::Replayed));
    assert!(net.receive(&mut pmtu, &newer, now).is_ok());
    // Long after the path MTU expired the replay memory still holds it off.
    let later = now + PATH_MTU_LIFETIME + Duration::from_secs(1);
    assert_eq!(pmtu.limit(net.c_addr(), later), None);
    assert_eq!(
        net.receive(&mut pmtu, &newer, later),
        Err(Rejected::Replayed)
    );
}

#[test]
fn reports_for_other_nodes_are_not_ours() {
    let net = Net::new();
    let now = Instant::now();
    let mut reporter = TooBigReporter::default();
    let msg = net.report(&mut reporter, 5, now);
    let mut pmtu = PathMtu::default();
    let elsewhere = node_prefix(&public(&net.c));
    assert_eq!(
        pmtu.screen(&msg, elsewhere, |_| true, now).unwrap_err(),
        Rejected::NotOurs
    );
    assert!(matches!(
        pmtu.screen(&msg[..100], net.a_prefix(), |_| true, now),
        Err(Rejected::Malformed(TooBigError::Length(100)))
    ));
}

#[test]
fn the_relay_signs_a_bounded_number_of_reports() {
    let net = Net::new();
    let now = Instant::now();
    let mut reporter = TooBigReporter::default();
    let packet = net.data(7, 5, 1448);
    let mut sent = 0;
    for _ in 0..100 {
        if reporter
            .report(&net.b, net.b_addr(), &packet, NARROW, now)
            .is_ok()
        {
            sent += 1;
        }
    }
    assert_eq!(sent, REPORTS_PER_SOURCE.burst, "one source's burst");
    assert_eq!(
        reporter.report(&net.b, net.b_addr(), &packet, NARROW, now),
        Err(NotReported::RateLimited)
    );
    let next = now + Duration::from_secs(1) / REPORTS_PER_SOURCE.per_second;
    assert!(
        reporter
            .report(&net.b, net.b_addr(), &packet, NARROW, next)
            .is_ok()
    );
    // Many sources together get the relay's overall budget, no more.
    let mut reporter = TooBigReporter::default();
    let mut sent = 0;
    for i in 0..1000u32 {
        let mut p = packet.clone();
        // Source i's own /64.
        p[wire::field::SRC.start + 4..wire::field::SRC.start + 8].copy_from_slice(&i.to_be_bytes());
        if reporter
            .report(&net.b, net.b_addr(), &p, NARROW, now)
            .is_ok()
        {
            sent += 1;
        }
    }
    assert_eq!(sent, REPORTS_IN_ALL.burst);
    // Only data packets that really exceed the link are reported.
    let mut reporter = TooBigReporter::default();
    let fits = net.data(7, 5, 1372);
    assert_eq!(
        reporter.report(&net.b, net.b_addr(), &fits, NARROW, now),
        Err(NotReported::Fits)
    );
    let mut control = packet.clone();
    control[wire::field::TYPE] = PacketType::Control as u8;
    assert_eq!(
        reporter.report(&net.b, net.b_addr(), &control, NARROW, now),
        Err(NotReported::NotData)
    );
    assert_eq!(
        reporter.report(&net.b, net.b_addr(), &packet[..20], NARROW, now),
        Err(NotReported::NotData)
    );
}

#[test]
fn signature_checks_fit_a_budget() {
    let net = Net::new();
    let now = Instant::now();
    let mut pmtu = PathMtu::default();
    let mut reporter = TooBigReporter::default();
    let mut checked = 0;
    for counter in 0..100 {
        let t = now + Duration::from_secs(counter);
        let msg = net.report(&mut reporter, counter, t);
        // Bad signatures, so every one that passes the cheap checks costs a check.
        let mut forged = msg.clone();
        forged[too_big::field::SIGNATURE.start] ^= 1;
        match net.receive(&mut pmtu, &forged, now) {
            Err(Rejected::BadSignature) => checked += 1,
            Err(Rejected::RateLimited) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(checked, VERIFICATIONS.burst);
}

#[test]
fn a_path_mtu_only_falls_until_it_expires() {
    let net = Net::new();
    let now = Instant::now();
    let mut reporter = TooBigReporter::default();
    let mut pmtu = PathMtu::new(Duration::from_secs(60), 16);
    let packet = |counter| net.data(7, counter, 1448);
    let report = |r: &mut TooBigReporter, counter, mtu, t| {
        r.report(&net.b, net.b_addr(), &packet(counter), mtu, t)
            .unwrap()
    };
    assert_eq!(
        net.receive(&mut pmtu, &report(&mut reporter, 1, 1420, now), now)
            .unwrap()
            .inner_mtu,
        1308
    );
    // A wider report does not raise it, a narrower one lowers it.
    let t = now + Duration::from_secs(10);
    assert_eq!(
        net.receive(&mut pmtu, &report(&mut reporter, 2, 1440, t), t)
            .unwrap()
            .inner_mtu,
        1308
    );
    assert_eq!(
        net.receive(&mut pmtu, &report(&mut reporter, 3, 1400, t), t)
            .unwrap()
            .inner_mtu,
        1288
    );
    assert_eq!(pmtu.limit(net.c_addr(), t).unwrap().inner_mtu, 1288);
    // Sixty seconds after the last lowering the full size is tried again, and a new
    // report starts from scratch.
    let t2 = t + Duration::from_secs(60);
    assert_eq!(
        pmtu.limit(net.c_addr(), t2 - Duration::from_millis(1))
            .unwrap()
            .inner_mtu,
        1288
    );
    assert_eq!(pmtu.limit(net.c_addr(), t2), None);
    assert_eq!(
        net.receive(&mut pmtu, &report(&mut reporter, 4, 1440, t2), t2)
            .unwrap()
            .inner_mtu,
        1328
    );
}

#[test]
fn the_table_is_bounded() {
    let net = Net::new();
    let now = Instant::now();
    let mut pmtu = PathMtu::new(Duration::from_secs(60), 4);
    let mut reporter = TooBigReporter::default();
    for i in 0..10u32 {
        let t = now + Duration::from_secs(u64::from(i));
        let mut p = net.data(7, 1, 1448);
        // Destination i's own /64.
        p[wire::field::DST.start + 4..wire::field::DST.start + 8].copy_from_slice(&i.to_be_bytes());
        let msg = reporter
            .report(&net.b, net.b_addr(), &p, NARROW, t)
            .unwrap();
        let screened = pmtu.screen(&msg, net.a_prefix(), |_| true, t).unwrap();
        pmtu.commit(screened.verify(Some(&public(&net.b))).unwrap(), t);
        assert!(pmtu.len() <= 4);
    }
    assert_eq!(pmtu.len(), 4);
}

#[test]
fn the_egress_mtu_is_asked_once_a_second() {
    let mut mtus = EgressMtus::default();
    let now = Instant::now();
    let mut asked = 0;
    for ms in [0, 10, 999] {
        let t = now + Duration::from_millis(ms);
        let got = mtus.get(1u8, t, || {
            asked += 1;
            Some(1420)
        });
        assert_eq!(got, Some(1420));
    }
    assert_eq!(asked, 1);
    let got = mtus.get(1u8, now + Duration::from_secs(1), || {
        asked += 1;
        Some(1500)
    });
    assert_eq!((got, asked), (Some(1500), 2));
    assert_eq!(mtus.get(2u8, now, || None), None, "unknown stays unknown");
    // Alternating next hops are answered from the table, each asked once.
    let t = now + Duration::from_millis(1500);
    for hop in [3u8, 4, 3, 4, 3] {
        mtus.get(hop, t, || {
            asked += 1;
            Some(1280 + u32::from(hop))
        });
    }
    assert_eq!(asked, 4);
    assert_eq!(mtus.get(4u8, t, || None), Some(1284));
    assert_eq!(mtus.get(3u8, t, || None), Some(1283));
}

// --- ICMPv6 Packet Too Big -------------------------------------------------------------

/// An IPv6 packet of `len` bytes from `src` to `dst` carrying `next_header`.
fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len).map(|i| i as u8).collect();
    p[0] = 0x60;
    p[1..4].copy_from_slice(&[0, 0, 0]);
    p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    p[6] = next_header;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p
}

#[test]
fn the_packet_too_big_is_what_rfc_4443_and_the_kernel_want() {
    let app: Ipv6Addr = "fd6d:a::1".parse().unwrap();
    let peer: Ipv6Addr = "fd6d:c::5".parse().unwrap();
    let relay: Ipv6Addr = "fd6d:b::1".parse().unwrap();
    let offending = ipv6(app, peer, 17, 1388);
    let ptb = packet_too_big(&offending, 1308, relay).expect("a message");
    // At most the IPv6 minimum MTU, quoting as much of the packet as fits.
    assert_eq!(ptb.len(), 1280);
    assert_eq!(ptb[0] >> 4, 6);
    assert_eq!(&ptb[1..4], &[0, 0, 0]);
    assert_eq!(u16::from_be_bytes([ptb[4], ptb[5]]), 1240, "payload length");
    assert_eq!(ptb[6], 58, "ICMPv6");
    assert_eq!(&ptb[8..24], &relay.octets(), "from the reporting relay");
    assert_eq!(&ptb[24..40], &app.octets(), "to the application's address");
    assert_eq!((ptb[40], ptb[41]), (2, 0), "Packet Too Big, code 0");
    assert_eq!(&ptb[44..48], &1308u32.to_be_bytes());
    assert_eq!(&ptb[48..], &offending[..1232], "the quote");
    // The checksum verifies: the pseudo-header and message sum to all ones.
    let len = (ptb.len() - 40) as u32;
    let sum = checksum::sum_bytes(&ptb[8..24])
        + checksum::sum_bytes(&ptb[24..40])
        + (len >> 16)
        + (len & 0xffff)
        + 58
        + checksum::sum_bytes(&ptb[40..]);
    assert_eq!(checksum::fold(sum), 0xffff);

    // A packet that fits in the message is quoted whole.
    let short = ipv6(app, peer, 6, 1232);
    let ptb = packet_too_big(&short, 1280, relay).unwrap();
    assert_eq!(ptb.len(), 48 + 1232);
    assert_eq!(&ptb[48..], &short[..]);
}

#[test]
fn only_packets_the_kernel_can_tie_to_a_flow_are_answered() {
    let app: Ipv6Addr = "fd6d:a::1".parse().unwrap();
    let peer: Ipv6Addr = "fd6d:c::5".parse().unwrap();
    let relay: Ipv6Addr = "fd6d:b::1".parse().unwrap();
    // A first fragment is answered, a later one is not.
    let mut first = ipv6(app, peer, 44, 1384);
    first[40] = 58;
    first[42..44].copy_from_slice(&1u16.to_be_bytes()); // offset 0, more fragments
    assert!(packet_too_big(&first, 1308, relay).is_some());
    let mut later = first.clone();
    later[42..44].copy_from_slice(&((1336u16) | 1).to_be_bytes());
    assert_eq!(packet_too_big(&later, 1308, relay), None);
    assert_eq!(packet_too_big(&first[..41], 1308, relay), None);
    // Below the minimum the kernel would ignore it.
    assert_eq!(packet_too_big(&first, 1279, relay), None);
    // Not IPv6, or a source nobody can be answered at.
    let mut v4 = first.clone();
    v4[0] = 0x45;
    assert_eq!(packet_too_big(&v4, 1308, relay), None);
    assert_eq!(
        packet_too_big(&ipv6(Ipv6Addr::UNSPECIFIED, peer, 17, 1400), 1308, relay),
        None
    );
    assert_eq!(
        packet_too_big(
            &ipv6("ff02::1".parse().unwrap(), peer, 17, 1400),
            1308,
            relay
        ),
        None
    );
    assert_eq!(packet_too_big(&first[..39], 1308, relay), None);
}

#[test]
fn ptbs_are_rate_limited_per_destination() {
    let mut pmtu = PathMtu::default();
    let now = Instant::now();
    let c: Ipv6Addr = "fd6d:c::5".parse().unwrap();
    let d: Ipv6Addr = "fd6d:d::5".parse().unwrap();
    let n = (0..100).filter(|_| pmtu.allow_ptb(c, now)).count();
    assert_eq!(n, PTB_PER_DESTINATION.burst as usize);
    assert!(pmtu.allow_ptb(d, now), "another destination has its own");
}
