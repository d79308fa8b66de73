//! The reference scenario behind the relay test, the demo and the relay benchmark:
//! three namespaces a — b — c, an agent in each with XDP on every link, static routes
//! for c's /64 (a → b → c), and b accepting a's agent as an authenticated neighbour;
//! the test sender in a sends as that neighbour's endpoint.
//!
//! Keeping it in one place means the test proves exactly what the demo shows and the
//! benchmark measures.

use std::{
    net::{Ipv6Addr, SocketAddrV6},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use myconet_common::wire::{DEFAULT_HOP_LIMIT, PacketType, Repr};
use serde_json::Value;

use crate::{
    agent::{AgentOptions, AgentProcess, counter},
    packet,
    topology::{Chain, Topology},
    traffic::{Capture, SendReport, UdpSender},
};

/// Datagrams [`RelayChain::send_paced`] sends before waiting for them to arrive: well
/// inside a veth's 256-entry XDP ring.
pub const WINDOW: usize = 64;

/// Underlay port every agent uses.
pub const PORT: u16 = 9651;
/// Source port of the test sender in a: a's agent's own port, so b's relay sees the
/// endpoint it authenticated (the sender writes its own UDP header, see
/// [`UdpSender::spoofing`]).
pub const SENDER_PORT: u16 = PORT;

/// How long neighbours may take to authenticate each other after start.
pub const LINK_UP_TIMEOUT: Duration = Duration::from_secs(15);

/// The running a — b — c chain.
#[derive(Debug)]
pub struct RelayChain {
    /// Agents of a, b and c (dropped before the topology).
    pub agents: Vec<AgentProcess>,
    /// The namespaces and links.
    pub topo: Topology,
    /// a's overlay address (source of test traffic).
    pub a_overlay: Ipv6Addr,
    /// c's /64, as `addr/64`.
    pub c_prefix: String,
    /// c's overlay address (destination of test traffic).
    pub c_overlay: Ipv6Addr,
}

/// Reads a string field of a JSON object.
pub fn json_str<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .with_context(|| format!("no string {key:?} in {v}"))
}

impl RelayChain {
    /// Builds the topology, starts the agents with `xdp_mode` and installs routes and
    /// peers; neighbours are resolved (ping) so the first packets take the fast path.
    pub fn start(bin_dir: &Path, xdp_mode: &str) -> Result<Self> {
        Self::start_with(bin_dir, xdp_mode, true, &[])
    }

    /// Like [`RelayChain::start`], with GRO on every veth or on none (`veth_gro`), and
    /// `c_args` appended to c's agent command line (e.g. `--dataplane userspace`,
    /// which leaves c's link without an XDP program).
    pub fn start_with(
        bin_dir: &Path,
        xdp_mode: &str,
        veth_gro: bool,
        c_args: &[&str],
    ) -> Result<Self> {
        Self::start_full(bin_dir, xdp_mode, veth_gro, c_args, None)
    }

    /// Like [`RelayChain::start`] with b's data plane pinned in `b_pin_dir` (on a
    /// [`crate::bpffs::BpfFs`]), so b keeps relaying while its agent restarts.
    pub fn start_pinned(bin_dir: &Path, xdp_mode: &str, b_pin_dir: &Path) -> Result<Self> {
        Self::start_full(bin_dir, xdp_mode, true, &[], Some(b_pin_dir))
    }

