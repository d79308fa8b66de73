//! `cargo xtask demo`: the reference relay scenario shown to a person.
//!
//! Builds a — b — c in network namespaces with an agent on each, sends Myconet data
//! packets from a to c, and shows that they arrive intact, that b relayed every one in
//! its XDP program, and what `myconet-ctl` reports on the relay. Everything is removed
//! at the end (also on error, through `Drop`).

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use myconet_common::wire::HEADER_LEN;

use crate::{
    agent::counter,
    scenario::{PORT, RelayChain},
    traffic::Capture,
};

/// Packets the demo sends.
const PACKETS: u64 = 1000;

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m── {n}. {text}\x1b[0m");
}

/// Runs the demo with the agent and ctl binaries found in `bin_dir`.
pub fn run(bin_dir: &Path) -> Result<()> {
    println!("Myconet demo: three nodes in network namespaces, a — b — c.");
    println!(
        "a sends Myconet data packets to c's overlay address; b relays them in the kernel (XDP)."
    );

    step(1, "Topology and agents");
    let chain = RelayChain::start(bin_dir, "auto")?;
    for (i, agent) in chain.agents.iter().enumerate() {
        let node = chain.topo.node(i);
        let status = agent.status()?;
        let ifaces: Vec<String> = status["interfaces"]
            .as_array()
            .map(|v| {
                v.iter()
                    .map(|i| {
                        format!(
                            "{} (XDP {})",
                            i["name"].as_str().unwrap_or("?"),
                            i["xdp_mode"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "  {}  namespace {:<22} overlay {:<32} underlay {}",
            ["a", "b", "c"][i],
            node.ns_name(),
            status["node_address"].as_str().unwrap_or("?"),
            node.ifaces()
                .iter()
                .map(|f| f.addr.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        );
        println!("     interfaces: {}", ifaces.join(", "));
    }

    step(
        2,
        "Routes on the relay b: the agent's table next to the kernel route map",
    );
    println!("$ myconet-ctl routes   (on b)");
    print!("{}", chain.agents[1].ctl(&["routes"])?);
    println!("$ myconet-ctl peers   (on b)");
    print!("{}", chain.agents[1].ctl(&["peers"])?);

    step(
        3,
        &format!(
            "a sends {PACKETS} data packets to {} (via b)",
            chain.c_overlay
        ),
    );
    let capture = Capture::udp_port(chain.topo.node(2).netns(), &chain.c_ingress()?, PORT)?;
    let datagrams = chain.default_datagrams(PACKETS);
    let b_before = chain.agents[1].stats()?;
    let sent = chain.send_paced(&datagrams, &capture)?;
    println!(
        "  sent {} packets, {} bytes of Myconet datagrams",
        sent.packets, sent.bytes
    );
    let arrived = capture.wait_for(PACKETS as usize, Duration::from_secs(10));
    let frames = capture.stop()?;
    let mut intact = 0u64;
    for (i, f) in frames.iter().filter(|f| !f.outgoing).enumerate() {
        let p = f.parse()?;
        let repr = p.repr()?;
        let sentd = datagrams
            .get(repr.counter as usize)
            .context("c received a packet a never sent")?;
        let ok = p.checksum_valid()
            && p.udp_payload()[HEADER_LEN..] == sentd[HEADER_LEN..]
            && repr.hop_limit + 1 == sentd[2];
        if ok {
            intact += 1;
        }
        if i < 3 {
            println!(
                "  c got #{:<4} {} → {}  hop limit {} → {}  {} payload bytes  checksum {}",
                repr.counter,
                repr.src_addr,
                repr.dst_addr,
                sentd[2],
                repr.hop_limit,
                p.myconet_payload().len(),
                if p.checksum_valid() { "valid" } else { "BAD" }
            );
        }
    }
    println!("  …");
    println!(
        "  c received {intact} of {PACKETS} packets intact (same header but hop limit, same payload, valid checksum)"
    );
    ensure!(
        arrived && intact == PACKETS,
        "only {intact} of {PACKETS} packets arrived intact"
    );

    step(4, "Counters on the relay b");
    println!("$ myconet-ctl stats   (on b)");
    print!("{}", chain.agents[1].ctl(&["stats"])?);
    let b_after = chain.agents[1].stats()?;
    let redirected = counter(&b_after, "xdp", "redirect")? - counter(&b_before, "xdp", "redirect")?;
    let agent_rx = counter(&b_after, "agent", "rx_data")? - counter(&b_before, "agent", "rx_data")?;
    println!(
        "\n  b relayed {redirected} of {PACKETS} packets in XDP (redirect to the link towards c); b's agent received {agent_rx} of them."
    );

    step(5, "Cleaning up");
    let names: Vec<String> = chain
        .topo
        .nodes()
        .iter()
        .map(|n| n.ns_name().to_string())
        .collect();
    drop(chain);
    println!(
        "  agents stopped (SIGTERM, XDP detached), namespaces {} removed",
        names.join(", ")
    );
    ensure!(
        redirected == PACKETS && agent_rx == 0,
        "the relay did not take the fast path for every packet"
    );
    println!("\nDemo complete.");
    Ok(())
}
