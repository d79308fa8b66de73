//! `cargo xtask bench content`: the content layer's figures in one run, as ratios
//! against the raw operations beside them (see `myconet_testbed::content_bench`),
//! printed as a table and saved as `target/bench/content.json`.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use myconet_testbed::content_bench::{self, ContentBench};

use crate::cmd;

/// Runs the benchmark with release binaries.
pub fn run(root: &Path, mib: u64, iperf_seconds: u64) -> Result<()> {
    let target = cmd::target_dir(root)?;
    let r = content_bench::run(&target.join("release"), mib << 20, iperf_seconds)?;
    let report = render(&r);
    println!("\n{report}");
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::json!({
        "bytes": r.bytes,
        "blake3_seconds": r.blake3_seconds,
        "raw_write_seconds": r.raw_write_seconds,
        "add_seconds": r.add_seconds,
        "iperf_bps": r.iperf_bps,
        "fetch_seconds": r.fetch_seconds,
        "proof_share": r.proof_share,
        "first_byte_seconds": r.first_byte_seconds,
        "small_total_seconds": r.small_total_seconds,
        "small_cli_seconds": r.small_cli_seconds,
        "lost_share": r.lost_share,
        "resent_share": r.resent_share,
        "serve_peak_rss": r.serve_peak_rss,
        "fetch_peak_rss": r.fetch_peak_rss,
        "idle_rss": r.idle_rss,
    });
    let path = dir.join("content.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("saved {}", path.display());
    Ok(())
}

fn mib_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds / (1 << 20) as f64
}

fn render(r: &ContentBench) -> String {
    let mut s = String::new();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let blake3 = mib_s(r.bytes, r.blake3_seconds);
    let raw = mib_s(r.bytes, r.raw_write_seconds);
    let add = mib_s(r.bytes, r.add_seconds);
    let fetch = mib_s(r.bytes, r.fetch_seconds);
    let iperf = r.iperf_bps / 8.0 / (1 << 20) as f64;
    let _ = writeln!(
        s,
        "Content, one run, {:.0} MiB file (release build)",
        mib(r.bytes)
    );
    let _ = writeln!(s, "  {:<46} {:>12} {:>12}", "case", "figure", "ratio");
    let _ = writeln!(
        s,
        "  {:<46} {:>8.0} MiB/s {:>12}",
        "raw BLAKE3 of the file", blake3, ""
    );
    let _ = writeln!(
        s,
        "  {:<46} {:>8.0} MiB/s {:>12}",
        "raw copy of the file + fsync", raw, ""
    );
    let _ = writeln!(
        s,
        "  {:<46} {:>8.0} MiB/s {:>5.2} / {:.2}",
        "content add (vs BLAKE3 / vs raw write)",
        add,
        add / blake3,
        add / raw
    );
    let _ = writeln!(
        s,
        "  {:<46} {:>8.0} MiB/s {:>12}",
        "iperf3 TCP a → c over the overlay", iperf, ""
    );
    let _ = writeln!(
        s,
        "  {:<46} {:>8.0} MiB/s {:>11.2}x",
        "content get a → c (vs iperf3; goal ≥ 0.90)",
        fetch,
        fetch / iperf
    );
    let _ = writeln!(
        s,
        "  {:<46} {:>10.3} % {:>12}",
        "proof bytes / data (goal ≤ 0.5 %)",
        r.proof_share * 100.0,
        ""
    );
    let _ = writeln!(
        s,
        "  {:<46} {:>9.1} ms {:>12}",
        "1 MB package: first verified byte",
        r.first_byte_seconds * 1e3,
        ""
    );
    let _ = writeln!(
        s,
        "  {:<46} {:>9.1} ms {:>12}",
        "1 MB package: complete (download / CLI)",
        r.small_total_seconds * 1e3,
        format!("{:.1} ms", r.small_cli_seconds * 1e3)
    );
    let _ = writeln!(
        s,
        "  {:<46} {:>10.3} % {:>12}",
        "killed half way: verified bytes lost",
        r.lost_share * 100.0,
        ""
    );
    let _ = writeln!(
        s,
        "  {:<46} {:>10.3} % {:>12}",
        "killed half way: sent beyond one copy",
        r.resent_share * 100.0,
        ""
    );
    let _ = writeln!(
        s,
        "  {:<46} {:>8.1} MiB {:>12}",
        "peak RSS, serving agent (idle before)",
        mib(r.serve_peak_rss),
        format!("{:.1} MiB", mib(r.idle_rss[0]))
    );
    let _ = writeln!(
        s,
        "  {:<46} {:>8.1} MiB {:>12}",
        "peak RSS, fetching agent (idle before)",
        mib(r.fetch_peak_rss),
        format!("{:.1} MiB", mib(r.idle_rss[1]))
    );
    s
}
