//! Proof of self-healing routing in namespaces: five nodes with two disjoint paths
//! between a and e,
//!
//! ```text
//!   a ── b ── e        (2 hops: the cheaper path)
//!   │         │
//!   c ── d ───┘        (3 hops)
//! ```
//!
//! No static routes anywhere: the routing protocol finds them. Traffic a → e takes the
//! cheaper path through b; killing b's agent moves it to c–d within the outage bound;
//! bringing b back moves it back without losing a packet (both paths are up while the
//! route changes); no packet is ever dropped for its hop limit (no loop). A second test
//! gives two equal-length paths different configured link costs.
//!
//! Runs as root (CI is root): five namespaces, five agents, XDP on every link.

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use myconet_testbed::{
    agent::{AgentOptions, AgentProcess, bin_dir, counter},
    diamond::{self, Diamond},
    probe::{Mode, Probe},
    scenario::{PORT, json_str},
    timing,
    topology::{Chain, Topology},
    traffic::bind_udp,
    util,
};
use serde_json::Value;

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const D: usize = 3;
const E: usize = 4;
const LINKS: [(usize, usize); 5] = [(A, B), (B, E), (A, C), (C, D), (D, E)];
/// Fast hellos so a dead relay is noticed in a fraction of a second.
const HELLO_MS: &str = "300";
/// Longest tolerated outage when the active relay dies with 300 ms hellos: the
/// detection bound (a jittered hello interval, then five probes 100 ms apart: 0.93 s)
/// with room for the route change and a loaded machine.
const MAX_OUTAGE: Duration = Duration::from_secs(2);
/// Longest tolerated outage of a ping stream with the default 1 s hellos (issue 12:
/// under 2 s). The detection bound is 1.1 s + 0.6 s on each side; the stream needs both.
const MAX_DEFAULT_OUTAGE: Duration = Duration::from_secs(2);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts node `i`'s agent (a TUN device only if `tun`) and configures every neighbour
/// as a peer.
fn start_agent(topo: &Topology, i: usize, tun: bool) -> Result<AgentProcess> {
    let mut extra_args = vec!["--hello-interval-ms".to_string(), HELLO_MS.to_string()];
    if !tun {
        extra_args.push("--no-tun".to_string());
    }
    let agent = AgentProcess::start(
        topo.node(i),
        &bin_dir()?,
        AgentOptions {
            port: PORT,
            extra_args,
            ..AgentOptions::default()
        },
    )?;
    // Every node configures its neighbours (both ends of a link start handshakes; the
    // tie-break leaves one session), so a restarted node reconnects at once.
    for (_, addr) in topo.node(i).neighbours() {
        agent.ctl(&["peers", "add", &addr.to_string()])?;
    }
    Ok(agent)
}

/// The next hop `agent` uses for `prefix`, once it has a routing-protocol route.
fn next_hop(agent: &AgentProcess, prefix: &str) -> Result<Option<String>> {
    let routes = agent.ctl_json(&["routes"])?;
    let row = routes["routes"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["prefix"] == prefix));
    Ok(row.and_then(|r| {
        let agent = &r["agent"];
        (agent["origin"] == "routing" && r["in_sync"] == true)
            .then(|| agent["next_hop"]["address"].as_str().map(str::to_owned))
            .flatten()
    }))
}

fn wait_next_hop(agent: &AgentProcess, prefix: &str, want: Ipv6Addr, what: &str) -> Result<()> {
    util::poll(what, CONVERGE_TIMEOUT, Duration::from_millis(100), || {
        Ok((next_hop(agent, prefix)? == Some(want.to_string())).then_some(()))
    })
    .with_context(|| format!("routes: {:?}", agent.ctl(&["routes"]).ok()))
}

fn running(agents: &[Option<AgentProcess>], i: usize) -> Result<&AgentProcess> {
    agents[i].as_ref().context("agent running")
}

fn hop_limit_drops(agents: &[Option<AgentProcess>]) -> Result<u64> {
    let mut total = 0;
    for agent in agents.iter().flatten() {
        let stats: Value = agent.ctl_json(&["stats"])?;
        total += counter(&stats, "xdp", "drop_hop_limit")?;
        total += counter(&stats, "agent", "rx_data_hop_limit")?;
    }
    Ok(total)
}

