//! Running external commands visibly: every command line is printed before it runs and
//! every exit status is checked, so a CI log shows exactly what happened and where.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Renders `cmd` as a shell-like line, including the environment it sets and its working
/// directory when that differs from ours.
pub fn line(cmd: &Command) -> String {
    let mut out = String::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            out.push_str(&format!(
                "{}={} ",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            ));
        }
    }
    out.push_str(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&quote(&arg.to_string_lossy()));
    }
    out
}

fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+^@%".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Prints and runs `cmd` with inherited stdio; a non-zero exit is an error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = line(cmd);
    eprintln!("+ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed with {status}");
    }
    Ok(())
}

/// Runs `cmd` quietly (a probe, not a step) and returns trimmed stdout, or `None` when it
/// cannot start or exits non-zero.
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Prints and runs `cmd`, echoing its stdout line by line and handing each line to
/// `on_line` (stderr passes straight through); a non-zero exit is an error.
pub fn run_streaming(cmd: &mut Command, mut on_line: impl FnMut(&str)) -> Result<()> {
    let line = line(cmd);
    eprintln!("+ {line}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    let stdout = child
        .stdout
        .take()
        .context("child stdout was not captured")?;
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("failed to read the output of `{line}`"))?;
        if n == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&buf);
        let text = text.trim_end_matches(['\n', '\r']);
        println!("{text}");
        on_line(text);
    }
    let status = child
        .wait()
        .with_context(|| format!("failed to wait for `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed with {status}");
    }
    Ok(())
}

/// A `cargo` command through the rustup proxy in `PATH` (so `+nightly` works), run in
/// the workspace root.
///
/// `RUSTUP_TOOLCHAIN`, which rustup sets for the `cargo run` that started us, is removed
/// so nested commands pick their toolchain the normal way.
pub fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// The cargo target directory, as `cargo metadata` reports it (honours
/// `CARGO_TARGET_DIR` and `build.target-dir`).
pub fn target_dir(root: &Path) -> Result<PathBuf> {
    let mut cmd = cargo(root);
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("failed to run cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed with {}", out.status);
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata printed invalid JSON")?;
    meta.get("target_directory")
        .and_then(serde_json::Value::as_str)
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

/// Whether we run with an effective uid of 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_quoted_for_copy_paste() {
        let mut cmd = Command::new("cargo");
        cmd.env(
            "CARGO_ENCODED_RUSTFLAGS",
            r#"--cfg=bpf_target_arch="x86_64""#,
        )
        .args(["clippy", "--", "-D", "warnings", "two words"]);
        assert_eq!(
            line(&cmd),
            r#"CARGO_ENCODED_RUSTFLAGS='--cfg=bpf_target_arch="x86_64"' cargo clippy -- -D warnings 'two words'"#
        );
    }

    #[test]
    fn probe_and_run_check_status() {
        assert_eq!(
            probe(Command::new("sh").args(["-c", "echo hi"])),
            Some("hi".into())
        );
        assert_eq!(probe(Command::new("sh").args(["-c", "exit 1"])), None);
        assert_eq!(probe(&mut Command::new("/nonexistent/program")), None);
        assert!(run(Command::new("sh").args(["-c", "exit 4"])).is_err());
        let mut seen = Vec::new();
        run_streaming(Command::new("sh").args(["-c", "echo a; echo b"]), |l| {
            seen.push(l.to_owned())
        })
        .unwrap();
        assert_eq!(seen, ["a", "b"]);
    }
}
