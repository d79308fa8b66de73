//! Running the real `myconet-agent` inside a namespace and talking to it with the real
//! `myconet-ctl`, so integration tests exercise exactly what users run.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::netns::{Netns, NsChild, STOP_GRACE};
use crate::timing;
use crate::topology::Node;
use crate::util::{self, COMMAND_TIMEOUT, TempDir};

/// Agent binary name.
pub const AGENT_BIN: &str = "myconet-agent";
/// Control CLI binary name.
pub const CTL_BIN: &str = "myconet-ctl";
/// Environment variable naming the directory that holds both binaries.
pub const BIN_DIR_ENV: &str = "MYCONET_BIN_DIR";
/// How long [`AgentProcess::start`] waits for the agent to answer `status`.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Log lines quoted in failure messages.
const LOG_TAIL_LINES: usize = 40;

/// The directory holding `myconet-agent` and `myconet-ctl`.
///
/// `$MYCONET_BIN_DIR` if set (so `cargo xtask test` can point at freshly built binaries),
/// else the cargo profile directory this executable runs from (`target/<profile>`, the
/// parent of `deps/` or `examples/`).
pub fn bin_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().context("cannot locate the running executable")?;
            let mut dir = exe
                .parent()
                .context("the running executable has no parent directory")?
                .to_path_buf();
            if matches!(
                dir.file_name().and_then(|n| n.to_str()),
                Some("deps") | Some("examples")
            ) {
                dir.pop();
            }
            dir
        }
    };
    check_bin_dir(dir)
}

fn check_bin_dir(dir: PathBuf) -> Result<PathBuf> {
    for bin in [AGENT_BIN, CTL_BIN] {
        if !dir.join(bin).is_file() {
            bail!(
                "{bin} not found in {}: build the binaries first: cargo build --bins \
                 (cargo xtask test does this), or set {BIN_DIR_ENV}",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Places a pre-generated identity in a fresh state directory, as the agent would have
/// written it (`identity.pk8`, mode 0600).
/// Writes one of the pre-generated identities into `state_dir` (which must exist and
/// hold none), so an agent started there skips the identity proof of work.
pub fn write_identity(state_dir: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("identity.pk8");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(&crate::identities::next_pkcs8()))
        .with_context(|| format!("failed to write {}", path.display()))
}

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Underlay UDP port (`--port`).
    pub port: u16,
    /// `--xdp-mode` (`auto`, `driver`, `generic`); `None` leaves the agent's default.
    pub xdp_mode: Option<String>,
    /// Interfaces (`--interface`); `None` means every link of the node.
    pub interfaces: Option<Vec<String>>,
    /// Further arguments appended verbatim.
    pub extra_args: Vec<String>,
    /// `RUST_LOG` for the agent; `None` inherits the caller's.
    pub log_filter: Option<String>,
    /// How long to wait for the agent to answer `status`.
    pub startup_timeout: Duration,
    /// Let the agent generate its identity (the proof of work takes seconds) instead of
    /// starting with one of the pre-generated ones ([`crate::identities`]).
    pub fresh_identity: bool,
    /// `--pin-dir`: where the agent pins its data plane (on a
    /// [`crate::bpffs::BpfFs`]); `None` leaves the agent's default, which is never a
    /// BPF file system under `ip netns exec`, so the agent runs unpinned.
    pub pin_dir: Option<PathBuf>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            port: myconet_common::wire::DEFAULT_PORT,
            xdp_mode: None,
            interfaces: None,
            extra_args: Vec::new(),
            log_filter: None,
            startup_timeout: STARTUP_TIMEOUT,
            fresh_identity: false,
            pin_dir: None,
        }
    }
}

/// How [`AgentProcess::restart`] stops the running agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGKILL: a crash or a power cut, no shutdown handler runs.
    Kill,
    /// SIGTERM: the operator's clean stop (SIGKILL after 5 s if ignored).
    Term,
}

/// A running `myconet-agent` in a namespace, with its own temporary state directory,
/// control socket and log; stopped with SIGTERM (then SIGKILL after 5 s) on drop.
///
/// While it runs it holds the testbed's timing lock shared ([`crate::timing`]), so a
/// timing-sensitive test never measures alongside another test's agents.
#[derive(Debug)]
pub struct AgentProcess {
    // Field order matters: the child stops before the directory with its socket goes,
    // and before the timing lock is released.
    child: NsChild,
    _timing: timing::Shared,
    ns: String,
    bin_dir: PathBuf,
    socket: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
    port: u16,
    /// The full command line after the program, for [`AgentProcess::restart`].
    args: Vec<String>,
    log_filter: Option<String>,
    startup_timeout: Duration,
    dir: TempDir,
}