/// `route get` on a for e's address: the routing protocol's decision with its reason in
/// a sentence; then a static route via c overrides it and the output says so, naming
/// what the protocol would use; deleting it hands the prefix back to the protocol.
fn route_get_explains_and_shows_a_static_override(
    a: &AgentProcess,
    e_overlay: Ipv6Addr,
    e_prefix: &str,
    via_b: Ipv6Addr,
    via_c: Ipv6Addr,
) -> Result<()> {
    let addr = e_overlay.to_string();
    let json = a.ctl_json(&["route", "get", &addr])?;
    let selection = json["selection"].as_str().unwrap_or_default().to_owned();
    ensure!(
        json["decided_by"] == "routing" && json["overridden"] != true,
        "route get --json: {json}"
    );
    let text = a.ctl(&["route", "get", &addr])?;
    for line in [
        format!("  prefix    {e_prefix}\n"),
        format!("  decision  {}\n", selection.replace('_', " ")),
        format!(
            "  why       the routing protocol carries {addr} ({e_prefix}) via [{via_b}]:{PORT} (metric "
        ),
        format!("  selected  via [{via_b}]:{PORT} metric "),
        format!("  installed {e_prefix} agent: forward [{via_b}]:{PORT} (routing);"),
    ] {
        ensure!(
            text.contains(&line),
            "route get should print {line:?}:\n{text}"
        );
    }

    a.ctl(&[
        "route",
        "add",
        e_prefix,
        "via",
        &via_c.to_string(),
        "--port",
        &PORT.to_string(),
    ])?;
    let json = a.ctl_json(&["route", "get", &addr])?;
    ensure!(
        json["decided_by"] == "static" && json["overridden"] == true,
        "route get --json with the static route: {json}"
    );
    let text = a.ctl(&["route", "get", &addr])?;
    for line in [
        format!(
            "  decision  static route, overriding the routing protocol ({})\n",
            selection.replace('_', " ")
        ),
        format!(
            "  why       a static route via [{via_c}]:{PORT} carries {addr} ({e_prefix}), \
             overriding the routing protocol's choice via [{via_b}]:{PORT} (metric "
        ),
        format!("  protocol  via [{via_b}]:{PORT} metric "),
        format!(
            "  installed {e_prefix} agent: forward [{via_c}]:{PORT} (static); kernel map: forward [{via_c}]:{PORT}; in sync: yes\n"
        ),
    ] {
        ensure!(
            text.contains(&line),
            "route get should print {line:?}:\n{text}"
        );
    }

    let removed = a.ctl(&["route", "del", e_prefix])?;
    ensure!(removed.contains("removed route"), "route del: {removed}");
    ensure!(
        next_hop(a, e_prefix)? == Some(via_b.to_string()),
        "deleting the static route hands {e_prefix} back to the protocol's route via b: {}",
        a.ctl(&["routes"])?
    );
    let json = a.ctl_json(&["route", "get", &addr])?;
    ensure!(json["decided_by"] == "routing", "after route del: {json}");
    Ok(())
}

#[test]
fn traffic_takes_the_cheaper_path_fails_over_and_returns() -> Result<()> {
    // Measures an outage: no other test's agents may share the CPU meanwhile.
    let _alone = timing::exclusive()?;
    let topo = Chain::new(5).tag("route").links(&LINKS).build()?;
    let mut agents: Vec<Option<AgentProcess>> = Vec::new();
    let result = scenario(&topo, &mut agents);
    if result.is_err() {
        for (i, agent) in agents.iter().enumerate() {
            if let Some(agent) = agent {
                eprintln!(
                    "--- node {i} routes:\n{}",
                    agent.ctl(&["routes"]).unwrap_or_default()
                );
                eprintln!(
                    "--- node {i} peers:\n{}",
                    agent.ctl(&["peers"]).unwrap_or_default()
                );
            }
        }
    }
    result
}

