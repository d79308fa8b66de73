//! End-to-end TCP throughput a → c through relay b, with b relaying in XDP and on the
//! userspace path one after the other in the same run, plus what the relay spent per
//! packet in each case, for `cargo xtask bench throughput`.
//!
//! Both variants run back to back on a fresh [`OverlayChain`] each, so they share the
//! machine's state of the moment: the machine is small and noisy, and only figures
//! measured side by side (read as ratios) mean anything. Nothing here asserts a timing.
//!
//! Where the CPU figures come from, and what they leave out:
//!
//! - **XDP relay**: the kernel's own run-time statistics of b's XDP program
//!   (`run_time_ns` and `run_cnt` in the program's fdinfo, counted while
//!   `kernel.bpf_stats_enabled` is 1). That is the program alone; the redirect that
//!   follows it (devmap flush, veth transmit) is not in it, so it is a lower bound of
//!   the relay's cost. The machine-wide softirq time per relayed packet is reported
//!   next to it as an upper bound: XDP runs in softirq, but so does every other
//!   receive on the machine, a's and c's included.
//! - **Userspace relay**: b's agent process CPU time (`utime + stime` over all its
//!   threads) per packet it relayed. Its syscalls are in it. With tick-based CPU
//!   accounting (no `CONFIG_IRQ_TIME_ACCOUNTING`) so is any softirq work that ran on its
//!   time, which on veth includes c's receive of what its own `sendto` hands over, so the
//!   figure leans high; the receive that hands b its datagrams runs mostly on a's time.
//!
//! For the same reason the agents' CPU shares of a and c include work done on behalf of
//! the other namespaces: on one machine, veth delivery runs inline in the sender's
//! context.

use std::{
    collections::HashMap,
    net::Ipv6Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{
    agent::{AgentProcess, counter, counter_bytes},
    netns::NsChild,
    scenario::OverlayChain,
    topology::{Chain, Node},
    util::{self, TempDir},
};

/// The relay data planes compared, in the order they run.
pub const RELAYS: [&str; 2] = ["xdp", "userspace"];

/// TCP port of the iperf3 server in c.
pub const IPERF_PORT: u16 = 5201;

/// How long the iperf3 server gets to start listening, and to exit after its one test.
const SERVER_TIMEOUT: Duration = Duration::from_secs(15);

/// Slack on top of the test length before the iperf3 client is killed: connection setup,
/// the final exchange of results, a loaded machine.
const CLIENT_SLACK: Duration = Duration::from_secs(30);

/// The kernel-wide switch for BPF run-time statistics.
const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// The agent's process name as the kernel reports it in `/proc/<pid>/comm`.
const AGENT_COMM: &str = "myconet-agent";

/// Threads listed per run: enough to see which ones carry the load.
const TOP_THREADS: usize = 12;

/// Node names, by index in the chain.
const NODE_NAMES: [&str; 3] = ["a", "b", "c"];

/// How the relay CPU time of a run was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayCpuSource {
    /// `run_time_ns` / `run_cnt` of b's XDP program (kernel BPF statistics).
    BpfRunTime,
    /// `utime + stime` of b's agent process per packet it relayed.
    AgentProcess,
}

impl RelayCpuSource {
    /// Short label for tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayCpuSource::BpfRunTime => "xdp prog run_time_ns/run_cnt",
            RelayCpuSource::AgentProcess => "agent utime+stime / relayed",
        }
    }
}

/// CPU a thread of one of the agents used during the measured window.
#[derive(Debug, Clone)]
pub struct ThreadCpu {
    /// Node the agent runs on (`a`, `b`, `c`).
    pub node: &'static str,
    /// Thread id.
    pub tid: u32,
    /// Thread name (`/proc/<pid>/task/<tid>/comm` as in `stat`).
    pub comm: String,
    /// CPU seconds (user + system).
    pub cpu_seconds: f64,
}

/// What one throughput run measured.
#[derive(Debug, Clone)]
pub struct ThroughputRun {
    /// b's data plane (`xdp`, `userspace`).
    pub relay: String,
    /// Seconds the iperf3 receiver measured over.
    pub seconds: f64,
    /// Wall-clock seconds between the two counter snapshots around the client.
    pub window_seconds: f64,
    /// Bits per second c received (`end.sum_received.bits_per_second`).
    pub received_bps: f64,
    /// TCP retransmits of the sender (`end.sum_sent.retransmits`).
    pub retransmits: u64,
    /// iperf3 client's CPU use, percent of one core (`cpu_utilization_percent.host_total`).
    pub client_cpu_percent: f64,
    /// iperf3 server's CPU use, percent of one core (`remote_total`).
    pub server_cpu_percent: f64,
    /// Data packets b relayed, both directions (XDP redirect + tx, or the agent's
    /// `rx_data_relayed`).
    pub relayed_packets: u64,
    /// Bytes of those packets (Myconet datagrams, without the outer headers).
    pub relayed_bytes: u64,
    /// Data packets that reached b's agent socket in the XDP run (the slow path); in
    /// the userspace run every relayed packet does.
    pub relay_agent_rx_data: u64,
    /// How `relay_cpu_ns` was measured.
    pub relay_cpu_source: RelayCpuSource,
    /// Relay CPU time in the window, nanoseconds.
    pub relay_cpu_ns: u64,
    /// What `relay_cpu_ns` is divided by: program runs, or relayed packets.
    pub relay_cpu_packets: u64,
    /// CPU seconds of the agents of a, b and c in the window.
    pub agent_cpu_seconds: [f64; 3],
    /// Packets dropped on transmit by any device of a, b and c (`/proc/net/dev`): on a
    /// it is the TUN queue overflowing when a's agent does not drain it fast enough,
    /// which is where TCP's losses come from.
    pub tx_dropped: [u64; 3],
    /// UDP datagrams dropped because a socket's receive buffer was full
    /// (`Udp6RcvbufErrors`), on a, b and c.
    pub udp_rcvbuf_errors: [u64; 3],
    /// Packets the agents of a, b and c failed to write (`tx_error`: a TUN write or an
    /// underlay send refused): TCP retransmits around such losses, so only this
    /// counter shows them.
    pub agent_tx_errors: [u64; 3],
    /// Machine-wide CPU seconds spent in softirq in the window (all cores).
    pub machine_softirq_seconds: f64,
    /// Machine-wide busy CPU seconds in the window (all cores, not idle or iowait).
    pub machine_busy_seconds: f64,
    /// Machine-wide CPU seconds available in the window (all cores).
    pub machine_total_seconds: f64,
    /// The busiest agent threads in the window, busiest first.
    pub threads: Vec<ThreadCpu>,
}

