//! Proof that a restarted relay keeps its links, in namespaces, with default timers:
//!
//! ```text
//!   a ── b ── d
//!   │         │
//!   └─── c ───┘
//! ```
//!
//! Every node configures its neighbours. b is killed (SIGKILL) and restarted with the
//! same state directory (same identity), then c is stopped cleanly (SIGTERM) and
//! restarted. After each restart every link is up again on both ends within a few hello
//! intervals; then every link stays up, without a flap, for a 60 s window shared by all
//! the checks (longer than every session-table timer that used to take a link down after
//! a double handshake: the 15 s grace of a replaced session, the 15 s wait for an
//! unconfirmed one, the 31 s of handshake retransmissions), while a ping stream a ⇄ d
//! crosses it without losing a probe. Finally the relay carrying the stream is killed and
//! the stream moves to the other, restarted, relay.
//!
//! Runs as root (CI is root): four namespaces, four agents, XDP on every link.

use std::{
    net::Ipv6Addr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use myconet_testbed::{
    agent::{AgentOptions, AgentProcess, Stop, bin_dir, counter},
    probe::{Mode, Probe},
    scenario::{PORT, json_str},
    topology::{Chain, Topology},
    util,
};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const D: usize = 3;
const LINKS: [(usize, usize); 4] = [(A, B), (B, D), (A, C), (C, D)];
/// The agent's default hello interval.
const HELLO: Duration = Duration::from_secs(1);
/// "Within a few hello intervals": how long after a restarted agent answers `status`
/// every link must be up again on both ends.
const RELINK_BOUND: Duration = Duration::from_secs(5);
/// How long every link must then stay up.
const WINDOW: Duration = Duration::from_secs(60);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts node `i`'s agent with its neighbours on the command line, as an operator's
/// configuration would name them, so a restart brings them back.
fn start_agent(topo: &Topology, i: usize) -> Result<AgentProcess> {
    let mut extra_args = Vec::new();
    if i == B || i == C {
        extra_args.push("--no-tun".to_string());
    }
    for (_, addr) in topo.node(i).neighbours() {
        extra_args.extend(["--peer".to_string(), format!("[{addr}]:{PORT}")]);
    }
    AgentProcess::start(
        topo.node(i),
        &bin_dir()?,
        AgentOptions {
            port: PORT,
            extra_args,
            ..AgentOptions::default()
        },
    )
}

/// Every link end (node, neighbour) that is not up and in the relay peer map, and the
/// shortest time any link end has been up.
fn link_state(topo: &Topology, agents: &[Option<AgentProcess>]) -> Result<(Vec<String>, Duration)> {
    let mut down = Vec::new();
    let mut youngest = Duration::MAX;
    for (i, agent) in agents.iter().enumerate() {
        let Some(agent) = agent else { continue };
        let peers = agent.ctl_json(&["peers"])?;
        let rows = peers["peers"].as_array().cloned().unwrap_or_default();
        for (j, addr) in topo.node(i).neighbours() {
            if agents[j].is_none() {
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
                    topo.node(i).name(),
                    topo.node(j).name(),
                    other.map_or("absent".to_string(), |r| r.to_string())
                )),
            }
        }
    }
    Ok((down, youngest))
}

fn wait_all_up(topo: &Topology, agents: &[Option<AgentProcess>], timeout: Duration) -> Result<()> {
    util::poll(
        "every link up on both ends",
        timeout,
        Duration::from_millis(50),
        || {
            let (down, _) = link_state(topo, agents)?;
            Ok(down.is_empty().then_some(()))
        },
    )
    .with_context(|| format!("{:?}", link_state(topo, agents).map(|s| s.0)))
}

/// Whether `agent` has a routing-protocol route for `prefix`, in sync with the kernel.
fn routed(agent: &AgentProcess, prefix: &str) -> Result<Option<String>> {
    let routes = agent.ctl_json(&["routes"])?;
    let row = routes["routes"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["prefix"] == prefix));
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

fn redirects(agent: &AgentProcess) -> Result<u64> {
    counter(&agent.ctl_json(&["stats"])?, "xdp", "redirect")
}

fn running(agents: &[Option<AgentProcess>], i: usize) -> Result<&AgentProcess> {
    agents[i].as_ref().context("agent running")
}

#[test]
fn restarted_relays_keep_their_links_and_take_the_traffic_back() -> Result<()> {
    let topo = Chain::new(4).tag("restart").links(&LINKS).build()?;
    let mut agents: Vec<Option<AgentProcess>> = Vec::new();
    let result = scenario(&topo, &mut agents);
    if result.is_err() {
        for (i, agent) in agents.iter().enumerate() {
            if let Some(agent) = agent {
                eprintln!(
                    "--- {} peers:\n{}\n--- log:\n{}",
                    topo.node(i).name(),
                    agent.ctl(&["peers"]).unwrap_or_default(),
                    agent.log_tail(30)
                );
            }
        }
    }
    result
}

