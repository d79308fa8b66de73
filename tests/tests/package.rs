//! The Debian package installs and works: built from the debug binaries the suite has
//! already built (the same assembly `cargo xtask package` runs on release binaries),
//! installed with dpkg into a scratch root, its files, conffile, unit and man pages
//! checked, the installed binaries run, and purged again.
//!
//! No namespaces and nothing outside its temporary directory: the scratch root has its
//! own dpkg database, and the maintainer scripts run without chroot with `DPKG_ROOT`
//! set, which they honour (they touch systemd only on the real root).

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, ensure};
use myconet_testbed::{
    agent::bin_dir,
    package::{self, CONFIG_PATH, PackageInputs, UNIT_PATH},
    util::{self, COMMAND_TIMEOUT, TempDir},
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the testbed lives in the workspace")
        .to_path_buf()
}

/// Runs `cmd`, failing with its output unless it succeeds; returns stdout and stderr.
fn run(cmd: &mut Command) -> Result<(String, String)> {
    let out = util::run_checked(cmd, COMMAND_TIMEOUT * 4)?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `dpkg --root=<root> …` with the maintainer scripts run outside a chroot (the scratch
/// root has no shell) and dependencies not checked (it has no libc6 package either).
fn dpkg(root: &Path) -> Command {
    let mut cmd = Command::new(util::tool("dpkg"));
    cmd.arg(format!("--root={}", root.display())).args([
        "--force-script-chrootless",
        "--force-depends",
        "--log=/dev/null",
    ]);
    cmd
}

fn mode(path: &Path) -> Result<u32> {
    Ok(fs::metadata(path)
        .with_context(|| format!("{} is missing", path.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

#[test]
fn the_package_installs_its_files_and_its_binaries_run() -> Result<()> {
    let bins = bin_dir()?;
    let dir = TempDir::new("package")?;
    let started = Instant::now();
    let version = package::workspace_version(&workspace())?;
    let deb = package::build(&PackageInputs {
        workspace: &workspace(),
        bin_dir: &bins,
        version: &version,
        out_dir: dir.path(),
        quick: true,
    })?;
    println!(
        "package built in {:.1?}: {}",
        started.elapsed(),
        deb.display()
    );

    let root = dir.path().join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        fs::create_dir_all(root.join(d))?;
    }
    for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        fs::write(root.join(f), "")?;
    }
    run(dpkg(&root).arg("--install").arg(&deb))?;
    let (status, _) = run(dpkg(&root).args(["--status", package::NAME]))?;
    ensure!(
        status.contains("Status: install ok installed"),
        "not installed:\n{status}"
    );
    ensure!(
        status.contains(&format!("/{CONFIG_PATH} ")),
        "{CONFIG_PATH} is not registered as a conffile:\n{status}"
    );
    ensure!(status.contains(&format!("Version: {version}")), "{status}");

    // Files and their modes.
    for (path, want) in [
        ("usr/bin/myconet-agent", 0o755),
        ("usr/bin/myconet-ctl", 0o755),
        (UNIT_PATH, 0o644),
        (CONFIG_PATH, 0o644),
        ("usr/share/man/man1/myconet-agent.1.gz", 0o644),
        ("usr/share/man/man1/myconet-ctl.1.gz", 0o644),
        ("usr/share/man/man1/myconet-ctl-peers-add.1.gz", 0o644),
        ("usr/share/bash-completion/completions/myconet-ctl", 0o644),
        ("usr/share/zsh/vendor-completions/_myconet-agent", 0o644),
        (
            "usr/share/fish/vendor_completions.d/myconet-ctl.fish",
            0o644,
        ),
        ("usr/share/doc/myconet/operations.md.gz", 0o644),
        ("usr/share/doc/myconet/copyright", 0o644),
    ] {
        let got = mode(&root.join(path))?;
        ensure!(got == want, "{path}: mode {got:o}, expected {want:o}");
    }
    ensure!(
        fs::read(root.join(CONFIG_PATH))? == fs::read(workspace().join("packaging/agent.toml"))?,
        "the installed sample config differs from packaging/agent.toml"
    );

    // The installed binaries run.
    let agent = root.join("usr/bin/myconet-agent");
    let ctl = root.join("usr/bin/myconet-ctl");
    let (out, _) = run(Command::new(&agent).arg("--version"))?;
    ensure!(out.trim() == format!("myconet-agent {version}"), "{out}");
    let (out, _) = run(Command::new(&ctl).arg("--version"))?;
    ensure!(out.trim() == format!("myconet-ctl {version}"), "{out}");
    let (help, _) = run(Command::new(&agent).arg("--help"))?;
    for needle in [
        "[default: 9651]",
        "[default: /var/lib/myconet]",
        "[default: /run/myconet/agent.sock]",
    ] {
        ensure!(
            help.contains(needle),
            "agent --help lacks {needle}:\n{help}"
        );
    }
    let (help, _) = run(Command::new(&ctl).arg("--help"))?;
    ensure!(help.contains("route") && help.contains("stats"), "{help}");

    // The man pages are roff that man can render, the completions load in bash.
    let page = root.join("usr/share/man/man1/myconet-agent.1.gz");
    let (roff, _) = run(Command::new(util::tool("gzip")).arg("-dc").arg(&page))?;
    ensure!(
        roff.starts_with(".ie") || roff.contains(".TH myconet-agent"),
        "{roff}"
    );
    ensure!(
        roff.contains("metrics\\-listen"),
        "the man page lacks --metrics-listen:\n{roff}"
    );
    if util::tool("man").is_file() {
        let (text, _) = run(Command::new(util::tool("man"))
            .arg("-l")
            .arg(&page)
            .env("MANWIDTH", "80"))?;
        ensure!(
            text.contains("myconet-agent") && text.contains("--state-dir"),
            "{text}"
        );
    } else {
        println!("man not installed: the man page was checked as roff only");
    }
    let completion = root.join("usr/share/bash-completion/completions/myconet-ctl");
    let (out, _) = run(Command::new("bash").args([
        "-c",
        "source \"$1\" && complete -p myconet-ctl",
        "bash",
        &completion.display().to_string(),
    ]))?;
    ensure!(
        out.contains("myconet-ctl"),
        "bash completion not registered: {out}"
    );

    // The unit as installed: `systemd-analyze verify` in the scratch root, with the
    // host's standard targets beside it (the unit's After=/WantedBy= name them).
    let analyze = util::tool("systemd-analyze");
    if analyze.is_file() {
        let units = root.join("usr/lib/systemd/system");
        for entry in fs::read_dir("/usr/lib/systemd/system")? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "target") {
                let _ = fs::copy(&path, units.join(path.file_name().context("name")?));
            }
        }
        let out = Command::new(&analyze)
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg("--man=no")
            .arg(format!("/{UNIT_PATH}"))
            .output()
            .context("running systemd-analyze")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify: {}\n{stderr}",
            util::status_text(out.status)
        );
    } else {
        println!(
            "systemd-analyze not installed (cargo xtask setup installs it): unit not verified"
        );
    }

    // Purge removes it all, the conffile included.
    run(dpkg(&root).args(["--purge", package::NAME]))?;
    for path in ["usr/bin/myconet-agent", UNIT_PATH, CONFIG_PATH] {
        ensure!(!root.join(path).exists(), "{path} survived the purge");
    }
    println!("package test took {:.1?}", started.elapsed());
    Ok(())
}