impl ThroughputRun {
    /// End-to-end goodput in Gbit/s.
    pub fn gbps(&self) -> f64 {
        self.received_bps / 1e9
    }

    /// Relay CPU nanoseconds per packet by this run's [`RelayCpuSource`].
    pub fn relay_ns_per_packet(&self) -> f64 {
        ratio(self.relay_cpu_ns as f64, self.relay_cpu_packets as f64)
    }

    /// Machine-wide softirq nanoseconds per relayed packet: an upper bound of the XDP
    /// relay's full cost (program, redirect, transmit), loose because a's and c's
    /// receive work is in it too.
    pub fn softirq_ns_per_packet(&self) -> f64 {
        ratio(
            self.machine_softirq_seconds * 1e9,
            self.relayed_packets as f64,
        )
    }

    /// Agent CPU nanoseconds per relayed packet on node `i` (0 = a, 1 = b, 2 = c).
    pub fn agent_ns_per_packet(&self, i: usize) -> f64 {
        let cpu = self.agent_cpu_seconds.get(i).copied().unwrap_or(f64::NAN);
        ratio(cpu * 1e9, self.relayed_packets as f64)
    }

    /// Relayed packets per second.
    pub fn relayed_pps(&self) -> f64 {
        ratio(self.relayed_packets as f64, self.window_seconds)
    }

    /// Average relayed datagram size in bytes.
    pub fn avg_packet_bytes(&self) -> f64 {
        ratio(self.relayed_bytes as f64, self.relayed_packets as f64)
    }

    /// Share of the machine's CPU that was busy in the window (0..=1).
    pub fn machine_busy_fraction(&self) -> f64 {
        ratio(self.machine_busy_seconds, self.machine_total_seconds)
    }

    /// Share of the machine's CPU (0..=1) busy with anything but the three agents and
    /// the two iperf3 processes: other work on the machine competing with the
    /// benchmark, so a high value marks a run whose absolute figures are depressed.
    /// Approximate, because softirq work is charged to whichever process it interrupts.
    pub fn other_cpu_fraction(&self) -> f64 {
        let agents: f64 = self.agent_cpu_seconds.iter().sum();
        let iperf = (self.client_cpu_percent + self.server_cpu_percent) / 100.0 * self.seconds;
        let other = (self.machine_busy_seconds - agents - iperf).max(0.0);
        ratio(other, self.machine_total_seconds)
    }
}

/// `a / b`, or NaN when `b` is zero, so an empty denominator shows up as "NaN" in a
/// table instead of as infinity or a panic.
fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { f64::NAN } else { a / b }
}

/// Measures TCP throughput a → c for `seconds` with b relaying in XDP, then on the
/// userspace path, each on a fresh chain; BPF run-time statistics are on for the whole
/// run (both variants, so both pay their small overhead on a's and c's programs alike)
/// and restored to their previous setting afterwards, also on error.
pub fn run(bin_dir: &Path, seconds: u64) -> Result<Vec<ThroughputRun>> {
    ensure!(
        util::is_root(),
        "the throughput benchmark needs root (namespaces, XDP, BPF statistics)"
    );
    let iperf3 = util::tool("iperf3");
    ensure!(
        iperf3.is_file(),
        "iperf3 not found (cargo xtask setup installs it)"
    );
    let _stats = BpfStatsGuard::enable()?;
    let ticks = clock_ticks_per_second()?;
    let mut runs = Vec::with_capacity(RELAYS.len());
    for relay in RELAYS {
        eprintln!("==> {seconds} s of iperf3 a → c with b relaying on the {relay} path");
        let run = measure(bin_dir, &iperf3, relay, seconds, ticks)
            .with_context(|| format!("throughput through the {relay} relay"))?;
        runs.push(run);
    }
    Ok(runs)
}

/// Plain kernel TCP a → c with b's kernel forwarding: what one TCP stream reaches on
/// this testbed with no Myconet at all, as the ceiling to read the overlay's figures
/// against.
#[derive(Debug, Clone)]
pub struct BaselineRun {
    /// Whether the veths ran GRO (see [`kernel_baseline`]).
    pub gro: bool,
    /// Seconds the iperf3 receiver measured over.
    pub seconds: f64,
    /// Bits per second c received.
    pub received_bps: f64,
    /// TCP retransmits of the sender.
    pub retransmits: u64,
    /// Machine-wide busy CPU seconds in the window (all cores).
    pub machine_busy_seconds: f64,
    /// Machine-wide CPU seconds available in the window (all cores).
    pub machine_total_seconds: f64,
}

impl BaselineRun {
    /// Goodput in Gbit/s.
    pub fn gbps(&self) -> f64 {
        self.received_bps / 1e9
    }