fn scenario(topo: &Topology, agents: &mut Vec<Option<AgentProcess>>) -> Result<()> {
    for i in 0..5 {
        agents.push(Some(start_agent(topo, i, i == A || i == E)?));
    }
    let (a_status, e_status) = (running(agents, A)?.status()?, running(agents, E)?.status()?);
    let a_overlay: Ipv6Addr = json_str(&a_status, "node_address")?.parse()?;
    let e_overlay: Ipv6Addr = json_str(&e_status, "node_address")?.parse()?;
    let e_prefix = json_str(&e_status, "node_prefix")?.to_string();
    let a_prefix = json_str(&a_status, "node_prefix")?.to_string();

    // Converged: a reaches e through b, and e reaches a through b.
    let via_b = topo.node(A).peer_addr(B)?;
    let via_c = topo.node(A).peer_addr(C)?;
    wait_next_hop(running(agents, A)?, &e_prefix, via_b, "a routes e via b")?;
    wait_next_hop(
        running(agents, E)?,
        &a_prefix,
        topo.node(E).peer_addr(B)?,
        "e routes a via b",
    )?;
    route_get_explains_and_shows_a_static_override(
        running(agents, A)?,
        e_overlay,
        &e_prefix,
        via_b,
        via_c,
    )?;

    let (near, far) = (
        (topo.node(A).netns(), a_overlay),
        (topo.node(E).netns(), e_overlay),
    );
    let probe = Probe::start(near, far, Mode::OneWay)?;
    thread::sleep(Duration::from_secs(1));
    let relayed_b = counter(
        &running(agents, B)?.ctl_json(&["stats"])?,
        "xdp",
        "redirect",
    )?;
    ensure!(relayed_b > 0, "b relays a → e in XDP before the failure");

    // Kill the relay on the active path.
    let b = agents[B].take().context("b running")?;
    b.kill()?;
    wait_next_hop(running(agents, A)?, &e_prefix, via_c, "a fails over to c")?;
    thread::sleep(Duration::from_secs(1));
    let report = probe.finish()?;
    eprintln!("failover: {}", report.summary());
    let outage = report
        .outage()
        .context("killing the active relay loses probes")?;
    ensure!(
        outage.duration <= MAX_OUTAGE && report.arrival_gap() <= MAX_OUTAGE,
        "outage exceeds {MAX_OUTAGE:?}: {}",
        report.summary()
    );
    ensure!(
        report.flows_at_end(Duration::from_millis(500)),
        "traffic flows again over c–d at the end: {}",
        report.summary()
    );

    // Bring b back (a new agent, a new identity) while probes flow over c–d: the
    // cheaper path is taken again, and as both paths are up while a's route changes,
    // not one probe may be lost across the change.
    let probe = Probe::start(near, far, Mode::OneWay)?;
    thread::sleep(Duration::from_millis(500));
    agents[B] = Some(start_agent(topo, B, false)?);
    wait_next_hop(running(agents, A)?, &e_prefix, via_b, "a returns to b")?;
    thread::sleep(Duration::from_secs(1));
    let report = probe.finish()?;
    eprintln!("return to b: {}", report.summary());
    ensure!(
        report.lost() == 0,
        "probes lost while a's route moved back to b: {}; missing {:?}",
        report.summary(),
        report.missing()
    );
    ensure!(
        counter(
            &running(agents, B)?.ctl_json(&["stats"])?,
            "xdp",
            "redirect"
        )? > 0,
        "the returned b relays a → e in XDP"
    );
    ensure!(
        hop_limit_drops(agents)? == 0,
        "no loop at any time: hop-limit drops must stay zero"
    );
    Ok(())
}

/// Issue 12: with the default timers (1 s hellos), killing the relay that carries a
/// ping stream across a diamond (`myconet_testbed::diamond`) interrupts it for less than
/// 2 s: each end notices the silence by probing after one unanswered hello (five probes
/// 100 ms apart), instead of waiting out the 3.5 s dead interval. Measured by the probes'
/// own timestamps, alone on the CPU.
#[test]
fn default_failover_of_a_ping_stream_across_a_diamond_is_under_two_seconds() -> Result<()> {
    let _alone = timing::exclusive()?;
    let mut diamond = Diamond::start("failover", &bin_dir()?, &[])?;
    let result = (|| -> Result<()> {
        let failover = diamond.fail_active_relay(Duration::from_secs(1))?;
        let report = &failover.report;
        eprintln!(
            "default failover ({} killed, rerouted after {:?}): {}",
            diamond.topo.node(failover.killed).name(),
            failover.rerouted,
            report.summary()
        );
        let outage = report
            .outage()
            .context("killing the active relay loses probes")?;
        ensure!(
            outage.duration < MAX_DEFAULT_OUTAGE && report.arrival_gap() < MAX_DEFAULT_OUTAGE,
            "the ping stream was interrupted for {MAX_DEFAULT_OUTAGE:?} or more: {}",
            report.summary()
        );
        ensure!(
            report.flows_at_end(Duration::from_millis(500)) && failover.survivor_relayed > 0,
            "the stream flows through the other relay in XDP: {}",
            report.summary()
        );
        // Both ends noticed by probing, not by waiting out the dead interval.
        for end in [diamond::A, diamond::D] {
            let stats = diamond.agent(end)?.stats()?;
            ensure!(
                counter(&stats, "neighbours", "peer_down_unanswered")? == 1,
                "{} took the dead relay down after unanswered probes: {}",
                diamond.topo.node(end).name(),
                stats["neighbours"]
            );
        }
        Ok(())
    })();
    if result.is_err() {
        eprintln!("{}", diamond.dump());
    }
    result
}

