//! Issue 12, defect 6: packets that fit the sender's TUN device but not a narrower link
//! further along the path. Chain a — b — c with the b — c link at MTU 1420 and a's
//! underlay at 1500, so a's TUN MTU is 1388 and c's 1308: TCP works (the MSS follows
//! c's MTU), but a large ping or UDP datagram from a leaves a's agent as 1,448-byte
//! Myconet datagrams that b cannot send on. The relay must answer with an
//! authenticated "too big", a's agent must turn it into an ICMPv6 Packet Too Big its
//! kernel applies, and the application's next packets must arrive: for pings (the
//! ICMPv6 error handler) and for UDP (the UDP socket's), with b relaying in XDP and on
//! the userspace path.
//!
//! Runs as root (CI is root): three namespaces, three agents, TUN devices, real veths.

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use myconet_testbed::{
    Topology,
    agent::{bin_dir, counter},
    scenario::OverlayChain,
    topology::Chain,
    traffic::bind_udp,
    util,
};
use serde_json::Value;

/// MTU of the b — c link (a tunnel-sized link in the middle of the path).
const NARROW_MTU: u32 = 1420;
/// Payload of the large pings and UDP datagrams: fragmented by a's kernel, each
/// fragment filling a's TUN MTU.
const LARGE: usize = 3000;
/// Tries for the first large packet to get through: the first ones are lost while the
/// "too big" travels back and a's kernel learns the path MTU (typically two).
const WARM_UP_TRIES: usize = 12;
/// Large packets sent once the path works; nearly all must arrive.
const STEADY: usize = 10;
const UDP_PORT: u16 = 5300;

/// a — b — c with the b — c link narrowed to [`NARROW_MTU`] on both ends, before any
/// agent starts (each derives its TUN MTU from its links).
fn narrow_chain(relay_dataplane: &str) -> Result<OverlayChain> {
    let topo = Chain::new(3).tag("mtu").build()?;
    let mtu = NARROW_MTU.to_string();
    for (node, peer) in [(1, 2), (2, 1)] {
        let n = topo.node(node);
        let ifname = n.iface_to(peer)?.name.clone();
        n.netns()
            .ip(["link", "set", "dev", &ifname, "mtu", &mtu])
            .with_context(|| format!("narrowing {ifname} on {}", n.name()))?;
    }
    OverlayChain::start_on(topo, &bin_dir()?, &["--dataplane", relay_dataplane])
}

/// The MTU of interface `ifname` in node `node`'s namespace.
fn link_mtu(topo: &Topology, node: usize, ifname: &str) -> Result<u64> {
    let out = topo
        .node(node)
        .netns()
        .ip(["-j", "link", "show", "dev", ifname])?;
    let link: Value = serde_json::from_slice(&out.stdout).context("ip -j link")?;
    link[0]["mtu"]
        .as_u64()
        .with_context(|| format!("no mtu for {ifname}: {link}"))
}

/// Sends one echo request with `size` bytes of payload from a to c; whether the reply
/// came back within a second.
fn ping_once(chain: &OverlayChain, size: usize) -> Result<bool> {
    let target = chain.c_overlay.to_string();
    let size = size.to_string();
    let mut cmd = chain.topo.node(0).netns().command("ping");
    cmd.args(["-6", "-n", "-c", "1", "-W", "1", "-s", &size, &target]);
    let out = util::run_with_timeout(&mut cmd, Duration::from_secs(10))?;
    Ok(out.status.success())
}

/// Sends large pings until two in a row are answered (at most [`WARM_UP_TRIES`]), then
/// [`STEADY`] more; returns (tries before the two, replies of the steady ones).
fn large_pings(chain: &OverlayChain) -> Result<(usize, usize)> {
    let mut in_a_row = 0;
    let mut tries = 0;
    while in_a_row < 2 {
        ensure!(
            tries < WARM_UP_TRIES,
            "{tries} pings of {LARGE} bytes a → c: never two replies in a row"
        );
        tries += 1;
        in_a_row = if ping_once(chain, LARGE)? {
            in_a_row + 1
        } else {
            0
        };
    }
    let mut replies = 0;
    for _ in 0..STEADY {
        replies += usize::from(ping_once(chain, LARGE)?);
    }
    Ok((tries, replies))
}

