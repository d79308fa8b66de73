//! `cargo xtask bench failover`: how long a ping stream across the diamond a — b|c — d
//! is interrupted when the relay carrying it is killed, over several runs, and what the
//! links' steady-state control traffic costs, for one or more builds side by side
//! (runs interleaved, so every build sees the same machine load). Printed as a table
//! and saved as `target/bench/failover.json`.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use myconet_testbed::bench::{self, ControlTraffic, FailoverRun};

/// One build's results.
struct Variant {
    bin_dir: PathBuf,
    runs: Vec<FailoverRun>,
    control: Option<ControlTraffic>,
}

/// Runs the benchmark: `runs` failovers per build in `bin_dirs`, then `control` of
/// idle control traffic per build (none if zero). `extra` goes to every agent.
pub fn run(
    target: &std::path::Path,
    bin_dirs: &[PathBuf],
    extra: &[String],
    runs: u32,
    control: Duration,
) -> Result<()> {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut variants: Vec<Variant> = bin_dirs
        .iter()
        .map(|d| Variant {
            bin_dir: d.clone(),
            runs: Vec::new(),
            control: None,
        })
        .collect();
    for i in 0..runs {
        for v in &mut variants {
            println!(
                "==> failover run {}/{runs} with {}",
                i + 1,
                v.bin_dir.display()
            );
            let run = bench::failover(&v.bin_dir, &extra, 1)?;
            for r in &run {
                println!(
                    "    outage {:?} (receiver silence {:?}, a rerouted after {:?}, {} probes lost)",
                    r.outage, r.arrival_gap, r.rerouted, r.lost
                );
            }
            v.runs.extend(run);
        }
    }
    if !control.is_zero() {
        for v in &mut variants {
            println!(
                "==> steady-state control traffic for {control:?} with {}",
                v.bin_dir.display()
            );
            v.control = Some(bench::control_traffic(&v.bin_dir, &extra, control)?);
        }
    }

    let report = render(&variants, &extra);
    println!("\n{report}");
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::json!({
        "agent_args": extra,
        "variants": variants.iter().map(|v| serde_json::json!({
            "bin_dir": v.bin_dir.display().to_string(),
            "failover": v.runs.iter().map(|r| serde_json::json!({
                "outage_s": r.outage.as_secs_f64(),
                "receiver_silence_s": r.arrival_gap.as_secs_f64(),
                "rerouted_s": r.rerouted.as_secs_f64(),
                "probes_lost": r.lost,
            })).collect::<Vec<_>>(),
            "control": v.control.as_ref().map(|c| serde_json::json!({
                "seconds": c.seconds,
                "link_directions": c.directions,
                "packets_per_s_per_direction": c.packets_per_direction(),
                "datagram_bytes_per_s_per_direction": c.bytes_per_direction(),
                "wire_bytes_per_s_per_direction": c.wire_bytes_per_direction(),
                "probes_sent": c.probes,
            })),
        })).collect::<Vec<_>>(),
    });
    let path = dir.join("failover.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("saved {}", path.display());
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn render(variants: &[Variant], extra: &[&str]) -> String {
    let mut s = String::new();
    let args = if extra.is_empty() {
        "default timers".to_string()
    } else {
        extra.join(" ")
    };
    let _ = writeln!(
        s,
        "Failover of a ping stream a ⇄ d when the active relay of the diamond is killed ({args}; seconds)"
    );
    let _ = writeln!(
        s,
        "  {:<44} {:>5} {:>6} {:>7} {:>6}   outages",
        "build", "runs", "min", "median", "max"
    );
    for v in variants {
        let mut o: Vec<Duration> = v.runs.iter().map(|r| r.outage).collect();
        o.sort_unstable();
        let (min, med, max) = match (o.first(), o.get(o.len() / 2), o.last()) {
            (Some(a), Some(b), Some(c)) => (secs(*a), secs(*b), secs(*c)),
            _ => ("-".into(), "-".into(), "-".into()),
        };
        let all: Vec<String> = v.runs.iter().map(|r| secs(r.outage)).collect();
        let _ = writeln!(
            s,
            "  {:<44} {:>5} {:>6} {:>7} {:>6}   {}",
            v.bin_dir.display().to_string(),
            o.len(),
            min,
            med,
            max,
            all.join(" ")
        );
    }
    if variants.iter().any(|v| v.control.is_some()) {
        let _ = writeln!(
            s,
            "\nSteady-state control traffic per link direction (hellos, acks, keepalives, routing), idle converged diamond"
        );
        let _ = writeln!(
            s,
            "  {:<44} {:>8} {:>10} {:>12} {:>12} {:>7}",
            "build", "seconds", "packets/s", "datagram B/s", "wire B/s", "probes"
        );
        for v in variants {
            if let Some(c) = &v.control {
                let _ = writeln!(
                    s,
                    "  {:<44} {:>8.1} {:>10.2} {:>12.1} {:>12.1} {:>7}",
                    v.bin_dir.display().to_string(),
                    c.seconds,
                    c.packets_per_direction(),
                    c.bytes_per_direction(),
                    c.wire_bytes_per_direction(),
                    c.probes
                );
            }
        }
    }
    s
}