impl AgentProcess {
    /// Starts an agent on `node` (on all its interfaces unless the options say otherwise)
    /// and waits until `myconet-ctl status` answers.
    pub fn start(node: &Node, bin_dir: &Path, options: AgentOptions) -> Result<Self> {
        let ifaces: Vec<String> = match &options.interfaces {
            Some(list) => list.clone(),
            None => node.if_names().into_iter().map(str::to_owned).collect(),
        };
        Self::start_in(node.netns(), &ifaces, bin_dir, options)
    }

    /// Starts an agent in `netns` on `interfaces` (ignoring `options.interfaces`) and
    /// waits until `myconet-ctl status` answers.
    pub fn start_in(
        netns: &Netns,
        interfaces: &[String],
        bin_dir: &Path,
        options: AgentOptions,
    ) -> Result<Self> {
        let dir = TempDir::new(&format!("agent-{}", netns.name()))?;
        let state_dir = dir.path().join("state");
        std::fs::create_dir(&state_dir)
            .with_context(|| format!("failed to create {}", state_dir.display()))?;
        if !options.fresh_identity {
            write_identity(&state_dir)?;
        }
        let socket = dir.path().join("agent.sock");
        let log = dir.path().join("agent.log");
        let agent = bin_dir.join(AGENT_BIN);

        let mut args: Vec<String> = Vec::new();
        for iface in interfaces {
            args.extend(["--interface".to_owned(), iface.clone()]);
        }
        args.extend([
            "--port".to_owned(),
            options.port.to_string(),
            "--state-dir".to_owned(),
            state_dir.display().to_string(),
            "--socket".to_owned(),
            socket.display().to_string(),
        ]);
        if let Some(mode) = &options.xdp_mode {
            args.extend(["--xdp-mode".to_owned(), mode.clone()]);
        }
        if let Some(dir) = &options.pin_dir {
            args.extend(["--pin-dir".to_owned(), dir.display().to_string()]);
        }
        args.extend(options.extra_args.iter().cloned());

        let timing = timing::shared()?;
        let child = spawn_with_env(netns, &agent, &args, &log, options.log_filter.as_deref())?;
        let mut agent = Self {
            child,
            _timing: timing,
            ns: netns.name().to_owned(),
            bin_dir: bin_dir.to_path_buf(),
            socket,
            state_dir,
            log,
            port: options.port,
            args,
            log_filter: options.log_filter,
            startup_timeout: options.startup_timeout,
            dir,
        };
        agent
            .wait_ready(options.startup_timeout)
            .map_err(|e| agent.with_log(e))?;
        Ok(agent)
    }

