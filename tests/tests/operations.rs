//! Running a node as an operator does, in network namespaces: start-up errors that say
//! why and leave nothing behind, the capabilities a running agent keeps (as root, and
//! as an unprivileged user holding exactly the systemd unit's capabilities), Prometheus
//! metrics scraped over HTTP while traffic flows, and the log formats.
//!
//! Runs as root (CI is root). Every wait is bounded; every namespace, process and
//! temporary directory is removed again.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{Ipv6Addr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use myconet_agent::caps::{self, CapSet};
use myconet_testbed::{
    Chain, Netns,
    agent::{AGENT_BIN, CTL_BIN, bin_dir},
    netns::{self, NsChild},
    scenario::OverlayChain,
    util::{self, COMMAND_TIMEOUT, TempDir},
};
use serde_json::Value;

const FAIL_TIMEOUT: Duration = Duration::from_secs(10);
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const METRICS_ADDR: &str = "[::1]:9652";

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

/// `env RUST_LOG=<filter> <prefix…> myconet-agent <args…>` in `ns`, output to `log`.
fn spawn(
    ns: &Netns,
    prefix: &[String],
    filter: &str,
    agent_args: &[String],
    log: &Path,
) -> Result<NsChild> {
    let mut full = prefix.to_vec();
    full.extend(["env".to_owned(), format!("RUST_LOG={filter}")]);
    full.push(bin_dir()?.join(AGENT_BIN).display().to_string());
    full.extend(agent_args.iter().cloned());
    let program = full.remove(0);
    ns.spawn(util::tool(&program), &full, Some(log))
}

/// Waits until the agent answers `status` on `socket`.
fn wait_ready(child: &mut NsChild, socket: &Path, log: &Path) -> Result<Value> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "agent exited during start-up ({}):\n{}",
                util::status_text(status),
                read(log)
            );
        }
        if socket.exists() {
            let out = util::run_with_timeout(
                Command::new(bin_dir()?.join(CTL_BIN))
                    .arg("--socket")
                    .arg(socket)
                    .args(["--json", "status"]),
                COMMAND_TIMEOUT,
            )?;
            if out.status.success() {
                return serde_json::from_slice(&out.stdout).context("status JSON");
            }
        }
        ensure!(
            Instant::now() < deadline,
            "agent not ready in {READY_TIMEOUT:?}:\n{}",
            read(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every thread's (effective, permitted) capabilities of process `pid`.
fn thread_caps(pid: u32) -> Result<Vec<(u32, CapSet, CapSet)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: u32 = entry?.file_name().to_string_lossy().parse()?;
        if let Some([eff, prm, _, _]) = caps::thread_sets(pid, tid) {
            out.push((tid, eff, prm));
        }
    }
    ensure!(!out.is_empty(), "no threads of {pid}");
    Ok(out)
}

fn ensure_caps_are(pid: u32, want: CapSet) -> Result<()> {
    for (tid, eff, prm) in thread_caps(pid)? {
        ensure!(
            eff == want && prm == want,
            "thread {tid} of the agent holds CapEff {eff} / CapPrm {prm}; expected only {want}"
        );
    }
    Ok(())
}

/// Whether an XDP program is attached to `iface`.
fn xdp_attached(ns: &Netns, iface: &str) -> Result<bool> {
    let out = ns.ip(["-d", "link", "show", "dev", iface])?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("prog/xdp"))
}

fn link_exists(ns: &Netns, name: &str) -> Result<bool> {
    Ok(ns
        .command(util::tool("ip"))
        .args(["link", "show", "dev", name])
        .output()?
        .status
        .success())
}

fn forwarding(ns: &Netns, iface: &str) -> Result<String> {
    Ok(ns
        .exec_stdout(
            "cat",
            [format!("/proc/sys/net/ipv6/conf/{iface}/forwarding")],
        )?
        .trim()
        .to_owned())
}