    fn start_full(
        bin_dir: &Path,
        xdp_mode: &str,
        veth_gro: bool,
        c_args: &[&str],
        b_pin_dir: Option<&Path>,
    ) -> Result<Self> {
        let topo = Chain::new(3).tag("relay").veth_gro(veth_gro).build()?;
        let mut agents = Vec::new();
        for (i, node) in topo.nodes().iter().enumerate() {
            let userspace = i == 2 && c_args.contains(&"userspace");
            let options = AgentOptions {
                port: PORT,
                xdp_mode: (!userspace).then(|| xdp_mode.to_string()),
                extra_args: if i == 2 {
                    c_args.iter().map(|a| a.to_string()).collect()
                } else {
                    Vec::new()
                },
                pin_dir: b_pin_dir.filter(|_| i == 1).map(Path::to_path_buf),
                ..AgentOptions::default()
            };
            agents.push(AgentProcess::start(node, bin_dir, options)?);
        }
        let (a, b, c) = (topo.node(0), topo.node(1), topo.node(2));
        let a_status = agents[0].status()?;
        let c_status = agents[2].status()?;
        let a_overlay: Ipv6Addr = json_str(&a_status, "node_address")?.parse()?;
        let c_overlay: Ipv6Addr = json_str(&c_status, "node_address")?.parse()?;
        let c_prefix = json_str(&c_status, "node_prefix")?.to_string();

        let port = PORT.to_string();
        let b_from_a = b.addr_to(0)?;
        let c_from_b = c.addr_to(1)?;
        agents[0].ctl(&[
            "route",
            "add",
            &c_prefix,
            "via",
            &b_from_a.to_string(),
            "--port",
            &port,
        ])?;
        agents[1].ctl(&[
            "route",
            "add",
            &c_prefix,
            "via",
            &c_from_b.to_string(),
            "--port",
            &port,
        ])?;
        // b authenticates a's agent at the link level before it may relay for it.
        agents[1].ctl(&["peers", "add", &a.addr_to(1)?.to_string(), "--port", &port])?;
        agents[1].wait_peers_up(&[(a.addr_to(1)?, PORT)], LINK_UP_TIMEOUT)?;
        // Resolve neighbours both ways so no packet waits on neighbour discovery.
        a.ping(b_from_a, 3)?;
        b.ping(c_from_b, 3)?;
        c.ping(b.addr_to(2)?, 3)?;
        Ok(Self {
            agents,
            topo,
            a_overlay,
            c_prefix,
            c_overlay,
        })
    }

    /// A sender in a, sending from `[a's address towards b]:port` to b's agent port;
    /// with [`SENDER_PORT`] it sends as b's authenticated neighbour, with any other
    /// port as a stranger.
    pub fn sender(&self, port: u16) -> Result<UdpSender> {
        let a = self.topo.node(0);
        let local = SocketAddrV6::new(a.addr_to(1)?, port, 0, 0);
        let dst = SocketAddrV6::new(self.topo.node(1).addr_to(0)?, PORT, 0, 0);
        UdpSender::spoofing(a.netns(), local, dst)
    }

    /// Sends `datagrams` as b's authenticated neighbour in windows of [`WINDOW`],
    /// waiting (bounded) after each until `capture` on c has seen everything sent so
    /// far. The test is about what the relay does to each packet, not about veth ring
    /// overflow under an unpaced burst (a redirect into a full ring is dropped by the
    /// kernel, outside the program's view); pacing keeps every packet accountable.
    pub fn send_paced(&self, datagrams: &[Vec<u8>], capture: &Capture) -> Result<SendReport> {
        let sender = self.sender(SENDER_PORT)?;
        let mut total = SendReport::default();
        let start = std::time::Instant::now();
        let mut sent = 0usize;
        for window in datagrams.chunks(WINDOW) {
            let report = sender.send_datagrams(window)?;
            total.packets += report.packets;
            total.bytes += report.bytes;
            total.backpressure += report.backpressure;
            sent += window.len();
            if !capture.wait_for(sent, Duration::from_secs(2)) {
                break;
            }
        }
        total.elapsed = start.elapsed();
        Ok(total)
    }

    /// Where frames went missing between a and c: b's program counters and every
    /// interface's kernel counters on b and c, for a failure message.
    pub fn loss_report(&self) -> String {
        let mut out = String::new();
        if let Ok(stats) = self.agents[1].stats() {
            out.push_str(&format!(
                "b's stats: {}\n",
                stats.get("xdp").unwrap_or(&stats)
            ));
        }
        for i in 1..=2 {
            let node = self.topo.node(i);
            match node.netns().exec_stdout("ip", ["-s", "-s", "link"]) {
                Ok(text) => out.push_str(&format!("{}:\n{text}\n", node.name())),
                Err(e) => out.push_str(&format!("{}: ip -s link failed: {e:#}\n", node.name())),
            }
        }
        out
    }