    /// Polls `status` until it succeeds, failing early if the agent exits.
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let mut last_error = None;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{AGENT_BIN} in {} exited during startup ({})",
                    self.ns,
                    util::status_text(status)
                );
            }
            if self.socket.exists() {
                match self.ctl(&["--json", "status"]) {
                    Ok(_) => return Ok(()),
                    Err(e) => last_error = Some(e),
                }
            }
            if std::time::Instant::now() >= deadline {
                let why = last_error
                    .map(|e| format!("{e:#}"))
                    .unwrap_or_else(|| format!("socket {} never appeared", self.socket.display()));
                bail!(
                    "{AGENT_BIN} in {} did not answer `status` within {timeout:?}: {why}",
                    self.ns
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Adds the log path and its last lines to an error, so a failing test shows why
    /// the agent misbehaved.
    pub fn with_log(&self, error: anyhow::Error) -> anyhow::Error {
        error.context(format!(
            "agent log {} ends with:\n{}",
            self.log.display(),
            util::tail(&self.log, LOG_TAIL_LINES)
        ))
    }

    /// Runs `myconet-ctl --socket <sock> <args…>` and returns stdout. The ctl talks over
    /// the Unix socket, so it runs in the caller's namespace.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(self.bin_dir.join(CTL_BIN));
        cmd.arg("--socket").arg(&self.socket).args(args);
        let out = util::run_checked(&mut cmd, COMMAND_TIMEOUT)?;
        String::from_utf8(out.stdout).context("myconet-ctl printed invalid UTF-8")
    }

    /// Runs `myconet-ctl --socket <sock> --json <args…>` and parses the JSON it prints.
    pub fn ctl_json(&self, args: &[&str]) -> Result<Value> {
        let mut full = Vec::with_capacity(args.len() + 1);
        full.push("--json");
        full.extend_from_slice(args);
        let text = self.ctl(&full)?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "myconet-ctl {} printed invalid JSON: {text}",
                args.join(" ")
            )
        })
    }

    /// Waits until every endpoint in `endpoints` is an authenticated neighbour of this
    /// agent ("up") and in its relay peer map; returns the last `peers` listing.
    pub fn wait_peers_up(&self, endpoints: &[(Ipv6Addr, u16)], timeout: Duration) -> Result<Value> {
        util::poll("neighbours up", timeout, Duration::from_millis(100), || {
            let peers = self.ctl_json(&["peers"])?;
            let rows = peers["peers"].as_array().cloned().unwrap_or_default();
            let all_up = endpoints.iter().all(|(addr, port)| {
                rows.iter().any(|r| {
                    r["address"] == addr.to_string().as_str()
                        && r["port"] == u64::from(*port)
                        && r["state"] == "up"
                        && r["in_kernel"] == true
                })
            });
            Ok(all_up.then_some(peers))
        })
        .with_context(|| format!("agent peers: {:?}", self.ctl(&["peers"]).ok()))
    }

    /// The agent's `status` as JSON.
    pub fn status(&self) -> Result<Value> {
        self.ctl_json(&["status"])
    }

    /// The agent's `stats` as JSON (read counters with [`counter`]).
    pub fn stats(&self) -> Result<Value> {
        self.ctl_json(&["stats"])
    }

    /// The namespace the agent runs in.
    pub fn ns_name(&self) -> &str {
        &self.ns
    }

    /// The agent's underlay port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The control socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The state directory (keys, persisted config).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        util::tail(&self.log, lines)
    }

    /// Keeps the temporary directory (state, socket, log) after drop.
    pub fn keep_files(&mut self) {
        self.dir.keep();
    }

    /// Whether the process is still running (reaps it if not).
    pub fn is_running(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_none())
    }

    /// Stops the agent the way an operator would (SIGTERM, SIGKILL after 5 s) and
    /// returns its exit status, so tests can check it shuts down cleanly.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.child.terminate(STOP_GRACE)
    }

    /// Stops the agent (`how`) and starts it again in `netns` (the namespace it ran in)
    /// with the same arguments, state directory (so the same identity), socket and log
    /// (appended to); waits until the new process answers `status`. Returns the old
    /// process's exit status.
    pub fn restart(&mut self, netns: &Netns, how: Stop) -> Result<ExitStatus> {
        if netns.name() != self.ns {
            bail!(
                "restart the agent of {} in its own namespace, not {}",
                self.ns,
                netns.name()
            );
        }
        let status = match how {
            Stop::Term => self.child.terminate(STOP_GRACE)?,
            Stop::Kill => self.signal_and_wait(libc::SIGKILL)?,
        };
        self.start_again(netns)?;
        Ok(status)
    }

    /// Sends `signal` (e.g. SIGKILL for a crash, SIGTERM, SIGUSR2) and waits, bounded,
    /// until the agent has exited; its state directory, socket path and log stay for
    /// [`AgentProcess::start_again`].
    pub fn signal_and_wait(&mut self, signal: libc::c_int) -> Result<ExitStatus> {
        self.child.signal(signal)?;
        self.child
            .wait_timeout(STOP_GRACE)?
            .with_context(|| format!("the agent did not exit after signal {signal}"))
    }

    /// Starts the agent again in `netns` (the one it ran in), after it exited, with the
    /// same command line, state directory, socket and log (appended), and waits until
    /// it answers `status`.
    pub fn start_again(&mut self, netns: &Netns) -> Result<()> {
        if netns.name() != self.ns {
            bail!("the agent ran in {}, not in {}", self.ns, netns.name());
        }
        if self.is_running()? {
            bail!("{AGENT_BIN} in {} is still running", self.ns);
        }
        let agent = self.bin_dir.join(AGENT_BIN);
        self.child = spawn_with_env(
            netns,
            &agent,
            &self.args,
            &self.log,
            self.log_filter.as_deref(),
        )?;
        let timeout = self.startup_timeout;
        self.wait_ready(timeout).map_err(|e| self.with_log(e))
    }

    /// Kills the agent with SIGKILL (a crash: nothing shuts down politely) and starts it
    /// again in `netns` with the same flags, state directory, socket and log (appended),
    /// waiting until it answers.
    pub fn kill_and_restart(&mut self, netns: &Netns) -> Result<()> {
        self.restart(netns, Stop::Kill).map(|_| ())
    }

    /// Kills the agent with SIGKILL, as a crash or a power cut would: no shutdown
    /// handler runs, so nothing is withdrawn politely (the kernel still detaches XDP
    /// when the last link fd closes).
    pub fn kill(mut self) -> Result<ExitStatus> {
        self.child.signal(libc::SIGKILL)?;
        self.child
            .wait_timeout(STOP_GRACE)?
            .context("the agent did not die after SIGKILL")
    }
}

