//! The agent's life cycle with real processes in network namespaces: attaching the XDP
//! program in the mode asked for, leaving nothing behind on SIGTERM or SIGKILL, refusing
//! to start with a clear message when it cannot do its job, and the control API driven
//! end to end through the real `myconet-ctl`.
//!
//! Runs as root (CI is root). Every wait is a bounded poll; every namespace, process and
//! temporary directory is removed again, and each test checks its namespaces are gone.

use std::{
    fs,
    io::Write,
    net::{SocketAddr, SocketAddrV6},
    os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use myconet_common::{maps::PROGRAM_NAME, wire::DEFAULT_PORT};
use myconet_testbed::{
    AgentOptions, AgentProcess, Chain, Netns, Topology,
    agent::{AGENT_BIN, CTL_BIN, bin_dir},
    netns::{self, NsChild},
    scenario::OverlayChain,
    traffic::bind_udp,
    util::{self, COMMAND_TIMEOUT, TempDir},
};
use serde_json::Value;

/// Upper bound for an agent that is expected to give up to actually exit.
const FAIL_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for an agent to answer `status`, and for the kernel to catch up.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A static route used by the control API test; anything in fd6d::/16 that is not the
/// node's own /64 would do.
const ROUTE_PREFIX: &str = "fd6d:feed:1:2::/64";
/// An address inside [`ROUTE_PREFIX`].
const ROUTE_ADDRESS: &str = "fd6d:feed:1:2::7";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// How `ip -d link show` reports XDP on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XdpAttach {
    /// No `xdp*` flag and no `prog/xdp` line.
    None,
    /// `xdp` in the flags (native / driver mode) and a `prog/xdp` line.
    Driver,
    /// `xdpgeneric` in the flags and a `prog/xdp` line.
    Generic,
    /// Anything else (offload, several programs, a flag without a program line, …).
    Other,
}

/// Reads the XDP state of `iface` as iproute2 prints it. With a program attached the
/// first line carries `xdp` (driver mode) or `xdpgeneric` between `mtu N` and `qdisc`,
/// and `-d` adds a line `prog/xdp id N name <prog> tag … jited`.
fn xdp_attach(ns: &Netns, iface: &str) -> Result<(XdpAttach, String)> {
    let out = ns.ip(["-d", "link", "show", "dev", iface])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let first = text.lines().next().unwrap_or_default();
    let flags: Vec<&str> = first
        .split_whitespace()
        .filter(|t| t.starts_with("xdp"))
        .collect();
    let prog_line = text.contains("prog/xdp");
    let state = match (flags.as_slice(), prog_line) {
        ([], false) => XdpAttach::None,
        (["xdp"], true) => XdpAttach::Driver,
        (["xdpgeneric"], true) => XdpAttach::Generic,
        _ => XdpAttach::Other,
    };
    Ok((state, text))
}

/// Checks that `iface` carries Myconet's program in `want` mode.
fn ensure_ours_attached(ns: &Netns, iface: &str, want: XdpAttach) -> Result<()> {
    let (state, text) = xdp_attach(ns, iface)?;
    ensure!(
        state == want,
        "{iface} in {}: expected {want:?}, ip link shows {state:?}:\n{text}",
        ns.name()
    );
    // The kernel keeps at most 15 bytes of a program name.
    let name: String = PROGRAM_NAME.chars().take(15).collect();
    ensure!(
        text.contains(&format!("name {name} ")),
        "{iface}: the attached program is not {name}:\n{text}"
    );
    Ok(())
}

/// Checks that no XDP program is attached to `iface`.
fn ensure_detached(ns: &Netns, iface: &str) -> Result<()> {
    let (state, text) = xdp_attach(ns, iface)?;
    ensure!(
        state == XdpAttach::None,
        "{iface} in {}: XDP still attached ({state:?}):\n{text}",
        ns.name()
    );
    Ok(())
}

/// `net.ipv6.conf.<iface>.forwarding` inside the namespace, via `ip netns exec … cat`.
fn forwarding(ns: &Netns, iface: &str) -> Result<String> {
    let path = format!("/proc/sys/net/ipv6/conf/{iface}/forwarding");
    Ok(ns.exec_stdout("cat", [path.as_str()])?.trim().to_owned())
}

