//! The handshake flood benchmark (`cargo xtask bench flood`): while a → c carries TCP
//! (iperf3) through relay b, an attacker in a fourth namespace, attached to the target
//! (c, or b), floods it with HandshakeInits as fast as it can make them, first from
//! fresh keys echoing every cookie, then replaying a few prepared inits. Each window is
//! measured next to an unflooded one on the same chain, so the ratios mean something on
//! a small, shared machine; nothing here asserts a timing.
//!
//! The attacker sends from several underlay addresses in different /64s (routed back to
//! it by the target), so per-source limits see that many senders and the node's
//! verification budget is what holds. It runs on the same two cores as everything else:
//! the CPU it burns making inits is part of what the flood costs the others. So each
//! flood has a control window: the same attacker doing the same work, its inits
//! addressed to an overlay destination the target neither owns nor routes, which the
//! target's XDP program drops at first sight (`drop_unknown_peer`). Against the
//! unflooded windows, the control gives what the attacker's own CPU (and its packets'
//! trip to the target's driver) costs a → c on this shared machine; the flood against
//! its control gives what handling the flood costs the target.

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::{
    agent::{AgentProcess, counter},
    netns::NsChild,
    scenario::{OverlayChain, PORT},
    throughput::{self, MachineCpu, NetCounters},
    topology::{Chain, Node},
    util::{self, TempDir},
};

/// Which node the attacker is attached to and floods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The receiving end of the a → c transfer.
    C,
    /// The relay between a and c.
    B,
}

impl Target {
    /// Index of the node in the chain.
    fn index(self) -> usize {
        match self {
            Target::C => 2,
            Target::B => 1,
        }
    }

    /// Name for tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::C => "c",
            Target::B => "b",
        }
    }
}

/// The flood of one window, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flood {
    /// No attacker (the comparison window).
    None,
    /// Fresh keys, every cookie echoed.
    Fresh,
    /// A few prepared inits sent again and again.
    Replay,
    /// The attacker of [`Flood::Fresh`] with its inits addressed so that the target's
    /// XDP program drops them at once: what the attacker costs by itself.
    FreshControl,
    /// The same for [`Flood::Replay`].
    ReplayControl,
}

impl Flood {
    /// Name for tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Flood::None => "none",
            Flood::Fresh => "fresh keys + cookie echo",
            Flood::Replay => "replayed inits",
            Flood::FreshControl => "control: fresh, dropped",
            Flood::ReplayControl => "control: replays, dropped",
        }
    }

    /// The control window of a flood (the flood itself for a control, `None` for none).
    pub fn control(self) -> Option<Flood> {
        match self {
            Flood::None => None,
            Flood::Fresh | Flood::FreshControl => Some(Flood::FreshControl),
            Flood::Replay | Flood::ReplayControl => Some(Flood::ReplayControl),
        }
    }

    /// Whether this is a control window.
    pub fn is_control(self) -> bool {
        matches!(self, Flood::FreshControl | Flood::ReplayControl)
    }

    /// The attacker's `--mode`, `None` without an attacker.
    fn mode(self) -> Option<&'static str> {
        match self {
            Flood::None => None,
            Flood::Fresh | Flood::FreshControl => Some("fresh"),
            Flood::Replay | Flood::ReplayControl => Some("replay"),
        }
    }
}

/// The windows measured per target, in order: unflooded before and after, so drift of
/// the shared machine during the run shows, and the flooded ones are read against the
/// mean of the two; each flood next to its control.
pub const WINDOWS: [Flood; 6] = [
    Flood::None,
    Flood::Fresh,
    Flood::FreshControl,
    Flood::Replay,
    Flood::ReplayControl,
    Flood::None,
];

/// Where the control windows' inits are addressed: an overlay prefix no node of the
/// chain owns or routes, so the target's XDP program drops them as from an unknown
/// peer before anything else looks at them.
const CONTROL_DST: Ipv6Addr = Ipv6Addr::new(0xfd6d, 0xdead, 0, 0, 0, 0, 0, 1);

