//! `cargo xtask fuzz`: builds the libFuzzer targets of `fuzz/` with cargo-fuzz on the
//! nightly toolchain and runs them, each over its committed seeds (`fuzz/corpus/<t>/`)
//! and saved crash cases (`fuzz/regressions/<t>/`), growing a working corpus under
//! `target/fuzz/corpus/<t>/` so the committed one stays small. Prints libFuzzer's
//! executions, executions per second and coverage (`cov:` edges, `ft:` features) per
//! target.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Target names and what each covers, in the order they run (from `fuzz/Cargo.toml`'s
/// `[[bin]]` entries would need a TOML parser; the list is short and a test checks it
/// against the manifest).
pub const TARGETS: &[(&str, &str)] = &[
    ("header", "Myconet header: parse → emit round trip"),
    (
        "session",
        "handshake, cookie, sealed datagrams into the session core",
    ),
    ("link", "link messages and routing frames"),
    ("routing", "routing TLVs and payloads into the router"),
    ("discovery", "discovery beacons into the peer manager"),
    ("config", "the agent's TOML config file"),
    (
        "content",
        "content protocol frames, manifests, MRIs and paths",
    ),
    (
        "xdp",
        "frames through the XDP program vs the userspace decision (root)",
    ),
];

/// Seconds each target runs inside `cargo xtask test`.
pub const TEST_SECONDS: u64 = 8;

/// libFuzzer's figures at the end of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Figures {
    /// Inputs executed.
    pub execs: u64,
    /// Executions per second.
    pub execs_per_sec: u64,
    /// Coverage: instrumented edges reached (`cov:`).
    pub cov: u64,
    /// Features reached (`ft:`), edges with hit counts and comparisons.
    pub ft: u64,
    /// Inputs in the corpus at the end (`corp:`).
    pub corpus: u64,
}

impl Figures {
    /// Updates from one line of libFuzzer output; status lines (`#N ... cov: ... ft:`)
    /// carry the coverage, the final `stat::` lines the totals.
    pub fn add_line(&mut self, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |key: &str| -> Option<u64> {
            let i = words.iter().position(|w| *w == key)?;
            words.get(i + 1)?.split('/').next()?.parse().ok()
        };
        if line.starts_with('#') {
            if let Some(v) = after("cov:") {
                self.cov = v;
            }
            if let Some(v) = after("ft:") {
                self.ft = v;
            }
            if let Some(v) = after("corp:") {
                self.corpus = v;
            }
            if let Some(v) = after("exec/s:") {
                self.execs_per_sec = v;
            }
            if let Some(n) = words.first().and_then(|w| w[1..].parse().ok()) {
                self.execs = n;
            }
        }
        if let Some(v) = line
            .strip_prefix("stat::number_of_executed_units:")
            .and_then(|v| v.trim().parse().ok())
        {
            self.execs = v;
        }
        if let Some(v) = line
            .strip_prefix("stat::average_exec_per_sec:")
            .and_then(|v| v.trim().parse().ok())
        {
            self.execs_per_sec = v;
        }
    }
}

fn known(target: &str) -> Result<()> {
    if TARGETS.iter().any(|(t, _)| *t == target) {
        Ok(())
    } else {
        bail!(
            "unknown fuzz target {target:?}; targets: {}",
            TARGETS.iter().map(|t| t.0).collect::<Vec<_>>().join(", ")
        )
    }
}

/// Prints the targets.
pub fn list() {
    println!("fuzz targets (cargo xtask fuzz TARGET [--time S]):");
    for (name, what) in TARGETS {
        println!("  {name:<10} {what}");
    }
}

fn cargo_fuzz(root: &Path) -> Command {
    let mut c = Command::new("cargo");
    // The rustup proxy picks nightly from `+nightly`; a toolchain override inherited
    // from the xtask's own (stable) cargo would defeat it.
    c.env_remove("RUSTUP_TOOLCHAIN")
        .current_dir(root)
        .args(["+nightly", "fuzz"]);
    c
}

/// Options shared by build and run: no sanitizer (the targets are safe Rust; coverage is
/// what matters), more codegen units for a quicker build, the target enabled.
const BUILD_ARGS: &[&str] = &[
    "--sanitizer",
    "none",
    "--codegen-units",
    "16",
    "--features",
    "libfuzzer",
];

/// Builds every target (once; runs reuse it).
pub fn build(root: &Path) -> Result<()> {
    cmd::run(cargo_fuzz(root).arg("build").args(BUILD_ARGS))
}