/// Polls `probe` until it yields a value. Unlike `util::poll` an error ends the wait at
/// once (a dead agent should fail the test now, not after the timeout).
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Drops tracing's colour codes (the agent's log is not a terminal, but the subscriber
/// colours anyway), so log assertions match plain text.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters… final byte in @..~
            if chars.next() == Some('[') {
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn read_log(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => strip_ansi(&String::from_utf8_lossy(&bytes)),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Runs `myconet-ctl --socket <socket> <args…>` whatever its exit status.
fn ctl_raw(socket: &Path, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(bin_dir()?.join(CTL_BIN));
    cmd.arg("--socket").arg(socket).args(args);
    util::run_with_timeout(&mut cmd, COMMAND_TIMEOUT)
}

/// Runs `myconet-ctl` expecting failure; returns its exit code and stderr.
fn ctl_failure(socket: &Path, args: &[&str]) -> Result<(i32, String)> {
    let out = ctl_raw(socket, args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success(),
        "myconet-ctl {} succeeded but should have failed: {stdout}",
        args.join(" ")
    );
    let code = out
        .status
        .code()
        .with_context(|| format!("myconet-ctl {} died by a signal: {stderr}", args.join(" ")))?;
    Ok((code, stderr))
}

/// Starts `myconet-agent <args…>` in `ns` with info logging (so warnings are in the log
/// whatever RUST_LOG the test runner has), output to `log`.
/// Gives a state directory named in `args` that holds no identity a pre-generated one:
/// generating it (the identity proof of work) takes seconds of CPU, which on a loaded
/// machine would eat into the bounds these tests set for start-up and refusal.
fn seed_identity(args: &[String]) -> Result<()> {
    if let Some(dir) = args
        .iter()
        .position(|a| a == "--state-dir")
        .and_then(|i| args.get(i + 1))
    {
        let dir = Path::new(dir);
        if !dir.join("identity.pk8").exists() {
            fs::create_dir_all(dir)?;
            myconet_testbed::agent::write_identity(dir)?;
        }
    }
    Ok(())
}

fn spawn_agent(ns: &Netns, args: &[String], log: &Path) -> Result<NsChild> {
    seed_identity(args)?;
    let agent = bin_dir()?.join(AGENT_BIN);
    let mut full = vec!["RUST_LOG=info".to_owned(), agent.display().to_string()];
    full.extend(args.iter().cloned());
    ns.spawn("env", &full, Some(log))
}

/// Starts an agent that must refuse to run: it has to exit by itself within
/// [`FAIL_TIMEOUT`] with exit status 1 (an error, not a panic or a signal). Returns its
/// log without colour codes.
fn agent_must_fail(ns: &Netns, args: &[String], log: &Path) -> Result<String> {
    let started = Instant::now();
    let mut child = spawn_agent(ns, args, log)?;
    let status = child.wait_timeout(FAIL_TIMEOUT)?;
    let text = read_log(log);
    let Some(status) = status else {
        bail!(
            "agent {args:?} still running after {FAIL_TIMEOUT:?}; it should have given up. Log:\n{text}"
        );
    };
    ensure!(
        status.code() == Some(1),
        "agent {args:?} should exit with status 1 (an error), got {} after {:?}. Log:\n{text}",
        util::status_text(status),
        started.elapsed()
    );
    Ok(text)
}

/// Waits until an agent started by hand answers `status`, failing at once if it exits.
fn wait_ready(child: &mut NsChild, socket: &Path, log: &Path) -> Result<Value> {
    wait_for("the agent to answer status", READY_TIMEOUT, || {
        if let Some(status) = child.try_wait()? {
            bail!(
                "agent exited during startup ({}). Log:\n{}",
                util::status_text(status),
                read_log(log)
            );
        }
        if !socket.exists() {
            return Ok(None);
        }
        let out = ctl_raw(socket, &["--json", "status"])?;
        if !out.status.success() {
            return Ok(None);
        }
        Ok(Some(
            serde_json::from_slice(&out.stdout).context("status printed invalid JSON")?,
        ))
    })
}

/// Removes a directory the test asked the testbed to keep (so it could look at what the
/// agent left behind in it).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The agent's temporary directory (socket, state, log), kept past the agent's exit.
fn keep_agent_dir(agent: &mut AgentProcess) -> Result<RemoveOnDrop> {
    agent.keep_files();
    let dir = agent
        .socket_path()
        .parent()
        .context("socket path has no parent")?
        .to_path_buf();
    Ok(RemoveOnDrop(dir))
}

fn ensure_namespaces_gone(names: &[String]) -> Result<()> {
    let left: Vec<String> = netns::list()?
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

/// Tears the topology down and checks `ip netns list` no longer shows its namespaces.
fn teardown(topo: Topology) -> Result<()> {
    let names: Vec<String> = topo
        .nodes()
        .iter()
        .map(|n| n.ns_name().to_owned())
        .collect();
    ensure!(!names.is_empty(), "topology without namespaces");
    drop(topo);
    ensure_namespaces_gone(&names)
}

fn teardown_ns(ns: Netns) -> Result<()> {
    let name = ns.name().to_owned();
    drop(ns);
    ensure_namespaces_gone(&[name])
}

/// A namespace with one up, addressed device that has no native XDP support, named
/// `name`. Returns the device type used.
///
/// `dummy` is the first choice: it has no `ndo_bpf`, so the kernel refuses driver-mode
/// XDP on it with EOPNOTSUPP. Some kernels are built without the dummy driver (the
/// testbed VM's, for one: `ip link add … type dummy` fails with "Unknown device type"),
/// so a port-less `bridge` stands in there: a bridge has no `ndo_bpf` either, on every
/// kernel, and like dummy it is an Ethernet device with IPv6 configuration, so generic
/// XDP and the agent's sysctls work on it.
fn namespace_with_non_xdp_device(label: &str, name: &str) -> Result<(Netns, &'static str)> {
    let ns = Netns::create(&netns::unique_name(label))?;
    ns.ip(["link", "set", "dev", "lo", "up"])?;
    let kind = match ns.ip(["link", "add", name, "type", "dummy"]) {
        Ok(_) => "dummy",
        Err(dummy_err) => {
            ns.ip(["link", "add", name, "type", "bridge"])
                .with_context(|| format!("no dummy device either: {dummy_err:#}"))?;
            "bridge"
        }
    };
    ns.ip(["link", "set", "dev", name, "up"])?;
    ns.ip(["addr", "add", "fd00:6c63::1/64", "dev", name, "nodad"])?;
    Ok((ns, kind))
}

/// Options for an agent with info logging and the given XDP mode.
fn options(xdp_mode: &str) -> AgentOptions {
    AgentOptions {
        xdp_mode: Some(xdp_mode.to_owned()),
        log_filter: Some("info".to_owned()),
        ..AgentOptions::default()
    }
}

/// The `interfaces` list of a `status` JSON as `(name, ifindex, xdp_mode)`.
fn status_interfaces(status: &Value) -> Result<Vec<(String, u64, String)>> {
    status["interfaces"]
        .as_array()
        .with_context(|| format!("status has no interfaces list: {status}"))?
        .iter()
        .map(|i| {
            Ok((
                i["name"].as_str().context("interface name")?.to_owned(),
                i["ifindex"].as_u64().context("interface ifindex")?,
                i["xdp_mode"]
                    .as_str()
                    .context("interface xdp_mode")?
                    .to_owned(),
            ))
        })
        .collect()
}

/// The row for `prefix` in a `routes` JSON, if any.
fn route_row<'a>(routes: &'a Value, prefix: &str) -> Result<Option<&'a Value>> {
    Ok(routes["routes"]
        .as_array()
        .with_context(|| format!("routes JSON has no routes list: {routes}"))?
        .iter()
        .find(|r| r["prefix"] == prefix))
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------------------------------
// 1. Attach in driver mode, clean detach on SIGTERM
// ---------------------------------------------------------------------------------------

/// Driver-mode attach is visible in the kernel and in `status`, the agent enables IPv6
/// forwarding on its interface, and SIGTERM undoes all of it: exit 0, program gone,
/// forwarding back to 0, socket removed, and the CLI then reports "no agent" (exit 2).
#[test]
fn sigterm_detaches_restores_sysctls_and_removes_the_socket() -> Result<()> {
    let bin = bin_dir()?;
    let topo = Chain::new(2).ipv6_forwarding(false).tag("lcterm").build()?;
    let a = topo.node(0);
    let ns = a.netns();
    let iface = a.iface_to(1)?.clone();
    ensure!(
        forwarding(ns, &iface.name)? == "0",
        "precondition: the chain was built without forwarding"
    );
    ensure_detached(ns, &iface.name)?;

    let mut agent = AgentProcess::start(a, &bin, options("driver"))?;
    // Keep the agent's directory past its exit, so the socket's absence afterwards is
    // the agent's doing and not the testbed deleting the directory.
    let dir = keep_agent_dir(&mut agent)?;
    let socket = agent.socket_path().to_path_buf();
    let log = agent.log_path().to_path_buf();

    ensure_ours_attached(ns, &iface.name, XdpAttach::Driver)?;
    let status = agent.status()?;
    ensure!(
        status_interfaces(&status)?
            == [(
                iface.name.clone(),
                u64::from(iface.ifindex),
                "driver".to_owned()
            )],
        "status should list {} in driver mode: {status}",
        iface.name
    );
    ensure!(
        forwarding(ns, &iface.name)? == "1",
        "forwarding not enabled on {} while the agent runs",
        iface.name
    );
    ensure!(
        fs::symlink_metadata(&socket)?.file_type().is_socket(),
        "{} is not a socket while the agent runs",
        socket.display()
    );

    let exit = agent.stop()?;
    ensure!(
        exit.success(),
        "agent exited with {} on SIGTERM. Log:\n{}",
        util::status_text(exit),
        read_log(&log)
    );
    // Detaching happens before the process exits, so no waiting is needed here.
    ensure_detached(ns, &iface.name)?;
    ensure!(
        forwarding(ns, &iface.name)? == "0",
        "forwarding on {} not restored to 0",
        iface.name
    );
    ensure!(
        log.is_file(),
        "the kept agent directory vanished: {}",
        log.display()
    );
    ensure!(
        fs::symlink_metadata(&socket).is_err(),
        "control socket {} left behind",
        socket.display()
    );
    let (code, stderr) = ctl_failure(&socket, &["status"])?;
    ensure!(
        code == 2,
        "ctl against a stopped agent: exit {code}, want 2: {stderr}"
    );
    ensure!(
        stderr.contains("no agent socket"),
        "ctl message should say there is no agent socket: {stderr}"
    );
    let text = read_log(&log);
    ensure!(
        text.contains("XDP detached") && text.contains("stopped"),
        "the log should record the orderly shutdown:\n{text}"
    );

    drop(dir);
    teardown(topo)
}

// ---------------------------------------------------------------------------------------
// 2. Generic mode on request
// ---------------------------------------------------------------------------------------

/// `--xdp-mode generic` attaches in generic (skb) mode even where driver mode would work
/// (veth supports native XDP), and says so in `status`.
#[test]
fn generic_mode_on_request() -> Result<()> {
    let bin = bin_dir()?;
    let topo = Chain::new(2).ipv6_forwarding(false).tag("lcgen").build()?;
    let a = topo.node(0);
    let iface = a.iface_to(1)?.name.clone();

    let agent = AgentProcess::start(a, &bin, options("generic"))?;
    ensure_ours_attached(a.netns(), &iface, XdpAttach::Generic)?;
    let status = agent.status()?;
    let ifaces = status_interfaces(&status)?;
    ensure!(
        ifaces.len() == 1 && ifaces[0].0 == iface && ifaces[0].2 == "generic",
        "status should list {iface} in generic mode: {status}"
    );
    let exit = agent.stop()?;
    ensure!(exit.success(), "exit {}", util::status_text(exit));
    ensure_detached(a.netns(), &iface)?;
    teardown(topo)
}

// ---------------------------------------------------------------------------------------
// 3. Auto mode falls back to generic where there is no native XDP
// ---------------------------------------------------------------------------------------

/// On a device without native XDP, `--xdp-mode auto` attaches in generic mode, reports
/// "generic" and logs a warning about the fallback naming the device.
#[test]
fn auto_mode_falls_back_to_generic_with_a_warning() -> Result<()> {
    let bin = bin_dir()?;
    let (ns, kind) = namespace_with_non_xdp_device("lcauto", "d0")?;

    let agent = AgentProcess::start_in(&ns, &["d0".to_owned()], &bin, options("auto"))?;
    let status = agent.status()?;
    let ifaces = status_interfaces(&status)?;
    ensure!(
        ifaces.len() == 1 && ifaces[0].0 == "d0" && ifaces[0].2 == "generic",
        "auto mode on a {kind} device should end up generic: {status}"
    );
    ensure_ours_attached(&ns, "d0", XdpAttach::Generic)?;
    let log = read_log(agent.log_path());
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("falling back to generic"));
    let Some(warning) = warning else {
        bail!("no fallback warning in the log:\n{log}");
    };
    ensure!(
        warning.contains("d0"),
        "the fallback warning should name the device: {warning}"
    );

    let exit = agent.stop()?;
    ensure!(exit.success(), "exit {}", util::status_text(exit));
    ensure_detached(&ns, "d0")?;
    teardown_ns(ns)
}

// ---------------------------------------------------------------------------------------
// 4. Clear errors when the agent cannot attach
// ---------------------------------------------------------------------------------------

/// An interface that does not exist: the agent exits promptly with an error that names
/// it and serves nothing, with or without sysctl management.
#[test]
fn unknown_interface_is_refused_promptly_by_name() -> Result<()> {
    let ns = Netns::create(&netns::unique_name("lcnoif"))?;
    let dir = TempDir::new("lc-noif")?;
    let socket = dir.path().join("agent.sock");
    for (i, extra) in [&[][..], &["--no-sysctl"][..]].iter().enumerate() {
        let mut argv = args(&["--interface", "nonexistent0", "--xdp-mode", "auto"]);
        argv.extend(args(extra));
        argv.extend([
            "--state-dir".to_owned(),
            dir.path().join("state").display().to_string(),
            "--socket".to_owned(),
            socket.display().to_string(),
        ]);
        let log = agent_must_fail(&ns, &argv, &dir.path().join(format!("agent{i}.log")))?;
        ensure!(
            log.contains("Error:") && log.contains("nonexistent0"),
            "{extra:?}: the error should name the interface:\n{log}"
        );
        ensure!(
            !socket.exists(),
            "{extra:?}: a control socket appeared although the agent refused to start"
        );
    }
    drop(dir);
    teardown_ns(ns)
}

/// The error for an unknown interface says what is wrong ("no such interface"), not
/// what the agent happened to try first: with and without `--no-sysctl`, so the
/// interfaces are checked before any sysctl is written.
#[test]
fn unknown_interface_error_says_no_such_interface() -> Result<()> {
    let ns = Netns::create(&netns::unique_name("lcnoif2"))?;
    let dir = TempDir::new("lc-noif2")?;
    for (i, extra) in [&["--no-sysctl"][..], &[][..]].iter().enumerate() {
        let mut argv = args(&["--interface", "nonexistent0"]);
        argv.extend(args(extra));
        argv.extend([
            "--state-dir".to_owned(),
            dir.path().join("state").display().to_string(),
            "--socket".to_owned(),
            dir.path().join("agent.sock").display().to_string(),
        ]);
        let log = agent_must_fail(&ns, &argv, &dir.path().join(format!("agent{i}.log")))?;
        ensure!(
            log.contains("no such interface: nonexistent0"),
            "{extra:?}: expected \"no such interface: nonexistent0\" in:\n{log}"
        );
    }
    drop(dir);
    teardown_ns(ns)
}

/// `--xdp-mode driver` on a device without native XDP: the agent refuses with an attach
/// error naming the device, and leaves neither a program nor changed sysctls behind.
#[test]
fn driver_mode_without_native_xdp_is_refused_cleanly() -> Result<()> {
    let (ns, kind) = namespace_with_non_xdp_device("lcdrv", "d0")?;
    let dir = TempDir::new("lc-drv")?;
    let socket = dir.path().join("agent.sock");
    let forwarding_before = forwarding(&ns, "d0")?;
    ensure!(
        forwarding_before == "0",
        "precondition: forwarding off on d0, is {forwarding_before}"
    );

    let argv = vec![
        "--interface".to_owned(),
        "d0".to_owned(),
        "--xdp-mode".to_owned(),
        "driver".to_owned(),
        "--state-dir".to_owned(),
        dir.path().join("state").display().to_string(),
        "--socket".to_owned(),
        socket.display().to_string(),
    ];
    let log = agent_must_fail(&ns, &argv, &dir.path().join("agent.log"))?;
    ensure!(
        log.contains("Error: attaching XDP to d0 failed"),
        "expected an attach error for the {kind} device d0:\n{log}"
    );
    ensure_detached(&ns, "d0")?;
    ensure!(
        forwarding(&ns, "d0")? == forwarding_before,
        "the refused agent left forwarding changed on d0"
    );
    ensure!(!socket.exists(), "a control socket appeared");
    drop(dir);
    teardown_ns(ns)
}

/// The driver-mode attach error carries the kernel's reason, as docs/operations.md
/// promises ("the agent exits with the kernel's reason"): EOPNOTSUPP, "Operation not
/// supported". aya's own message stops at "`bpf_link_create` failed" and keeps the
/// `io::Error` as its source, so the agent must print the whole chain.
#[test]
fn driver_mode_attach_error_carries_the_kernels_reason() -> Result<()> {
    let (ns, kind) = namespace_with_non_xdp_device("lcdrv2", "d0")?;
    let dir = TempDir::new("lc-drv2")?;
    let argv = vec![
        "--interface".to_owned(),
        "d0".to_owned(),
        "--xdp-mode".to_owned(),
        "driver".to_owned(),
        "--state-dir".to_owned(),
        dir.path().join("state").display().to_string(),
        "--socket".to_owned(),
        dir.path().join("agent.sock").display().to_string(),
    ];
    let log = agent_must_fail(&ns, &argv, &dir.path().join("agent.log"))?;
    let error = log
        .lines()
        .find(|l| l.starts_with("Error:"))
        .with_context(|| format!("no error line in the log:\n{log}"))?;
    ensure!(
        log.contains("Operation not supported"),
        "the attach error on the {kind} device should include the kernel's reason \
         (EOPNOTSUPP); it says: {error}"
    );
    drop(dir);
    teardown_ns(ns)
}

// ---------------------------------------------------------------------------------------
// 5. Crash safety
// ---------------------------------------------------------------------------------------

/// SIGKILL cannot run any cleanup, yet the program is detached because it hangs on a BPF
/// link owned by the process. A new agent then starts on the same state directory and
/// socket path: it replaces the stale socket and keeps the node's identity.
#[test]
fn sigkill_detaches_and_a_restart_reuses_identity_and_socket() -> Result<()> {
    let bin = bin_dir()?;
    let topo = Chain::new(2).ipv6_forwarding(false).tag("lckill").build()?;
    let a = topo.node(0);
    let ns = a.netns();
    let iface = a.iface_to(1)?.name.clone();

    let mut agent = AgentProcess::start(a, &bin, options("driver"))?;
    let dir = keep_agent_dir(&mut agent)?;
    let socket = agent.socket_path().to_path_buf();
    let state_dir = agent.state_dir().to_path_buf();
    let before = agent.status()?;
    ensure_ours_attached(ns, &iface, XdpAttach::Driver)?;

    let pid = libc::pid_t::try_from(agent.pid()).context("pid out of range")?;
    // SAFETY: the agent is our unreaped child (AgentProcess reaps it only in
    // is_running/stop/drop, none of which has run), so the pid is still its.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    ensure!(
        rc == 0,
        "kill -9 {pid}: {}",
        std::io::Error::last_os_error()
    );
    wait_for("the killed agent to exit", READY_TIMEOUT, || {
        Ok((!agent.is_running()?).then_some(()))
    })?;
    wait_for("the kernel to drop the XDP link", READY_TIMEOUT, || {
        Ok((xdp_attach(ns, &iface)?.0 == XdpAttach::None).then_some(()))
    })?;
    ensure_detached(ns, &iface)?;
    ensure!(
        forwarding(ns, &iface)? == "1",
        "precondition: a killed agent cannot restore forwarding itself"
    );

    // The socket file outlives the process; nobody answers on it.
    ensure!(
        fs::symlink_metadata(&socket)?.file_type().is_socket(),
        "precondition: the killed agent's socket file should still be there"
    );
    let (code, stderr) = ctl_failure(&socket, &["status"])?;
    ensure!(
        code == 1 && stderr.contains("stale socket"),
        "ctl on the dead agent's socket: exit {code}: {stderr}"
    );
    drop(agent);

    let log = dir.0.join("restart.log");
    let argv = vec![
        "--interface".to_owned(),
        iface.clone(),
        "--xdp-mode".to_owned(),
        "driver".to_owned(),
        "--state-dir".to_owned(),
        state_dir.display().to_string(),
        "--socket".to_owned(),
        socket.display().to_string(),
    ];
    let mut second = spawn_agent(ns, &argv, &log)?;
    let after = wait_ready(&mut second, &socket, &log)?;
    for field in ["node_address", "node_prefix", "public_key"] {
        ensure!(
            after[field].is_string() && after[field] == before[field],
            "{field} changed across the restart: {} → {}",
            before[field],
            after[field]
        );
    }
    let ifaces = status_interfaces(&after)?;
    ensure!(
        ifaces.len() == 1 && ifaces[0].0 == iface && ifaces[0].2 == "driver",
        "restarted agent should be attached in driver mode: {after}"
    );
    ensure_ours_attached(ns, &iface, XdpAttach::Driver)?;
    let text = read_log(&log);
    ensure!(
        text.contains("removing stale control socket"),
        "the restarted agent should say it replaced the stale socket:\n{text}"
    );

    let exit = second.terminate(netns::STOP_GRACE)?;
    ensure!(
        exit.success(),
        "restarted agent exited with {} on SIGTERM",
        util::status_text(exit)
    );
    ensure_detached(ns, &iface)?;
    ensure!(!socket.exists(), "socket left behind after SIGTERM");
    // The restarted agent restored the killed one's journal first, so the value it put
    // back is the one from before either agent ran, not the killed agent's "1".
    ensure!(
        forwarding(ns, &iface)? == "0",
        "forwarding should be back to its original 0 after a crash and a clean restart"
    );
    ensure!(
        !state_dir.join("sysctl-restore").exists(),
        "the sysctl journal must be removed on clean shutdown"
    );
    drop(second);
    drop(dir);
    teardown(topo)
}