/// What one window measured.
#[derive(Debug, Clone)]
pub struct FloodWindow {
    /// The node flooded.
    pub target: Target,
    /// The flood in this window.
    pub flood: Flood,
    /// a → c goodput, bits per second (iperf3's receiver).
    pub received_bps: f64,
    /// TCP retransmits of the sender.
    pub retransmits: u64,
    /// Seconds between the snapshots around the client.
    pub window_seconds: f64,
    /// The target agent's CPU seconds in the window.
    pub target_cpu_seconds: f64,
    /// The whole machine's busy share in the window (0..=1).
    pub machine_busy: f64,
    /// Deltas of the target agent's counters in the window, by name.
    pub target_counters: Vec<(&'static str, u64)>,
    /// Deltas of the target's XDP counters in the window, by name.
    pub target_xdp: Vec<(&'static str, u64)>,
    /// Datagrams dropped at the target because its agent socket's buffer was full.
    pub target_rcvbuf_errors: u64,
    /// The attacker's own report (its JSON line), `None` without a flood.
    pub attacker: Option<Value>,
    /// CPU seconds the attacker process used in the window (it shares the machine).
    pub attacker_cpu_seconds: f64,
}

impl FloodWindow {
    /// Goodput in Gbit/s.
    pub fn gbps(&self) -> f64 {
        self.received_bps / 1e9
    }

    /// A counter delta by name (0 if not listed).
    pub fn counter(&self, name: &str) -> u64 {
        self.target_counters
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v)
    }

    /// Per second of the window.
    pub fn per_second(&self, name: &str) -> f64 {
        self.counter(name) as f64 / self.window_seconds.max(f64::EPSILON)
    }

    /// An XDP counter's delta per second of the window (0 if not listed).
    pub fn xdp_per_second(&self, name: &str) -> f64 {
        self.target_xdp
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v) as f64
            / self.window_seconds.max(f64::EPSILON)
    }
}

/// What the whole run of one target showed besides its windows.
#[derive(Debug, Clone)]
pub struct FloodRun {
    /// The node flooded.
    pub target: Target,
    /// The windows, in [`WINDOWS`] order.
    pub windows: Vec<FloodWindow>,
    /// a's handshakes that failed over the whole run (its session with c must carry
    /// the transfer through every flood).
    pub a_handshakes_failed: u64,
    /// With the relay b as the target: seconds until a, which had never talked to b end
    /// to end, had its packets delivered by b's agent while the fresh-key flood was
    /// still running (a real initiator's handshake with the flooded node); `None` if
    /// not within 10 s, or for target c.
    pub new_session_under_flood: Option<f64>,
}

/// The target agent's counters the report reads.
const COUNTERS: [&str; 8] = [
    "rx_handshake",
    "handshake_verified",
    "handshake_rate_limited",
    "handshake_replayed",
    "handshake_rejected",
    "rx_data_local",
    "rx_data_relayed",
    "rx_malformed",
];

/// The target's XDP counters the report reads.
const XDP_COUNTERS: [&str; 3] = ["pass_control", "drop_handshake_rate", "drop_unknown_peer"];

/// Addresses the attacker sends from, one per /64 (`fd00:f100:<i>::2`).
fn attacker_sources(n: usize) -> Vec<(Ipv6Addr, String)> {
    (0..n)
        .map(|i| {
            let addr = Ipv6Addr::new(0xfd00, 0xf100, i as u16, 0, 0, 0, 0, 2);
            (addr, format!("{addr}/64"))
        })
        .collect()
}