/// A datagram of [`LARGE`] bytes numbered `n`.
fn datagram(n: usize) -> Vec<u8> {
    let mut d = vec![0u8; LARGE];
    for (i, b) in d.iter_mut().enumerate() {
        *b = (i as u8) ^ (n as u8);
    }
    d[..8].copy_from_slice(&(n as u64).to_be_bytes());
    d
}

/// Whether datagram `n` reaches c within half a second.
fn udp_once(tx: &UdpSocket, rx: &UdpSocket, to: SocketAddr, n: usize) -> Result<bool> {
    let sent = datagram(n);
    tx.send_to(&sent, to)?;
    let mut buf = vec![0u8; 65536];
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    while std::time::Instant::now() < deadline {
        match rx.recv_from(&mut buf) {
            // An earlier datagram that came late is not this one.
            Ok((len, _)) if buf[..len] == sent[..] => return Ok(true),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

/// Large UDP datagrams a → `dst` (an address of c): until two in a row arrive intact,
/// then [`STEADY`] more; returns (tries before the two, arrivals of the steady ones).
fn large_udp(chain: &OverlayChain, dst: Ipv6Addr) -> Result<(usize, usize)> {
    let to = SocketAddr::V6(SocketAddrV6::new(dst, UDP_PORT, 0, 0));
    let rx = bind_udp(chain.topo.node(2).netns(), to)?;
    rx.set_read_timeout(Some(Duration::from_millis(100)))?;
    let from = SocketAddr::V6(SocketAddrV6::new(chain.a_overlay, 0, 0, 0));
    let tx = bind_udp(chain.topo.node(0).netns(), from)?;
    let mut n = 0;
    let mut in_a_row = 0;
    while in_a_row < 2 {
        ensure!(
            n < WARM_UP_TRIES,
            "{n} UDP datagrams of {LARGE} bytes a → c: never two in a row arrived"
        );
        n += 1;
        in_a_row = if udp_once(&tx, &rx, to, n)? {
            in_a_row + 1
        } else {
            0
        };
    }
    let tries = n;
    let mut arrived = 0;
    for _ in 0..STEADY {
        n += 1;
        arrived += usize::from(udp_once(&tx, &rx, to, n)?);
    }
    Ok((tries, arrived))
}

fn delta(after: &Value, before: &Value, section: &str, name: &str) -> Result<u64> {
    Ok(counter(after, section, name)?.saturating_sub(counter(before, section, name)?))
}

fn large_packets_cross_a_narrower_link(relay_dataplane: &str) -> Result<()> {
    let chain = narrow_chain(relay_dataplane)?;
    let tun = myconet_agent::os::tun::DEFAULT_NAME;
    ensure!(
        link_mtu(&chain.topo, 0, tun)? == 1388 && link_mtu(&chain.topo, 2, tun)? == 1308,
        "TUN MTUs: a {}, c {} (expected 1388 and 1308)",
        link_mtu(&chain.topo, 0, tun)?,
        link_mtu(&chain.topo, 2, tun)?
    );
    // The path works for packets that fit everywhere.
    chain
        .topo
        .node(0)
        .netns()
        .exec(
            "ping",
            [
                "-6",
                "-n",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "3",
                &chain.c_overlay.to_string(),
            ],
        )
        .context("small pings a → c")?;
    wait_for_relay_key(&chain)?;
    let before: Vec<Value> = chain
        .agents
        .iter()
        .map(|a| a.stats())
        .collect::<Result<_>>()?;

    let (tries, replies) = large_pings(&chain)?;
    eprintln!("{relay_dataplane}: pings: two in a row after {tries}, then {replies}/{STEADY}");
    ensure!(
        replies >= STEADY - 1,
        "only {replies} of {STEADY} large pings answered once the path MTU was known"
    );
    // UDP to c after a's kernel forgot the path MTU it learned from the pings (a node
    // has exactly one overlay address, so a second address of c is no fresh
    // destination): it takes a Packet Too Big of its own (through the UDP socket's
    // error handler this time) from a's agent, which still knows the path MTU of c.
    let a_ns = chain.topo.node(0).netns();
    a_ns.ip(["-6", "route", "flush", "cache"])?;
    let cached =
        String::from_utf8_lossy(&a_ns.ip(["-6", "route", "show", "cache"])?.stdout).into_owned();
    ensure!(
        !cached.contains(&chain.c_overlay.to_string()),
        "a's kernel still holds a path MTU for c after the flush: {cached}"
    );
    let a_before_udp = chain.agents[0].stats()?;
    let (tries, arrived) = large_udp(&chain, chain.c_overlay)?;
    eprintln!("{relay_dataplane}: UDP: two in a row after {tries}, then {arrived}/{STEADY}");
    ensure!(
        arrived >= STEADY - 1,
        "only {arrived} of {STEADY} large UDP datagrams arrived once the path MTU was known"
    );
    let a_after_udp = chain.agents[0].stats()?;
    ensure!(
        delta(&a_after_udp, &a_before_udp, "agent", "tun_too_big")? >= 1,
        "a's agent answered no oversized UDP datagram: {a_after_udp}"
    );

    // The signal took the path the design says, and every drop was counted.
    let after: Vec<Value> = chain
        .agents
        .iter()
        .map(|a| a.stats())
        .collect::<Result<_>>()?;
    let (a, b) = (&after[0], &after[1]);
    ensure!(
        delta(b, &before[1], "agent", "rx_data_too_big")? >= 1
            && delta(b, &before[1], "agent", "too_big_sent")? >= 1,
        "b neither counted an oversized packet nor sent a too-big report: {b}"
    );
    ensure!(
        delta(b, &before[1], "agent", "tx_error")? == 0,
        "b's oversized packets ended as send errors, not as too-big reports: {b}"
    );
    if relay_dataplane == "xdp" {
        ensure!(
            delta(b, &before[1], "xdp", "pass_too_big")? >= 1,
            "b's XDP program passed no oversized packet up as too big: {b}"
        );
    }
    ensure!(
        delta(a, &before[0], "agent", "too_big_accepted")? >= 1
            && delta(a, &before[0], "agent", "tun_too_big")? >= 1,
        "a believed no report or answered no oversized packet on its TUN: {a}"
    );
    for refused in [
        "too_big_malformed",
        "too_big_not_ours",
        "too_big_below_minimum",
        "too_big_unknown_quote",
        "too_big_rate_limited",
        "too_big_unknown_reporter",
        "too_big_bad_signature",
        "tx_error",
    ] {
        ensure!(
            delta(a, &before[0], "agent", refused)? == 0,
            "a counted {refused}: {a}"
        );
    }
    Ok(())
}

/// Waits until a's routing table holds the key of b's /64, which a report from b must
/// be signed with (b's announcements reach a as soon as their link is up).
fn wait_for_relay_key(chain: &OverlayChain) -> Result<()> {
    let b = chain.agents[1].status()?;
    let b_addr = b["node_address"]
        .as_str()
        .context("b's node_address")?
        .to_string();
    util::poll(
        "a to learn b's key from routing",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || {
            let route = chain.agents[0].ctl_json(&["route", "get", &b_addr])?;
            Ok(route["selected"]["origin_key"]
                .as_str()
                .is_some_and(|k| !k.is_empty())
                .then_some(()))
        },
    )
}

#[test]
fn large_packets_cross_a_narrower_link_behind_an_xdp_relay() -> Result<()> {
    large_packets_cross_a_narrower_link("xdp")
}

#[test]
fn large_packets_cross_a_narrower_link_behind_a_userspace_relay() -> Result<()> {
    large_packets_cross_a_narrower_link("userspace")
}