// ---------------------------------------------------------------------------------------
// 6. The control API end to end through the real CLI
// ---------------------------------------------------------------------------------------

/// Routes and peers through `myconet-ctl` against a live agent with XDP attached:
/// refusals carry a message and exit 1, accepted changes reach both the agent and the
/// kernel maps and go away again; the socket and key are private; a second agent on the
/// same socket refuses to start and leaves its own interface as it found it.
#[test]
fn control_api_end_to_end_through_the_cli() -> Result<()> {
    let bin = bin_dir()?;
    let topo = Chain::new(2).ipv6_forwarding(false).tag("lcctl").build()?;
    let (a, b) = (topo.node(0), topo.node(1));
    let agent = AgentProcess::start(a, &bin, options("driver"))?;
    let socket = agent.socket_path().to_path_buf();
    let status = agent.status()?;
    let own_prefix = status["node_prefix"]
        .as_str()
        .context("status has no node_prefix")?
        .to_owned();
    ensure!(
        own_prefix != ROUTE_PREFIX,
        "the test prefix collides with the node's own"
    );
    let peer = a.peer_addr(1)?.to_string();

    // Refusals: outside the overlay, and the node's own prefix.
    let (code, stderr) = ctl_failure(&socket, &["route", "add", "2001:db8:1::/64", "via", &peer])?;
    ensure!(
        code == 1 && stderr.contains("2001:db8:1::/64") && stderr.contains("fd6d::/16"),
        "route outside fd6d::/16: exit {code}: {stderr}"
    );
    let (code, stderr) = ctl_failure(&socket, &["route", "add", &own_prefix, "via", &peer])?;
    ensure!(
        code == 1 && stderr.contains("own prefix"),
        "route for the own prefix: exit {code}: {stderr}"
    );
    ensure!(
        route_row(&agent.ctl_json(&["routes"])?, "2001:db8:1::/64")?.is_none(),
        "a refused route was installed anyway"
    );

    // A valid route shows up on both sides, in sync.
    let port = DEFAULT_PORT.to_string();
    let added = agent.ctl(&["route", "add", ROUTE_PREFIX, "via", &peer, "--port", &port])?;
    ensure!(
        added.contains(ROUTE_PREFIX) && added.contains(&format!("[{peer}]:{port}")),
        "route add confirmation: {added}"
    );
    let table = agent.ctl(&["routes"])?;
    let line = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(ROUTE_PREFIX))
        .with_context(|| format!("{ROUTE_PREFIX} missing from the routes table:\n{table}"))?;
    // SYNC is the only column that can hold a bare "yes" (it says "NO" otherwise).
    ensure!(
        line.split_whitespace().any(|w| w == "yes") && !line.contains(" NO "),
        "the SYNC column for {ROUTE_PREFIX} should say yes:\n{table}"
    );
    let routes = agent.ctl_json(&["routes"])?;
    let row = route_row(&routes, ROUTE_PREFIX)?
        .with_context(|| format!("{ROUTE_PREFIX} missing from --json routes: {routes}"))?;
    ensure!(row["in_sync"] == true, "route not in sync: {row}");
    for side in ["agent", "kernel"] {
        let entry = &row[side];
        ensure!(
            entry["action"] == "forward"
                && entry["next_hop"]["address"] == peer.as_str()
                && entry["next_hop"]["port"] == u64::from(DEFAULT_PORT),
            "{side} entry for {ROUTE_PREFIX} should forward to [{peer}]:{port}: {row}"
        );
    }
    ensure!(
        row["agent"]["origin"] == "static",
        "origin should be static: {row}"
    );

    // `route get` says which route carries an address in it and why, in a sentence.
    let inside = ROUTE_ADDRESS;
    let explained = agent.ctl(&["route", "get", inside])?;
    let want = [
        format!("  prefix    {ROUTE_PREFIX}\n"),
        "  decision  static route (the routing protocol has no route)\n".to_owned(),
        format!(
            "  why       a static route via [{peer}]:{port} carries {inside} ({ROUTE_PREFIX}); \
             the routing protocol has no route to it\n"
        ),
        format!("  installed {ROUTE_PREFIX} agent: forward [{peer}]:{port} (static);"),
    ];
    for line in &want {
        ensure!(
            explained.contains(line.as_str()),
            "route get should print {line:?}:\n{explained}"
        );
    }
    let json = agent.ctl_json(&["route", "get", inside])?;
    ensure!(
        json["decided_by"] == "static" && json["overridden"] != true,
        "route get --json: {json}"
    );

    // Deleting it removes it from both sides.
    let removed = agent.ctl(&["route", "del", ROUTE_PREFIX])?;
    ensure!(
        removed.contains("removed route"),
        "route del confirmation: {removed}"
    );
    let routes = agent.ctl_json(&["routes"])?;
    ensure!(
        route_row(&routes, ROUTE_PREFIX)?.is_none(),
        "{ROUTE_PREFIX} still listed after route del: {routes}"
    );
    ensure!(
        route_row(&routes, &own_prefix)?.is_some_and(|r| r["in_sync"] == true),
        "the own prefix should still be listed and in sync: {routes}"
    );

    // Peers round trip. Nobody answers at the peer's endpoint, so it stays
    // "connecting" and never enters the kernel peer map: only a completed link
    // handshake puts a neighbour there.
    let added = agent.ctl_json(&["peers", "add", &peer])?;
    ensure!(
        added["address"] == peer.as_str()
            && added["port"] == u64::from(DEFAULT_PORT)
            && added["state"] == "connecting"
            && added["origin"] == "static"
            && added["in_kernel"] == false,
        "peers add: {added}"
    );
    let peers = agent.ctl_json(&["peers"])?;
    let listed = peers["peers"]
        .as_array()
        .with_context(|| format!("peers JSON: {peers}"))?;
    ensure!(
        listed.len() == 1
            && listed[0]["address"] == peer.as_str()
            && listed[0]["state"] == "connecting"
            && listed[0]["in_kernel"] == false,
        "peers should list exactly the added peer, unauthenticated: {peers}"
    );
    let removed = agent.ctl_json(&["peers", "remove", &peer])?;
    ensure!(removed["removed"] == true, "peers remove: {removed}");
    let peers = agent.ctl_json(&["peers"])?;
    ensure!(
        peers["peers"].as_array().is_some_and(Vec::is_empty),
        "peer still listed after removal: {peers}"
    );

    // The socket and the key are private to the agent's user.
    let meta = fs::symlink_metadata(&socket)?;
    ensure!(
        meta.file_type().is_socket() && meta.permissions().mode() & 0o7777 == 0o600,
        "control socket mode {:o}, want 600",
        meta.permissions().mode() & 0o7777
    );
    let key = agent.state_dir().join("identity.pk8");
    let mode = fs::metadata(&key)
        .with_context(|| format!("no identity file at {}", key.display()))?
        .permissions()
        .mode();
    ensure!(
        mode & 0o7777 == 0o600,
        "identity file mode {:o}, want 600",
        mode & 0o7777
    );

    // A second agent (in b, on its own interface) pointed at a's socket refuses.
    let b_iface = b.iface_to(0)?.name.clone();
    let b_forwarding = forwarding(b.netns(), &b_iface)?;
    ensure!(
        b_forwarding == "0",
        "precondition: forwarding off on {b_iface}, is {b_forwarding}"
    );
    let dir = TempDir::new("lc-second")?;
    let argv = vec![
        "--interface".to_owned(),
        b_iface.clone(),
        "--xdp-mode".to_owned(),
        "generic".to_owned(),
        "--state-dir".to_owned(),
        dir.path().join("state").display().to_string(),
        "--socket".to_owned(),
        socket.display().to_string(),
    ];
    let log = agent_must_fail(b.netns(), &argv, &dir.path().join("agent.log"))?;
    ensure!(
        log.contains("already serving"),
        "the second agent should refuse because another is serving:\n{log}"
    );
    let still = agent.status()?;
    ensure!(
        still["public_key"] == status["public_key"],
        "the first agent no longer answers on its socket: {still}"
    );
    ensure_detached(b.netns(), &b_iface)?;
    ensure!(
        forwarding(b.netns(), &b_iface)? == b_forwarding,
        "the refused agent left forwarding changed on {b_iface}"
    );

    let exit = agent.stop()?;
    ensure!(exit.success(), "exit {}", util::status_text(exit));
    drop(dir);
    teardown(topo)
}