fn spawn_with_env(
    netns: &Netns,
    program: &Path,
    args: &[String],
    log: &Path,
    rust_log: Option<&str>,
) -> Result<NsChild> {
    match rust_log {
        // `env` sets the variable for the agent only, without touching this process's
        // environment (which other test threads share).
        Some(filter) => {
            let mut full = vec![format!("RUST_LOG={filter}"), program.display().to_string()];
            full.extend(args.iter().cloned());
            netns.spawn("env", &full, Some(log))
        }
        None => netns.spawn(program, args, Some(log)),
    }
}

/// Reads counter `name` in section `section` (`"xdp"` or `"agent"`) of a `stats` JSON
/// (`{"xdp": [{"name": …, "packets": N, "bytes": N}, …], "agent": […]}`) as packets.
///
/// A missing section or name is an error rather than zero, so a typo cannot make an
/// assertion like "no drops" pass vacuously; the error lists the names present.
pub fn counter(stats: &Value, section: &str, name: &str) -> Result<u64> {
    counter_field(stats, section, name, "packets")
}

/// Like [`counter`] but reads the byte count.
pub fn counter_bytes(stats: &Value, section: &str, name: &str) -> Result<u64> {
    counter_field(stats, section, name, "bytes")
}

fn counter_field(stats: &Value, section: &str, name: &str, field: &str) -> Result<u64> {
    let list = stats
        .get(section)
        .and_then(Value::as_array)
        .with_context(|| format!("stats have no {section:?} list: {stats}"))?;
    let entry = list
        .iter()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(name))
        .with_context(|| {
            let names: Vec<&str> = list
                .iter()
                .filter_map(|c| c.get("name").and_then(Value::as_str))
                .collect();
            format!("no counter {name:?} in stats.{section}; present: {names:?}")
        })?;
    match entry.get(field) {
        // proto3 JSON renders 64-bit integers as strings; serde renders numbers.
        Some(Value::Number(n)) => n
            .as_u64()
            .with_context(|| format!("stats.{section}.{name}.{field} = {n} is not a u64")),
        Some(Value::String(s)) => s
            .parse()
            .with_context(|| format!("stats.{section}.{name}.{field} = {s:?} is not a u64")),
        // Default values may be omitted.
        None | Some(Value::Null) => Ok(0),
        Some(other) => bail!("stats.{section}.{name}.{field} = {other} is not a number"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counters_are_read_strictly() {
        let stats = json!({
            "xdp": [
                {"name": "redirect", "packets": 7, "bytes": 700},
                {"name": "tx", "packets": "3", "bytes": "300"},
                {"name": "drop_no_route"}
            ],
            "agent": []
        });
        assert_eq!(counter(&stats, "xdp", "redirect").unwrap(), 7);
        assert_eq!(counter_bytes(&stats, "xdp", "redirect").unwrap(), 700);
        assert_eq!(counter(&stats, "xdp", "tx").unwrap(), 3);
        assert_eq!(counter(&stats, "xdp", "drop_no_route").unwrap(), 0);
        let err = counter(&stats, "xdp", "redirekt").unwrap_err().to_string();
        assert!(err.contains("redirect"), "{err}");
        assert!(counter(&stats, "agent", "rx_data").is_err());
        assert!(counter(&stats, "kernel", "tx").is_err());
    }

    #[test]
    fn missing_binaries_are_explained() {
        let dir = TempDir::new("bindir").unwrap();
        let err = check_bin_dir(dir.path().to_path_buf())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cargo build --bins"), "{err}");
        std::fs::write(dir.path().join(AGENT_BIN), "").unwrap();
        std::fs::write(dir.path().join(CTL_BIN), "").unwrap();
        assert_eq!(check_bin_dir(dir.path().to_path_buf()).unwrap(), dir.path());
    }
}