/// Each way the agent can refuse to start: it prints why, exits 1, and leaves no
/// socket, no lock file, no state it did not find, no XDP program and no TUN device.
/// The refusals that are found before anything is claimed also come before any warning.
#[test]
fn startup_errors_say_why_and_leave_nothing_behind() -> Result<()> {
    let topo = Chain::new(2)
        .ipv6_forwarding(false)
        .tag("opsfail")
        .build()?;
    let ns = topo.node(0).netns();
    let iface = topo.node(0).iface_to(1)?.name.clone();
    let dir = TempDir::new("ops-fail")?;
    let file = dir.path().join("a-file");
    fs::write(&file, "not a directory")?;
    let taken = dir.path().join("taken");
    let no_net_admin = args(&[
        "setpriv",
        "--inh-caps=-net_admin",
        "--bounding-set=-net_admin",
        "--",
    ]);
    let cases: Vec<(&str, Vec<String>, Vec<String>, String)> = vec![
        (
            "missing interface",
            vec![],
            args(&["--interface", "nonexistent0"]),
            "no such interface: nonexistent0".into(),
        ),
        (
            "state dir is a file",
            vec![],
            args(&[
                "--interface",
                &iface,
                "--state-dir",
                &file.display().to_string(),
            ]),
            format!(
                "state directory {} exists and is not a directory",
                file.display()
            ),
        ),
        (
            "TUN without CAP_NET_ADMIN",
            no_net_admin,
            args(&["--interface", &iface]),
            "creating the TUN device myconet0 needs CAP_NET_ADMIN".into(),
        ),
        (
            "port taken (found after XDP is attached)",
            vec![],
            args(&["--interface", &iface, "--port", "9777"]),
            "binding UDP [::]:9777".into(),
        ),
    ];
    // Held for the last case: the agent's UDP bind fails after it attached XDP.
    let _holder = ns.run_in(|| std::net::UdpSocket::bind("[::]:9777"))??;
    let _ = &taken;
    for (i, (case, prefix, extra, needle)) in cases.into_iter().enumerate() {
        let run = dir.path().join(format!("run{i}"));
        let state = run.join("state");
        let socket = run.join("sock/agent.sock");
        let log = dir.path().join(format!("case{i}.log"));
        if i >= 3 {
            // Found after the claims: the agent gets that far with a pre-generated
            // identity (the proof of work would take seconds under load).
            fs::create_dir_all(&state)?;
            myconet_testbed::agent::write_identity(&state)?;
        }
        let mut agent_args = extra.clone();
        if !extra.iter().any(|a| a == "--state-dir") {
            agent_args.extend(["--state-dir".into(), state.display().to_string()]);
        }
        agent_args.extend(["--socket".into(), socket.display().to_string()]);
        let mut child = spawn(ns, &prefix, "info", &agent_args, &log)?;
        let status = child
            .wait_timeout(FAIL_TIMEOUT)?
            .with_context(|| format!("{case}: still running:\n{}", read(&log)))?;
        let text = read(&log);
        ensure!(
            status.code() == Some(1),
            "{case}: exit {}:\n{text}",
            util::status_text(status)
        );
        let error = text
            .lines()
            .find(|l| l.starts_with("Error:"))
            .with_context(|| format!("{case}: no Error: line:\n{text}"))?;
        ensure!(
            text.contains(&needle),
            "{case}: expected {needle:?}:\n{text}"
        );
        ensure!(
            !text.contains('\u{1b}'),
            "{case}: colour codes in a log file:\n{text}"
        );
        if i < 3 {
            // Found before anything is claimed: nothing was logged before the error.
            ensure!(
                !text.contains("WARN") && !text.contains(" INFO "),
                "{case}: log lines before the error {error:?}:\n{text}"
            );
            ensure!(!state.exists(), "{case}: the state directory was created");
            ensure!(
                !socket.parent().unwrap().exists(),
                "{case}: the socket directory was created"
            );
        } else {
            // After the claims: they are all undone.
            ensure!(!socket.exists(), "{case}: the socket is left");
            let mut left: Vec<String> = fs::read_dir(&state)?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()?;
            left.sort();
            // Only state meant to outlive the process may stay: the identity, the
            // routing seqno reservation (never reused, so it is written before the
            // router can announce anything) and the content store (opened, and created
            // if new, before the network claims); no lock file, no sysctl journal.
            left.retain(|f| f != "routing-seqno" && f != "store");
            ensure!(
                left == ["identity.pk8"],
                "{case}: the state directory holds {left:?}"
            );
            let sock_dir: Vec<_> = fs::read_dir(socket.parent().unwrap())?.collect();
            ensure!(
                sock_dir.is_empty(),
                "{case}: the socket directory is not empty"
            );
        }
        ensure!(!xdp_attached(ns, &iface)?, "{case}: XDP left attached");
        ensure!(
            !link_exists(ns, "myconet0")?,
            "{case}: a TUN device is left"
        );
        ensure!(forwarding(ns, &iface)? == "0", "{case}: forwarding left on");
    }
    drop(dir);
    let names: Vec<String> = topo
        .nodes()
        .iter()
        .map(|n| n.ns_name().to_owned())
        .collect();
    drop(topo);
    ensure!(
        netns::list()?.iter().all(|n| !names.contains(n)),
        "namespaces left"
    );
    Ok(())
}