// ---------------------------------------------------------------------------------------
// 7. A corrupt identity is never replaced
// ---------------------------------------------------------------------------------------

/// A key file that is not a valid PKCS#8 Ed25519 key stops the agent with an error that
/// says so; the file is left byte for byte and mode for mode as it was. A key file others
/// can read is refused too, with the fix in the message.
#[test]
fn corrupt_or_exposed_identity_is_refused_and_left_alone() -> Result<()> {
    let ns = Netns::create(&netns::unique_name("lcid"))?;
    let dir = TempDir::new("lc-identity")?;
    let garbage: &[u8] = b"this is not a PKCS#8 document\x00\x01\x02\xff";

    for (case, mode, needle) in [
        ("corrupt", 0o600, "not a valid Ed25519 PKCS#8 key"),
        ("exposed", 0o640, "chmod 600"),
    ] {
        let state = dir.path().join(case);
        fs::create_dir(&state)?;
        let key = state.join("identity.pk8");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)?;
        f.write_all(garbage)?;
        drop(f);
        fs::set_permissions(&key, fs::Permissions::from_mode(mode))?;
        let socket = dir.path().join(format!("{case}.sock"));

        let argv = vec![
            "--state-dir".to_owned(),
            state.display().to_string(),
            "--socket".to_owned(),
            socket.display().to_string(),
        ];
        let log = agent_must_fail(&ns, &argv, &dir.path().join(format!("{case}.log")))?;
        ensure!(
            log.contains("Error:") && log.contains(&key.display().to_string()),
            "{case}: the error should name the key file:\n{log}"
        );
        ensure!(
            log.contains(needle),
            "{case}: expected {needle:?} in:\n{log}"
        );
        ensure!(
            fs::read(&key)? == garbage,
            "{case}: the key file was modified"
        );
        let after = fs::metadata(&key)?.permissions().mode() & 0o7777;
        ensure!(
            after == mode,
            "{case}: key file mode changed from {mode:o} to {after:o}"
        );
        // Only the key: the key is checked before anything is claimed, so no lock
        // file, no replacement key, no journal.
        let mut entries: Vec<_> = fs::read_dir(&state)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        ensure!(
            entries == ["identity.pk8"],
            "{case}: the state directory changed: {entries:?}"
        );
        ensure!(!socket.exists(), "{case}: a control socket appeared");
    }
    drop(dir);
    teardown_ns(ns)
}