    /// `n` distinct Myconet data datagrams from a to c: counters 0..n, payload sizes
    /// cycling through 0..=1200 bytes, each payload a pattern derived from its counter.
    pub fn datagrams(&self, n: u64, hop_limit: u8) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let repr = Repr {
                    packet_type: PacketType::Data,
                    hop_limit,
                    flags: 0,
                    session_id: 7,
                    counter: i,
                    dst_addr: self.c_overlay,
                    src_addr: self.a_overlay,
                };
                let len = (i as usize * 37) % 1201;
                let payload: Vec<u8> = (0..len).map(|j| (i as usize * 31 + j) as u8).collect();
                packet::datagram(&repr, &payload)
            })
            .collect()
    }

    /// The default datagrams (hop limit 64).
    pub fn default_datagrams(&self, n: u64) -> Vec<Vec<u8>> {
        self.datagrams(n, DEFAULT_HOP_LIMIT)
    }

    /// Name of c's interface towards b (where relayed frames arrive).
    pub fn c_ingress(&self) -> Result<String> {
        Ok(self.topo.node(2).iface_to(1)?.name.clone())
    }

    /// Waits (bounded) until `f` holds on fresh stats of agent `i`; returns the last stats.
    pub fn wait_stats(
        &self,
        i: usize,
        timeout: Duration,
        f: impl Fn(&Value) -> Result<bool>,
    ) -> Result<Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let stats = self.agents[i].stats()?;
            if f(&stats)? || std::time::Instant::now() >= deadline {
                return Ok(stats);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Checks that every agent's route table agrees with its kernel map.
    pub fn assert_routes_in_sync(&self) -> Result<()> {
        for agent in &self.agents {
            let routes = agent.ctl_json(&["routes"])?;
            let rows = routes
                .get("routes")
                .and_then(Value::as_array)
                .context("routes JSON has no list")?;
            ensure!(!rows.is_empty(), "{}: no routes at all", agent.ns_name());
            for row in rows {
                ensure!(
                    row.get("in_sync").and_then(Value::as_bool) == Some(true),
                    "{}: route out of sync: {row}",
                    agent.ns_name()
                );
            }
        }
        Ok(())
    }
}

/// The a — b — c chain as an overlay: TUN devices on a and c, routes both ways, b
/// accepting both agents as peers, so unmodified applications on a and c talk to each
/// other's overlay addresses through b.
#[derive(Debug)]
pub struct OverlayChain {
    /// Agents of a, b and c (dropped before the topology).
    pub agents: Vec<AgentProcess>,
    /// The namespaces and links.
    pub topo: Topology,
    /// a's overlay address.
    pub a_overlay: Ipv6Addr,
    /// c's overlay address.
    pub c_overlay: Ipv6Addr,
}

impl OverlayChain {
    /// Starts the chain; `relay_dataplane` (`xdp`, `userspace`) is b's `--dataplane`.
    pub fn start(bin_dir: &Path, relay_dataplane: &str) -> Result<Self> {
        let topo = Chain::new(3).tag("ovl").build()?;
        Self::start_on(topo, bin_dir, &["--dataplane", relay_dataplane])
    }

