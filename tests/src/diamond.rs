//! The diamond: two equal relays between two end nodes, the smallest topology in which
//! a relay can fail over to another.
//!
//! ```text
//!   a ── b ── d
//!   │         │
//!   └─── c ───┘
//! ```
//!
//! a and d have TUN devices (overlay addresses for a ping stream); b and c are pure
//! relays. Every node names its neighbours with `--peer`, as an operator's configuration
//! would, so a restarted agent finds them again. Used by the restart and failover tests
//! and by `cargo xtask bench failover`.

use std::{
    net::Ipv6Addr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    agent::{AgentOptions, AgentProcess, counter, counter_bytes},
    probe::{Mode, Probe, ProbeReport},
    scenario::{PORT, json_str},
    topology::{Chain, Topology},
    util,
};

/// End node with the ping stream's source.
pub const A: usize = 0;
/// First relay.
pub const B: usize = 1;
/// Second relay.
pub const C: usize = 2;
/// End node with the ping stream's echo.
pub const D: usize = 3;
/// The four links.
pub const LINKS: [(usize, usize); 4] = [(A, B), (B, D), (A, C), (C, D)];
/// How long convergence (links, routes) may take.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Four agents in a diamond of namespaces.
#[derive(Debug)]
pub struct Diamond {
    /// The namespaces and links.
    pub topo: Topology,
    /// The agents by node index; `None` once killed.
    pub agents: Vec<Option<AgentProcess>>,
    bin_dir: PathBuf,
    extra_args: Vec<String>,
    a_overlay: Ipv6Addr,
    d_overlay: Ipv6Addr,
    a_prefix: String,
    d_prefix: String,
}

impl Diamond {
    /// Builds the namespaces and starts the four agents from `bin_dir`, each with
    /// `extra_args` (e.g. `--hello-interval-ms`), then waits until every link is up.
    pub fn start(tag: &str, bin_dir: &Path, extra_args: &[&str]) -> Result<Self> {
        let topo = Chain::new(4).tag(tag).links(&LINKS).build()?;
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let mut agents = Vec::new();
        for i in 0..4 {
            agents.push(Some(start_agent(&topo, i, bin_dir, &extra_args)?));
        }
        let status = |i: usize| -> Result<serde_json::Value> {
            agents[i].as_ref().context("agent running")?.status()
        };
        let (a_status, d_status) = (status(A)?, status(D)?);
        let diamond = Self {
            a_overlay: json_str(&a_status, "node_address")?.parse()?,
            d_overlay: json_str(&d_status, "node_address")?.parse()?,
            a_prefix: json_str(&a_status, "node_prefix")?.to_string(),
            d_prefix: json_str(&d_status, "node_prefix")?.to_string(),
            topo,
            agents,
            bin_dir: bin_dir.to_path_buf(),
            extra_args,
        };
        diamond.wait_all_up(CONVERGE_TIMEOUT)?;
        Ok(diamond)
    }

    /// Node `i`'s agent, if running.
    pub fn agent(&self, i: usize) -> Result<&AgentProcess> {
        self.agents[i]
            .as_ref()
            .with_context(|| format!("{}'s agent is not running", self.topo.node(i).name()))
    }

    /// Starts node `i`'s agent again after it was killed.
    pub fn start_again(&mut self, i: usize) -> Result<()> {
        if self.agents[i].is_some() {
            bail!("{}'s agent is running", self.topo.node(i).name());
        }
        self.agents[i] = Some(start_agent(&self.topo, i, &self.bin_dir, &self.extra_args)?);
        Ok(())
    }

    /// Every link end (node, neighbour) of running agents that is not up and in the
    /// relay peer map, and the shortest time any link end has been up.
    pub fn link_state(&self) -> Result<(Vec<String>, Duration)> {
        let mut down = Vec::new();
        let mut youngest = Duration::MAX;
        for (i, agent) in self.agents.iter().enumerate() {
            let Some(agent) = agent else { continue };
            let peers = agent.ctl_json(&["peers"])?;
            let rows = peers["peers"].as_array().cloned().unwrap_or_default();
            for (j, addr) in self.topo.node(i).neighbours() {
                if self.agents[j].is_none() {
                    continue;
                }
                let row = rows.iter().find(|r| {
                    r["address"] == addr.to_string().as_str() && r["port"] == u64::from(PORT)
                });
                match row {
                    Some(r) if r["state"] == "up" && r["in_kernel"] == true => {
                        let age = r["state_age_ms"]
                            .as_u64()
                            .or_else(|| r["state_age_ms"].as_str().and_then(|s| s.parse().ok()))
                            .context("state_age_ms")?;
                        youngest = youngest.min(Duration::from_millis(age));
                    }
                    other => down.push(format!(
                        "{} sees {}: {}",
                        self.topo.node(i).name(),
                        self.topo.node(j).name(),
                        other.map_or("absent".to_string(), |r| r.to_string())
                    )),
                }
            }
        }
        Ok((down, youngest))
    }

    /// Waits until every link between running agents is up on both ends.
    pub fn wait_all_up(&self, timeout: Duration) -> Result<()> {
        util::poll(
            "every link up on both ends",
            timeout,
            Duration::from_millis(50),
            || {
                let (down, _) = self.link_state()?;
                Ok(down.is_empty().then_some(()))
            },
        )
        .with_context(|| format!("{:?}", self.link_state().map(|s| s.0)))
    }