// ---------------------------------------------------------------------------------------
// 8. Two agents started at once on one socket path
// ---------------------------------------------------------------------------------------

/// How many times two agents are started at the same instant on one socket path.
const RACE_ROUNDS: usize = 16;

/// Starts `myconet-agent <args…>` in `ns` held at a gate: the shell opens the FIFO
/// `gate` for reading, which blocks until someone opens it for writing, then execs the
/// agent in its own place (the child's pid is the agent's). Agents waiting on one gate
/// are released together.
fn spawn_gated_agent(ns: &Netns, gate: &Path, args: &[String], log: &Path) -> Result<NsChild> {
    let agent = bin_dir()?.join(AGENT_BIN);
    let mut full = vec![
        "-c".to_owned(),
        r#"exec 3<"$0" && exec 3<&- && exec env RUST_LOG=info "$@""#.to_owned(),
        gate.display().to_string(),
        agent.display().to_string(),
    ];
    full.extend(args.iter().cloned());
    ns.spawn("sh", &full, Some(log))
}

/// Opens `gate` for writing, which releases every agent waiting on it, and keeps it open
/// until each of `children` has become the agent (or exited), so none is left waiting.
fn open_gate(gate: &Path, children: &mut [NsChild]) -> Result<()> {
    // Non-blocking: fails with ENXIO while no reader has opened the FIFO yet.
    let writer =
        wait_for(
            "an agent to wait at the gate",
            READY_TIMEOUT,
            || match fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(gate)
            {
                Ok(f) => Ok(Some(f)),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                Err(e) => Err(e).with_context(|| format!("opening {}", gate.display())),
            },
        )?;
    wait_for("both agents to pass the gate", READY_TIMEOUT, || {
        for child in children.iter_mut() {
            let comm = fs::read_to_string(format!("/proc/{}/comm", child.id()));
            let is_agent = comm.is_ok_and(|c| c.trim() == AGENT_BIN);
            if !is_agent && child.try_wait()?.is_none() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })?;
    drop(writer);
    Ok(())
}

/// Two agents started at the same instant on one socket path, with their own state
/// directories and ports and no TUN device (so the socket is all they contend for),
/// [`RACE_ROUNDS`] times, every other time over a stale socket left by a crash: exactly
/// one serves, the other exits with status 1 saying another agent is serving there
/// before touching anything (its state directory is never created), and the winner
/// keeps answering until it is stopped, when it removes the socket and its lock.
#[test]
fn two_agents_started_at_once_on_one_socket_exactly_one_wins() -> Result<()> {
    let ns = Netns::create(&netns::unique_name("lcrace"))?;
    ns.ip(["link", "set", "dev", "lo", "up"])?;
    let dir = TempDir::new("lc-race")?;
    let socket = dir.path().join("agent.sock");
    let lock = dir.path().join("agent.sock.lock");
    let gate = dir.path().join("gate");
    for round in 0..RACE_ROUNDS {
        if round % 2 == 1 {
            drop(std::os::unix::net::UnixListener::bind(&socket)?);
        }
        let path = std::ffi::CString::new(gate.display().to_string())?;
        // SAFETY: a valid NUL-terminated path; mkfifo only reads it.
        ensure!(
            unsafe { libc::mkfifo(path.as_ptr(), 0o600) } == 0,
            "mkfifo {}: {}",
            gate.display(),
            std::io::Error::last_os_error()
        );
        let mut runs = Vec::new();
        let mut children = Vec::new();
        for i in 0..2u16 {
            let state = dir.path().join(format!("state-{round}-{i}"));
            let log = dir.path().join(format!("agent-{round}-{i}.log"));
            let port = 21_000 + i;
            let argv = vec![
                "--no-tun".to_owned(),
                "--port".to_owned(),
                port.to_string(),
                "--state-dir".to_owned(),
                state.display().to_string(),
                "--socket".to_owned(),
                socket.display().to_string(),
            ];
            children.push(spawn_gated_agent(&ns, &gate, &argv, &log)?);
            runs.push((state, log, port));
        }
        open_gate(&gate, &mut children)?;
        fs::remove_file(&gate)?;

        // The loser gives up at once; both still running means both believe they serve.
        let loser = wait_for("one of the two agents to give up", FAIL_TIMEOUT, || {
            let mut exited = Vec::new();
            for (i, child) in children.iter_mut().enumerate() {
                if let Some(status) = child.try_wait()? {
                    exited.push((i, status));
                }
            }
            match exited.as_slice() {
                [] => Ok(None),
                [one] => Ok(Some(*one)),
                _ => bail!(
                    "round {round}: both agents exited:\n{}\n{}",
                    read_log(&runs[0].1),
                    read_log(&runs[1].1)
                ),
            }
        })
        .with_context(|| format!("round {round}: both agents are still running"))?;
        let (lost, status) = loser;
        let won = 1 - lost;
        let loser_log = read_log(&runs[lost].1);
        ensure!(
            status.code() == Some(1),
            "round {round}: the loser should exit with status 1, got {}:\n{loser_log}",
            util::status_text(status)
        );
        ensure!(
            loser_log.contains(&format!(
                "another agent is already serving on {}",
                socket.display()
            )),
            "round {round}: the loser should say another agent serves the socket:\n{loser_log}"
        );
        ensure!(
            !runs[lost].0.exists(),
            "round {round}: the loser created its state directory before giving up"
        );

        // The winner serves, on its own port, and goes on serving.
        let status = wait_ready(&mut children[won], &socket, &runs[won].1)?;
        ensure!(
            status["port"] == u64::from(runs[won].2),
            "round {round}: the socket answers for port {}, the winner has {}",
            status["port"],
            runs[won].2
        );
        thread::sleep(Duration::from_millis(100));
        ensure!(
            children[won].try_wait()?.is_none(),
            "round {round}: the winner stopped:\n{}",
            read_log(&runs[won].1)
        );
        let again = ctl_raw(&socket, &["--json", "status"])?;
        ensure!(
            again.status.success(),
            "round {round}: the winner no longer answers: {}",
            String::from_utf8_lossy(&again.stderr)
        );

        let exit = children[won].terminate(netns::STOP_GRACE)?;
        ensure!(
            exit.success(),
            "round {round}: the winner exited with {} on SIGTERM",
            util::status_text(exit)
        );
        ensure!(
            !socket.exists() && !lock.exists(),
            "round {round}: the socket or its lock outlived the winner"
        );
    }
    drop(dir);
    teardown_ns(ns)
}

// ---------------------------------------------------------------------------------------
// 9. `--dataplane auto` where XDP cannot attach
// ---------------------------------------------------------------------------------------

/// An MTU a veth's peer may not have for a driver-mode program on 4 KiB pages: the
/// kernel refuses the attach with ERANGE ("Peer MTU is too large to set XDP").
const JUMBO_MTU: &str = "9000";
/// Datagrams a sends to c through b in the fallback test.
const FALLBACK_DATAGRAMS: u32 = 300;

/// Sends [`FALLBACK_DATAGRAMS`] numbered datagrams from a's overlay address to c's and
/// returns how many distinct ones c received (bounded: c stops listening 2 s after the
/// last one arrived, or 20 s after the start).
fn overlay_datagrams(chain: &OverlayChain) -> Result<u32> {
    let to = SocketAddr::V6(SocketAddrV6::new(chain.c_overlay, 7070, 0, 0));
    let rx = bind_udp(chain.topo.node(2).netns(), to)?;
    rx.set_read_timeout(Some(Duration::from_secs(2)))?;
    let tx = bind_udp(
        chain.topo.node(0).netns(),
        SocketAddr::V6(SocketAddrV6::new(chain.a_overlay, 0, 0, 0)),
    )?;
    let receiver = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = std::collections::BTreeSet::new();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline && seen.len() < FALLBACK_DATAGRAMS as usize {
            match rx.recv(&mut buf) {
                Ok(n) if n >= 4 => {
                    seen.insert(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        seen.len() as u32
    });
    let mut payload = vec![0x5a; 1000];
    for i in 0..FALLBACK_DATAGRAMS {
        payload[..4].copy_from_slice(&i.to_be_bytes());
        tx.send_to(&payload, to)?;
        // Paced: this is about which path relays, not about queue sizes.
        if i % 20 == 19 {
            thread::sleep(Duration::from_millis(5));
        }
    }
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))
}

/// `--xdp-mode driver` with `--dataplane auto` on relay b of a — b — c whose b–c link
/// has an MTU driver-mode XDP cannot take: the kernel refuses XDP on b's to-c, so b
/// relays in XDP where it attached (to-a) and on the userspace path where it did not
/// (to-c, with a warning). `status` says so per interface ("driver", "none" with the
/// kernel's reason) and overall ("mixed"); traffic a → c over the overlay arrives, and
/// b's counters show its agent relayed exactly what a and c received (XDP could
/// redirect nothing into to-c). The same situation with `--dataplane xdp` is refused
/// with the kernel's reason, and that refused agent leaves no program and no changed
/// sysctl behind.
#[test]
fn auto_dataplane_falls_back_per_interface_and_relays_in_userspace() -> Result<()> {
    let bin = bin_dir()?;
    let topo = Chain::new(3).ipv6_forwarding(false).tag("lcfall").build()?;
    let (b, c) = (topo.node(1), topo.node(2));
    let (b_to_a, b_to_c) = (b.iface_to(0)?.clone(), b.iface_to(2)?.clone());
    b.netns()
        .ip(["link", "set", "dev", &b_to_c.name, "mtu", JUMBO_MTU])?;
    c.netns()
        .ip(["link", "set", "dev", &c.iface_to(1)?.name, "mtu", JUMBO_MTU])?;
    let mut chain =
        OverlayChain::start_on(topo, &bin, &["--xdp-mode", "driver", "--dataplane", "auto"])?;
    let b = chain.topo.node(1);

    let status = chain.agents[1].status()?;
    ensure!(
        status["dataplane"] == "mixed" && status["dataplane_requested"] == "auto",
        "b should report a mixed data plane, as asked by auto: {status}"
    );
    let ifaces = status["interfaces"]
        .as_array()
        .with_context(|| format!("no interfaces in {status}"))?;
    let find = |name: &str| ifaces.iter().find(|i| i["name"] == name).cloned();
    let to_a = find(&b_to_a.name).with_context(|| format!("{} missing: {status}", b_to_a.name))?;
    let to_c = find(&b_to_c.name).with_context(|| format!("{} missing: {status}", b_to_c.name))?;
    ensure!(
        to_a["xdp_mode"] == "driver" && to_a["userspace_reason"].as_str().unwrap_or("").is_empty(),
        "{} should relay in driver-mode XDP: {to_a}",
        b_to_a.name
    );
    let reason = to_c["userspace_reason"].as_str().unwrap_or_default();
    ensure!(
        to_c["xdp_mode"] == "none"
            && reason.contains(&format!("attaching XDP to {} failed", b_to_c.name))
            && reason.contains("os error 34"),
        "{} should be on the userspace path with the kernel's reason (ERANGE): {to_c}",
        b_to_c.name
    );
    let human = chain.agents[1].ctl(&["status"])?;
    ensure!(
        human.contains("data plane:    mixed (--dataplane auto)")
            && human.contains(&format!(
                "{} (ifindex {}, userspace: attaching XDP to",
                b_to_c.name, b_to_c.ifindex
            )),
        "status should show the mixed data plane and the userspace interface:\n{human}"
    );
    ensure_ours_attached(b.netns(), &b_to_a.name, XdpAttach::Driver)?;
    ensure_detached(b.netns(), &b_to_c.name)?;
    // Forwarding is for bpf_fib_lookup: set where XDP runs, left alone elsewhere.
    ensure!(
        forwarding(b.netns(), &b_to_a.name)? == "1" && forwarding(b.netns(), &b_to_c.name)? == "0",
        "forwarding should be on for {} only",
        b_to_a.name
    );
    let log = read_log(chain.agents[1].log_path());
    ensure!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("userspace data path")
            && l.contains(&b_to_c.name)),
        "b should warn that {} takes the userspace path:\n{log}",
        b_to_c.name
    );

    // Traffic a → c crosses b: in on to-a (XDP), out on to-c (userspace), and back.
    let before = chain.relay_counts()?;
    chain.topo.node(0).netns().exec(
        "ping",
        [
            "-6",
            "-n",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "3",
            &chain.c_overlay.to_string(),
        ],
    )?;
    let got = overlay_datagrams(&chain)?;
    ensure!(
        got == FALLBACK_DATAGRAMS,
        "c received {got} of {FALLBACK_DATAGRAMS} datagrams through b"
    );
    let counts = chain.settled_relay_counts(&before, Duration::from_secs(10))?;
    eprintln!("fallback relay: {counts:?}");
    ensure!(
        counts.balanced()
            && counts.b_xdp_relayed == 0
            && counts.b_agent_relayed == counts.a_rx_data + counts.c_rx_data
            && counts.b_xdp_passed_up == counts.c_rx_data
            && counts.c_rx_data >= u64::from(FALLBACK_DATAGRAMS),
        "b's agent should relay everything, XDP on {} passing a → c up: {counts:?}",
        b_to_a.name
    );

    // The same situation with --dataplane xdp is an error, and leaves nothing behind.
    let relay = chain.agents.remove(1);
    let exit = relay.stop()?;
    ensure!(exit.success(), "b exited with {}", util::status_text(exit));
    let b = chain.topo.node(1);
    ensure_detached(b.netns(), &b_to_a.name)?;
    ensure!(
        forwarding(b.netns(), &b_to_a.name)? == "0",
        "b restored forwarding on {} when it stopped",
        b_to_a.name
    );
    let dir = TempDir::new("lc-fall")?;
    let argv = vec![
        "--interface".to_owned(),
        b_to_a.name.clone(),
        "--interface".to_owned(),
        b_to_c.name.clone(),
        "--xdp-mode".to_owned(),
        "driver".to_owned(),
        "--dataplane".to_owned(),
        "xdp".to_owned(),
        "--no-tun".to_owned(),
        "--state-dir".to_owned(),
        dir.path().join("state").display().to_string(),
        "--socket".to_owned(),
        dir.path().join("agent.sock").display().to_string(),
    ];
    let log = agent_must_fail(b.netns(), &argv, &dir.path().join("agent.log"))?;
    let error = log
        .lines()
        .find(|l| l.starts_with("Error:"))
        .with_context(|| format!("no error line in the log:\n{log}"))?;
    ensure!(
        error.contains(&format!("attaching XDP to {} failed", b_to_c.name))
            && error.contains("os error 34"),
        "--dataplane xdp should fail naming {} and the kernel's reason: {error}",
        b_to_c.name
    );
    ensure_detached(b.netns(), &b_to_a.name)?;
    ensure_detached(b.netns(), &b_to_c.name)?;
    ensure!(
        forwarding(b.netns(), &b_to_a.name)? == "0",
        "the refused agent left forwarding changed on {}",
        b_to_a.name
    );
    drop(dir);
    let OverlayChain { agents, topo, .. } = chain;
    drop(agents);
    teardown(topo)
}

