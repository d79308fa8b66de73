//! `cargo xtask setup`: installs what building and testing Myconet needs on a Debian
//! machine, skipping whatever is already there, so a fresh CI machine and a developer's
//! machine end up the same.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Debian packages the testbed and benchmarks use, with a command that proves each one
/// is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("iperf3", "iperf3"),
    ("tcpdump", "tcpdump"),
    // The testbed pings neighbours to check links and resolve neighbour entries.
    ("ping", "iputils-ping"),
    // The testbed sets per-namespace sysctls (forwarding, DAD).
    ("sysctl", "procps"),
    // `cargo xtask package` and its test: building, installing and checking the .deb
    // (strip and objdump from binutils, the unit checked by systemd-analyze verify).
    ("dpkg-deb", "dpkg"),
    ("strip", "binutils"),
    ("objdump", "binutils"),
    ("systemd-analyze", "systemd"),
    // The capability tests run the agent with a restricted set.
    ("setpriv", "util-linux"),
];

/// Runs every setup step.
pub fn run() -> Result<()> {
    system_packages().context("setup: installing Debian packages failed")?;
    let sysroot = rust_src().context("setup: the nightly rust-src component is unavailable")?;
    bpf_linker(&sysroot).context("setup: installing bpf-linker failed")?;
    cargo_fuzz().context("setup: installing cargo-fuzz failed")?;
    println!(
        "setup: bpfel-unknown-none needs nothing more (core is built from rust-src with \
         -Z build-std)"
    );
    Ok(())
}

fn has_command(name: &str) -> bool {
    // Look in the sbin directories too: Debian puts `ip` and `ethtool` there and not
    // every root environment has them in PATH.
    let path = std::env::var("PATH").unwrap_or_default();
    cmd::probe(
        Command::new("sh")
            .args(["-c", "command -v \"$1\"", "sh", name])
            .env("PATH", format!("{path}:/usr/local/sbin:/usr/sbin:/sbin")),
    )
    .is_some()
}

fn system_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(command, _)| !has_command(command))
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        let commands: Vec<&str> = PACKAGES.iter().map(|&(c, _)| c).collect();
        println!("setup: system tools present: {}", commands.join(", "));
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    if !cmd::is_root() {
        bail!(
            "packages {} are missing and installing them needs root: \
             run as root or `apt-get install {}` yourself",
            missing.join(", "),
            missing.join(" ")
        );
    }
    cmd::run(Command::new("apt-get").arg("update"))?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&missing),
    )?;
    let still: Vec<&str> = PACKAGES
        .iter()
        .filter(|(command, _)| !has_command(command))
        .map(|&(command, _)| command)
        .collect();
    if !still.is_empty() {
        bail!(
            "after installing, these commands are still not found: {}",
            still.join(", ")
        );
    }
    Ok(())
}

/// Nightly's sysroot, with rust-src present (needed by `-Z build-std` for the eBPF
/// target).
fn rust_src() -> Result<PathBuf> {
    let sysroot = nightly_sysroot()?;
    let src = sysroot.join("lib/rustlib/src");
    if src.is_dir() {
        println!("setup: nightly rust-src present ({})", src.display());
        return Ok(sysroot);
    }
    println!("setup: adding rust-src to the nightly toolchain");
    cmd::run(Command::new("rustup").env_remove("RUSTUP_TOOLCHAIN").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    if !src.is_dir() {
        bail!("rust-src installed but {} does not exist", src.display());
    }
    Ok(sysroot)
}

fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot = cmd::probe(
        Command::new("rustup")
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["run", "nightly", "rustc", "--print", "sysroot"]),
    )
    .context(
        "`rustup run nightly rustc --print sysroot` failed: the nightly toolchain is \
         not installed (rustup toolchain install nightly)",
    )?;
    Ok(PathBuf::from(sysroot))
}

