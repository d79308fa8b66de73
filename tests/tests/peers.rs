//! Proof of link-level authentication between neighbours: a configured neighbour enters
//! the relay peer map only after its link handshake proves a key, the neighbour layer
//! measures RTT over authenticated hellos, and a neighbour that stops answering goes
//! down and leaves the peer map by itself.
//!
//! Runs as root (CI is root): two namespaces, two agents, a real veth.

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use myconet_testbed::{
    agent::{AgentOptions, AgentProcess, bin_dir, counter},
    scenario::{LINK_UP_TIMEOUT, PORT, json_str},
    topology::Chain,
    traffic::bind_udp,
    util,
};
use serde_json::Value;

fn peer_row(peers: &Value, addr: Ipv6Addr) -> Option<&Value> {
    peers["peers"]
        .as_array()?
        .iter()
        .find(|r| r["address"] == addr.to_string().as_str())
}

#[test]
fn neighbours_authenticate_measure_rtt_and_expire() -> Result<()> {
    let bins = bin_dir()?;
    let topo = Chain::new(2).tag("link").build()?;
    let (a, b) = (topo.node(0), topo.node(1));
    let options = || AgentOptions {
        port: PORT,
        ..AgentOptions::default()
    };
    let agent_a = AgentProcess::start(a, &bins, options())?;
    let agent_b = AgentProcess::start(b, &bins, options())?;
    let a_status = agent_a.status()?;
    let a_key = json_str(&a_status, "public_key")?.to_string();
    let a_node = json_str(&a_status, "node_address")?.to_string();
    let b_status = agent_b.status()?;
    let b_key = json_str(&b_status, "public_key")?.to_string();
    let a_addr = a.addr_to(1)?;
    let b_addr = b.addr_to(0)?;

    // b is told about a by endpoint only; it learns and proves a's key by handshake.
    agent_b.ctl(&["peers", "add", &a_addr.to_string()])?;
    let peers = agent_b.wait_peers_up(&[(a_addr, PORT)], LINK_UP_TIMEOUT)?;
    let row = peer_row(&peers, a_addr).context("a listed on b")?;
    ensure!(
        row["node_key"] == a_key.as_str()
            && row["node_address"] == a_node.as_str()
            && row["origin"] == "static",
        "b's view of a: {row}"
    );
    // a never configured b: b authenticated itself, so a lists it as an inbound peer.
    let peers_a = agent_a.wait_peers_up(&[(b_addr, PORT)], LINK_UP_TIMEOUT)?;
    let row = peer_row(&peers_a, b_addr).context("b listed on a")?;
    ensure!(
        row["node_key"] == b_key.as_str() && row["origin"] == "inbound",
        "a's view of b: {row}"
    );

    // Hellos every ~2 s: an RTT sample and a fresh last-seen arrive within a few.
    let peers = util::poll(
        "an RTT sample on b",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            let peers = agent_b.ctl_json(&["peers"])?;
            let ok = peer_row(&peers, a_addr).is_some_and(|r| r["rtt_us"].as_u64().is_some());
            Ok(ok.then_some(peers))
        },
    )?;
    let row = peer_row(&peers, a_addr).context("a listed on b")?;
    let rtt = row["rtt_us"].as_u64().unwrap_or(u64::MAX);
    let seen = row["last_seen_ms"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        rtt < 1_000_000,
        "RTT over a veth should be far below 1 s: {row}"
    );
    ensure!(
        seen < 5_000,
        "a hello or ack within the last hello interval: {row}"
    );
    let table = agent_b.ctl(&["peers"])?;
    ensure!(
        table.contains("up") && table.contains(&a_node),
        "the table shows state and node:\n{table}"
    );

    // a goes away: b marks it down after the dead interval and drops it from the map.
    agent_a.stop()?;
    let peers = util::poll(
        "a down on b",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || {
            let peers = agent_b.ctl_json(&["peers"])?;
            let down = peer_row(&peers, a_addr)
                .is_some_and(|r| r["state"] != "up" && r["in_kernel"] == false);
            Ok(down.then_some(peers))
        },
    )?;
    ensure!(
        peer_row(&peers, a_addr).is_some_and(|r| r["origin"] == "static"),
        "a configured peer stays listed (and keeps retrying) after going down: {peers}"
    );

    // Removing it forgets it entirely.
    let removed = agent_b.ctl_json(&["peers", "remove", &a_addr.to_string()])?;
    ensure!(removed["removed"] == true, "{removed}");
    let peers = agent_b.ctl_json(&["peers"])?;
    ensure!(peer_row(&peers, a_addr).is_none(), "{peers}");
    agent_b.stop()?;
    Ok(())
}