    /// Share of the machine's CPU that was busy in the window (0..=1).
    pub fn machine_busy_fraction(&self) -> f64 {
        ratio(self.machine_busy_seconds, self.machine_total_seconds)
    }
}

/// Measures plain kernel TCP a → c for `seconds` over the underlay of a fresh a — b — c
/// chain built like the relay runs' (same veths, same offloads), b forwarding in its
/// kernel: no agents, no overlay, no encryption.
///
/// With `gro` (as the relay runs' veths are set up) b's kernel merges a's segments and
/// forwards 64 KB superpackets, a batching no per-packet relay of encrypted datagrams
/// can do; without it b forwards every 1,500-byte frame on its own, as the XDP relay
/// does. The two bracket what one TCP stream can expect here.
pub fn kernel_baseline(seconds: u64, gro: bool) -> Result<BaselineRun> {
    ensure!(
        util::is_root(),
        "the throughput benchmark needs root (namespaces)"
    );
    let iperf3 = util::tool("iperf3");
    ensure!(
        iperf3.is_file(),
        "iperf3 not found (cargo xtask setup installs it)"
    );
    let how = if gro { "with GRO" } else { "without GRO" };
    eprintln!("==> {seconds} s of iperf3 a → c with b forwarding in its kernel {how}, no overlay");
    let topo = Chain::new(3).tag("kfwd").veth_gro(gro).build()?;
    let (a, b, c) = (topo.node(0), topo.node(1), topo.node(2));
    let (a_addr, c_addr) = (a.addr_to(1)?, c.addr_to(1)?);
    let a_route = format!("{c_addr}/128");
    let c_route = format!("{a_addr}/128");
    let via_a = b.addr_to(0)?.to_string();
    let via_c = b.addr_to(2)?.to_string();
    a.netns().ip([
        "-6",
        "route",
        "add",
        a_route.as_str(),
        "via",
        via_a.as_str(),
    ])?;
    c.netns().ip([
        "-6",
        "route",
        "add",
        c_route.as_str(),
        "via",
        via_c.as_str(),
    ])?;
    // Resolves every neighbour on the way and proves the path before measuring.
    a.ping(c_addr, 3)?;

    let logs = TempDir::new("iperf3")?;
    let server_log = logs.path().join("server.json");
    let mut server = start_server(c, &iperf3, c_addr, &server_log)?;
    let before = MachineCpu::read()?;
    let client = run_client(a, &iperf3, a_addr, c_addr, seconds);
    let after = MachineCpu::read()?;
    let client = finish_client(client, &mut server, c, &server_log)?;
    let iperf = parse_iperf(&client)?;
    let ticks = clock_ticks_per_second()?;
    let machine = after.since(&before);
    Ok(BaselineRun {
        gro,
        seconds: iperf.seconds,
        received_bps: iperf.received_bps,
        retransmits: iperf.retransmits,
        machine_busy_seconds: machine.busy as f64 / ticks,
        machine_total_seconds: machine.total as f64 / ticks,
    })
}

/// Turns BPF run-time statistics on and puts the previous setting back on drop.
///
/// The switch is kernel-wide (not per namespace), so leaving it on would slow every
/// BPF program on the machine a little for good. A process killed with SIGKILL cannot
/// restore it; the drop covers errors and panics.
struct BpfStatsGuard {
    previous: String,
}

impl BpfStatsGuard {
    fn enable() -> Result<Self> {
        let previous = std::fs::read_to_string(BPF_STATS_SYSCTL)
            .with_context(|| format!("reading {BPF_STATS_SYSCTL}"))?
            .trim()
            .to_owned();
        std::fs::write(BPF_STATS_SYSCTL, "1")
            .with_context(|| format!("enabling BPF statistics ({BPF_STATS_SYSCTL} = 1)"))?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStatsGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS_SYSCTL, &self.previous) {
            eprintln!(
                "throughput: could not restore {BPF_STATS_SYSCTL} to {}: {e}",
                self.previous
            );
        }
    }
}

/// One relay variant: chain, server, warm-up, snapshots around the client, results.
fn measure(
    bin_dir: &Path,
    iperf3: &Path,
    relay: &str,
    seconds: u64,
    ticks: f64,
) -> Result<ThroughputRun> {
    let chain = OverlayChain::start(bin_dir, relay)?;
    let (a, b, c) = (chain.topo.node(0), chain.topo.node(1), chain.topo.node(2));
    ensure!(
        chain.agents.len() == 3,
        "the overlay chain has {} agents, not 3",
        chain.agents.len()
    );
    let mut pids = [0u32; 3];
    for (slot, agent) in pids.iter_mut().zip(&chain.agents) {
        *slot = agent_pid(agent)?;
    }

    // The handshake a ↔ c happens here rather than inside the measured window.
    warm_up(a, chain.c_overlay)?;

    let xdp_progs = if relay == "xdp" {
        let ids = attached_xdp_prog_ids(b)?;
        ensure!(
            !ids.is_empty(),
            "no XDP program attached on {}",
            b.ns_name()
        );
        Some(ids)
    } else {
        None
    };

    let logs = TempDir::new("iperf3")?;
    let server_log = logs.path().join("server.json");
    // Declared after the chain, so it is stopped before the chain goes.
    let mut server = start_server(c, iperf3, chain.c_overlay, &server_log)?;

    let before = Snapshot::take(&chain, &pids, xdp_progs.as_deref())?;
    let client = run_client(a, iperf3, chain.a_overlay, chain.c_overlay, seconds);
    let after = Snapshot::take(&chain, &pids, xdp_progs.as_deref())?;
    let client = finish_client(client, &mut server, c, &server_log)?;
    // The server, then the chain (agents, namespaces) go on return, also on error.
    results(relay, &client, &before, &after, ticks)
}

