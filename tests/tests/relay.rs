//! Proof in a real topology: Myconet data packets from a reach c through b, relayed by
//! b's XDP program without ever reaching b's agent, and arrive intact.
//!
//! Runs as root (CI is root): three network namespaces, three agents, real veth links.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, ensure};
use myconet_common::wire::{HEADER_LEN, field};
use myconet_testbed::{
    agent::{bin_dir, counter},
    scenario::{PORT, RelayChain, SENDER_PORT},
    traffic::Capture,
};

const N: u64 = 2000;

#[test]
fn xdp_relays_a_to_c_through_b() -> Result<()> {
    let chain = RelayChain::start(&bin_dir()?, "driver")?;
    let (b, c) = (&chain.agents[1], &chain.agents[2]);
    for agent in &chain.agents {
        let status = agent.status()?;
        let ifaces = status["interfaces"].as_array().context("interfaces")?;
        ensure!(!ifaces.is_empty(), "{}: XDP not attached", agent.ns_name());
        for i in ifaces {
            ensure!(i["xdp_mode"] == "driver", "{}: {i}", agent.ns_name());
        }
    }
    chain.assert_routes_in_sync()?;

    let b_before = b.stats()?;
    let c_before = c.stats()?;
    let capture = Capture::udp_port(chain.topo.node(2).netns(), &chain.c_ingress()?, PORT)?;

    let datagrams = chain.default_datagrams(N);
    let sent = chain.send_paced(&datagrams, &capture)?;
    ensure!(sent.packets == N, "sender sent {} of {N}", sent.packets);

    ensure!(
        capture.wait_for(N as usize, Duration::from_secs(20)),
        "c captured {} of {N} frames\n{}",
        capture.count(),
        chain.loss_report()
    );
    let frames = capture.stop()?;

    // c received every packet intact: same Myconet header but the hop limit (one
    // relay: 64 → 63), same payload, a valid UDP checksum, from b's underlay endpoint.
    let b_towards_c = chain.topo.node(1).addr_to(2)?;
    let c_towards_b = chain.topo.node(2).addr_to(1)?;
    let mut by_counter = BTreeMap::new();
    for f in frames.iter().filter(|f| !f.outgoing) {
        let p = f.parse()?;
        ensure!(p.checksum_valid(), "bad UDP checksum on a relayed frame");
        ensure!(
            p.ip_src == b_towards_c && p.ip_dst == c_towards_b,
            "outer addresses {p:?}"
        );
        ensure!(
            p.sport == PORT && p.dport == PORT,
            "ports {} → {}",
            p.sport,
            p.dport
        );
        let repr = p.repr()?;
        by_counter.insert(repr.counter, p.udp_payload().to_vec());
    }
    ensure!(
        by_counter.len() == N as usize,
        "c saw {} distinct packets of {N}",
        by_counter.len()
    );
    for (i, sent) in datagrams.iter().enumerate() {
        let got = by_counter
            .get(&(i as u64))
            .with_context(|| format!("packet {i} missing"))?;
        ensure!(
            got.len() == sent.len(),
            "packet {i}: length {} != {}",
            got.len(),
            sent.len()
        );
        ensure!(
            got[field::HOP_LIMIT] == sent[field::HOP_LIMIT] - 1,
            "packet {i}: hop limit"
        );
        let mut expect = sent.clone();
        expect[field::HOP_LIMIT] -= 1;
        ensure!(
            got[..HEADER_LEN] == expect[..HEADER_LEN],
            "packet {i}: header changed"
        );
        ensure!(
            got[HEADER_LEN..] == expect[HEADER_LEN..],
            "packet {i}: payload changed"
        );
    }

    // c's kernel accepted every one (it verifies the UDP checksum) and handed it to c's
    // agent. These test packets are not sealed by a session, so the agent then refuses
    // them as unknown-session traffic: relaying is all this test is about.
    let delta = |after: &serde_json::Value, before: &serde_json::Value, sec: &str, name: &str| {
        Ok::<_, anyhow::Error>(counter(after, sec, name)? - counter(before, sec, name)?)
    };
    let c_after = chain.wait_stats(2, Duration::from_secs(10), |s| {
        Ok(delta(s, &c_before, "agent", "rx_data")? >= N)
    })?;
    ensure!(
        delta(&c_after, &c_before, "agent", "rx_data")? == N,
        "c's agent: {c_after}"
    );
    ensure!(
        delta(&c_after, &c_before, "agent", "rx_unknown_session")? == N,
        "unsealed packets must be refused, not delivered: {c_after}"
    );
    ensure!(
        delta(&c_after, &c_before, "xdp", "pass_local")? == N,
        "c's XDP: {c_after}"
    );

    // b relayed every one in the kernel (in on the link to a, out on the link to c: a
    // DEVMAP redirect) and its agent saw none of them.
    let b_after = b.stats()?;
    ensure!(
        delta(&b_after, &b_before, "xdp", "redirect")? == N,
        "b's XDP: {b_after}"
    );
    ensure!(
        delta(&b_after, &b_before, "agent", "rx_data")? == 0,
        "b's agent got data: {b_after}"
    );
    for drop in [
        "drop_malformed",
        "drop_no_route",
        "drop_hop_limit",
        "drop_unknown_peer",
    ] {
        ensure!(
            delta(&b_after, &b_before, "xdp", drop)? == 0,
            "b dropped ({drop}): {b_after}"
        );
    }
    Ok(())
}