/// The capabilities named by `AmbientCapabilities=` in the packaged unit.
fn unit_capabilities() -> Result<Vec<String>> {
    let unit = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/myconet-agent.service"),
    )?;
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .context("the unit has no AmbientCapabilities=")?;
    let bounding = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .context("the unit has no CapabilityBoundingSet=")?;
    ensure!(
        line == bounding,
        "ambient {line:?} and bounding {bounding:?} sets differ"
    );
    Ok(line
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect())
}

/// An agent run as systemd runs the unit: an unprivileged user holding exactly the
/// unit's ambient capabilities. It attaches XDP in driver mode, creates the TUN device,
/// sets the sysctls, serves; once set up every thread holds only what running needs;
/// a route added then still reaches the kernel map; SIGTERM detaches and restores.
#[test]
fn the_units_capabilities_run_the_agent_unprivileged_and_it_keeps_only_what_it_needs() -> Result<()>
{
    let caps = unit_capabilities()?;
    let topo = Chain::new(2)
        .ipv6_forwarding(false)
        .tag("opsunit")
        .build()?;
    let ns = topo.node(0).netns();
    let iface = topo.node(0).iface_to(1)?.name.clone();
    let dir = TempDir::new("ops-unit")?;
    // What StateDirectory= and RuntimeDirectory= give the service's user.
    let (state, run) = (dir.path().join("state"), dir.path().join("run"));
    for d in [&state, &run] {
        fs::create_dir(d)?;
        std::os::unix::fs::chown(d, Some(65534), Some(65534))?;
    }
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
    let list = caps
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(",");
    // /dev/net/tun as Debian makes it (mode 0666), in a mount namespace of the agent's
    // own: this machine's may be 0600, and the test must not change the host's.
    let prefix = args(&[
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs -o mode=0755 tmpfs /dev/net && mknod -m 0666 /dev/net/tun c 10 200 && exec \"$@\"",
        "sh",
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        &format!("--inh-caps=-all,{list}"),
        &format!("--ambient-caps=-all,{list}"),
        &format!("--bounding-set=-all,{list}"),
        "--",
    ]);
    let socket = run.join("agent.sock");
    let log = dir.path().join("agent.log");
    let agent_args = args(&[
        "--interface",
        &iface,
        "--xdp-mode",
        "driver",
        "--state-dir",
        &state.display().to_string(),
        "--socket",
        &socket.display().to_string(),
    ]);
    let mut child = spawn(ns, &prefix, "info", &agent_args, &log)?;
    let status = wait_ready(&mut child, &socket, &log)?;
    ensure!(
        status["interfaces"][0]["xdp_mode"] == "driver",
        "XDP not in driver mode with the unit's capabilities: {status}\n{}",
        read(&log)
    );
    ensure!(
        link_exists(ns, "myconet0")?,
        "no TUN device:\n{}",
        read(&log)
    );
    ensure!(
        forwarding(ns, &iface)? == "1",
        "forwarding not set:\n{}",
        read(&log)
    );
    ensure!(read(&log).contains("identity created"), "{}", read(&log));

    let want = caps::needed_after_setup(true);
    ensure_caps_are(child.id(), want)?;

    // Running needs no more than that: a static route reaches the kernel map.
    let ctl = |a: &[&str]| -> Result<Value> {
        let out = util::run_checked(
            Command::new(bin_dir()?.join(CTL_BIN))
                .arg("--socket")
                .arg(&socket)
                .arg("--json")
                .args(a),
            COMMAND_TIMEOUT,
        )?;
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    };
    let via = topo.node(1).addr_to(0)?.to_string();
    ctl(&["route", "add", "fd6d:feed:1:2::/64", "via", &via])?;
    let routes = ctl(&["routes"])?;
    let row = routes["routes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["prefix"] == "fd6d:feed:1:2::/64"))
        .with_context(|| format!("route missing: {routes}"))?;
    ensure!(
        row["kernel"].is_object(),
        "the route is not in the kernel map: {row}"
    );

    let exit = child.terminate(netns::STOP_GRACE)?;
    ensure!(
        exit.success(),
        "exit {}:\n{}",
        util::status_text(exit),
        read(&log)
    );
    ensure!(!xdp_attached(ns, &iface)?, "XDP left attached");
    ensure!(
        forwarding(ns, &iface)? == "0",
        "forwarding not restored:\n{}",
        read(&log)
    );
    ensure!(!socket.exists(), "socket left");
    drop(dir);
    drop(topo);
    Ok(())
}

/// One sample of the exposition format: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// GETs `path` from `addr` inside `ns`; returns status line, headers and body.
fn http_get(ns: &Netns, addr: &str, path: &str) -> Result<(String, String, String)> {
    let addr: SocketAddr = addr.parse()?;
    let path = path.to_owned();
    ns.run_in(move || -> Result<(String, String, String)> {
        let mut stream = TcpStream::connect_timeout(&addr, COMMAND_TIMEOUT)?;
        stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").context("no header end")?;
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        Ok((status.to_owned(), headers.to_lowercase(), body.to_owned()))
    })?
}

/// Parses the text format strictly enough to catch a malformed line: every sample's
/// family has HELP and TYPE lines before it, and counters end in `_total`.
fn parse_metrics(body: &str) -> Result<Vec<Sample>> {
    let mut help = std::collections::HashSet::new();
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').context("HELP without text")?;
            ensure!(!text.trim().is_empty(), "empty HELP for {name}");
            help.insert(name.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').context("TYPE without kind")?;
            ensure!(["counter", "gauge"].contains(&kind), "{line}");
            ensure!(
                kind != "counter" || name.ends_with("_total"),
                "counter {name} lacks _total"
            );
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value: {line}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("bad value: {line}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .with_context(|| format!("unclosed: {line}"))?;
                let mut labels = BTreeMap::new();
                for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .with_context(|| format!("label: {line}"))?;
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name.to_owned(), labels)
            }
            None => (series.to_owned(), BTreeMap::new()),
        };
        ensure!(
            name.starts_with("myconet_"),
            "{name} lacks the myconet_ prefix"
        );
        ensure!(
            help.contains(&name) && types.contains_key(&name),
            "{name} has no HELP/TYPE"
        );
        samples.push((name, labels, value));
    }
    Ok(samples)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
}