/// The client's report, or its error with the end of the server's log; then gives the
/// server (which serves one test) a bounded time to exit.
pub(crate) fn finish_client(
    client: Result<Value>,
    server: &mut NsChild,
    c: &Node,
    server_log: &Path,
) -> Result<Value> {
    let client = client.map_err(|e| {
        e.context(format!(
            "iperf3 server log {} ends with:\n{}",
            server_log.display(),
            util::tail(server_log, 20)
        ))
    })?;
    if server.wait_timeout(SERVER_TIMEOUT)?.is_none() {
        eprintln!(
            "throughput: the iperf3 server in {} did not exit after its test; stopping it",
            c.ns_name()
        );
    }
    Ok(client)
}

/// One overlay ping a → c, retried, so the session exists before anything is measured.
pub fn warm_up(a: &Node, c_overlay: Ipv6Addr) -> Result<()> {
    let target = c_overlay.to_string();
    util::poll(
        "the overlay session a → c",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || {
            a.netns()
                .exec(
                    util::tool("ping"),
                    ["-6", "-n", "-c", "1", "-W", "2", target.as_str()],
                )
                .map(|_| Some(()))
        },
    )
}

/// Starts `iperf3 -s -1` bound to c's overlay address and waits until it listens.
pub fn start_server(c: &Node, iperf3: &Path, c_overlay: Ipv6Addr, log: &Path) -> Result<NsChild> {
    let port = IPERF_PORT.to_string();
    let bind = c_overlay.to_string();
    let mut server = c.netns().spawn(
        iperf3,
        [
            "-s",
            "-1",
            "-B",
            bind.as_str(),
            "-p",
            port.as_str(),
            "--json",
        ],
        Some(log),
    )?;
    let filter = format!("sport = :{IPERF_PORT}");
    util::poll(
        "the iperf3 server in c to listen",
        SERVER_TIMEOUT,
        Duration::from_millis(50),
        || {
            if let Some(status) = server.try_wait()? {
                bail!(
                    "iperf3 server exited at start ({}): {}",
                    util::status_text(status),
                    util::tail(log, 20)
                );
            }
            let out = c
                .netns()
                .exec(util::tool("ss"), ["-H", "-l", "-t", "-n", filter.as_str()])?;
            Ok((!String::from_utf8_lossy(&out.stdout).trim().is_empty()).then_some(()))
        },
    )?;
    Ok(server)
}

/// Runs the iperf3 client in a for `seconds` and returns its parsed JSON report.
pub fn run_client(
    a: &Node,
    iperf3: &Path,
    a_overlay: Ipv6Addr,
    c_overlay: Ipv6Addr,
    seconds: u64,
) -> Result<Value> {
    let mut cmd = a.netns().command(iperf3);
    cmd.args(["-c", &c_overlay.to_string()])
        .args(["-B", &a_overlay.to_string()])
        .args(["-p", &IPERF_PORT.to_string()])
        .args(["-t", &seconds.to_string()])
        .args(["--connect-timeout", "10000", "-J"]);
    let timeout = Duration::from_secs(seconds) + CLIENT_SLACK;
    let out = util::run_with_timeout(&mut cmd, timeout)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Option<Value> = serde_json::from_str(&text).ok();
    if !out.status.success() {
        let why = report
            .as_ref()
            .and_then(|r| r.get("error"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_owned());
        bail!(
            "iperf3 client failed ({}): {why}",
            util::status_text(out.status)
        );
    }
    report.with_context(|| format!("iperf3 client printed invalid JSON: {text}"))
}

/// The figures iperf3's client report gives us.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IperfReport {
    pub(crate) seconds: f64,
    pub(crate) received_bps: f64,
    pub(crate) retransmits: u64,
    client_cpu_percent: f64,
    server_cpu_percent: f64,
}

/// Bits per second the receiver of an iperf3 client report measured.
pub fn received_bps(report: &Value) -> Result<f64> {
    Ok(parse_iperf(report)?.received_bps)
}

pub(crate) fn parse_iperf(report: &Value) -> Result<IperfReport> {
    if let Some(error) = report.get("error").and_then(Value::as_str) {
        bail!("iperf3 reported an error: {error}");
    }
    let end = report.get("end").context("iperf3 report has no \"end\"")?;
    let num = |section: &str, key: &str| -> Result<f64> {
        end.get(section)
            .and_then(|s| s.get(key))
            .and_then(Value::as_f64)
            .with_context(|| format!("iperf3 report has no number end.{section}.{key}"))
    };
    Ok(IperfReport {
        seconds: num("sum_received", "seconds")?,
        received_bps: num("sum_received", "bits_per_second")?,
        retransmits: end
            .get("sum_sent")
            .and_then(|s| s.get("retransmits"))
            .and_then(Value::as_u64)
            .context("iperf3 report has no integer end.sum_sent.retransmits")?,
        // CPU use is informative only; an iperf3 that leaves it out is not an error.
        client_cpu_percent: num("cpu_utilization_percent", "host_total").unwrap_or(f64::NAN),
        server_cpu_percent: num("cpu_utilization_percent", "remote_total").unwrap_or(f64::NAN),
    })
}

/// Everything read at one instant around the client run.
struct Snapshot {
    at: Instant,
    b_stats: Value,
    tx_errors: [u64; 3],
    agent_ticks: [u64; 3],
    net: [NetCounters; 3],
    threads: Vec<(usize, u32, String, u64)>,
    machine: MachineCpu,
    prog: Option<ProgStats>,
}