/// Two paths of equal length from relay a to d, through b and through c, with the
/// traffic coming from e behind a:
///
/// ```text
///   e ── a ── b ── d
///        │         │
///        c ────────┘
/// ```
///
/// a's config file gives its link to b a base cost of 400 (Babel's per-interface cost;
/// the default is 96), so a relays e → d through c and b relays none of it. Then
/// `myconet-ctl peers add <b> --cost 48` on a makes b's path the cheaper one: a's route
/// (RIB and XDP route map) moves to b while both paths stay up, under traffic, and not
/// one probe is lost across the change.
///
/// The change lowers a's metric to d. Raising it instead (a dearer cost on c's link)
/// also moves a's route without loss at a, but e then sees a's worse metric as
/// unfeasible and has no route until a new seqno arrives (a seqno request: ~0.15 s
/// measured here); that is the routing protocol's loop protection, see
/// docs/operations.md.
#[test]
fn configured_link_costs_choose_between_equal_paths_without_loss() -> Result<()> {
    const DIAMOND: [(usize, usize); 5] = [(A, B), (B, D), (A, C), (C, D), (E, A)];
    let topo = Chain::new(5).tag("cost").links(&DIAMOND).build()?;
    let mut agents: Vec<Option<AgentProcess>> = Vec::new();
    let result = cost_scenario(&topo, &mut agents);
    if result.is_err() {
        for (i, agent) in agents.iter().enumerate() {
            if let Some(agent) = agent {
                eprintln!(
                    "--- node {i} routes:\n{}",
                    agent.ctl(&["routes"]).unwrap_or_default()
                );
                eprintln!(
                    "--- node {i} peers:\n{}",
                    agent.ctl(&["peers"]).unwrap_or_default()
                );
            }
        }
    }
    result
}

/// a's link cost to the neighbour at `addr`, as `peers` shows it.
fn link_cost(a: &AgentProcess, addr: Ipv6Addr) -> Result<Option<u64>> {
    let peers = a.ctl_json(&["peers"])?;
    Ok(peers["peers"]
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|p| p["address"] == addr.to_string().as_str())
        })
        .and_then(|p| p["link_cost"].as_u64()))
}

fn redirects(agent: &AgentProcess) -> Result<u64> {
    counter(&agent.ctl_json(&["stats"])?, "xdp", "redirect")
}