    /// Starts the agents on an a — b — c topology built (and perhaps altered) by the
    /// caller; `relay_args` are b's extra flags (b never has a TUN device). Nodes after
    /// the third (say, an attacker attached to one of them) get no agent.
    pub fn start_on(topo: Topology, bin_dir: &Path, relay_args: &[&str]) -> Result<Self> {
        ensure!(topo.len() >= 3, "an overlay chain has three nodes");
        let mut agents = Vec::new();
        for (i, node) in topo.nodes().iter().take(3).enumerate() {
            let mut extra_args = Vec::new();
            if i == 1 {
                extra_args.push("--no-tun".to_string());
                extra_args.extend(relay_args.iter().map(|a| a.to_string()));
            }
            let options = AgentOptions {
                port: PORT,
                extra_args,
                ..AgentOptions::default()
            };
            agents.push(AgentProcess::start(node, bin_dir, options)?);
        }
        let status = |i: usize| agents[i].status();
        let (a_status, c_status) = (status(0)?, status(2)?);
        let a_overlay: Ipv6Addr = json_str(&a_status, "node_address")?.parse()?;
        let c_overlay: Ipv6Addr = json_str(&c_status, "node_address")?.parse()?;
        let a_prefix = json_str(&a_status, "node_prefix")?.to_string();
        let c_prefix = json_str(&c_status, "node_prefix")?.to_string();
        let (a, b, c) = (topo.node(0), topo.node(1), topo.node(2));
        let s = |addr: Ipv6Addr| addr.to_string();
        agents[0].ctl(&["route", "add", &c_prefix, "via", &s(b.addr_to(0)?)])?;
        agents[2].ctl(&["route", "add", &a_prefix, "via", &s(b.addr_to(2)?)])?;
        agents[1].ctl(&["route", "add", &c_prefix, "via", &s(c.addr_to(1)?)])?;
        agents[1].ctl(&["route", "add", &a_prefix, "via", &s(a.addr_to(1)?)])?;
        agents[1].ctl(&["peers", "add", &s(a.addr_to(1)?)])?;
        agents[1].ctl(&["peers", "add", &s(c.addr_to(1)?)])?;
        agents[1].wait_peers_up(
            &[(a.addr_to(1)?, PORT), (c.addr_to(1)?, PORT)],
            LINK_UP_TIMEOUT,
        )?;
        a.ping(b.addr_to(0)?, 3)?;
        b.ping(c.addr_to(1)?, 3)?;
        c.ping(b.addr_to(2)?, 3)?;
        Ok(Self {
            agents,
            topo,
            a_overlay,
            c_overlay,
        })
    }
}

/// Data packets counted around relay b of an [`OverlayChain`] at one moment.
///
/// a and c share no link, so every data packet either of their agents receives crossed
/// b; b relays in XDP (`redirect`, `tx`) or in its agent (`rx_data_relayed`). Between
/// two snapshots, what b relayed must equal what a and c received, up to the losses
/// the kernel names on the way (a full veth ring after b's redirect, a full socket
/// buffer at a or c, a failed send by b's agent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounts {
    /// Data packets that reached a's agent (all from c).
    pub a_rx_data: u64,
    /// Data packets that reached c's agent (all from a).
    pub c_rx_data: u64,
    /// Packets b's XDP program relayed (`redirect` + `tx`).
    pub b_xdp_relayed: u64,
    /// Data packets b's XDP program passed up to its agent for relaying
    /// (`pass_no_neighbour` + `pass_slow_path` + `pass_too_big`).
    pub b_xdp_passed_up: u64,
    /// Data packets that reached b's agent.
    pub b_rx_data: u64,
    /// Data packets b's agent relayed.
    pub b_agent_relayed: u64,
    /// Losses the kernel counts between b and a or c, and b's failed sends: veth
    /// `tx_dropped` and `xdp_xmit_errors` on b's interfaces, UDP `InErrors` at a and c,
    /// b's agent `tx_error`.
    pub named_losses: u64,
}

impl RelayCounts {
    /// What happened between `before` and `self`.
    pub fn since(&self, before: &RelayCounts) -> RelayCounts {
        RelayCounts {
            a_rx_data: self.a_rx_data.saturating_sub(before.a_rx_data),
            c_rx_data: self.c_rx_data.saturating_sub(before.c_rx_data),
            b_xdp_relayed: self.b_xdp_relayed.saturating_sub(before.b_xdp_relayed),
            b_xdp_passed_up: self.b_xdp_passed_up.saturating_sub(before.b_xdp_passed_up),
            b_rx_data: self.b_rx_data.saturating_sub(before.b_rx_data),
            b_agent_relayed: self.b_agent_relayed.saturating_sub(before.b_agent_relayed),
            named_losses: self.named_losses.saturating_sub(before.named_losses),
        }
    }

