//! Named network namespaces with RAII cleanup.
//!
//! Each Myconet node under test lives in its own namespace so a whole overlay fits on one
//! machine. A [`Netns`] deletes its namespace when dropped and first ends every process
//! the testbed started inside it, so a failing test leaves nothing behind.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::{self, COMMAND_TIMEOUT};

/// Where `ip netns add` bind-mounts namespace handles.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// Prefix of every namespace the testbed creates, so people (and `cargo xtask netns
/// down`) can tell ours from anyone else's.
pub const NAME_PREFIX: &str = "myc";

/// How long processes get between SIGTERM and SIGKILL when the testbed stops them.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Pids of children started in a namespace that nobody has reaped yet.
///
/// A child's pid cannot be reused until it is reaped, so signalling a pid found here is
/// always signalling our own process. [`NsChild`] removes its pid in the same critical
/// section in which it reaps it.
type Registry = Arc<Mutex<HashSet<u32>>>;

fn lock(registry: &Registry) -> MutexGuard<'_, HashSet<u32>> {
    // A panic while holding this lock cannot leave the set inconsistent (every update
    // is a single insert or remove), so a poisoned lock is still usable.
    registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A network namespace created with `ip netns add` and deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    children: Registry,
    deleted: bool,
}

impl Netns {
    /// Creates the namespace `name` (`ip netns add`).
    ///
    /// Fails if it already exists: reusing a stale namespace from a crashed run would
    /// make tests depend on leftovers. Use [`unique_name`] for collision-free names.
    pub fn create(name: &str) -> Result<Self> {
        validate_name(name)?;
        if !util::is_root() {
            bail!("creating network namespace {name} needs root (run the tests as root)");
        }
        util::run(util::tool("ip"), ["netns", "add", name])
            .with_context(|| format!("failed to create network namespace {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            children: Arc::default(),
            deleted: false,
        })
    }