/// Two agents that were told nothing about each other find each other by beacons on the
/// link they share, and authenticate each other with a link handshake that must prove
/// the key each beacon announced.
#[test]
fn neighbours_discover_each_other_on_a_link() -> Result<()> {
    let bins = bin_dir()?;
    let topo = Chain::new(2).tag("disc").build()?;
    let mut agents = Vec::new();
    for (i, node) in topo.nodes().iter().enumerate() {
        let iface = node.iface_to(1 - i)?.name.clone();
        let options = AgentOptions {
            port: PORT,
            extra_args: vec!["--discover".to_string(), iface],
            ..AgentOptions::default()
        };
        agents.push(AgentProcess::start(node, &bins, options)?);
    }
    let keys = agents
        .iter()
        .map(|a| Ok(json_str(&a.status()?, "public_key")?.to_string()))
        .collect::<Result<Vec<_>>>()?;
    for (i, agent) in agents.iter().enumerate() {
        let other = &keys[1 - i];
        let peers = util::poll(
            "a discovered neighbour up",
            LINK_UP_TIMEOUT,
            Duration::from_millis(200),
            || {
                let peers = agent.ctl_json(&["peers"])?;
                let found = peers["peers"].as_array().is_some_and(|rows| {
                    rows.iter().any(|r| {
                        r["node_key"] == other.as_str()
                            && r["state"] == "up"
                            && r["interface"].as_u64().is_some_and(|i| i != 0)
                            && r["address"]
                                .as_str()
                                .is_some_and(|a| a.starts_with("fe80:"))
                    })
                });
                Ok(found.then_some(peers))
            },
        )?;
        ensure!(
            peers["peers"].as_array().is_some_and(|r| r.len() == 1),
            "exactly one neighbour on a two-node link: {peers}"
        );
    }
    for agent in agents {
        agent.stop()?;
    }
    Ok(())
}

/// The route a node holds for `prefix`, if the routing protocol installed one and the
/// kernel map agrees: its next hop's address and interface.
fn routed_next_hop(agent: &AgentProcess, prefix: &str) -> Result<Option<(String, u64)>> {
    let routes = agent.ctl_json(&["routes"])?;
    let row = routes["routes"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["prefix"] == prefix));
    Ok(row.and_then(|r| {
        let nh = &r["agent"]["next_hop"];
        (r["agent"]["origin"] == "routing" && r["in_sync"] == true)
            .then(|| Some((nh["address"].as_str()?.to_owned(), nh["ifindex"].as_u64()?)))
            .flatten()
    }))
}