    /// Everything b relayed, in the kernel and in its agent.
    pub fn b_relayed(&self) -> u64 {
        self.b_xdp_relayed + self.b_agent_relayed
    }

    /// Whether b relayed exactly what a and c received, up to the named losses: never
    /// less (nothing reaches a or c but through b), never more than the losses explain.
    /// Without losses that is equality.
    pub fn balanced(&self) -> bool {
        let received = self.a_rx_data + self.c_rx_data;
        (received..=received + self.named_losses).contains(&self.b_relayed())
    }
}

/// An XDP counter, 0 when no program is attached (the list is empty then).
fn xdp_counter(stats: &Value, name: &str) -> Result<u64> {
    if stats["xdp"].as_array().is_none_or(Vec::is_empty) {
        return Ok(0);
    }
    counter(stats, "xdp", name)
}

/// `Udp6InErrors` of a namespace (datagrams the kernel dropped on receive, full socket
/// buffers included).
fn udp6_in_errors(node: &crate::topology::Node) -> Result<u64> {
    let text = node.netns().exec_stdout("cat", ["/proc/net/snmp6"])?;
    text.lines()
        .find_map(|l| l.strip_prefix("Udp6InErrors"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Udp6InErrors in {}'s /proc/net/snmp6", node.name()))
}

/// A veth's drops on the way out: `tx_dropped` (peer's ring full on the stack path) and
/// `xdp_xmit_errors` (peer's ring full for frames redirected by XDP).
fn veth_tx_losses(node: &crate::topology::Node, ifname: &str) -> Result<u64> {
    let link = node
        .netns()
        .ip(["-s", "-j", "link", "show", "dev", ifname])?;
    let link: Value = serde_json::from_slice(&link.stdout).context("ip -j link")?;
    let dropped = link[0]["stats64"]["tx"]["dropped"]
        .as_u64()
        .with_context(|| format!("no tx dropped for {ifname}: {link}"))?;
    let ethtool = node
        .netns()
        .exec_stdout(crate::util::tool("ethtool"), ["-S", ifname])?;
    let xmit_errors: u64 = ethtool
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(k, _)| k.ends_with("xdp_xmit_errors"))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum();
    Ok(dropped + xmit_errors)
}

impl OverlayChain {
    /// The data-packet counters around b now (see [`RelayCounts`]).
    pub fn relay_counts(&self) -> Result<RelayCounts> {
        let (a, b, c) = (
            self.agents[0].stats()?,
            self.agents[1].stats()?,
            self.agents[2].stats()?,
        );
        let mut named_losses = counter(&b, "agent", "tx_error")?;
        let b_node = self.topo.node(1);
        for iface in b_node.ifaces() {
            named_losses += veth_tx_losses(b_node, &iface.name)?;
        }
        named_losses += udp6_in_errors(self.topo.node(0))? + udp6_in_errors(self.topo.node(2))?;
        Ok(RelayCounts {
            a_rx_data: counter(&a, "agent", "rx_data")?,
            c_rx_data: counter(&c, "agent", "rx_data")?,
            b_xdp_relayed: xdp_counter(&b, "redirect")? + xdp_counter(&b, "tx")?,
            b_xdp_passed_up: xdp_counter(&b, "pass_no_neighbour")?
                + xdp_counter(&b, "pass_slow_path")?
                + xdp_counter(&b, "pass_too_big")?,
            b_rx_data: counter(&b, "agent", "rx_data")?,
            b_agent_relayed: counter(&b, "agent", "rx_data_relayed")?,
            named_losses,
        })
    }

    /// The counters since `before` once they balance (packets still in flight when a
    /// snapshot is taken are counted by b but not yet by a or c), or the last unbalanced
    /// difference after `timeout`: a real loss or miscount never balances.
    pub fn settled_relay_counts(
        &self,
        before: &RelayCounts,
        timeout: Duration,
    ) -> Result<RelayCounts> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let d = self.relay_counts()?.since(before);
            if d.balanced() || std::time::Instant::now() >= deadline {
                return Ok(d);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