/// Relay b of an a — b — c overlay serves metrics on loopback; a scrape parses, names
/// both neighbours (up, with an RTT) and both interfaces, and the XDP relay counters
/// grow by at least the packets a ping from a to c sent through b.
#[test]
fn metrics_are_scraped_over_http_and_move_with_traffic() -> Result<()> {
    let bin = bin_dir()?;
    let topo = Chain::new(3).tag("opsmet").build()?;
    let chain = OverlayChain::start_on(
        topo,
        &bin,
        &["--dataplane", "xdp", "--metrics-listen", METRICS_ADDR],
    )?;
    let b = chain.topo.node(1);
    let b_agent = &chain.agents[1];
    // b runs as root: after set-up it too keeps only what running needs.
    ensure_caps_are(b_agent.pid(), caps::needed_after_setup(true))?;

    let scrape = || -> Result<Vec<Sample>> {
        let (status, headers, body) = http_get(b.netns(), METRICS_ADDR, "/metrics")?;
        ensure!(status.contains(" 200 "), "{status}\n{body}");
        ensure!(
            headers.contains("content-type: text/plain; version=0.0.4"),
            "{headers}"
        );
        parse_metrics(&body).with_context(|| format!("parsing:\n{body}"))
    };
    let relayed = |s: &[Sample]| -> f64 {
        ["redirect", "tx"]
            .iter()
            .filter_map(|v| value(s, "myconet_xdp_packets_total", &[("verdict", v)]))
            .sum()
    };
    let before = scrape()?;
    let c = chain.c_overlay.to_string();
    chain.topo.node(0).netns().exec(
        util::tool("ping"),
        ["-6", "-n", "-c", "5", "-i", "0.2", "-W", "2", c.as_str()],
    )?;
    let after = util::poll(
        "relay counters to move",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let s = scrape()?;
            Ok((relayed(&s) >= relayed(&before) + 10.0).then_some(s))
        },
    )?;

    for peer in [
        chain.topo.node(0).addr_to(1)?,
        chain.topo.node(2).addr_to(1)?,
    ] {
        let label = format!("[{peer}]:9651");
        ensure!(
            value(&after, "myconet_peer_up", &[("peer", &label)]) == Some(1.0),
            "peer {label} not up in the metrics"
        );
        ensure!(
            value(&after, "myconet_peer_rtt_seconds", &[("peer", &label)]).is_some_and(|v| v > 0.0),
            "no RTT for {label}"
        );
    }
    for iface in b.if_names() {
        let sent = |s: &[Sample]| {
            value(
                s,
                "myconet_interface_transmit_packets_total",
                &[("interface", iface)],
            )
        };
        ensure!(
            sent(&after).zip(sent(&before)).is_some_and(|(a, b)| a > b),
            "{iface}: transmit counter did not grow"
        );
        ensure!(
            value(
                &after,
                "myconet_interface_info",
                &[("interface", iface), ("xdp_mode", "driver")]
            ) == Some(1.0)
        );
    }
    // What `stats` says, the metrics say.
    let stats = b_agent.stats()?;
    let rx = myconet_testbed::counter(&stats, "agent", "rx_control")? as f64;
    let scraped = value(
        &scrape()?,
        "myconet_agent_packets_total",
        &[("counter", "rx_control")],
    )
    .context("no rx_control")?;
    ensure!(scraped >= rx, "metrics rx_control {scraped} < stats {rx}");
    let (status, _, _) = http_get(b.netns(), METRICS_ADDR, "/nope")?;
    ensure!(status.contains(" 404 "), "{status}");
    let _: Ipv6Addr = chain.c_overlay;
    drop(chain);
    Ok(())
}