/// Without CAP_BPF and CAP_SYS_ADMIN (dropped from the agent's bounding and inheritable
/// sets, so even root cannot use them) the program cannot load at all: under the
/// default `--dataplane auto` the agent runs with every interface on the userspace path
/// and says why; with `--dataplane xdp` it refuses to start with that reason.
#[test]
fn without_bpf_capabilities_auto_runs_in_userspace_and_xdp_refuses() -> Result<()> {
    let bin = bin_dir()?;
    let topo = Chain::new(2).ipv6_forwarding(false).tag("lccap").build()?;
    let a = topo.node(0);
    let iface = a.iface_to(1)?.name.clone();
    let dir = TempDir::new("lc-cap")?;
    let agent = bin.join(AGENT_BIN).display().to_string();
    let argv = |dataplane: &str, run: &str| -> Vec<String> {
        let mut v = args(&[
            "--inh-caps=-bpf,-sys_admin",
            "--bounding-set=-bpf,-sys_admin",
            "--",
            "env",
            "RUST_LOG=info",
        ]);
        v.push(agent.clone());
        v.extend(args(&[
            "--interface",
            &iface,
            "--no-tun",
            "--dataplane",
            dataplane,
        ]));
        v.extend([
            "--state-dir".to_owned(),
            dir.path().join(run).display().to_string(),
            "--socket".to_owned(),
            dir.path().join(format!("{run}.sock")).display().to_string(),
        ]);
        v
    };

    // Pre-generated identities: the proof of work would take seconds under load.
    for run in ["auto", "xdp"] {
        let state = dir.path().join(run);
        fs::create_dir_all(&state)?;
        myconet_testbed::agent::write_identity(&state)?;
    }
    let log = dir.path().join("auto.log");
    let socket = dir.path().join("auto.sock");
    let mut child = a
        .netns()
        .spawn(util::tool("setpriv"), argv("auto", "auto"), Some(&log))?;
    let status = wait_ready(&mut child, &socket, &log)?;
    let ifaces = status["interfaces"].as_array().cloned().unwrap_or_default();
    ensure!(
        status["dataplane"] == "userspace"
            && ifaces.len() == 1
            && ifaces[0]["name"] == iface.as_str()
            && ifaces[0]["xdp_mode"] == "none"
            && ifaces[0]["userspace_reason"]
                .as_str()
                .is_some_and(|r| r.contains("loading the XDP program failed")),
        "without BPF capabilities auto should run in userspace and say why: {status}"
    );
    ensure_detached(a.netns(), &iface)?;
    let exit = child.terminate(netns::STOP_GRACE)?;
    ensure!(exit.success(), "exit {}", util::status_text(exit));

    let log = dir.path().join("xdp.log");
    let started = Instant::now();
    let mut child = a
        .netns()
        .spawn(util::tool("setpriv"), argv("xdp", "xdp"), Some(&log))?;
    let exit = child
        .wait_timeout(FAIL_TIMEOUT)?
        .with_context(|| format!("--dataplane xdp kept running:\n{}", read_log(&log)))?;
    let text = read_log(&log);
    ensure!(
        exit.code() == Some(1)
            && text
                .lines()
                .any(|l| l.starts_with("Error:") && l.contains("loading the XDP program failed")),
        "--dataplane xdp should fail with the load error after {:?} ({}):\n{text}",
        started.elapsed(),
        util::status_text(exit)
    );
    drop(dir);
    teardown(topo)
}