impl Snapshot {
    fn take(chain: &OverlayChain, pids: &[u32; 3], xdp_progs: Option<&[u32]>) -> Result<Self> {
        let prog = match xdp_progs {
            Some(ids) => Some(prog_stats(pids[1], ids)?),
            None => None,
        };
        let mut agent_ticks = [0; 3];
        let mut net = [NetCounters::default(); 3];
        let mut threads = Vec::new();
        for (i, &pid) in pids.iter().enumerate() {
            agent_ticks[i] = process_cpu_ticks(pid)?;
            net[i] = NetCounters::read(pid)?;
            for (tid, comm, t) in thread_cpu_ticks(pid)? {
                threads.push((i, tid, comm, t));
            }
        }
        let machine = MachineCpu::read()?;
        let at = Instant::now();
        let stats = [
            chain.agents[0].stats()?,
            chain.agents[1].stats()?,
            chain.agents[2].stats()?,
        ];
        let mut tx_errors = [0; 3];
        for (i, s) in stats.iter().enumerate() {
            tx_errors[i] = counter(s, "agent", "tx_error")?;
        }
        let [_, b_stats, _] = stats;
        Ok(Self {
            at,
            b_stats,
            tx_errors,
            agent_ticks,
            net,
            threads,
            machine,
            prog,
        })
    }
}

fn results(
    relay: &str,
    client: &Value,
    before: &Snapshot,
    after: &Snapshot,
    ticks: f64,
) -> Result<ThroughputRun> {
    let iperf = parse_iperf(client)?;
    let delta = |f: fn(&Value, &str, &str) -> Result<u64>, sec: &str, name: &str| {
        Ok::<u64, anyhow::Error>(f(&after.b_stats, sec, name)?.saturating_sub(f(
            &before.b_stats,
            sec,
            name,
        )?))
    };
    let relay_agent_rx_data = delta(counter, "agent", "rx_data")?;
    let agent_cpu_seconds: [f64; 3] = std::array::from_fn(|i| {
        after.agent_ticks[i].saturating_sub(before.agent_ticks[i]) as f64 / ticks
    });
    let (relayed_packets, relayed_bytes, relay_cpu_source, relay_cpu_ns, relay_cpu_packets) =
        match (&before.prog, &after.prog) {
            (Some(p0), Some(p1)) => {
                let packets = delta(counter, "xdp", "redirect")? + delta(counter, "xdp", "tx")?;
                let bytes =
                    delta(counter_bytes, "xdp", "redirect")? + delta(counter_bytes, "xdp", "tx")?;
                let runs = p1.run_cnt.saturating_sub(p0.run_cnt);
                ensure!(
                    runs > 0 || packets == 0,
                    "b's XDP program relayed {packets} packets but BPF statistics counted no \
                     runs: is {BPF_STATS_SYSCTL} honoured by this kernel?"
                );
                (
                    packets,
                    bytes,
                    RelayCpuSource::BpfRunTime,
                    p1.run_time_ns.saturating_sub(p0.run_time_ns),
                    runs,
                )
            }
            _ => {
                let packets = delta(counter, "agent", "rx_data_relayed")?;
                let bytes = delta(counter_bytes, "agent", "rx_data_relayed")?;
                (
                    packets,
                    bytes,
                    RelayCpuSource::AgentProcess,
                    (agent_cpu_seconds[1] * 1e9).round() as u64,
                    packets,
                )
            }
        };
    ensure!(
        relayed_packets > 0,
        "b relayed no data packets during the test: the traffic did not go through b ({})",
        after.b_stats
    );
    let machine = after.machine.since(&before.machine);
    Ok(ThroughputRun {
        relay: relay.to_owned(),
        seconds: iperf.seconds,
        window_seconds: after.at.duration_since(before.at).as_secs_f64(),
        received_bps: iperf.received_bps,
        retransmits: iperf.retransmits,
        client_cpu_percent: iperf.client_cpu_percent,
        server_cpu_percent: iperf.server_cpu_percent,
        relayed_packets,
        relayed_bytes,
        relay_agent_rx_data,
        relay_cpu_source,
        relay_cpu_ns,
        relay_cpu_packets,
        agent_cpu_seconds,
        tx_dropped: std::array::from_fn(|i| {
            after.net[i]
                .tx_dropped
                .saturating_sub(before.net[i].tx_dropped)
        }),
        udp_rcvbuf_errors: std::array::from_fn(|i| {
            after.net[i]
                .udp_rcvbuf_errors
                .saturating_sub(before.net[i].udp_rcvbuf_errors)
        }),
        agent_tx_errors: std::array::from_fn(|i| {
            after.tx_errors[i].saturating_sub(before.tx_errors[i])
        }),
        machine_softirq_seconds: machine.softirq as f64 / ticks,
        machine_busy_seconds: machine.busy as f64 / ticks,
        machine_total_seconds: machine.total as f64 / ticks,
        threads: thread_deltas(&before.threads, &after.threads, ticks),
    })
}

/// Per-thread CPU in the window, busiest first; threads that started inside the window
/// count from zero, threads that ended inside it are lost (their time is still in the
/// process totals).
fn thread_deltas(
    before: &[(usize, u32, String, u64)],
    after: &[(usize, u32, String, u64)],
    ticks: f64,
) -> Vec<ThreadCpu> {
    let start: HashMap<(usize, u32), u64> = before
        .iter()
        .map(|(node, tid, _, t)| ((*node, *tid), *t))
        .collect();
    let mut out: Vec<ThreadCpu> = after
        .iter()
        .filter_map(|(node, tid, comm, t)| {
            let used = t.saturating_sub(start.get(&(*node, *tid)).copied().unwrap_or(0));
            (used > 0).then(|| ThreadCpu {
                node: NODE_NAMES.get(*node).copied().unwrap_or("?"),
                tid: *tid,
                comm: comm.clone(),
                cpu_seconds: used as f64 / ticks,
            })
        })
        .collect();
    out.sort_by(|x, y| y.cpu_seconds.total_cmp(&x.cpu_seconds));
    out.truncate(TOP_THREADS);
    out
}