/// Runs the three windows of `seconds` each against `target`; `flood_bin` is the
/// attacker (the testbed's `flood` example), `sources` how many /64s it sends from.
pub fn run(
    bin_dir: &Path,
    flood_bin: &Path,
    target: Target,
    seconds: u64,
    sources: usize,
) -> Result<FloodRun> {
    ensure!(util::is_root(), "the flood benchmark needs root");
    let iperf3 = util::tool("iperf3");
    ensure!(
        iperf3.is_file(),
        "iperf3 not found (cargo xtask setup installs it)"
    );
    ensure!(flood_bin.is_file(), "{} not found", flood_bin.display());
    ensure!((1..=200).contains(&sources), "1..=200 attacker sources");
    let t = target.index();
    let topo = Chain::new(4)
        .links(&[(0, 1), (1, 2), (3, t)])
        .tag("fld")
        .build()?;
    let chain = OverlayChain::start_on(topo, bin_dir, &["--dataplane", "xdp"])?;
    let (a, c, x) = (chain.topo.node(0), chain.topo.node(2), chain.topo.node(3));
    let victim = chain.topo.node(t);
    let victim_overlay: Ipv6Addr =
        crate::scenario::json_str(&chain.agents[t].status()?, "node_address")?.parse()?;

    // The attacker's source addresses, and the victim's way back to them.
    let x_iface = x.iface_to(t)?.name.clone();
    let sources = attacker_sources(sources);
    for (_, cidr) in &sources {
        x.netns().ip([
            "-6",
            "addr",
            "add",
            cidr.as_str(),
            "dev",
            x_iface.as_str(),
            "nodad",
        ])?;
    }
    let via = x.addr_to(t)?.to_string();
    let v_iface = victim.iface_to(3)?.name.clone();
    victim.netns().ip([
        "-6",
        "route",
        "add",
        "fd00:f100::/32",
        "via",
        via.as_str(),
        "dev",
        v_iface.as_str(),
    ])?;
    let to = SocketAddr::V6(SocketAddrV6::new(victim.addr_to(3)?, PORT, 0, 0));
    let from: Vec<String> = sources.iter().map(|(a, _)| a.to_string()).collect();
    let from = from.join(",");

    let ticks = throughput::clock_ticks_per_second()?;
    let victim_pid = throughput::agent_pid(&chain.agents[t])?;
    throughput::warm_up(a, chain.c_overlay)?;
    let a_before = chain.agents[0].stats()?;

    let mut windows = Vec::new();
    let mut new_session_under_flood = None;
    for flood in WINDOWS {
        eprintln!(
            "==> {seconds} s of iperf3 a → c, attacker on {}: {}",
            target.as_str(),
            flood.as_str()
        );
        let dst = if flood.is_control() {
            CONTROL_DST
        } else {
            victim_overlay
        };
        let attacker = match flood.mode() {
            None => None,
            Some(mode) => Some(start_attacker(
                x,
                flood_bin,
                mode,
                dst,
                to,
                &from,
                // Running before, during and after the client's window.
                seconds + 3,
            )?),
        };
        if attacker.is_some() {
            std::thread::sleep(Duration::from_secs(1));
        }
        let window = measure_window(&chain, &iperf3, c, t, victim_pid, seconds, ticks);
        if flood == Flood::Fresh && target == Target::B {
            new_session_under_flood = reach_relay(a, &chain.agents[t], victim_overlay)?;
        }
        let (attacker_report, attacker_cpu_seconds) = match attacker {
            Some((mut child, log, cpu_before)) => {
                let cpu = throughput::process_cpu_ticks(child.id())
                    .map_or(0.0, |t| t.saturating_sub(cpu_before) as f64 / ticks);
                (Some(finish_attacker(&mut child, &log, seconds)?), cpu)
            }
            None => (None, 0.0),
        };
        let (received_bps, retransmits, window_seconds, cpu, machine_busy, counters, xdp, rcvbuf) =
            window?;
        windows.push(FloodWindow {
            target,
            flood,
            received_bps,
            retransmits,
            window_seconds,
            target_cpu_seconds: cpu,
            machine_busy,
            target_counters: counters,
            target_xdp: xdp,
            target_rcvbuf_errors: rcvbuf,
            attacker: attacker_report,
            attacker_cpu_seconds,
        });
    }
    let a_after = chain.agents[0].stats()?;
    let delta = |name: &str| -> Result<u64> {
        Ok(counter(&a_after, "agent", name)?.saturating_sub(counter(&a_before, "agent", name)?))
    };
    Ok(FloodRun {
        target,
        windows,
        a_handshakes_failed: delta("handshake_failed")?,
        new_session_under_flood,
    })
}

/// Pings the relay's overlay address from `a` (a new end-to-end session: a never
/// talked to b) until b's agent has delivered one of the pings (b has no TUN device,
/// so nothing answers them: its `rx_data_local` counts them); seconds it took, `None`
/// if not within 10 s.
fn reach_relay(a: &Node, b: &AgentProcess, b_overlay: Ipv6Addr) -> Result<Option<f64>> {
    let before = counter(&b.stats()?, "agent", "rx_data_local")?;
    let target = b_overlay.to_string();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        // Replies never come; the exit status is not the point.
        let _ = a.netns().exec(
            util::tool("ping"),
            ["-6", "-n", "-c", "1", "-W", "1", target.as_str()],
        );
        if counter(&b.stats()?, "agent", "rx_data_local")? > before {
            return Ok(Some(start.elapsed().as_secs_f64()));
        }
    }
    Ok(None)
}

