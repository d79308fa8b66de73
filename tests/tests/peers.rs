//! Proof of link-level authentication between neighbours: a configured neighbour enters
//! the relay peer map only after its link handshake proves a key, the neighbour layer
//! measures RTT over authenticated hellos, and a neighbour that stops answering goes
//! down and leaves the peer map by itself.
//!
//! Runs as root (CI is root): two namespaces, two agents, a real veth.

use std::{net::Ipv6Addr, time::Duration};

use anyhow::{Context, Result, ensure};
use myconet_testbed::{
    agent::{AgentOptions, AgentProcess, bin_dir},
    scenario::{LINK_UP_TIMEOUT, PORT, json_str},
    topology::Chain,
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
