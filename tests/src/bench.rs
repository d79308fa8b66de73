//! Topology benchmarks driven by `cargo xtask bench`: real agents in the reference
//! a — b — c scenario, a generator in a, counters read on b and c.
//!
//! Figures are reported, never asserted: the machine is shared and noisy, so callers
//! compare variants measured side by side in one run.

use std::{path::Path, time::Duration};

use anyhow::Result;

use crate::{
    agent::counter,
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