/// Clock ticks per second of the `utime`/`stime` fields in `/proc/<pid>/stat` and the
/// columns of `/proc/stat`.
pub(crate) fn clock_ticks_per_second() -> Result<f64> {
    // SAFETY: sysconf has no preconditions; it returns -1 for unknown names.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(ticks > 0, "sysconf(_SC_CLK_TCK) returned {ticks}");
    Ok(ticks as f64)
}

/// The pid of the agent itself.
///
/// `ip netns exec` execs the agent in place, so the child's pid is normally the
/// agent's; should a wrapper (`ip`, `env`) ever stay in between, its child is the agent.
/// Checked by name so a CPU figure can never silently belong to the wrapper.
pub fn agent_pid(agent: &AgentProcess) -> Result<u32> {
    let mut pid = agent.pid();
    for _ in 0..3 {
        let comm = read_comm(pid)?;
        if comm == AGENT_COMM {
            return Ok(pid);
        }
        let kids = children(pid)?;
        match kids.as_slice() {
            [only] => pid = *only,
            _ => bail!(
                "process {pid} ({comm}) started for the agent in {} is not {AGENT_COMM} and \
                 has children {kids:?}",
                agent.ns_name()
            ),
        }
    }
    bail!(
        "no {AGENT_COMM} process found under pid {} ({})",
        agent.pid(),
        agent.ns_name()
    )
}

fn read_comm(pid: u32) -> Result<String> {
    let path = format!("/proc/{pid}/comm");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .to_owned())
}

/// Children of every thread of `pid` (`/proc/<pid>/task/*/children`).
fn children(pid: u32) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for tid in task_ids(pid)? {
        let path = format!("/proc/{pid}/task/{tid}/children");
        // A thread may exit between listing and reading; that is not an error.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for word in text.split_whitespace() {
            out.push(
                word.parse()
                    .with_context(|| format!("{path}: bad pid {word:?}"))?,
            );
        }
    }
    Ok(out)
}

fn task_ids(pid: u32) -> Result<Vec<u32>> {
    let dir = format!("/proc/{pid}/task");
    let mut tids = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let entry = entry.with_context(|| format!("listing {dir}"))?;
        if let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    Ok(tids)
}

/// `(comm, utime, stime)` from the text of a `/proc/<pid>/stat` or
/// `/proc/<pid>/task/<tid>/stat` file.
fn parse_stat_times(text: &str) -> Result<(String, u64, u64)> {
    // The name is parenthesised and may itself contain spaces and ')'.
    let open = text.find('(').context("no '(' in stat")?;
    let close = text.rfind(')').context("no ')' in stat")?;
    ensure!(open < close, "malformed stat: {text:?}");
    let comm = text[open + 1..close].to_owned();
    // After the name: state (field 3), …, utime (field 14), stime (field 15).
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        rest.get(n - 3)
            .with_context(|| format!("stat has no field {n}: {text:?}"))?
            .parse()
            .with_context(|| format!("stat field {n} is not a number: {text:?}"))
    };
    Ok((comm, field(14)?, field(15)?))
}

/// `utime + stime` of the whole process (all threads, in clock ticks).
pub(crate) fn process_cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let (_, utime, stime) = parse_stat_times(&text).with_context(|| format!("parsing {path}"))?;
    Ok(utime + stime)
}

/// `(tid, name, utime + stime)` of every live thread of `pid`.
fn thread_cpu_ticks(pid: u32) -> Result<Vec<(u32, String, u64)>> {
    let mut out = Vec::new();
    for tid in task_ids(pid)? {
        let path = format!("/proc/{pid}/task/{tid}/stat");
        // A thread may exit between listing and reading.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let (comm, utime, stime) =
            parse_stat_times(&text).with_context(|| format!("parsing {path}"))?;
        out.push((tid, comm, utime + stime));
    }
    Ok(out)
}

/// Machine-wide CPU time from the first line of `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct MachineCpu {
    pub(crate) busy: u64,
    softirq: u64,
    pub(crate) total: u64,
}

impl MachineCpu {
    pub(crate) fn read() -> Result<Self> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        Self::parse(&text).context("parsing /proc/stat")
    }

    fn parse(text: &str) -> Result<Self> {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some("cpu"))
            .context("no aggregate \"cpu\" line")?;
        let cols: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("non-numeric column in {line:?}"))?;
        ensure!(cols.len() >= 8, "too few columns in {line:?}");
        // user nice system idle iowait irq softirq steal [guest guest_nice]; guest time
        // is already inside user and nice, so only the first eight add up to the total.
        let total: u64 = cols[..8].iter().sum();
        Ok(Self {
            busy: total - cols[3] - cols[4],
            softirq: cols[6],
            total,
        })
    }

    pub(crate) fn since(&self, earlier: &Self) -> Self {
        Self {
            busy: self.busy.saturating_sub(earlier.busy),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            total: self.total.saturating_sub(earlier.total),
        }
    }
}

/// Drop counters of one namespace, read through `/proc/<pid>/net/` of a process inside
/// it (the agent), so no command has to run in the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct NetCounters {
    tx_dropped: u64,
    pub(crate) udp_rcvbuf_errors: u64,
}