fn cost_scenario(topo: &Topology, agents: &mut Vec<Option<AgentProcess>>) -> Result<()> {
    let (via_b, via_c) = (topo.node(A).peer_addr(B)?, topo.node(A).peer_addr(C)?);
    let via_e = topo.node(A).peer_addr(E)?;
    // a's neighbours come from its config file, b's with a cost.
    let dir = util::TempDir::new("route-cost")?;
    let config = dir.path().join("a.toml");
    std::fs::write(
        &config,
        format!(
            "peers = [{{ endpoint = \"[{via_b}]:{PORT}\", cost = 400 }}, \"[{via_c}]:{PORT}\", \
             \"[{via_e}]:{PORT}\"]\n"
        ),
    )?;
    agents.push(Some(AgentProcess::start(
        topo.node(A),
        &bin_dir()?,
        AgentOptions {
            port: PORT,
            extra_args: vec![
                "-c".to_string(),
                config.display().to_string(),
                "--hello-interval-ms".to_string(),
                HELLO_MS.to_string(),
                "--no-tun".to_string(),
            ],
            ..AgentOptions::default()
        },
    )?));
    for i in [B, C, D, E] {
        agents.push(Some(start_agent(topo, i, i == D || i == E)?));
    }
    let a = running(agents, A)?;
    let e_status = running(agents, E)?.status()?;
    let d_status = running(agents, D)?.status()?;
    let e_overlay: Ipv6Addr = json_str(&e_status, "node_address")?.parse()?;
    let d_overlay: Ipv6Addr = json_str(&d_status, "node_address")?.parse()?;
    let d_prefix = json_str(&d_status, "node_prefix")?.to_string();

    a.wait_peers_up(
        &[(via_b, PORT), (via_c, PORT), (via_e, PORT)],
        CONVERGE_TIMEOUT,
    )?;
    // Both offers held, and c's selected: the cost decided, not which link came up first.
    util::poll(
        "a to hold routes to d via b and c and select c",
        CONVERGE_TIMEOUT,
        Duration::from_millis(100),
        || {
            let routes = a.ctl_json(&["routes"])?;
            let both = routes["routes"].as_array().is_some_and(|rows| {
                rows.iter()
                    .any(|r| r["prefix"] == d_prefix.as_str() && r["candidates"] == 2)
            });
            Ok((both && next_hop(a, &d_prefix)? == Some(via_c.to_string())).then_some(()))
        },
    )
    .with_context(|| format!("routes: {:?}", a.ctl(&["routes"]).ok()))?;
    wait_next_hop(
        running(agents, E)?,
        &d_prefix,
        topo.node(E).peer_addr(A)?,
        "e routes d via a",
    )?;
    let (cost_b, cost_c) = (link_cost(a, via_b)?, link_cost(a, via_c)?);
    ensure!(
        cost_b.is_some_and(|b| b >= 400) && cost_c.is_some_and(|c| c < 400),
        "peers should show the configured cost on b's link: b {cost_b:?}, c {cost_c:?}"
    );

    let (b, c) = (running(agents, B)?, running(agents, C)?);
    let (a_before, b_before, c_before) = (redirects(a)?, redirects(b)?, redirects(c)?);
    let probe = Probe::start(
        (topo.node(E).netns(), e_overlay),
        (topo.node(D).netns(), d_overlay),
        Mode::OneWay,
    )?;
    thread::sleep(Duration::from_secs(1));
    ensure!(
        redirects(a)? > a_before && redirects(c)? > c_before && redirects(b)? == b_before,
        "with b's link dearer, a relays e → d to c in XDP and b relays none of it"
    );

    // Make b's link the cheaper one: a's route moves to b, both paths up throughout.
    let changed = a.ctl(&["peers", "add", &via_b.to_string(), "--cost", "48"])?;
    ensure!(
        changed.contains("added peer"),
        "peers add --cost: {changed}"
    );
    wait_next_hop(
        a,
        &d_prefix,
        via_b,
        "a moves d to b (b's link now costs 48)",
    )?;
    let b_switched = redirects(b)?;
    thread::sleep(Duration::from_secs(1));
    let report = probe.finish()?;
    for i in [A, B, C, D, E] {
        let st = running(agents, i)?.ctl_json(&["stats"])?;
        eprintln!(
            "node {i}: tx_no_route {} rx_data_no_route {} drop_no_route {} routing {}",
            counter(&st, "agent", "tx_no_route")?,
            counter(&st, "agent", "rx_data_no_route")?,
            counter(&st, "xdp", "drop_no_route")?,
            st["routing"]
        );
    }
    eprintln!(
        "cost change: {}; missing {:?}",
        report.summary(),
        report.missing()
    );
    ensure!(
        report.lost() == 0,
        "probes lost while a's route moved from c to b: {}",
        report.summary()
    );
    ensure!(
        redirects(b)? > b_switched,
        "after the cost change b relays e → d"
    );
    let (cost_b, cost_c) = (link_cost(a, via_b)?, link_cost(a, via_c)?);
    ensure!(
        cost_b.is_some_and(|b| b >= 48) && cost_b < cost_c,
        "peers should show the new cost on b's link: b {cost_b:?}, c {cost_c:?}"
    );
    ensure!(
        hop_limit_drops(agents)? == 0,
        "no loop at any time: hop-limit drops must stay zero"
    );
    Ok(())
}

