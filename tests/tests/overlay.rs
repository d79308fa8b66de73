//! Proof of the encrypted overlay: unmodified applications on a and c (ping, a TCP
//! transfer) talk over their overlay addresses through relay b, which can read nothing
//! but the cleartext Myconet header; forged and replayed packets are dropped and counted
//! while the session survives. Runs with b relaying in XDP and on the userspace path.
//!
//! Runs as root (CI is root): three namespaces, three agents, TUN devices, real veths.

use std::{
    io::{Read, Write},
    net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use myconet_common::wire::PacketType;
use myconet_testbed::{
    agent::{bin_dir, counter},
    scenario::{OverlayChain, PORT},
    traffic::{Capture, CaptureOptions, Direction, bind_udp},
};

/// A marker that appears many times in the TCP stream from a; it must never be seen on
/// b's wire.
const MARKER: &[u8] = b"MYCONET-PLAINTEXT-MARKER-7f3a";
const TCP_BYTES: usize = 4 << 20;
const TCP_PORT: u16 = 5201;

fn payload() -> Vec<u8> {
    let mut data = Vec::with_capacity(TCP_BYTES);
    let mut i: u32 = 0;
    while data.len() < TCP_BYTES {
        data.extend_from_slice(MARKER);
        data.extend_from_slice(&i.to_be_bytes());
        i = i.wrapping_add(1);
    }
    data.truncate(TCP_BYTES);
    data
}

fn ping(chain: &OverlayChain, count: u32) -> Result<()> {
    let target = chain.c_overlay.to_string();
    let count = count.to_string();
    chain
        .topo
        .node(0)
        .netns()
        .exec(
            "ping",
            ["-6", "-n", "-c", &count, "-i", "0.2", "-W", "3", &target],
        )
        .map(|_| ())
        .context("ping a → c over the overlay")
}

/// Sends `data` from a to c over TCP between the overlay addresses and returns what c
/// received.
fn tcp_transfer(chain: &OverlayChain, data: &[u8]) -> Result<Vec<u8>> {
    let c_addr = SocketAddr::V6(SocketAddrV6::new(chain.c_overlay, TCP_PORT, 0, 0));
    let listener = chain
        .topo
        .node(2)
        .netns()
        .run_in(|| TcpListener::bind(c_addr))??;
    std::thread::scope(|s| {
        let server = s.spawn(move || -> Result<Vec<u8>> {
            let (mut conn, _) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut got = Vec::new();
            conn.read_to_end(&mut got)?;
            Ok(got)
        });
        chain.topo.node(0).netns().run_in(|| -> Result<()> {
            let mut conn = TcpStream::connect_timeout(&c_addr, Duration::from_secs(10))?;
            conn.set_write_timeout(Some(Duration::from_secs(20)))?;
            conn.write_all(data)?;
            conn.shutdown(std::net::Shutdown::Write)?;
            Ok(())
        })??;
        server
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))?
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn overlay_through(relay_dataplane: &str) -> Result<()> {
    let chain = OverlayChain::start(&bin_dir()?, relay_dataplane)?;
    // Capture everything on both of b's links while the applications talk. Frames b
    // relays in XDP never reach packet taps on b itself (XDP runs before them on ingress
    // and redirects skip them on egress), so each link is also tapped at its far end on a
    // and c: together that is every frame on b's wires. `taps[2 * l]` and
    // `taps[2 * l + 1]` are the two ends of b's link `l`.
    let b = chain.topo.node(1);
    let mut taps = Vec::new();
    for iface in b.ifaces() {
        taps.push((b, iface.name.clone()));
        let far = chain.topo.node(iface.peer);
        taps.push((far, far.iface_to(1)?.name.clone()));
    }
    let captures = taps
        .iter()
        .map(|(node, ifname)| {
            Capture::start(
                node.netns(),
                ifname,
                CaptureOptions {
                    udp_dst_port: None,
                    direction: Direction::Any,
                    max_frames: 200_000,
                    max_duration: Duration::from_secs(60),
                },
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let b_before = chain.agents[1].stats()?;
    let ends_before = [chain.agents[0].stats()?, chain.agents[2].stats()?];
    let counts_before = chain.relay_counts()?;

    ping(&chain, 3)?;
    let data = payload();
    let got = tcp_transfer(&chain, &data)?;
    ensure!(
        got.len() == data.len(),
        "c received {} of {} bytes",
        got.len(),
        data.len()
    );
    ensure!(got == data, "the bytes c received differ from what a sent");
    // Every packet a and c opened reached their TUN devices, and every one they read
    // was sent: TCP's retransmissions would hide a lost write from the byte check.
    for (name, before, agent) in [
        ("a", &ends_before[0], &chain.agents[0]),
        ("c", &ends_before[1], &chain.agents[2]),
    ] {
        let after = agent.stats()?;
        for stat in ["tx_error", "tun_dropped", "rx_inner_invalid"] {
            let n = counter(&after, "agent", stat)? - counter(before, "agent", stat)?;
            ensure!(
                n == 0,
                "{name} counted {n} {stat} during the transfer: {after}"
            );
        }
    }
    // What the kernel itself sends into the TUN device for destinations outside the
    // overlay (here echo requests to all nodes on the link) is counted apart, as not
    // the overlay's, and is no loss.
    let a_before = chain.agents[0].stats()?;
    let tun = format!("ff02::1%{}", myconet_agent::os::tun::DEFAULT_NAME);
    // No answer comes back over a TUN device; only the sends matter.
    let _ = chain.topo.node(0).netns().exec(
        "ping",
        ["-6", "-n", "-c", "2", "-i", "0.2", "-W", "1", tun.as_str()],
    );
    let mut seen = 0;
    for _ in 0..50 {
        let a_after = chain.agents[0].stats()?;
        seen = counter(&a_after, "agent", "tun_not_overlay")?
            - counter(&a_before, "agent", "tun_not_overlay")?;
        ensure!(
            counter(&a_after, "agent", "tun_dropped")?
                == counter(&a_before, "agent", "tun_dropped")?,
            "a link-scoped packet counted as an overlay drop: {a_after}"
        );
        if seen >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        seen >= 2,
        "a's agent counted {seen} of 2 echo requests to ff02::1 as tun_not_overlay"
    );

    // b saw the traffic, and never the plaintext: every frame on its wires, whatever
    // its port, and none lost by the captures (kernel drops or the frame limit fail
    // `stop_complete`). Each link carried the whole a → c transfer: the Myconet data
    // a sent to c seen there (each datagram once, though both ends may see it) is at
    // least the bytes sent, since it holds them plus headers and tags.
    let mut frames = 0;
    let mut a_to_c: [std::collections::BTreeMap<(u32, u64), usize>; 2] = Default::default();
    for (i, cap) in captures.into_iter().enumerate() {
        for f in cap.stop_complete()? {
            frames += 1;
            ensure!(!contains(&f.data, MARKER), "plaintext visible on b's wire");
            ensure!(
                !contains(&f.data, b"MYCONET-PLAINTEXT"),
                "plaintext prefix visible on b"
            );
            let Ok(p) = f.parse() else { continue };
            let Ok(repr) = p.repr() else { continue };
            if p.dport == PORT
                && repr.packet_type == PacketType::Data
                && repr.dst_addr == chain.c_overlay
            {
                a_to_c[i / 2].insert((repr.session_id, repr.counter), p.myconet_payload().len());
            }
        }
    }
    for (link, seen) in a_to_c.iter().enumerate() {
        let bytes: usize = seen.values().sum();
        ensure!(
            bytes >= data.len(),
            "b's link {link} shows {bytes} bytes of a → c data in {} datagrams, less than \
             the {} bytes a sent",
            seen.len(),
            data.len()
        );
    }
    ensure!(frames > 1000, "b's captures saw only {frames} frames");

    // b's relay counters account for exactly the data a and c received (see
    // RelayCounts: they share no link, so all of it crossed b).
    let counts = chain.settled_relay_counts(&counts_before, Duration::from_secs(10))?;
    let b_after = chain.agents[1].stats()?;
    eprintln!("{relay_dataplane}: {counts:?}");
    ensure!(
        counts.balanced(),
        "b relayed {} data packets ({} in XDP, {} in its agent), a and c received {} + {}, \
         named losses {}: {counts:?}\n{b_after}",
        counts.b_relayed(),
        counts.b_xdp_relayed,
        counts.b_agent_relayed,
        counts.a_rx_data,
        counts.c_rx_data,
        counts.named_losses
    );
    // 4 MiB over a 1,388-byte overlay MTU alone is more than 3,000 packets a → c.
    ensure!(
        counts.c_rx_data > 2000,
        "c received only {} data packets",
        counts.c_rx_data
    );
    let d = |sec: &str, name: &str| -> Result<u64> {
        Ok(counter(&b_after, sec, name)? - counter(&b_before, sec, name)?)
    };
    match relay_dataplane {
        "xdp" => {
            // What XDP passed up (first packets before a neighbour resolved) is exactly
            // what reached b's agent, and the agent relayed all of it.
            ensure!(
                counts.b_rx_data == counts.b_xdp_passed_up
                    && counts.b_agent_relayed == counts.b_rx_data,
                "b's agent relayed {} of {} data packets; XDP passed up {}: {b_after}",
                counts.b_agent_relayed,
                counts.b_rx_data,
                counts.b_xdp_passed_up
            );
            for drop in ["drop_unknown_peer", "drop_no_route", "drop_hop_limit"] {
                ensure!(d("xdp", drop)? == 0, "b's XDP dropped ({drop}): {b_after}");
            }
            // And XDP, not the agent, carried the traffic: at least 99 % of what a and c
            // received was relayed in the kernel (the rest: first packets passed up
            // while a neighbour entry resolved).
            let received = counts.a_rx_data + counts.c_rx_data;
            ensure!(
                counts.b_xdp_relayed * 100 >= received * 99,
                "b's XDP relayed only {} of the {received} data packets a and c received \
                 ({} by its agent): {b_after}",
                counts.b_xdp_relayed,
                counts.b_agent_relayed
            );
        }
        _ => {
            ensure!(
                b_after["xdp"].as_array().is_none_or(Vec::is_empty),
                "XDP attached"
            );
            ensure!(
                counts.b_xdp_relayed == 0 && counts.b_agent_relayed == counts.b_rx_data,
                "b's agent relayed {} of {} data packets: {b_after}",
                counts.b_agent_relayed,
                counts.b_rx_data
            );
        }
    }
    for drop in [
        "rx_data_unknown_peer",
        "rx_data_no_route",
        "rx_data_hop_limit",
        "rx_malformed",
    ] {
        ensure!(d("agent", drop)? == 0, "b dropped data ({drop}): {b_after}");
    }
    ensure!(
        d("agent", "rx_handshake_relayed")? >= 2,
        "handshake not relayed: {b_after}"
    );
    Ok(())
}

#[test]
fn applications_talk_through_an_xdp_relay() -> Result<()> {
    overlay_through("xdp")
}

#[test]
fn applications_talk_through_a_userspace_relay() -> Result<()> {
    overlay_through("userspace")
}

#[test]
fn forged_and_replayed_packets_are_dropped_and_the_session_survives() -> Result<()> {
    let chain = OverlayChain::start(&bin_dir()?, "xdp")?;
    let c = chain.topo.node(2);
    // Establish the session and keep one genuine data frame as c received it.
    let capture = Capture::udp_port(c.netns(), &c.iface_to(1)?.name, PORT)?;
    ping(&chain, 2)?;
    let frames = capture.stop()?;
    let genuine = frames
        .iter()
        .filter_map(|f| f.parse().ok())
        .find(|p| {
            p.repr()
                .is_ok_and(|r| r.packet_type == myconet_common::wire::PacketType::Data)
        })
        .context("no data frame captured at c")?;
    let datagram = genuine.udp_payload().to_vec();

    let before = chain.agents[2].stats()?;
    // Send from b's address on the link to c: an on-path attacker's position.
    let attacker = bind_udp(
        chain.topo.node(1).netns(),
        SocketAddr::V6(SocketAddrV6::new(chain.topo.node(1).addr_to(2)?, 0, 0, 0)),
    )?;
    let to = SocketAddr::V6(SocketAddrV6::new(c.addr_to(1)?, PORT, 0, 0));
    // 1. Replay of a genuine packet.
    attacker.send_to(&datagram, to)?;
    // 2. The same packet with one ciphertext byte flipped (bad tag).
    let mut tampered = datagram.clone();
    let last = tampered.len() - 1;
    tampered[last - 20] ^= 0x01;
    attacker.send_to(&tampered, to)?;
    // 3. A header field flipped (authenticated as associated data).
    let mut bad_header = datagram.clone();
    bad_header[myconet_common::wire::field::FLAGS] ^= 0x80;
    attacker.send_to(&bad_header, to)?;
    // 4. A session id nobody has.
    let mut wrong_session = datagram.clone();
    wrong_session[4..8].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
    attacker.send_to(&wrong_session, to)?;
    // 5. Garbage.
    attacker.send_to(&[0xff; 7], to)?;

    let d = |after: &serde_json::Value, name: &str| -> Result<u64> {
        Ok(counter(after, "agent", name)? - counter(&before, "agent", name)?)
    };
    let mut after = chain.agents[2].stats()?;
    for _ in 0..100 {
        if d(&after, "rx_open_failed")? >= 3 && d(&after, "rx_unknown_session")? >= 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        after = chain.agents[2].stats()?;
    }
    ensure!(
        d(&after, "rx_open_failed")? == 3,
        "replay/tag/header: {after}"
    );
    ensure!(
        d(&after, "rx_unknown_session")? == 1,
        "wrong session: {after}"
    );
    ensure!(
        counter(&after, "xdp", "drop_malformed")? > counter(&before, "xdp", "drop_malformed")?,
        "garbage to the Myconet port must be a counted drop: {after}"
    );
    ensure!(
        d(&after, "rx_data_local")? == 0,
        "a forged packet was delivered: {after}"
    );

    // The session survives: traffic still flows both ways.
    ping(&chain, 2)?;
    let _: Ipv6Addr = chain.a_overlay;
    Ok(())
}
