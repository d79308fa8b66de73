//! Topology benchmarks driven by `cargo xtask bench`: real agents in the reference
//! a — b — c scenario, a generator in a, counters read on b and c; and the diamond's
//! failover and steady-state control traffic.
//!
//! Figures are reported, never asserted: the machine is shared and noisy, so callers
//! compare variants measured side by side in one run.

use std::{path::Path, time::Duration};

use anyhow::Result;

use crate::{
    agent::counter,
    diamond::Diamond,
    scenario::{RelayChain, SENDER_PORT},
};

/// What one relay throughput run measured.
#[derive(Debug, Clone)]
pub struct RelayRun {
    /// Size of each Myconet datagram (header + payload).
    pub datagram_bytes: usize,
    /// Seconds the generator ran.
    pub seconds: f64,
    /// Datagrams the generator handed to the kernel.
    pub offered: u64,
    /// Datagrams b relayed in XDP (tx + redirect).
    pub relayed_xdp: u64,
    /// Datagrams that reached b's agent (should stay ~0).
    pub relay_agent_rx: u64,
    /// Datagrams c's kernel accepted and handed to c's agent (valid checksums).
    pub delivered: u64,
}

impl RelayRun {
    /// Relayed packets per second.
    pub fn relayed_pps(&self) -> f64 {
        self.relayed_xdp as f64 / self.seconds
    }

    /// Offered packets per second.
    pub fn offered_pps(&self) -> f64 {
        self.offered as f64 / self.seconds
    }

    /// Relayed bits per second of Myconet datagrams (without outer headers).
    pub fn relayed_bps(&self) -> f64 {
        self.relayed_pps() * self.datagram_bytes as f64 * 8.0
    }
}

/// Runs the generator in a for `duration` per datagram size and reads b's and c's
/// counters around each run. `xdp_mode` is passed to every agent.
pub fn relay(
    bin_dir: &Path,
    xdp_mode: &str,
    sizes: &[usize],
    duration: Duration,
) -> Result<Vec<RelayRun>> {
    let chain = RelayChain::start(bin_dir, xdp_mode)?;
    let sender = chain.sender(SENDER_PORT)?.batch(64);
    let mut runs = Vec::new();
    for &size in sizes {
        let payload_len = size.saturating_sub(myconet_common::wire::HEADER_LEN);
        let datagram = chain
            .default_datagrams(1)
            .into_iter()
            .next()
            .map(|mut d| {
                d.truncate(myconet_common::wire::HEADER_LEN);
                d.resize(myconet_common::wire::HEADER_LEN + payload_len, 0xa5);
                d
            })
            .unwrap_or_default();
        let b0 = chain.agents[1].stats()?;
        let c0 = chain.agents[2].stats()?;
        let report = sender.blast(&datagram, duration)?;
        // Let in-flight packets land before reading counters.
        std::thread::sleep(Duration::from_millis(200));
        let b1 = chain.agents[1].stats()?;
        let c1 = chain.agents[2].stats()?;
        let d = |after: &serde_json::Value, before: &serde_json::Value, sec: &str, name: &str| {
            Ok::<u64, anyhow::Error>(counter(after, sec, name)? - counter(before, sec, name)?)
        };
        runs.push(RelayRun {
            datagram_bytes: datagram.len(),
            seconds: report.elapsed.as_secs_f64(),
            offered: report.packets,
            relayed_xdp: d(&b1, &b0, "xdp", "redirect")? + d(&b1, &b0, "xdp", "tx")?,
            relay_agent_rx: d(&b1, &b0, "agent", "rx_data")?,
            delivered: d(&c1, &c0, "agent", "rx_data")?,
        });
    }
    Ok(runs)
}

/// One failover of the diamond: the relay carrying a ping stream a ⇄ d is killed.
#[derive(Debug, Clone)]
pub struct FailoverRun {
    /// The longest run of lost probes, by their send times.
    pub outage: Duration,
    /// The longest silence at the stream's receiver.
    pub arrival_gap: Duration,
    /// From the kill until a's route pointed at the other relay.
    pub rerouted: Duration,
    /// Probes lost.
    pub lost: u32,
}

/// Kills the active relay of a fresh diamond `runs` times (agents from `bin_dir`, each
/// with `extra_args`) and measures the ping stream across each failure.
pub fn failover(bin_dir: &Path, extra_args: &[&str], runs: u32) -> Result<Vec<FailoverRun>> {
    let mut out = Vec::new();
    for _ in 0..runs {
        let mut diamond = Diamond::start("benchfo", bin_dir, extra_args)?;
        let f = diamond.fail_active_relay(Duration::from_secs(1))?;
        let outage = f.report.outage().map(|o| o.duration).unwrap_or_default();
        out.push(FailoverRun {
            outage,
            arrival_gap: f.report.arrival_gap(),
            rerouted: f.rerouted,
            lost: f.report.lost(),
        });
    }
    Ok(out)
}

/// Steady-state control traffic of the diamond's links.
#[derive(Debug, Clone)]
pub struct ControlTraffic {
    /// Seconds measured.
    pub seconds: f64,
    /// Link directions measured (two per link).
    pub directions: u32,
    /// Control packets received, all agents together.
    pub packets: u64,
    /// Their Myconet datagram bytes (header, payload, tag; no IPv6/UDP headers).
    pub bytes: u64,
    /// Probe hellos sent meanwhile (a healthy link should send none).
    pub probes: u64,
}

impl ControlTraffic {
    /// Control packets per second in one direction of one link.
    pub fn packets_per_direction(&self) -> f64 {
        self.packets as f64 / self.seconds / f64::from(self.directions)
    }

    /// Control bytes per second in one direction of one link, as Myconet datagrams.
    pub fn bytes_per_direction(&self) -> f64 {
        self.bytes as f64 / self.seconds / f64::from(self.directions)
    }

    /// The same on the wire, with the outer IPv6 (40) and UDP (8) headers.
    pub fn wire_bytes_per_direction(&self) -> f64 {
        (self.bytes + 48 * self.packets) as f64 / self.seconds / f64::from(self.directions)
    }
}

/// Measures the control traffic (hellos, acks, keepalives, routing) of an idle,
/// converged diamond for `duration` (use at least a minute: routing sends its periodic
/// updates every 30 s).
pub fn control_traffic(
    bin_dir: &Path,
    extra_args: &[&str],
    duration: Duration,
) -> Result<ControlTraffic> {
    let diamond = Diamond::start("benchct", bin_dir, extra_args)?;
    diamond.wait_routes()?;
    // Let the start-up exchanges (dumps, their repeats) pass.
    std::thread::sleep(Duration::from_secs(5));
    let probes = |d: &Diamond| -> Result<u64> {
        let mut n = 0;
        for agent in d.agents.iter().flatten() {
            // Agents that predate the counter have none: count them as zero.
            n += counter(&agent.stats()?, "neighbours", "hello_probe_sent").unwrap_or(0);
        }
        Ok(n)
    };
    let (p0, b0) = diamond.control_received()?;
    let probes0 = probes(&diamond)?;
    let started = std::time::Instant::now();
    std::thread::sleep(duration);
    let (p1, b1) = diamond.control_received()?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(ControlTraffic {
        seconds,
        directions: 2 * crate::diamond::LINKS.len() as u32,
        packets: p1 - p0,
        bytes: b1 - b0,
        probes: probes(&diamond)? - probes0,
    })
}
