//! Small process, path and naming helpers shared by the testbed modules.
//!
//! Every external command the testbed runs goes through [`run`], so each one is printed
//! on failure with its stderr and none of them can hang a test run forever.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Default upper bound for one short external command (`ip`, `ethtool`, `myconet-ctl`).
///
/// Generous because CI machines have two cores and may be busy compiling, but finite so a
/// wedged command fails the test instead of hanging CI until its global timeout.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A tag unique within this machine for as long as this process lives: `<pid>x<counter>`.
///
/// Namespace names and temporary directories embed it so tests running in parallel
/// threads, or in parallel test binaries, never collide.
pub fn unique_tag() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}x{}", std::process::id(), n)
}

/// Whether this process runs with an effective uid of 0.
///
/// Namespaces, veths, raw sockets and XDP all need root; callers use this to fail early
/// with a message that says so instead of an obscure `EPERM` from deep inside.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Resolves a system tool by name: first through `PATH`, then in the sbin directories.
///
/// Non-login root shells (and some CI environments) lack `/usr/sbin` in `PATH`, where
/// Debian installs `ip` and `ethtool`; looking there too keeps the testbed working anyway.
pub fn tool(name: &str) -> PathBuf {
    let from_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    let fallback = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .into_iter()
        .map(PathBuf::from);
    from_path
        .chain(fallback)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Renders a command line for messages, e.g. `ip -n mycx a link set lo up`.
pub fn describe(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

/// Runs `cmd` to completion with captured output, killing it after `timeout`.
///
/// Returns the output whatever the exit status; use [`run_checked`] when failure should
/// be an error.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let line = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);

    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("failed to wait for `{line}`"))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            // Our own child: killing and reaping it is safe.
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{line}` did not finish within {timeout:?}; killed it");
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    let stdout = stdout.map(join_drain).unwrap_or_default();
    let stderr = stderr.map(join_drain).unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `cmd` like [`run_with_timeout`] and turns a non-zero exit into an error that
/// quotes the command line, the exit status and stderr.
pub fn run_checked(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let line = describe(cmd);
    let output = run_with_timeout(cmd, timeout)?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            status_text(output.status),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Runs a program with arguments through [`run_checked`] and the default timeout.
pub fn run<I, S>(program: impl AsRef<OsStr>, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_checked(Command::new(program.as_ref()).args(args), COMMAND_TIMEOUT)
}

/// `exit status 1` or `killed by signal 9`, for error messages.
pub fn status_text(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "unknown exit status".to_owned(),
    }
}

fn drain<R: Read + Send + 'static>(mut reader: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just truncates what we report; the exit status still decides.
        let _ = reader.read_to_end(&mut buf);
        buf
    })
}

fn join_drain(handle: thread::JoinHandle<Vec<u8>>) -> Vec<u8> {
    handle.join().unwrap_or_default()
}

/// The last `lines` lines of a text file, for failure messages about a process log.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// A directory under the system temp dir, removed on drop unless the thread is panicking.
///
/// Keeping it after a failure leaves agent logs and state in place for a post-mortem;
/// the failure message prints its path.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates a fresh directory named `myconet-<label>-<unique tag>`.
    pub fn new(label: &str) -> Result<Self> {
        let base = std::env::temp_dir();
        for _ in 0..16 {
            let path = base.join(format!("myconet-{label}-{}", unique_tag()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("failed to create {}", path.display()));
                }
            }
        }
        bail!(
            "could not find a free temporary directory name under {}",
            base.display()
        )
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory on drop, e.g. for a demo whose logs a person reads afterwards.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep || thread::panicking() {
            eprintln!("testbed: keeping {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Polls `probe` until it returns `Ok(Some(_))` or `timeout` passes, then returns the
/// last error or a timeout error naming `what`.
///
/// All the testbed's waiting is built on this so every wait has a bound.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if Instant::now() >= deadline {
            return Err(match last {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow::anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_unique() {
        let a = unique_tag();
        let b = unique_tag();
        assert_ne!(a, b);
        assert!(a.starts_with(&std::process::id().to_string()));
    }

    #[test]
    fn run_reports_stderr_and_status() {
        let err = run("sh", ["-c", "echo boom >&2; exit 3"]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("exit status 3"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
        let out = run("sh", ["-c", "echo hi"]).unwrap();
        assert_eq!(out.stdout, b"hi\n");
    }

    #[test]
    fn run_kills_on_timeout() {
        let start = Instant::now();
        let err = run_with_timeout(Command::new("sleep").arg("10"), Duration::from_millis(200))
            .unwrap_err();
        assert!(format!("{err:#}").contains("did not finish"));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn tail_takes_last_lines() {
        let dir = TempDir::new("tail").unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "1\n2\n3\n4\n").unwrap();
        assert_eq!(tail(&path, 2), "3\n4");
        assert_eq!(tail(&path, 10), "1\n2\n3\n4");
        assert!(tail(&dir.path().join("missing"), 2).contains("cannot read"));
    }

    #[test]
    fn poll_is_bounded() {
        let err = poll::<()>(
            "never",
            Duration::from_millis(50),
            Duration::from_millis(10),
            || Ok(None),
        )
        .unwrap_err();
        assert!(err.to_string().contains("never"));
        let mut n = 0;
        let v = poll(
            "third try",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                n += 1;
                Ok((n == 3).then_some(n))
            },
        )
        .unwrap();
        assert_eq!(v, 3);
    }
}
