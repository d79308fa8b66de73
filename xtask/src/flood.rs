//! `cargo xtask bench flood`: a → c TCP throughput through relay b while an attacker
//! attached to c (then to b) floods it with HandshakeInits (fresh keys echoing cookies,
//! then replays), each flooded window next to an unflooded one on the same chain and
//! next to a control window (the same attacker, its inits dropped by the target's XDP
//! program at first sight); with the inits the target verified per second and its
//! agent's CPU. Builds named with `--bin-dir` are run in turn per target. Printed as a
//! table and saved as JSON under `target/bench/flood.json`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use myconet_testbed::flood::{self, Flood, FloodRun, Target};

use crate::cmd;

/// Wanted: flooded throughput at least this share of the unflooded one (the issue).
const TARGET_RATIO: f64 = 0.9;

/// Runs the flood benchmark against `targets` with the agents in `bin_dirs` (this tree's
/// release build if empty), one build after the other per target.
pub fn run(
    root: &Path,
    seconds: u64,
    targets: &[Target],
    sources: usize,
    bin_dirs: &[PathBuf],
) -> Result<()> {
    cmd::run(cmd::cargo(root).args([
        "build",
        "--release",
        "-p",
        "myconet-testbed",
        "--example",
        "flood",
    ]))?;
    let target_dir = cmd::target_dir(root)?;
    let release = target_dir.join("release");
    let flood_bin = release.join("examples").join("flood");
    let bin_dirs = if bin_dirs.is_empty() {
        vec![release]
    } else {
        bin_dirs.to_vec()
    };
    let mut runs = Vec::new();
    for &target in targets {
        for bin_dir in &bin_dirs {
            eprintln!(
                "==> target {}, agents from {}",
                target.as_str(),
                bin_dir.display()
            );
            let run = flood::run(bin_dir, &flood_bin, target, seconds, sources)
                .with_context(|| format!("flooding {}", target.as_str()))?;
            runs.push((bin_dir.clone(), run));
        }
    }
    if runs.is_empty() {
        bail!("no target to flood");
    }
    println!("\n{}", render(&runs, sources));
    let dir = target_dir.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::json!({
        "seconds": seconds,
        "attacker_sources": sources,
        "targets": runs.iter().map(|(dir, run)| run_json(dir, run)).collect::<Vec<_>>(),
        "goal_ratio": TARGET_RATIO,
    });
    let path = dir.join("flood.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("saved {}", path.display());
    Ok(())
}

/// The unflooded throughput: the mean of the unflooded windows (before and after).
fn baseline(run: &FloodRun) -> f64 {
    let none: Vec<f64> = run
        .windows
        .iter()
        .filter(|w| w.flood == Flood::None)
        .map(|w| w.received_bps)
        .collect();
    if none.is_empty() {
        f64::NAN
    } else {
        none.iter().sum::<f64>() / none.len() as f64
    }
}

/// The mean goodput of the windows of one kind (there is one of each flood).
fn mean_of(run: &FloodRun, flood: Flood) -> f64 {
    let v: Vec<f64> = run
        .windows
        .iter()
        .filter(|w| w.flood == flood)
        .map(|w| w.received_bps)
        .collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// For each flood: flooded / unflooded (the goal's figure), control / unflooded (what
/// the attacker's own CPU and packets cost a → c on this shared machine), flooded /
/// control (what handling the flood costs the target).
fn ratios(run: &FloodRun, flood: Flood) -> (f64, f64, f64) {
    let base = baseline(run);
    let flooded = mean_of(run, flood);
    let control = flood.control().map_or(f64::NAN, |c| mean_of(run, c));
    (flooded / base, control / base, flooded / control)
}

fn run_json(bin_dir: &Path, run: &FloodRun) -> serde_json::Value {
    let base = baseline(run);
    let summary: serde_json::Map<String, serde_json::Value> = [Flood::Fresh, Flood::Replay]
        .into_iter()
        .map(|f| {
            let (flooded, control, handling) = ratios(run, f);
            (
                f.as_str().to_string(),
                serde_json::json!({
                    "flooded_over_unflooded": flooded,
                    "attacker_only_over_unflooded": control,
                    "flooded_over_attacker_only": handling,
                }),
            )
        })
        .collect();
    serde_json::json!({
        "target": run.target.as_str(),
        "bin_dir": bin_dir.display().to_string(),
        "ratios": summary,
        "a_handshakes_failed": run.a_handshakes_failed,
        "new_session_under_flood_seconds": run.new_session_under_flood,
        "windows": run.windows.iter().map(|w| serde_json::json!({
            "flood": w.flood.as_str(),
            "gbps": w.gbps(),
            "ratio_to_unflooded": w.received_bps / base,
            "retransmits": w.retransmits,
            "window_seconds": w.window_seconds,
            "target_agent_cpu_seconds": w.target_cpu_seconds,
            "target_agent_cpu_percent_of_a_core": 100.0 * w.target_cpu_seconds / w.window_seconds,
            "machine_busy_fraction": w.machine_busy,
            "target_counters": w.target_counters.iter().map(|(n, v)| (n.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "target_inits_verified_per_second": w.per_second("handshake_verified"),
            "target_xdp": w.target_xdp.iter().map(|(n, v)| (n.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "target_udp_rcvbuf_errors": w.target_rcvbuf_errors,
            "attacker": w.attacker,
            "attacker_cpu_seconds": w.attacker_cpu_seconds,
            "attacker_cpu_percent_of_a_core": 100.0 * w.attacker_cpu_seconds / w.window_seconds,
        })).collect::<Vec<_>>(),
    })
}

fn render(runs: &[(PathBuf, FloodRun)], sources: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Handshake flood: iperf3 a → c through XDP relay b; attacker attached to the target, \
         sending from {sources} /64s (all on the same 2 cores)"
    );
    for (bin_dir, run) in runs {
        let base = baseline(run);
        let _ = writeln!(
            s,
            "\n  target {} (agents from {})",
            run.target.as_str(),
            bin_dir.display()
        );
        let _ = writeln!(
            s,
            "  {:<26} {:>7} {:>7} {:>7} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>8} {:>10}",
            "flood",
            "Gbit/s",
            "ratio",
            "retrans",
            "agent CPU",
            "attkr CPU",
            "inits rx/s",
            "verified/s",
            "limited/s",
            "replayed/s",
            "rcvbuf",
            "sent/s",
            "echoed",
            "xdp shed/s"
        );
        for w in &run.windows {
            let attacker = |k: &str| {
                w.attacker
                    .as_ref()
                    .and_then(|a| a.get(k))
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.0)
            };
            let _ = writeln!(
                s,
                "  {:<26} {:>7.2} {:>6.2}x {:>7} {:>8.0}% {:>8.0}% {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>8} {:>10.0} {:>8.0} {:>10.0}",
                w.flood.as_str(),
                w.gbps(),
                w.received_bps / base,
                w.retransmits,
                100.0 * w.target_cpu_seconds / w.window_seconds,
                100.0 * w.attacker_cpu_seconds / w.window_seconds,
                w.per_second("rx_handshake"),
                w.per_second("handshake_verified"),
                w.per_second("handshake_rate_limited"),
                w.per_second("handshake_replayed"),
                w.target_rcvbuf_errors,
                attacker("sent_per_second"),
                attacker("cookies_echoed"),
                w.xdp_per_second("drop_handshake_rate"),
            );
        }
        for f in [Flood::Fresh, Flood::Replay] {
            let (flooded, control, handling) = ratios(run, f);
            let _ = writeln!(
                s,
                "  {:<26} flooded/unflooded {flooded:.2}; attacker only (control)/unflooded \
                 {control:.2}; flooded/control (the target's handling) {handling:.2}",
                f.as_str()
            );
        }
        let worst = run
            .windows
            .iter()
            .filter(|w| matches!(w.flood, Flood::Fresh | Flood::Replay))
            .map(|w| w.received_bps / base)
            .fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            s,
            "  a's handshakes failed: {}; worst flooded/unflooded {:.2} (goal ≥ {TARGET_RATIO}): {}",
            run.a_handshakes_failed,
            worst,
            if worst >= TARGET_RATIO && run.a_handshakes_failed == 0 {
                "met"
            } else {
                "NOT met"
            }
        );
        if run.target == Target::B {
            let _ = writeln!(
                s,
                "  a new session a → b during the fresh-key flood: {}",
                run.new_session_under_flood
                    .map_or("none within 10 s".to_string(), |t| {
                        format!("a's packets delivered by b after {t:.2} s")
                    })
            );
        }
    }
    let _ = writeln!(
        s,
        "\n  ratio = against the mean of the two unflooded windows (before and after); agent CPU is the target agent's,\n  attkr CPU the attacker's (same machine), % of one core; rcvbuf = datagrams the target's kernel dropped \
         because the agent's socket was full (data included);\n  sent/s = what the attacker got out, \
         echoed = cookie replies it answered;\n  control = the same attacker, its inits addressed to a prefix nobody routes, \
         dropped by the target's XDP at once (drop_unknown_peer); xdp shed/s = inits the target's XDP \
         handshake gate dropped."
    );
    s
}