/// A rogue neighbour that completes a genuine link handshake (it holds a real key) and
/// then announces a prefix its key does not own: the victim ignores the announcement
/// and counts it, while the rogue's announcement of its own prefix is accepted (so the
/// test proves the channel works and the refusal is about ownership).
#[test]
fn a_neighbour_announcing_a_prefix_it_does_not_own_is_ignored() -> Result<()> {
    use myconet_core::{
        id::{LinkEndpoint, Signer},
        peers::wire::frame_routing,
        routing::{SignedOrigin, owned_prefix, wire},
        session::{Config, Inbound, SessionTable},
    };
    use ring::{rand::SystemRandom, signature::Ed25519KeyPair};

    let topo = Chain::new(2).tag("rogue").build()?;
    let victim = AgentProcess::start(
        topo.node(0),
        &bin_dir()?,
        AgentOptions {
            port: PORT,
            extra_args: vec!["--no-tun".to_string()],
            ..AgentOptions::default()
        },
    )?;
    let victim_ep = SocketAddrV6::new(topo.node(1).peer_addr(0)?, PORT, 0, 0);
    let socket = bind_udp(
        topo.node(1).netns(),
        SocketAddr::V6(SocketAddrV6::new(topo.node(1).addr_to(0)?, PORT, 0, 0)),
    )?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;

    // A key with the identity proof of work: without it the victim would refuse the
    // rogue's own prefix too (`rejected_insufficient_work`).
    let rogue: Arc<Ed25519KeyPair> = Arc::new(
        Ed25519KeyPair::from_pkcs8(&myconet_testbed::identities::next_pkcs8())
            .map_err(|e| anyhow::anyhow!("rogue key: {e}"))?,
    );
    let someone: Ed25519KeyPair = Ed25519KeyPair::from_seed_unchecked(&[0x77; 32])
        .map_err(|e| anyhow::anyhow!("second key: {e}"))?;
    let rogue_key: [u8; 32] = Signer::public_key(rogue.as_ref()).try_into()?;
    let someone_key: [u8; 32] = Signer::public_key(&someone).try_into()?;
    let rng = SystemRandom::new();
    let start = Instant::now();
    let mut table = SessionTable::new(rogue.clone(), Config::default(), start)?;
    // Link handshakes are bound to both ends' underlay endpoints: the rogue's own.
    table.set_local_underlay(PORT, [topo.node(1).addr_to(0)?]);
    let link = LinkEndpoint::from(victim_ep);
    table
        .connect_link(link, None, start, &rng)
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    // Pump the rogue's side until its link session is up (bounded).
    let pump = |table: &mut SessionTable| -> Result<()> {
        while let Some(t) = table.poll_transmit() {
            socket.send_to(&t.datagram, SocketAddr::V6(victim_ep))?;
        }
        let mut buf = [0u8; 2048];
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            // Hellos from the victim open as control messages; the rogue ignores them.
            let _: Option<Inbound> = table
                .handle_datagram(from, &buf[..n], Instant::now(), &rng)
                .ok();
        }
        Ok(())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while table.link_session(link).is_none() {
        ensure!(
            Instant::now() < deadline,
            "the rogue's link handshake never completed"
        );
        pump(&mut table)?;
    }
    // Let the victim see the rogue's confirmation and bring it up.
    for _ in 0..10 {
        pump(&mut table)?;
    }

    // 1. A hijack: someone else's prefix, signed by the rogue's own key.
    let foreign = owned_prefix(&someone_key);
    let forged = Signer::sign(
        rogue.as_ref(),
        &wire::signing_message(&rogue_key, foreign, 64, 1),
    );
    let forged: [u8; 64] = forged.as_slice().try_into()?;
    // 2. The rogue's own prefix, honestly signed: must be accepted.
    let own = SignedOrigin::sign(rogue.as_ref(), 1).context("signing")?;
    let mut payload = vec![wire::VERSION, 0];
    wire::put_update(&mut payload, 64, 1, 0, foreign, &rogue_key, &forged);
    wire::put_update(
        &mut payload,
        64,
        own.seqno,
        0,
        own.prefix,
        &own.key,
        &own.signature,
    );
    let frame = frame_routing(&payload).context("framing")?;
    // Resend a few times: the victim may still be bringing the neighbour up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        table
            .send_link(link, frame.clone(), Instant::now(), &rng)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for _ in 0..5 {
            pump(&mut table)?;
        }
        let stats = victim.ctl_json(&["stats"])?;
        if counter(&stats, "routing", "rejected_unowned_prefix")? > 0 {
            break stats;
        }
        ensure!(Instant::now() < deadline, "hijack never counted: {stats}");
    };
    let routes = victim.ctl_json(&["routes"])?;
    let rows = routes["routes"].as_array().cloned().unwrap_or_default();
    let foreign_prefix = format!("{}/64", Ipv6Addr::from(u128::from(foreign) << 64));
    let own_prefix = format!("{}/64", Ipv6Addr::from(u128::from(own.prefix) << 64));
    ensure!(
        !rows.iter().any(|r| r["prefix"] == foreign_prefix.as_str()),
        "the hijacked prefix must not be routed: {routes}"
    );
    ensure!(
        rows.iter()
            .any(|r| r["prefix"] == own_prefix.as_str() && r["agent"]["origin"] == "routing"),
        "the rogue's own prefix is accepted (the channel works): {routes}\n{stats}"
    );
    victim.stop()?;
    Ok(())
}
