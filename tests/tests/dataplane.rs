//! The XDP data plane on the kind of links nodes really have: stock veths (TX checksum
//! offload on, as in every container), and relays whose agent restarts.
//!
//! Runs as root (CI is root): namespaces, agents, real veths.

use std::{
    collections::BTreeSet,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use myconet_testbed::{
    Node,
    agent::{bin_dir, counter},
    bpffs::BpfFs,
    scenario::{OverlayChain, PORT, RelayChain, SENDER_PORT},
    traffic::{Capture, CaptureOptions, Direction},
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

/// Whether `ip -d link` shows an XDP program on `iface` of `node`.
fn xdp_attached(node: &Node, iface: &str) -> Result<bool> {
    let text = node
        .netns()
        .exec_stdout("ip", ["-d", "link", "show", "dev", iface])?;
    Ok(text.contains("prog/xdp"))
}

/// Defect 5 of issue 12: the XDP program and its maps died with the agent, so a relay
/// upgrade or crash dropped transit traffic. b's data plane is pinned now: a stream of
/// datagrams a → c through b's XDP keeps flowing while b's agent is SIGKILLed and
/// restarted, and again across a hitless exit (SIGUSR2) and restart; every restarted
/// agent takes the pinned links over (no detach). Every datagram sent must arrive at
/// c: zero lost. A clean SIGTERM then leaves no pin and no program behind.
#[test]
fn a_relay_keeps_forwarding_while_its_agent_restarts() -> Result<()> {
    let fs = BpfFs::mount()?;
    let pin_dir = fs.path().join("b");
    let mut chain = RelayChain::start_pinned(&bin_dir()?, "driver", &pin_dir)?;
    let b_ifaces: Vec<String> = chain
        .topo
        .node(1)
        .if_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    for iface in &b_ifaces {
        ensure!(
            pin_dir.join(format!("link-driver-{iface}")).exists(),
            "b's link on {iface} is not pinned: {:?}",
            fs.entries()
        );
    }
    let c = chain.topo.node(2);
    let capture = Capture::start(
        c.netns(),
        &chain.c_ingress()?,
        CaptureOptions {
            udp_dst_port: Some(PORT),
            direction: Direction::Incoming,
            max_frames: 200_000,
            max_duration: Duration::from_secs(60),
        },
    )?;
    let datagrams = chain.default_datagrams(40_000);
    let sender = chain.sender(SENDER_PORT)?;
    let stop = AtomicBool::new(false);
    // (first datagram index, when its window was sent)
    let mut windows: Vec<(usize, Instant)> = Vec::new();
    let mut phases: Vec<(&str, Instant)> = Vec::new();
    let result = std::thread::scope(|s| -> Result<()> {
        let stream = s.spawn(|| -> Result<Vec<(usize, Instant)>> {
            let mut sent = Vec::new();
            for (i, window) in datagrams.chunks(STREAM_WINDOW).enumerate() {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                sent.push((i * STREAM_WINDOW, Instant::now()));
                sender.send_datagrams(window)?;
                std::thread::sleep(STREAM_PAUSE);
            }
            Ok(sent)
        });
        let mut run = || -> Result<()> {
            let b_node = chain.topo.node(1);
            std::thread::sleep(Duration::from_millis(300));
            phases.push(("kill", Instant::now()));
            chain.agents[1].signal_and_wait(libc::SIGKILL)?;
            for iface in &b_ifaces {
                ensure!(
                    xdp_attached(b_node, iface)?,
                    "SIGKILL detached XDP from b's {iface}"
                );
            }
            std::thread::sleep(Duration::from_millis(700));
            chain.agents[1].start_again(b_node.netns())?;
            phases.push(("up after kill", Instant::now()));
            std::thread::sleep(Duration::from_millis(300));
            phases.push(("hitless exit", Instant::now()));
            let exit = chain.agents[1].signal_and_wait(libc::SIGUSR2)?;
            ensure!(exit.success(), "SIGUSR2 exit: {exit:?}");
            for iface in &b_ifaces {
                ensure!(
                    xdp_attached(b_node, iface)?,
                    "a hitless exit detached XDP from b's {iface}"
                );
            }
            std::thread::sleep(Duration::from_millis(300));
            chain.agents[1].start_again(b_node.netns())?;
            phases.push(("up after hitless exit", Instant::now()));
            std::thread::sleep(Duration::from_millis(300));
            Ok(())
        };
        let outcome = run();
        stop.store(true, Ordering::Release);
        let sent = stream
            .join()
            .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
        windows = sent;
        outcome
    });
    result.map_err(|e| chain.agents[1].with_log(e))?;

    let sent = windows
        .last()
        .map_or(0, |(first, _)| (first + STREAM_WINDOW).min(datagrams.len()));
    capture.wait_for(sent, Duration::from_secs(10));
    let frames = capture.stop()?;
    let mut got = BTreeSet::new();
    for f in &frames {
        if let Ok(repr) = f.parse().and_then(|p| p.repr()) {
            got.insert(repr.counter);
        }
    }
    // Datagrams sent while b had no agent at all, and while its next agent started.
    let during = |from: &str, to: &str| -> usize {
        let at = |name: &str| phases.iter().find(|(n, _)| *n == name).map(|(_, t)| *t);
        let (Some(from), Some(to)) = (at(from), at(to)) else {
            return 0;
        };
        windows.iter().filter(|(_, t)| *t > from && *t < to).count() * STREAM_WINDOW
    };
    let gap_kill = during("kill", "up after kill");
    let gap_hitless = during("hitless exit", "up after hitless exit");
    let lost: Vec<u64> = (0..sent as u64).filter(|i| !got.contains(i)).collect();
    eprintln!(
        "restarts: sent {sent}, c got {}, lost {} ({gap_kill} sent while b was killed and \
         restarting, {gap_hitless} across the hitless exit)",
        got.len(),
        lost.len()
    );
    ensure!(
        gap_kill > 0 && gap_hitless > 0,
        "the stream must run across both restarts: {gap_kill}, {gap_hitless}"
    );
    ensure!(
        lost.is_empty(),
        "{} of {sent} datagrams lost across b's restarts (first: {:?})\n{}",
        lost.len(),
        &lost[..lost.len().min(10)],
        chain.loss_report()
    );
    let log = std::fs::read_to_string(chain.agents[1].log_path())?;
    ensure!(
        log.matches("took over the pinned XDP link").count() >= 2 * b_ifaces.len()
            && log.contains("adopting the pinned data plane"),
        "the restarted agents must take the pinned data plane over:\n{}",
        chain.agents[1].log_tail(40)
    );

    // A clean stop leaves nothing behind.
    let exit = chain.agents[1].signal_and_wait(libc::SIGTERM)?;
    ensure!(exit.success(), "SIGTERM exit: {exit:?}");
    let b_node = chain.topo.node(1);
    for iface in &b_ifaces {
        ensure!(
            !xdp_attached(b_node, iface)?,
            "XDP still attached to b's {iface} after SIGTERM"
        );
    }
    ensure!(
        !pin_dir.exists(),
        "pins left after SIGTERM: {:?}",
        fs.entries()
    );
    Ok(())
}

/// Datagrams per send of the restart test's stream, and the pause after each: about
/// 3,000 datagrams a second, in bursts well inside a veth's 256-frame XDP ring.
const STREAM_WINDOW: usize = 16;
const STREAM_PAUSE: Duration = Duration::from_millis(5);