    /// The namespace name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a fresh thread that has joined this namespace, and returns its result.
    ///
    /// Sockets created inside `f` belong to the namespace for their whole life, even when
    /// used later from other threads; that is how [`crate::traffic`] sends and captures
    /// without spawning processes. A panic in `f` is resumed on the calling thread.
    pub fn run_in<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = Path::new(NETNS_RUN_DIR).join(&self.name);
        let handle = File::open(&path)
            .with_context(|| format!("failed to open namespace handle {}", path.display()))?;
        thread::scope(|scope| {
            let worker = thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(scope, move || -> Result<R> {
                    // SAFETY: setns only changes this (fresh, short-lived) thread's network
                    // namespace; the fd is valid for the duration of the call.
                    let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        return Err(std::io::Error::last_os_error())
                            .with_context(|| format!("setns into {} failed", path.display()));
                    }
                    drop(handle);
                    Ok(f())
                })
                .context("failed to spawn a namespace worker thread")?;
            match worker.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs `ip netns exec <name> <program> <args...>` to completion (bounded by
    /// [`COMMAND_TIMEOUT`]); a non-zero exit is an error quoting stderr.
    pub fn exec<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        util::run_checked(&mut cmd, COMMAND_TIMEOUT)
            .with_context(|| format!("command in network namespace {} failed", self.name))
    }

    /// Like [`Netns::exec`] but returns stdout as text.
    pub fn exec_stdout<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.exec(program, args)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ip -n <name> <args...>`: iproute2 switches namespace itself, which is
    /// cheaper than `ip netns exec` and needs no mount namespace games.
    pub fn ip<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(util::tool("ip"));
        cmd.arg("-n").arg(&self.name).args(args);
        util::run_checked(&mut cmd, COMMAND_TIMEOUT)
    }

    /// A `Command` for `ip netns exec <name> <program>`, for callers that need their own
    /// stdio or timeout handling.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(util::tool("ip"));
        cmd.args(["netns", "exec"]).arg(&self.name).arg(program);
        cmd
    }

    /// Starts a long-running process inside the namespace with stdout and stderr appended
    /// to `log` (or discarded), and tracks it so dropping the namespace also stops it.
    pub fn spawn<I, S>(
        &self,
        program: impl AsRef<OsStr>,
        args: I,
        log: Option<&Path>,
    ) -> Result<NsChild>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args).stdin(Stdio::null());
        match log {
            Some(path) => {
                let file = File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("failed to open log file {}", path.display()))?;
                let err = file
                    .try_clone()
                    .with_context(|| format!("failed to duplicate {}", path.display()))?;
                cmd.stdout(file).stderr(err);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let description = util::describe(&cmd);
        // Hold the lock across spawn so a concurrent delete cannot miss the new child.
        let mut registry = lock(&self.children);
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start `{description}`"))?;
        registry.insert(child.id());
        drop(registry);
        Ok(NsChild {
            child,
            registry: Arc::clone(&self.children),
            description,
            status: None,
        })
    }

    /// Whether `ip netns list` still shows the namespace.
    pub fn exists(&self) -> Result<bool> {
        Ok(list()?.iter().any(|n| n == &self.name))
    }

    /// Stops the processes the testbed started here (SIGTERM, then SIGKILL after
    /// [`STOP_GRACE`]) and deletes the namespace. Idempotent.
    pub fn delete(&mut self) -> Result<()> {
        if self.deleted {
            return Ok(());
        }
        stop_registered(&self.children);
        delete_named(&self.name)?;
        self.deleted = true;
        Ok(())
    }

    /// Leaves the namespace in place when this value is dropped, e.g. for `cargo xtask
    /// netns up`, and returns its name. Tracked processes are left running too.
    pub fn persist(mut self) -> String {
        self.deleted = true;
        std::mem::take(&mut self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("testbed: {e:#}");
        }
    }
}

/// Deletes the namespace `name` if it exists (`ip netns del`). Idempotent.
pub fn delete_named(name: &str) -> Result<()> {
    validate_name(name)?;
    if !Path::new(NETNS_RUN_DIR).join(name).exists() {
        return Ok(());
    }
    util::run(util::tool("ip"), ["netns", "del", name])
        .with_context(|| format!("failed to delete network namespace {name}"))?;
    Ok(())
}

/// Names from `ip netns list` (without the `(id: N)` suffix).
pub fn list() -> Result<Vec<String>> {
    let out = util::run(util::tool("ip"), ["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// A fresh namespace name `myc<pid>x<n>-<suffix>` that no other test thread or process
/// will pick.
pub fn unique_name(suffix: &str) -> String {
    format!("{NAME_PREFIX}{}-{suffix}", util::unique_tag())
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if !ok {
        bail!("invalid network namespace name {name:?}: use 1-64 of [A-Za-z0-9._-]");
    }
    Ok(())
}

/// SIGTERMs every registered child, waits up to [`STOP_GRACE`] for them to exit, then
/// SIGKILLs the rest. Does not reap: the owning [`NsChild`] does that.
fn stop_registered(registry: &Registry) {
    let pids: Vec<u32> = lock(registry).iter().copied().collect();
    if pids.is_empty() {
        return;
    }
    signal_registered(registry, libc::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        let alive = lock(registry).iter().any(|&pid| is_running(pid));
        if !alive {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    signal_registered(registry, libc::SIGKILL);
}

fn signal_registered(registry: &Registry, signal: libc::c_int) {
    let guard = lock(registry);
    for &pid in guard.iter() {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: the pid is an unreaped child of ours (see `Registry`), so this
            // cannot hit an unrelated process.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

/// Whether a pid is alive and not yet a zombie, from `/proc/<pid>/stat`.
fn is_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain ')'.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// A process started inside a namespace by [`Netns::spawn`]; stopped (SIGTERM, then
/// SIGKILL after [`STOP_GRACE`]) and reaped on drop.
#[derive(Debug)]
pub struct NsChild {
    child: Child,
    registry: Registry,
    description: String,
    status: Option<ExitStatus>,
}

impl NsChild {
    /// The process id (that of the program itself: `ip netns exec` execs it in place).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The command line it was started with.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Reaps the process if it has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        // Reap and deregister under one lock so the pid is never signalled after reuse.
        let mut registry = lock(&self.registry);
        let status = self
            .child
            .try_wait()
            .with_context(|| format!("failed to wait for `{}`", self.description))?;
        if let Some(status) = status {
            registry.remove(&self.child.id());
            self.status = Some(status);
        }
        Ok(status)
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` unless the process has already been reaped.
    pub fn signal(&mut self, signal: libc::c_int) -> Result<()> {
        let registry = lock(&self.registry);
        if self.status.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        drop(registry);
        // SAFETY: the child is not reaped yet (status is None and only we reap it), so
        // the pid still names our process.
        if unsafe { libc::kill(pid, signal) } != 0 {
            let err = std::io::Error::last_os_error();
            // ESRCH cannot happen for an unreaped child; report anything else.
            return Err(err).with_context(|| format!("kill({pid}, {signal}) failed"));
        }
        Ok(())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(libc::SIGTERM)?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        eprintln!(
            "testbed: `{}` ignored SIGTERM for {grace:?}; sending SIGKILL",
            self.description
        );
        self.signal(libc::SIGKILL)?;
        self.wait_timeout(Duration::from_secs(10))?
            .with_context(|| format!("`{}` survived SIGKILL", self.description))
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        if let Err(e) = self.terminate(STOP_GRACE) {
            eprintln!("testbed: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(validate_name("myc1x2-a").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
        let a = unique_name("a");
        assert!(a.starts_with(NAME_PREFIX) && a.ends_with("-a"));
        assert_ne!(a, unique_name("a"));
    }

    #[test]
    fn own_process_is_running() {
        assert!(is_running(std::process::id()));
        assert!(!is_running(u32::MAX));
    }
}