/// Runs the built `target` for `seconds`; returns libFuzzer's figures. A crash fails
/// with where the input was saved and how to keep it as a regression case.
pub fn run_target(root: &Path, target: &str, seconds: u64) -> Result<Figures> {
    known(target)?;
    if target == "xdp" && !cmd::is_root() {
        bail!("the xdp fuzz target loads a BPF program in a network namespace: run as root");
    }
    let work = cmd::target_dir(root)?.join("fuzz");
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    let seeds = fuzz_dir(root).join("corpus").join(target);
    let regressions = fuzz_dir(root).join("regressions").join(target);
    // The binary `build` made (cargo-fuzz's layout); running it directly spares a
    // cargo invocation per target.
    let binary = cmd::target_dir(root)?
        .join("x86_64-unknown-linux-gnu/release")
        .join(target);
    if !binary.is_file() {
        bail!(
            "{} is missing: build the fuzz targets first",
            binary.display()
        );
    }
    let mut c = Command::new(&binary);
    c.current_dir(root).arg(&corpus).arg(&seeds);
    if regressions.is_dir() {
        c.arg(&regressions);
    }
    c.arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        // Inputs beyond 4 KiB reach nothing new in any of these formats.
        .arg("-max_len=4096");
    let line = cmd::line(&c);
    eprintln!("+ {line}");
    let started = Instant::now();
    let mut child = c
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    let stderr = child.stderr.take().context("stderr not captured")?;
    let mut figures = Figures::default();
    let mut tail: Vec<String> = Vec::new();
    use std::io::BufRead;
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line?;
        figures.add_line(&line);
        // Status lines are many; keep the log readable and the interesting lines whole.
        if !line.starts_with('#') || line.contains("INITED") || line.contains("DONE") {
            eprintln!("{line}");
        }
        tail.push(line);
        if tail.len() > 50 {
            tail.remove(0);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        // The newest input libFuzzer saved during this run, if any.
        let crash = std::fs::read_dir(&artifacts)
            .ok()
            .and_then(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.metadata()
                            .and_then(|m| m.modified())
                            .is_ok_and(|t| t.elapsed().is_ok_and(|e| e <= started.elapsed()))
                    })
                    .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
            })
            .map(|p| p.display().to_string());
        let Some(crash) = crash else {
            bail!(
                "fuzz target {target} failed ({status}) without saving a crash input: \
                 a setup failure, see the output above"
            );
        };
        bail!(
            "fuzz target {target} failed after {:.0}s ({status}); input: {crash}\n\
             keep it as a regression case once fixed: cp {crash} {}/",
            started.elapsed().as_secs_f64(),
            regressions.display()
        );
    }
    Ok(figures)
}

/// Runs `targets` in turn, `seconds` each, and prints the table of figures.
pub fn run(root: &Path, targets: &[String], seconds: u64) -> Result<()> {
    for t in targets {
        known(t)?;
    }
    crate::setup::cargo_fuzz()?;
    let started = Instant::now();
    build(root)?;
    println!(
        "fuzz: targets built in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let mut rows = Vec::new();
    for t in targets {
        let f = run_target(root, t, seconds)?;
        rows.push((t.clone(), f));
    }
    print_table(&rows, seconds);
    Ok(())
}

/// Prints the figures of each run as a table.
pub fn print_table(rows: &[(String, Figures)], seconds: u64) {
    println!("\nfuzz results ({seconds} s per target):");
    println!(
        "  {:<10} {:>12} {:>10} {:>8} {:>8} {:>8}",
        "target", "execs", "execs/s", "cov", "ft", "corpus"
    );
    for (t, f) in rows {
        println!(
            "  {:<10} {:>12} {:>10} {:>8} {:>8} {:>8}",
            t, f.execs, f.execs_per_sec, f.cov, f.ft, f.corpus
        );
    }
}

/// The stage `cargo xtask test` runs: every target for [`TEST_SECONDS`], so every saved
/// crash case and seed is replayed under libFuzzer and a little new ground is covered.
pub fn test_stage(root: &Path) -> Result<()> {
    let all: Vec<String> = TARGETS.iter().map(|t| t.0.to_string()).collect();
    run(root, &all, TEST_SECONDS)
}

/// The fuzz manifest's directory.
fn fuzz_dir(root: &Path) -> PathBuf {
    root.join("fuzz")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_from_libfuzzer_lines() {
        let mut f = Figures::default();
        f.add_line("#2\tINITED cov: 120 ft: 130 corp: 9/1024b exec/s: 0 rss: 40Mb");
        f.add_line("#4096\tpulse  cov: 150 ft: 190 corp: 12/2Kb lim: 43 exec/s: 2048 rss: 41Mb");
        f.add_line("#52311\tDONE   cov: 161 ft: 220 corp: 14/2Kb lim: 200 exec/s: 5231 rss: 42Mb");
        assert_eq!(
            f,
            Figures {
                execs: 52311,
                execs_per_sec: 5231,
                cov: 161,
                ft: 220,
                corpus: 14,
            }
        );
        f.add_line("stat::number_of_executed_units: 52400");
        f.add_line("stat::average_exec_per_sec:     5240");
        assert_eq!((f.execs, f.execs_per_sec), (52400, 5240));
        f.add_line("INFO: Seed: 123");
        assert_eq!(f.cov, 161);
    }

    #[test]
    fn targets_match_the_fuzz_manifest() {
        let root = cmd::workspace_root().unwrap();
        let manifest = std::fs::read_to_string(fuzz_dir(&root).join("Cargo.toml")).unwrap();
        let bins: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.strip_prefix("name = \""))
            .filter_map(|l| l.strip_suffix('"'))
            .filter(|n| *n != "myconet-fuzz")
            .collect();
        let listed: Vec<&str> = TARGETS.iter().map(|t| t.0).collect();
        assert_eq!(bins, listed);
        for t in &listed {
            assert!(
                fuzz_dir(&root).join("corpus").join(t).is_dir(),
                "{t} has no seed corpus"
            );
        }
    }
}