/// Off a terminal the log is plain text; `RUST_LOG=debug` shows Myconet's debug lines
/// and not the HTTP/2 stack's; `--log-format json` writes one JSON object per line.
#[test]
fn logs_are_plain_off_a_terminal_debug_is_readable_and_json_on_request() -> Result<()> {
    let ns = Netns::create(&netns::unique_name("opslog"))?;
    ns.ip(["link", "set", "lo", "up"])?;
    let dir = TempDir::new("ops-log")?;
    for format in ["text", "json"] {
        let socket = dir.path().join(format!("{format}.sock"));
        let log = dir.path().join(format!("{format}.log"));
        let agent_args = args(&[
            "--no-tun",
            "--log-format",
            format,
            "--state-dir",
            &dir.path().join(format).display().to_string(),
            "--socket",
            &socket.display().to_string(),
        ]);
        let mut child = spawn(&ns, &[], "debug", &agent_args, &log)?;
        wait_ready(&mut child, &socket, &log)?;
        // A few RPCs: each one is dozens of HTTP/2 frames.
        for _ in 0..3 {
            util::run_checked(
                Command::new(bin_dir()?.join(CTL_BIN))
                    .arg("--socket")
                    .arg(&socket)
                    .arg("stats"),
                COMMAND_TIMEOUT,
            )?;
        }
        let exit = child.terminate(netns::STOP_GRACE)?;
        ensure!(exit.success(), "exit {}", util::status_text(exit));
        let text = read(&log);
        ensure!(!text.contains('\u{1b}'), "{format}: colour codes:\n{text}");
        ensure!(
            !text.contains("h2::") && !text.contains("\"h2::"),
            "{format}: HTTP/2 frame logs:\n{text}"
        );
        match format {
            "text" => ensure!(
                text.lines()
                    .any(|l| l.contains("DEBUG") && l.contains("myconet_agent")),
                "no Myconet debug lines:\n{text}"
            ),
            _ => {
                let mut debug = 0;
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    let v: Value =
                        serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
                    ensure!(
                        v["level"].is_string()
                            && v["target"].is_string()
                            && v["fields"].is_object(),
                        "{line}"
                    );
                    if v["level"] == "DEBUG"
                        && v["target"]
                            .as_str()
                            .is_some_and(|t| t.starts_with("myconet_agent"))
                    {
                        debug += 1;
                    }
                }
                ensure!(debug > 0, "no Myconet debug events:\n{text}");
                ensure!(text.contains("\"identity created\""), "{text}");
            }
        }
    }
    drop(dir);
    let name = ns.name().to_owned();
    drop(ns);
    ensure!(!netns::list()?.contains(&name), "namespace left");
    Ok(())
}