fn scenario(topo: &Topology, agents: &mut Vec<Option<AgentProcess>>) -> Result<()> {
    for i in 0..4 {
        agents.push(Some(start_agent(topo, i)?));
    }
    wait_all_up(topo, agents, CONVERGE_TIMEOUT)?;
    let (a_status, d_status) = (running(agents, A)?.status()?, running(agents, D)?.status()?);
    let a_overlay: Ipv6Addr = json_str(&a_status, "node_address")?.parse()?;
    let d_overlay: Ipv6Addr = json_str(&d_status, "node_address")?.parse()?;
    let (a_prefix, d_prefix) = (
        json_str(&a_status, "node_prefix")?.to_string(),
        json_str(&d_status, "node_prefix")?.to_string(),
    );
    let wait_routes = |agents: &[Option<AgentProcess>]| -> Result<()> {
        util::poll(
            "a and d route to each other",
            CONVERGE_TIMEOUT,
            Duration::from_millis(100),
            || {
                let a = routed(running(agents, A)?, &d_prefix)?;
                let d = routed(running(agents, D)?, &a_prefix)?;
                Ok((a.is_some() && d.is_some()).then_some(()))
            },
        )
    };
    wait_routes(agents)?;
    let (near, far) = (
        (topo.node(A).netns(), a_overlay),
        (topo.node(D).netns(), d_overlay),
    );

    // Restart each relay in turn: every link is back within a few hello intervals.
    let across = Probe::start(near, far, Mode::Echo)?;
    thread::sleep(Duration::from_secs(1));
    for (relay, how) in [(B, Stop::Kill), (C, Stop::Term)] {
        let agent = agents[relay].as_mut().context("relay running")?;
        agent.restart(topo.node(relay).netns(), how)?;
        let restarted = Instant::now();
        wait_all_up(topo, agents, RELINK_BOUND).with_context(|| {
            format!(
                "links not all up {RELINK_BOUND:?} ({} hello intervals) after {} restarted ({how:?})",
                RELINK_BOUND.as_secs_f64() / HELLO.as_secs_f64(),
                topo.node(relay).name()
            )
        })?;
        eprintln!(
            "{} restarted ({how:?}): every link up {:?} after it answered",
            topo.node(relay).name(),
            restarted.elapsed()
        );
    }
    wait_routes(agents)?;
    eprintln!("across the restarts: {}", across.finish()?.summary());

    // The window: every link stays up, and the ping stream loses nothing.
    let window = Probe::start(near, far, Mode::Echo)?;
    let started = Instant::now();
    let before = (
        redirects(running(agents, B)?)?,
        redirects(running(agents, C)?)?,
    );
    while started.elapsed() < WINDOW {
        thread::sleep(Duration::from_secs(1));
        let (down, _) = link_state(topo, agents)?;
        ensure!(
            down.is_empty(),
            "{:?} into the window a link went down: {down:?}",
            started.elapsed()
        );
    }
    let (down, youngest) = link_state(topo, agents)?;
    ensure!(
        down.is_empty() && youngest >= WINDOW,
        "every link end has been up for the whole {WINDOW:?} window (youngest {youngest:?}; down: {down:?})"
    );
    let report = window.finish()?;
    eprintln!("window: {}", report.summary());
    ensure!(
        report.lost() == 0 && report.sent_count() > 0,
        "the ping stream a ⇄ d lost probes while every link was up: {}; missing {:?}",
        report.summary(),
        report.missing()
    );

    // The relay that carries the stream dies: the stream moves to the other one.
    let after = (
        redirects(running(agents, B)?)?,
        redirects(running(agents, C)?)?,
    );
    let (active, survivor) = if after.0 - before.0 >= after.1 - before.1 {
        (B, C)
    } else {
        (C, B)
    };
    let probe = Probe::start(near, far, Mode::Echo)?;
    thread::sleep(Duration::from_millis(500));
    agents[active].take().context("active relay")?.kill()?;
    let via = topo.node(A).peer_addr(survivor)?.to_string();
    util::poll(
        "a routes d via the surviving relay",
        CONVERGE_TIMEOUT,
        Duration::from_millis(100),
        || Ok((routed(running(agents, A)?, &d_prefix)? == Some(via.clone())).then_some(())),
    )?;
    let relayed = redirects(running(agents, survivor)?)?;
    thread::sleep(Duration::from_secs(2));
    let report = probe.finish()?;
    eprintln!(
        "{} killed, stream moved to {}: {}",
        topo.node(active).name(),
        topo.node(survivor).name(),
        report.summary()
    );
    ensure!(
        report.flows_at_end(Duration::from_secs(1)),
        "the stream flows again through {}: {}",
        topo.node(survivor).name(),
        report.summary()
    );
    let more = redirects(running(agents, survivor)?)? - relayed;
    if more == 0 {
        bail!(
            "{} (restarted) relays the stream in XDP after {} died",
            topo.node(survivor).name(),
            topo.node(active).name()
        );
    }
    Ok(())
}
