//! `cargo xtask test`: the whole gate CI runs (`.ci/run`), stage by stage, stopping at
//! the first failure with a banner that names the stage. The fuzz stage runs every fuzz
//! target for a few seconds over its seeds and saved crash cases (`fuzz::test_stage`).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cmd, fuzz, setup};

/// One step of the gate; boxed so the stages can be listed in order and run in a loop.
type Stage<'a> = Box<dyn FnMut() -> Result<()> + 'a>;

/// Test counts summed over every `test result:` line cargo test printed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Tests marked `#[ignore]`.
    pub ignored: u64,
}

impl Tally {
    /// Adds the counts of one libtest summary line, e.g.
    /// `test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; …`.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

/// Crates the protocol cores must never depend on: the async runtime, the eBPF loader,
/// the XDP program and the agent (the shell). `myconet-core` builds and tests on stable
/// Rust with no eBPF toolchain only while none of them is in its dependency tree.
const NOT_IN_CORE: &[&str] = &["aya", "tokio", "myconet-ebpf", "myconet-agent"];

/// The packages of a `cargo tree --prefix none` listing that are, or belong to, one of
/// [`NOT_IN_CORE`] (`aya-obj` counts as aya, `tokio-macros` as tokio).
pub fn forbidden_in_core(tree: &str) -> Vec<String> {
    let mut found: Vec<String> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| {
            NOT_IN_CORE.iter().any(|bad| {
                *name == *bad || name.strip_prefix(bad).is_some_and(|r| r.starts_with('-'))
            })
        })
        .map(str::to_owned)
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Fails when `myconet-core`'s normal dependencies reach tokio, aya, the XDP program or
/// the agent (see [`NOT_IN_CORE`]).
fn check_core_is_sans_io(root: &Path) -> Result<()> {
    let mut tree = cmd::cargo(root);
    tree.args([
        "tree",
        "-p",
        "myconet-core",
        "-e",
        "normal",
        "--prefix",
        "none",
    ]);
    let line = cmd::line(&tree);
    eprintln!("+ {line}");
    let out = tree
        .output()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed with {}", out.status);
    }
    let listing = String::from_utf8_lossy(&out.stdout);
    if !listing.lines().any(|l| l.starts_with("myconet-core ")) {
        bail!("`{line}` did not list myconet-core");
    }
    let found = forbidden_in_core(&listing);
    if !found.is_empty() {
        bail!(
            "myconet-core depends on {} (the protocol cores must stay free of I/O runtimes \
             and the eBPF toolchain; move that code to myconet-agent)",
            found.join(", ")
        );
    }
    println!(
        "myconet-core: no {} in its dependencies",
        NOT_IN_CORE.join(", ")
    );
    Ok(())
}

/// Runs fmt, clippy (host and eBPF), build, tests and a short run of every fuzz target;
/// `extra` goes to `cargo test` (and skips the fuzz stage).
pub fn run(root: &Path, extra: &[String]) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "cargo xtask test must run as root: the integration tests create network \
             namespaces and attach XDP programs (CI runs as root; try `sudo -E cargo xtask test`)"
        );
    }
    let started = Instant::now();
    let target = cmd::target_dir(root)?;
    let bin_dir = target.join("debug");
    let mut tally = Tally::default();

    let mut stages: Vec<(&str, Stage<'_>)> = vec![
        ("setup", Box::new(setup::run)),
        (
            "rustfmt",
            Box::new(|| cmd::run(cmd::cargo(root).args(["fmt", "--all", "--", "--check"]))),
        ),
        (
            "clippy",
            Box::new(|| {
                cmd::run(cmd::cargo(root).args(["clippy", "--all-targets", "--", "-D", "warnings"]))
            }),
        ),
        ("core is sans-IO", Box::new(|| check_core_is_sans_io(root))),
        (
            "clippy (eBPF)",
            Box::new(|| {
                let ebpf_target = target.join("ebpf-clippy");
                cmd::run(
                    cmd::cargo(root)
                        .env(
                            "CARGO_ENCODED_RUSTFLAGS",
                            r#"--cfg=bpf_target_arch="x86_64""#,
                        )
                        .args([
                            "+nightly",
                            "clippy",
                            "-p",
                            "myconet-ebpf",
                            "--release",
                            "--target",
                            "bpfel-unknown-none",
                            "-Z",
                            "build-std=core",
                            "--target-dir",
                        ])
                        .arg(&ebpf_target)
                        .args(["--", "-D", "warnings"]),
                )
            }),
        ),
        (
            "build",
            Box::new(|| cmd::run(cmd::cargo(root).args(["build", "--bins"]))),
        ),
        (
            "test",
            Box::new(|| {
                cmd::run_streaming(
                    cmd::cargo(root)
                        .env(myconet_testbed::agent::BIN_DIR_ENV, &bin_dir)
                        .arg("test")
                        .args(extra),
                    |line| tally.add_line(line),
                )
            }),
        ),
        (
            "fuzz",
            Box::new(|| {
                if extra.is_empty() {
                    fuzz::test_stage(root)
                } else {
                    println!("fuzz: skipped (cargo test arguments given)");
                    Ok(())
                }
            }),
        ),
    ];

    let total = stages.len();
    let mut failure = None;
    for (i, (name, stage)) in stages.iter_mut().enumerate() {
        let n = i + 1;
        println!("\n==> [{n}/{total}] {name}");
        let stage_start = Instant::now();
        if let Err(e) = stage() {
            failure = Some((n, *name, e));
            break;
        }
        println!(
            "==> [{n}/{total}] {name}: ok ({:.1}s)",
            stage_start.elapsed().as_secs_f64()
        );
    }
    drop(stages);

    let elapsed = started.elapsed().as_secs_f64();
    let summary = format!(
        "summary: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.ignored
    );
    match failure {
        Some((n, name, e)) => {
            println!("\nxtask test: FAILED at stage {n}/{total} ({name}) after {elapsed:.1}s");
            if tally != Tally::default() {
                println!("{summary}");
            }
            Err(e.context(format!("stage {n}/{total} ({name}) failed")))
        }
        None => {
            println!("\nxtask test: all {total} stages passed in {elapsed:.1}s");
            println!("{summary}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_core_check_names_runtimes_and_the_ebpf_toolchain() {
        let clean = "myconet-core v0.1.0 (/w/myconet-core)\nmyconet-common v0.1.0\nring v0.17.14\nthiserror v2.0.21\n";
        assert!(forbidden_in_core(clean).is_empty());
        let dirty = format!(
            "{clean}tokio v1.0.0\ntokio-macros v2.0.0 (proc-macro)\naya-obj v0.2.0\nmyconet-ebpf v0.1.0\nayaya v1.0.0\ntokiox v1.0.0\n"
        );
        assert_eq!(
            forbidden_in_core(&dirty),
            ["aya-obj", "myconet-ebpf", "tokio", "tokio-macros"]
        );
    }

    #[test]
    fn tally_sums_libtest_lines() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add_line("test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 7 filtered out; finished in 1.00s");
        t.add_line("running 5 tests");
        t.add_line("test foo ... ok");
        assert_eq!(
            t,
            Tally {
                passed: 7,
                failed: 3,
                ignored: 1
            }
        );
    }
}
