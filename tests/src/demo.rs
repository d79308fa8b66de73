//! `cargo xtask demo`: the product shown to a person, in about half a minute.
//!
//! Builds a — b — c in network namespaces with an agent on each (TUN devices on a and
//! c, b a pure relay forwarding in XDP), then: ping and a short iperf3 from a to c over
//! the encrypted overlay; a package (a small website and a binary) added on a and
//! fetched on c, byte for byte; and b's counters showing that its kernel relayed every
//! packet while its agent saw none. Everything is removed at the end (also on error,
//! through `Drop`).

use std::{path::Path, time::Duration, time::Instant};

use anyhow::{Context, Result, ensure};

use crate::{
    agent::{counter, counter_bytes},
    content::{ContentChain, package_tree, same_tree},
    throughput::{received_bps, run_client, start_server, warm_up},
    util::{self, TempDir},
};

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m── {n}. {text}\x1b[0m");
}

/// b's relay counters: XDP relayed packets and bytes, data packets its agent received.
fn b_counts(chain: &ContentChain) -> Result<(u64, u64, u64)> {
    let s = chain.agents[1].stats()?;
    Ok((
        counter(&s, "xdp", "redirect")? + counter(&s, "xdp", "tx")?,
        counter_bytes(&s, "xdp", "redirect")? + counter_bytes(&s, "xdp", "tx")?,
        counter(&s, "agent", "rx_data")?,
    ))
}

/// Runs the demo with the agent and ctl binaries found in `bin_dir`.
pub fn run(bin_dir: &Path) -> Result<()> {
    let started = Instant::now();
    println!("Myconet demo: three nodes in network namespaces, a — b — c.");
    println!(
        "a and c talk over the encrypted overlay; b relays their packets in the kernel (XDP) and can read none of them."
    );

    step(1, "Topology and agents");
    let chain = ContentChain::start(bin_dir, 3, "demo", |i| {
        if i == 1 {
            vec!["--no-tun".into(), "--dataplane".into(), "xdp".into()]
        } else {
            Vec::new()
        }
    })?;
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
            "  {}  namespace {:<22} overlay {:<40} interfaces {}",
            ["a", "b", "c"][i],
            node.ns_name(),
            status["node_address"].as_str().unwrap_or("?"),
            ifaces.join(", ")
        );
    }
    println!("$ myconet-ctl routes   (on b; learnt by the routing protocol)");
    print!("{}", chain.agents[1].ctl(&["routes"])?);

    let (a, c) = (chain.topo.node(0), chain.topo.node(2));
    let (a_addr, c_addr) = (chain.overlay[0], chain.overlay[2]);
    let before = b_counts(&chain)?;

    step(2, "ping a → c over the overlay");
    warm_up(a, c_addr)?;
    let ping = a.netns().exec(
        util::tool("ping"),
        ["-6", "-n", "-c", "3", "-i", "0.2", &c_addr.to_string()],
    )?;
    for line in String::from_utf8_lossy(&ping.stdout).lines() {
        println!("  {line}");
    }

    step(3, "iperf3 a → c over the overlay, 3 s");
    let iperf3 = util::tool("iperf3");
    let logs = TempDir::new("demo-iperf")?;
    let server_log = logs.path().join("server.json");
    let mut server = start_server(c, &iperf3, c_addr, &server_log)?;
    let report = run_client(a, &iperf3, a_addr, c_addr, 3)?;
    let _ = server.wait_timeout(Duration::from_secs(5));
    println!(
        "  {:.2} Gbit/s of TCP, end-to-end encrypted, through b's XDP relay",
        received_bps(&report)? / 1e9
    );

    step(4, "a package added on a, fetched on c");
    let dir = TempDir::new("demo-content")?;
    let src = dir.path().join("my-site");
    let size = package_tree(&src, &[32 << 20])?;
    let src_s = src.to_str().context("the temporary path is not UTF-8")?;
    println!(
        "$ myconet-ctl content add {src_s} --title \"Demo site\" --kind site --lang en   (on a)"
    );
    let mri = chain.add(
        0,
        &[
            src_s,
            "--title",
            "Demo site",
            "--kind",
            "site",
            "--lang",
            "en",
        ],
    )?;
    println!("{mri}");
    let fetch_before = b_counts(&chain)?;
    let out = dir.path().join("fetched");
    println!(
        "$ myconet-ctl content get {mri} --from {a_addr} -o {}   (on c)",
        out.display()
    );
    let got = chain.ctl(
        2,
        &[
            "content",
            "get",
            &mri,
            "--from",
            &a_addr.to_string(),
            "-o",
            out.to_str().context("utf8")?,
        ],
        Duration::from_secs(120),
    )?;
    for line in String::from_utf8_lossy(&got.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&got.stdout).lines())
    {
        println!("  {line}");
    }
    let files = same_tree(&src, &out)?;
    println!("  c's copy: {files} files, {size} bytes, byte for byte what a added");
    println!("$ myconet-ctl content ls   (on c)");
    print!("{}", chain.agents[2].ctl(&["content", "ls"])?);
    let fetch_after = b_counts(&chain)?;

    step(5, "Counters on the relay b");
    let after = b_counts(&chain)?;
    println!(
        "  the package: b relayed {} packets, {:.1} MB, in XDP; b's agent received {} of them",
        fetch_after.0 - fetch_before.0,
        (fetch_after.1 - fetch_before.1) as f64 / 1e6,
        fetch_after.2 - fetch_before.2
    );
    println!(
        "  the whole demo: b relayed {} packets in XDP; its agent received {} data packets (passed up before a neighbour entry existed)",
        after.0 - before.0,
        after.2 - before.2
    );
    ensure!(
        fetch_after.1 - fetch_before.1 > size,
        "b's XDP program did not relay the package"
    );
    ensure!(
        fetch_after.2 - fetch_before.2 <= 16,
        "b's agent saw the package's packets"
    );

    step(6, "Cleaning up");
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
    println!(
        "\nDemo complete in {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