/// Starts the attacker for `seconds`; returns it with its log.
fn start_attacker(
    x: &Node,
    flood_bin: &Path,
    mode: &str,
    dst: Ipv6Addr,
    to: SocketAddr,
    from: &str,
    seconds: u64,
) -> Result<(NsChild, (TempDir, std::path::PathBuf), u64)> {
    let dir = TempDir::new("flood")?;
    let log = dir.path().join("flood.json");
    let args = [
        "--dst".to_string(),
        dst.to_string(),
        "--to".to_string(),
        to.to_string(),
        "--from".to_string(),
        from.to_string(),
        "--mode".to_string(),
        mode.to_string(),
        "--seconds".to_string(),
        seconds.to_string(),
    ];
    let child = x.netns().spawn(flood_bin, &args, Some(&log))?;
    // `ip netns exec` execs the attacker in place, so this pid is the attacker's.
    std::thread::sleep(Duration::from_millis(200));
    let cpu = throughput::process_cpu_ticks(child.id()).unwrap_or(0);
    Ok((child, (dir, log), cpu))
}

/// Waits for the attacker to end and reads its report.
fn finish_attacker(
    child: &mut NsChild,
    (_dir, log): &(TempDir, std::path::PathBuf),
    seconds: u64,
) -> Result<Value> {
    let status = child
        .wait_timeout(Duration::from_secs(seconds + 30))?
        .context("the attacker did not stop")?;
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    ensure!(
        status.success(),
        "the attacker failed ({}): {text}",
        util::status_text(status)
    );
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("the attacker printed no report: {text}"))?;
    serde_json::from_str(line).context("the attacker's report")
}

type Deltas = Vec<(&'static str, u64)>;
type WindowFigures = (f64, u64, f64, f64, f64, Deltas, Deltas, u64);

/// One iperf3 run a → c with snapshots of the victim around it.
fn measure_window(
    chain: &OverlayChain,
    iperf3: &Path,
    c: &Node,
    victim: usize,
    victim_pid: u32,
    seconds: u64,
    ticks: f64,
) -> Result<WindowFigures> {
    let logs = TempDir::new("iperf3")?;
    let server_log = logs.path().join("server.json");
    let mut server = throughput::start_server(c, iperf3, chain.c_overlay, &server_log)?;
    let stats_before = chain.agents[victim].stats()?;
    let cpu_before = throughput::process_cpu_ticks(victim_pid)?;
    let net_before = NetCounters::read(victim_pid)?;
    let machine_before = MachineCpu::read()?;
    let start = Instant::now();
    let client = throughput::run_client(
        chain.topo.node(0),
        iperf3,
        chain.a_overlay,
        chain.c_overlay,
        seconds,
    );
    let window_seconds = start.elapsed().as_secs_f64();
    let machine = MachineCpu::read()?.since(&machine_before);
    let cpu_after = throughput::process_cpu_ticks(victim_pid)?;
    let net_after = NetCounters::read(victim_pid)?;
    let stats_after = chain.agents[victim].stats()?;
    let client = throughput::finish_client(client, &mut server, c, &server_log)?;
    let iperf = throughput::parse_iperf(&client)?;
    let mut counters = Vec::new();
    for name in COUNTERS {
        let delta = counter(&stats_after, "agent", name)?.saturating_sub(counter(
            &stats_before,
            "agent",
            name,
        )?);
        counters.push((name, delta));
    }
    // An older build compared with `--bin-dir` may not have every counter: 0 there.
    let mut xdp = Vec::new();
    for name in XDP_COUNTERS {
        let read = |stats: &Value| counter(stats, "xdp", name).unwrap_or(0);
        xdp.push((name, read(&stats_after).saturating_sub(read(&stats_before))));
    }
    Ok((
        iperf.received_bps,
        iperf.retransmits,
        window_seconds,
        cpu_after.saturating_sub(cpu_before) as f64 / ticks,
        if machine.total == 0 {
            f64::NAN
        } else {
            machine.busy as f64 / machine.total as f64
        },
        counters,
        xdp,
        net_after
            .udp_rcvbuf_errors
            .saturating_sub(net_before.udp_rcvbuf_errors),
    ))
}