#[test]
fn relay_refuses_strangers_and_expired_packets() -> Result<()> {
    let chain = RelayChain::start(&bin_dir()?, "auto")?;
    let b = &chain.agents[1];
    let before = b.stats()?;

    // Same traffic from a port b does not know as a peer: dropped, counted, not relayed.
    let stranger = chain.sender(SENDER_PORT + 1)?;
    stranger.send_datagrams(&chain.default_datagrams(50))?;
    // Hop limit 1 from the real peer: would reach zero at b.
    chain
        .sender(SENDER_PORT)?
        .send_datagrams(&chain.datagrams(30, 1))?;

    let after = chain.wait_stats(1, Duration::from_secs(10), |s| {
        Ok(counter(s, "xdp", "drop_unknown_peer")?
            >= counter(&before, "xdp", "drop_unknown_peer")? + 50
            && counter(s, "xdp", "drop_hop_limit")?
                >= counter(&before, "xdp", "drop_hop_limit")? + 30)
    })?;
    let d = |name: &str| {
        Ok::<_, anyhow::Error>(counter(&after, "xdp", name)? - counter(&before, "xdp", name)?)
    };
    ensure!(d("drop_unknown_peer")? == 50, "{after}");
    ensure!(d("drop_hop_limit")? == 30, "{after}");
    ensure!(
        d("redirect")? == 0 && d("tx")? == 0,
        "nothing may be relayed: {after}"
    );
    ensure!(
        counter(&after, "agent", "rx_data")? == 0,
        "b's agent got data: {after}"
    );

    // Removing the route makes b drop for lack of one; the kernel map follows the agent.
    b.ctl(&["route", "del", &chain.c_prefix])?;
    chain.assert_routes_in_sync()?;
    let before = b.stats()?;
    chain
        .sender(SENDER_PORT)?
        .send_datagrams(&chain.default_datagrams(20))?;
    let after = chain.wait_stats(1, Duration::from_secs(10), |s| {
        Ok(counter(s, "xdp", "drop_no_route")? >= counter(&before, "xdp", "drop_no_route")? + 20)
    })?;
    ensure!(
        counter(&after, "xdp", "drop_no_route")? - counter(&before, "xdp", "drop_no_route")? == 20,
        "{after}"
    );
    Ok(())
}