fn bpf_linker(sysroot: &Path) -> Result<()> {
    if let Some(version) = cmd::probe(Command::new("bpf-linker").arg("--version")) {
        println!("setup: {version} present");
        return Ok(());
    }
    let lib = sysroot.join("lib");
    let (dylib, major) = find_llvm_dylib(&lib)?;
    println!("setup: installing bpf-linker against nightly's LLVM {major} ({dylib})");
    let rustflags = format!(
        "-L {lib} -l dylib={dylib} -C link-arg=-Wl,-rpath,{lib}",
        lib = lib.display()
    );
    cmd::run(
        Command::new("cargo")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env("RUSTFLAGS", rustflags)
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--version",
                "^0.13",
                "--no-default-features",
                "--features",
                &format!("llvm-{major},no-llvm-linking"),
            ]),
    )?;
    if cmd::probe(Command::new("bpf-linker").arg("--version")).is_none() {
        bail!(
            "bpf-linker installed but `bpf-linker --version` still fails (is ~/.cargo/bin in PATH?)"
        );
    }
    Ok(())
}

/// Installs cargo-fuzz (the fuzz targets' runner, `cargo xtask fuzz`) unless present.
pub fn cargo_fuzz() -> Result<()> {
    let probe = || {
        cmd::probe(Command::new("cargo").env_remove("RUSTUP_TOOLCHAIN").args([
            "+nightly",
            "fuzz",
            "--version",
        ]))
    };
    if let Some(version) = probe() {
        println!("setup: {version} present");
        return Ok(());
    }
    println!("setup: installing cargo-fuzz");
    cmd::run(Command::new("cargo").env_remove("RUSTUP_TOOLCHAIN").args([
        "install",
        "cargo-fuzz",
        "--version",
        "^0.13",
        "--locked",
    ]))?;
    if probe().is_none() {
        bail!(
            "cargo-fuzz installed but `cargo +nightly fuzz --version` still fails (is ~/.cargo/bin in PATH?)"
        );
    }
    Ok(())
}

/// Finds `libLLVM-<major>-rust-*.so` in `lib` and returns the dylib name to link
/// (`LLVM-<major>-rust-…`) and the LLVM major version.
fn find_llvm_dylib(lib: &Path) -> Result<(String, u32)> {
    let entries =
        std::fs::read_dir(lib).with_context(|| format!("cannot list {}", lib.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", lib.display()))?;
        if let Some(parsed) = entry.file_name().to_str().and_then(parse_llvm_dylib) {
            found.push(parsed);
        }
    }
    found.sort();
    match found.pop() {
        Some(hit) => Ok(hit),
        None => bail!(
            "no libLLVM-<major>-rust-*.so in {} (is the nightly toolchain complete?)",
            lib.display()
        ),
    }
}

fn parse_llvm_dylib(file: &str) -> Option<(String, u32)> {
    let name = file.strip_prefix("lib")?.strip_suffix(".so")?;
    let rest = name.strip_prefix("LLVM-")?;
    let (major, tail) = rest.split_once('-')?;
    if !tail.starts_with("rust-") {
        return None;
    }
    let major = major.parse().ok()?;
    Some((name.to_owned(), major))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_dylib_names() {
        assert_eq!(
            parse_llvm_dylib("libLLVM-22-rust-1.97.0-nightly.so"),
            Some(("LLVM-22-rust-1.97.0-nightly".to_owned(), 22))
        );
        assert_eq!(
            parse_llvm_dylib("libLLVM.so.22.1-rust-1.97.0-nightly"),
            None
        );
        assert_eq!(
            parse_llvm_dylib("librustc_driver-b5a965480ee51f9a.so"),
            None
        );
        assert_eq!(parse_llvm_dylib("libLLVM-x-rust-1.so"), None);
    }

    #[test]
    fn finds_llvm_in_the_real_nightly_sysroot() {
        // Every Myconet machine has nightly (the eBPF build needs it).
        let sysroot = nightly_sysroot().unwrap();
        let (dylib, major) = find_llvm_dylib(&sysroot.join("lib")).unwrap();
        assert!(dylib.starts_with(&format!("LLVM-{major}-rust-")), "{dylib}");
        assert!(sysroot.join("lib").join(format!("lib{dylib}.so")).is_file());
    }

    #[test]
    fn shell_builtin_probe_works() {
        assert!(has_command("sh"));
        assert!(!has_command("surely-not-a-command-xyz"));
    }
}