impl NetCounters {
    pub(crate) fn read(pid: u32) -> Result<Self> {
        let dev = format!("/proc/{pid}/net/dev");
        let snmp6 = format!("/proc/{pid}/net/snmp6");
        let dev_text = std::fs::read_to_string(&dev).with_context(|| format!("reading {dev}"))?;
        let snmp_text =
            std::fs::read_to_string(&snmp6).with_context(|| format!("reading {snmp6}"))?;
        Ok(Self {
            tx_dropped: parse_dev_tx_dropped(&dev_text)
                .with_context(|| format!("parsing {dev}"))?,
            udp_rcvbuf_errors: parse_snmp6(&snmp_text, "Udp6RcvbufErrors")
                .with_context(|| format!("parsing {snmp6}"))?,
        })
    }
}

/// Transmit drops summed over every device in a `/proc/net/dev` text.
fn parse_dev_tx_dropped(text: &str) -> Result<u64> {
    let mut total = 0;
    // Two header lines, then `name: rx bytes packets errs drop fifo frame compressed
    // multicast tx bytes packets errs drop …`.
    for line in text.lines().skip(2) {
        let (name, counters) = line
            .split_once(':')
            .with_context(|| format!("no ':' in {line:?}"))?;
        let drop = counters
            .split_whitespace()
            .nth(11)
            .with_context(|| format!("no transmit drop column for {}", name.trim()))?;
        total += drop
            .parse::<u64>()
            .with_context(|| format!("transmit drops of {} = {drop:?}", name.trim()))?;
    }
    Ok(total)
}

/// One counter of a `/proc/net/snmp6` text.
fn parse_snmp6(text: &str, name: &str) -> Result<u64> {
    let value = text
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.next())?
        })
        .with_context(|| format!("no {name}"))?;
    value
        .parse()
        .with_context(|| format!("{name} = {value:?} is not a number"))
}

/// Kernel run-time statistics of one BPF program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProgStats {
    id: u32,
    run_time_ns: u64,
    run_cnt: u64,
}