/// A neighbour cannot make a relay pass on handshakes without bound: every one goes up
/// to b's agent (XDP passes them after its peer and route checks), which relays at most
/// `RELAY_HANDSHAKE_LIMIT` (a burst of 256, then 128 per second) per neighbour and
/// counts the rest. Every packet is accounted for, and c sees exactly what b relayed.
#[test]
fn relay_limits_the_handshakes_one_neighbour_hands_it() -> Result<()> {
    use myconet_agent::underlay::RELAY_HANDSHAKE_LIMIT;
    use myconet_common::wire::{PacketType, Repr};
    use myconet_testbed::{packet, traffic::CaptureOptions};

    const SENT: u64 = 1000;
    let chain = RelayChain::start(&bin_dir()?, "auto")?;
    let b = &chain.agents[1];
    let before = b.stats()?;
    let capture = Capture::start(
        chain.topo.node(2).netns(),
        &chain.c_ingress()?,
        CaptureOptions {
            udp_dst_port: Some(PORT),
            ..CaptureOptions::default()
        },
    )?;
    // Handshake-typed datagrams for c from a's authenticated endpoint: b cannot tell
    // them from real inits without c's keys, and must not need to.
    let inits: Vec<Vec<u8>> = (0..SENT)
        .map(|i| {
            let repr = Repr {
                packet_type: PacketType::HandshakeInit,
                hop_limit: 64,
                flags: 0,
                session_id: 0,
                counter: i,
                dst_addr: chain.c_overlay,
                src_addr: chain.a_overlay,
            };
            // Growing sizes: c's receive GRO never merges a datagram into a smaller
            // one's run, so its capture sees every datagram as a frame of its own.
            packet::datagram(&repr, &vec![0x5a; 100 + i as usize])
        })
        .collect();
    let start = std::time::Instant::now();
    chain.sender(SENDER_PORT)?.send_datagrams(&inits)?;
    let d = |s: &serde_json::Value, name: &str| {
        Ok::<_, anyhow::Error>(counter(s, "agent", name)? - counter(&before, "agent", name)?)
    };
    let after = chain.wait_stats(1, Duration::from_secs(20), |s| {
        Ok(d(s, "rx_handshake_relayed")? + d(s, "rx_handshake_relay_limited")? >= SENT)
    })?;
    let elapsed = start.elapsed();
    let relayed = d(&after, "rx_handshake_relayed")?;
    let limited = d(&after, "rx_handshake_relay_limited")?;
    ensure!(relayed + limited == SENT, "not all accounted for: {after}");
    let burst = u64::from(RELAY_HANDSHAKE_LIMIT.burst);
    let rate = u64::from(RELAY_HANDSHAKE_LIMIT.per_second);
    // At least the burst; at most the burst plus what the rate refilled meanwhile.
    let most = burst + rate * (elapsed.as_millis() as u64 / 1000 + 1);
    ensure!(
        relayed >= burst && relayed <= most,
        "relayed {relayed} (burst {burst}, at most {most} in {elapsed:?}): {after}"
    );
    ensure!(limited > 0, "nothing was limited: {after}");
    // c receives exactly what b relayed (and b relayed only these).
    ensure!(
        capture.wait_for(relayed as usize, Duration::from_secs(10)),
        "c captured {} of {relayed}\n{}",
        capture.count(),
        chain.loss_report()
    );
    std::thread::sleep(Duration::from_millis(200));
    let frames = capture.stop()?;
    let handshakes = frames
        .iter()
        .filter(|f| {
            f.parse().ok().and_then(|p| p.repr().ok()).is_some_and(|r| {
                r.packet_type == PacketType::HandshakeInit
                    && r.src_addr == chain.a_overlay
                    && r.dst_addr == chain.c_overlay
            })
        })
        .count() as u64;
    ensure!(
        handshakes == relayed,
        "c saw {handshakes}, b relayed {relayed}"
    );
    Ok(())
}
