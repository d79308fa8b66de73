//! The XDP data plane on the kind of links nodes really have: stock veths (TX checksum
//! offload on, as in every container), and relays whose agent restarts.
//!
//! Runs as root (CI is root): namespaces, agents, real veths.

use anyhow::{Context, Result, ensure};
use myconet_testbed::{
    agent::{bin_dir, counter},
    scenario::OverlayChain,
    util,
};

/// Pings c's overlay address from a and returns how many of `count` echo requests were
/// answered.
fn overlay_ping(chain: &OverlayChain, count: u32) -> Result<u32> {
    let target = chain.c_overlay.to_string();
    let count = count.to_string();
    let out = chain
        .topo
        .node(0)
        .netns()
        .command("ping")
        .args(["-6", "-n", "-c", &count, "-i", "0.2", "-W", "2", &target])
        .output()
        .context("running ping a → c")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let (_, rest) = l.split_once(" transmitted, ")?;
            rest.split_once(" received")?.0.trim().parse().ok()
        })
        .with_context(|| format!("no ping summary in {text:?}"))
}

/// Defect 3 of issue 12, exactly as seen: on stock veths a's agent sends with TX
/// checksum offload, so its datagrams carry partial checksums; b's XDP relays them
/// (redirect), which turns the skb into a frame without checksum state, and c's kernel
/// dropped every one as `Udp6InCsumErrors` while Myconet's counters showed nothing
/// wrong. b must complete the checksums, so every ping is answered, and the kernel's
/// checksum errors (now in `stats` too) stay where they were.
#[test]
fn relayed_data_survives_tx_checksum_offload() -> Result<()> {
    let chain = OverlayChain::start(&bin_dir()?, "xdp")?;
    for node in chain.topo.nodes() {
        for iface in node.ifaces() {
            let features = node
                .netns()
                .exec_stdout(util::tool("ethtool"), ["-k", &iface.name])?;
            ensure!(
                features.contains("tx-checksumming: on"),
                "{} {}: the testbed must use stock veths: {features}",
                node.name(),
                iface.name
            );
        }
    }
    let stats = |i: usize| chain.agents[i].stats();
    let (a0, b0, c0) = (stats(0)?, stats(1)?, stats(2)?);

    let answered = overlay_ping(&chain, 5)?;

    let (a1, b1, c1) = (stats(0)?, stats(1)?, stats(2)?);
    let d = |after: &serde_json::Value, before: &serde_json::Value, sec: &str, name: &str| {
        Ok::<u64, anyhow::Error>(counter(after, sec, name)? - counter(before, sec, name)?)
    };
    for (name, before, after) in [("a", &a0, &a1), ("c", &c0, &c1)] {
        ensure!(
            d(after, before, "kernel", "udp6_in_csum_errors")? == 0,
            "{name}'s kernel dropped datagrams with bad UDP checksums: {after}"
        );
    }
    ensure!(answered == 5, "{answered} of 5 pings answered: {b1}\n{c1}");
    // The replies and requests crossed b's XDP program (not its agent), and arrived
    // there with partial checksums: the test exercises what it names.
    let relayed = d(&b1, &b0, "xdp", "redirect")?;
    ensure!(relayed >= 10, "b's XDP relayed {relayed} packets: {b1}");
    let partial = d(&b1, &b0, "xdp", "csum_partial")?;
    ensure!(
        partial >= 10,
        "only {partial} of b's relayed packets arrived with partial checksums: {b1}"
    );
    Ok(())
}