    /// The next hop node `i` uses for the other end node's prefix (a → d, d → a), once it
    /// has a routing-protocol route in sync with the kernel.
    pub fn next_hop(&self, i: usize) -> Result<Option<String>> {
        let prefix = if i == D {
            &self.a_prefix
        } else {
            &self.d_prefix
        };
        let routes = self.agent(i)?.ctl_json(&["routes"])?;
        let row = routes["routes"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["prefix"] == prefix.as_str()));
        Ok(row.and_then(|r| {
            (r["agent"]["origin"] == "routing" && r["in_sync"] == true)
                .then(|| {
                    r["agent"]["next_hop"]["address"]
                        .as_str()
                        .map(str::to_owned)
                })
                .flatten()
        }))
    }

    /// Waits until a and d route to each other.
    pub fn wait_routes(&self) -> Result<()> {
        util::poll(
            "a and d route to each other",
            CONVERGE_TIMEOUT,
            Duration::from_millis(100),
            || Ok((self.next_hop(A)?.is_some() && self.next_hop(D)?.is_some()).then_some(())),
        )
    }

    /// Starts a ping stream a ⇄ d.
    pub fn ping_stream(&self) -> Result<Probe> {
        Probe::start(
            (self.topo.node(A).netns(), self.a_overlay),
            (self.topo.node(D).netns(), self.d_overlay),
            Mode::Echo,
        )
    }

    /// Packets node `i`'s XDP program relayed (redirect).
    pub fn redirects(&self, i: usize) -> Result<u64> {
        counter(&self.agent(i)?.stats()?, "xdp", "redirect")
    }

    /// Link control packets and bytes all running agents received so far.
    pub fn control_received(&self) -> Result<(u64, u64)> {
        let (mut packets, mut bytes) = (0, 0);
        for agent in self.agents.iter().flatten() {
            let stats = agent.stats()?;
            packets += counter(&stats, "agent", "rx_control")?;
            bytes += counter_bytes(&stats, "agent", "rx_control")?;
        }
        Ok((packets, bytes))
    }

    /// Kills (SIGKILL) the relay that carries a ping stream a ⇄ d and measures the
    /// stream across the failure: until a routes d via the other relay, that relay has
    /// relayed the stream in XDP, and the stream has flowed for a further `settle`.
    pub fn fail_active_relay(&mut self, settle: Duration) -> Result<Failover> {
        self.wait_routes()?;
        let before = (self.redirects(B)?, self.redirects(C)?);
        let stream = self.ping_stream()?;
        thread::sleep(Duration::from_secs(1));
        let after = (self.redirects(B)?, self.redirects(C)?);
        let (killed, survivor) = if after.0 - before.0 >= after.1 - before.1 {
            (B, C)
        } else {
            (C, B)
        };
        let survivor_before = self.redirects(survivor)?;
        let killed_at = Instant::now();
        self.agents[killed]
            .take()
            .context("the active relay is running")?
            .kill()?;
        let via = self.topo.node(A).peer_addr(survivor)?.to_string();
        util::poll(
            "a routes d via the surviving relay",
            CONVERGE_TIMEOUT,
            Duration::from_millis(50),
            || Ok((self.next_hop(A)? == Some(via.clone())).then_some(())),
        )?;
        let rerouted = killed_at.elapsed();
        thread::sleep(settle);
        let report = stream.finish()?;
        Ok(Failover {
            killed,
            survivor,
            rerouted,
            survivor_relayed: self.redirects(survivor)? - survivor_before,
            report,
        })
    }

    /// Every running agent's peers and the end of its log, for a failure message.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for (i, agent) in self.agents.iter().enumerate() {
            if let Some(agent) = agent {
                out.push_str(&format!(
                    "--- {} peers:\n{}\n--- {} routes:\n{}\n--- log:\n{}\n",
                    self.topo.node(i).name(),
                    agent.ctl(&["peers"]).unwrap_or_default(),
                    self.topo.node(i).name(),
                    agent.ctl(&["routes"]).unwrap_or_default(),
                    agent.log_tail(30)
                ));
            }
        }
        out
    }
}

/// What killing the active relay did to the ping stream.
#[derive(Debug, Clone)]
pub struct Failover {
    /// The relay killed.
    pub killed: usize,
    /// The relay that took the stream over.
    pub survivor: usize,
    /// From the kill until a's route pointed at the survivor (as `routes` shows it,
    /// polled every 50 ms).
    pub rerouted: Duration,
    /// Packets the survivor relayed in XDP after the kill.
    pub survivor_relayed: u64,
    /// The stream, across the failure.
    pub report: ProbeReport,
}

fn start_agent(
    topo: &Topology,
    i: usize,
    bin_dir: &Path,
    extra: &[String],
) -> Result<AgentProcess> {
    let mut extra_args = extra.to_vec();
    if i == B || i == C {
        extra_args.push("--no-tun".to_string());
    }
    for (_, addr) in topo.node(i).neighbours() {
        extra_args.extend(["--peer".to_string(), format!("[{addr}]:{PORT}")]);
    }
    AgentProcess::start(
        topo.node(i),
        bin_dir,
        AgentOptions {
            port: PORT,
            extra_args,
            ..AgentOptions::default()
        },
    )
}