/// a — b — c told nothing but `--discover` on their links: they find each other by
/// beacons (link-local addresses), route over each other, and b relays real overlay
/// traffic between a and c. b admits each neighbour only on the link it was found on,
/// so nothing it relays is dropped as coming from an unknown peer.
#[test]
fn discovered_neighbours_relay_overlay_traffic() -> Result<()> {
    const N: u32 = 100;
    const PROBE_PORT: u16 = 7070;
    let bins = bin_dir()?;
    let topo = Chain::new(3).tag("discrel").build()?;
    let mut agents = Vec::new();
    for (i, node) in topo.nodes().iter().enumerate() {
        let mut extra_args = vec!["--hello-interval-ms".to_string(), "300".to_string()];
        for iface in node.if_names() {
            extra_args.extend(["--discover".to_string(), iface.to_string()]);
        }
        if i == 1 {
            extra_args.push("--no-tun".to_string());
        }
        let options = AgentOptions {
            port: PORT,
            extra_args,
            ..AgentOptions::default()
        };
        agents.push(AgentProcess::start(node, &bins, options)?);
    }
    let status = |i: usize| agents[i].status();
    let (a_status, c_status) = (status(0)?, status(2)?);
    let a_overlay: Ipv6Addr = json_str(&a_status, "node_address")?.parse()?;
    let c_overlay: Ipv6Addr = json_str(&c_status, "node_address")?.parse()?;
    let a_prefix = json_str(&a_status, "node_prefix")?.to_string();
    let c_prefix = json_str(&c_status, "node_prefix")?.to_string();

    // Both ends route to each other through b's link-local address on their link.
    for (from, prefix, iface_to_b) in [(0, &c_prefix, 1), (2, &a_prefix, 1)] {
        let want_ifindex = u64::from(topo.node(from).iface_to(iface_to_b)?.ifindex);
        let (addr, ifindex) = util::poll(
            "a route through the discovered neighbour b",
            Duration::from_secs(40),
            Duration::from_millis(200),
            || routed_next_hop(&agents[from], prefix),
        )
        .map_err(|e| agents[from].with_log(e))
        .with_context(|| format!("routes: {:?}", agents[from].ctl(&["routes"]).ok()))?;
        ensure!(
            addr.starts_with("fe80:") && ifindex == want_ifindex,
            "node {from} routes {prefix} via {addr}%{ifindex}, not b's link-local address on \
             interface {want_ifindex}"
        );
    }
    // b admitted both neighbours on their own links (each found by a beacon, or
    // authenticated first by the other side's handshake: inbound).
    let peers = agents[1].ctl_json(&["peers"])?;
    let rows = peers["peers"].as_array().context("b's peers")?;
    ensure!(
        rows.len() == 2
            && rows.iter().all(|r| r["state"] == "up"
                && r["in_kernel"] == true
                && (r["origin"] == "discovered" || r["origin"] == "inbound")
                && r["interface"].as_u64().is_some_and(|i| i != 0)),
        "b's neighbours: {peers}"
    );

    // The first packets may wait for the end-to-end handshake: ping until one answer.
    let c_target = c_overlay.to_string();
    util::poll(
        "a ping from a to c over the overlay",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            Ok(topo
                .node(0)
                .netns()
                .exec("ping", ["-6", "-n", "-c", "1", "-W", "2", &c_target])
                .is_ok()
                .then_some(()))
        },
    )?;

    let b_before = agents[1].stats()?;
    let rx = bind_udp(
        topo.node(2).netns(),
        SocketAddr::V6(SocketAddrV6::new(c_overlay, PROBE_PORT, 0, 0)),
    )?;
    rx.set_read_timeout(Some(Duration::from_millis(200)))?;
    let tx = bind_udp(
        topo.node(0).netns(),
        SocketAddr::V6(SocketAddrV6::new(a_overlay, 0, 0, 0)),
    )?;
    let to = SocketAddr::V6(SocketAddrV6::new(c_overlay, PROBE_PORT, 0, 0));
    for seq in 0..N {
        tx.send_to(&seq.to_be_bytes(), to)?;
        std::thread::sleep(Duration::from_millis(5));
    }
    // Datagrams wait in c's socket buffer; collect them within a bound.
    let mut got = std::collections::BTreeSet::new();
    let mut buf = [0u8; 64];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (got.len() as u32) < N && std::time::Instant::now() < deadline {
        if let Ok(4) = rx.recv(&mut buf) {
            got.insert(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
        }
    }
    ensure!(
        got.len() as u32 == N,
        "c received {} of {N} datagrams from a",
        got.len()
    );

    // b relayed them (in the kernel or on its userspace path) and refused nothing as
    // coming from a stranger.
    let b_after = agents[1].stats()?;
    let d = |sec: &str, name: &str| -> Result<u64> {
        Ok(counter(&b_after, sec, name)? - counter(&b_before, sec, name)?)
    };
    let relayed = d("xdp", "redirect")? + d("xdp", "tx")? + d("agent", "rx_data_relayed")?;
    ensure!(
        relayed >= u64::from(N),
        "b relayed {relayed} of {N}: {b_after}"
    );
    ensure!(
        counter(&b_after, "xdp", "drop_unknown_peer")? == 0
            && counter(&b_after, "agent", "rx_data_unknown_peer")? == 0,
        "b refused a discovered neighbour's packets: {b_after}"
    );
    for agent in agents {
        agent.stop()?;
    }
    Ok(())
}