/// Ids of the XDP programs attached to `node`'s interfaces, from `ip -d -j link show`.
fn attached_xdp_prog_ids(node: &Node) -> Result<Vec<u32>> {
    let out = node.netns().ip(["-d", "-j", "link", "show"])?;
    let links: Value =
        serde_json::from_slice(&out.stdout).context("`ip -d -j link show` printed bad JSON")?;
    let mut ids = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        if let Some(xdp) = link.get("xdp") {
            collect_prog_ids(xdp, &mut ids);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Every `prog.id` inside an iproute2 `xdp` object (a single program, or the `attached`
/// list newer iproute2 prints when several modes are in use).
fn collect_prog_ids(v: &Value, ids: &mut Vec<u32>) {
    match v {
        Value::Object(map) => {
            for (key, value) in map {
                let id = value
                    .get("id")
                    .and_then(Value::as_u64)
                    .and_then(|i| u32::try_from(i).ok());
                match (key.as_str(), id) {
                    ("prog", Some(id)) => ids.push(id),
                    _ => collect_prog_ids(value, ids),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_prog_ids(i, ids)),
        _ => {}
    }
}

/// Run-time statistics of the program among `ids` that the agent `pid` holds open,
/// read from the fdinfo of its BPF program descriptor.
///
/// Reading them through the agent's own descriptor needs neither bpftool nor a BPF
/// syscall of ours; matching the attached ids makes sure it is b's relay program, not
/// a's or c's (every agent loads one with the same name).
fn prog_stats(pid: u32, ids: &[u32]) -> Result<ProgStats> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        // Descriptors come and go while the agent runs; skip what vanished.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_string_lossy() != "anon_inode:bpf-prog" {
            continue;
        }
        let info = PathBuf::from(format!(
            "/proc/{pid}/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ));
        let Ok(text) = std::fs::read_to_string(&info) else {
            continue;
        };
        let stats =
            parse_prog_fdinfo(&text).with_context(|| format!("parsing {}", info.display()))?;
        if ids.contains(&stats.id) {
            return Ok(stats);
        }
        seen.push(stats.id);
    }
    bail!(
        "agent {pid} holds no descriptor of the XDP program(s) {ids:?} attached in its \
         namespace (its BPF programs: {seen:?})"
    )
}

fn parse_prog_fdinfo(text: &str) -> Result<ProgStats> {
    let field = |name: &str| -> Result<u64> {
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .with_context(|| format!("no {name} in fdinfo (kernel without BPF run-time stats?)"))?;
        value
            .trim()
            .parse()
            .with_context(|| format!("fdinfo {name} = {value:?} is not a number"))
    };
    Ok(ProgStats {
        id: u32::try_from(field("prog_id")?).context("prog_id out of range")?,
        run_time_ns: field("run_time_ns")?,
        run_cnt: field("run_cnt")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stat_times_survive_odd_names() {
        let text = "1234 (tokio (rt) w) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 4 0 123 0 0";
        let (comm, utime, stime) = parse_stat_times(text).unwrap();
        assert_eq!(comm, "tokio (rt) w");
        assert_eq!((utime, stime), (250, 75));
        assert!(parse_stat_times("1 (x) S 1 2").is_err());
        assert!(parse_stat_times("garbage").is_err());
    }

    #[test]
    fn proc_stat_totals_exclude_guest_time() {
        let text = "cpu  100 5 50 1000 10 1 20 3 40 0\ncpu0 50 2 25 500 5 0 10 1 20 0\n";
        let m = MachineCpu::parse(text).unwrap();
        assert_eq!(m.total, 100 + 5 + 50 + 1000 + 10 + 1 + 20 + 3);
        assert_eq!(m.busy, m.total - 1000 - 10);
        assert_eq!(m.softirq, 20);
        let later = MachineCpu {
            busy: m.busy + 7,
            softirq: m.softirq + 2,
            total: m.total + 9,
        };
        assert_eq!(
            later.since(&m),
            MachineCpu {
                busy: 7,
                softirq: 2,
                total: 9
            }
        );
        assert!(MachineCpu::parse("intr 1 2 3\n").is_err());
        assert!(MachineCpu::parse("cpu 1 2 3\n").is_err());
    }

    #[test]
    fn fdinfo_of_a_bpf_program() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nprog_type:\t6\n\
                    prog_jited:\t1\nprog_tag:\tabcdef0123456789\nmemlock:\t4096\n\
                    prog_id:\t42\nrun_time_ns:\t123456\nrun_cnt:\t789\n\
                    recursion_misses:\t0\nverified_insns:\t300\n";
        assert_eq!(
            parse_prog_fdinfo(text).unwrap(),
            ProgStats {
                id: 42,
                run_time_ns: 123_456,
                run_cnt: 789
            }
        );
        let old_kernel = "prog_type:\t6\nprog_id:\t42\n";
        assert!(parse_prog_fdinfo(old_kernel).is_err());
    }

    #[test]
    fn namespace_drop_counters() {
        let dev = "Inter-|   Receive                                                |  Transmit\n \
                   face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
                   lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n\
                   myconet0: 8300470  107552    0    0    0     0          0         0 807730587  581960    0 13887    0     0       0          0\n \
                   to-b: 1 2 0 0 0 0 0 0 3 4 0 5 0 0 0 0\n";
        assert_eq!(parse_dev_tx_dropped(dev).unwrap(), 13887 + 5);
        assert!(parse_dev_tx_dropped("h\nh\nx: 1 2 3\n").is_err());
        let snmp6 = "Udp6InDatagrams                 581957\nUdp6RcvbufErrors                \
                     7\nUdp6SndbufErrors 0\n";
        assert_eq!(parse_snmp6(snmp6, "Udp6RcvbufErrors").unwrap(), 7);
        assert!(parse_snmp6(snmp6, "Udp6Nope").is_err());
    }

    #[test]
    fn xdp_prog_ids_from_iproute2_json() {
        let mut ids = Vec::new();
        let single = json!({"mode": 1, "prog": {"id": 17, "name": "myconet_xdp"}});
        collect_prog_ids(&single, &mut ids);
        let multi =
            json!({"attached": [{"mode": 2, "prog": {"id": 18}}, {"mode": 1, "prog": {"id": 19}}]});
        collect_prog_ids(&multi, &mut ids);
        assert_eq!(ids, [17, 18, 19]);
    }

    #[test]
    fn iperf_client_report() {
        let report = json!({
            "start": {},
            "end": {
                "sum_sent": {"seconds": 5.0, "bytes": 1_000_000_000u64, "bits_per_second": 1.6e9, "retransmits": 12},
                "sum_received": {"seconds": 5.01, "bytes": 999_000_000u64, "bits_per_second": 1.59e9},
                "cpu_utilization_percent": {"host_total": 55.5, "remote_total": 33.3}
            }
        });
        let r = parse_iperf(&report).unwrap();
        assert_eq!(r.received_bps, 1.59e9);
        assert_eq!(r.retransmits, 12);
        assert_eq!(r.seconds, 5.01);
        assert_eq!((r.client_cpu_percent, r.server_cpu_percent), (55.5, 33.3));
        assert!(parse_iperf(&json!({"error": "unable to connect"})).is_err());
        assert!(parse_iperf(&json!({"end": {"sum_sent": {}}})).is_err());
    }

    #[test]
    fn per_packet_figures_never_divide_by_zero() {
        let run = ThroughputRun {
            relay: "xdp".into(),
            seconds: 5.0,
            window_seconds: 5.0,
            received_bps: 4e9,
            retransmits: 0,
            client_cpu_percent: 0.0,
            server_cpu_percent: 0.0,
            relayed_packets: 0,
            relayed_bytes: 0,
            relay_agent_rx_data: 0,
            relay_cpu_source: RelayCpuSource::BpfRunTime,
            relay_cpu_ns: 100,
            relay_cpu_packets: 0,
            agent_cpu_seconds: [1.0, 0.0, 1.0],
            tx_dropped: [0; 3],
            udp_rcvbuf_errors: [0; 3],
            agent_tx_errors: [0; 3],
            machine_softirq_seconds: 1.0,
            machine_busy_seconds: 9.0,
            machine_total_seconds: 10.0,
            threads: Vec::new(),
        };
        assert!(run.relay_ns_per_packet().is_nan());
        assert!(run.softirq_ns_per_packet().is_nan());
        assert!(run.agent_ns_per_packet(5).is_nan());
        assert_eq!(run.gbps(), 4.0);
        assert_eq!(run.machine_busy_fraction(), 0.9);
        // 9 s busy − 2 s of agents − no iperf3, of 10 s.
        assert!((run.other_cpu_fraction() - 0.7).abs() < 1e-9);
    }

    #[test]
    fn thread_deltas_rank_busiest_first() {
        let before = vec![(0, 10, "main".to_owned(), 5), (1, 20, "w".to_owned(), 1)];
        let after = vec![
            (0, 10, "main".to_owned(), 105),
            (1, 20, "w".to_owned(), 1),
            (2, 30, "new".to_owned(), 300),
        ];
        let d = thread_deltas(&before, &after, 100.0);
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].node, d[0].tid, d[0].cpu_seconds), ("c", 30, 3.0));
        assert_eq!((d[1].node, d[1].comm.as_str()), ("a", "main"));
    }
}
