//! `cargo xtask bench content`: the content layer's figures, side by side in one run.
//!
//! - add: `content add` of one file against raw BLAKE3 hashing of the same bytes and a
//!   raw copy of them with fsync (what any add must at least do);
//! - fetch: a → c through b's XDP relay over the overlay, against iperf3 TCP over the
//!   same path just before;
//! - proofs: proof bytes sent as a share of the data;
//! - time to first byte of a package of one 1 MB file, and to its last;
//! - an interrupted download: c's agent SIGKILLed half way, restarted, the download
//!   resumed: what it fetched again;
//! - memory: peak resident set (VmHWM) of the serving and the fetching agents.

use std::{
    io::Read,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::{
    agent::{AgentProcess, CTL_BIN},
    content::{ContentChain, content_counter, random_file},
    throughput::{agent_pid, received_bps, run_client, start_server, warm_up},
    util::{self, TempDir},
};

/// Results of one run.
#[derive(Debug, Clone, Default)]
pub struct ContentBench {
    /// Bytes of the large file.
    pub bytes: u64,
    /// Seconds of raw BLAKE3 over the file (read from the page cache).
    pub blake3_seconds: f64,
    /// Seconds of a raw copy of the file with fsync.
    pub raw_write_seconds: f64,
    /// Seconds of `content add` of the file.
    pub add_seconds: f64,
    /// iperf3 TCP a → c over the overlay, bits per second.
    pub iperf_bps: f64,
    /// Seconds of `content get` of the package on c from a.
    pub fetch_seconds: f64,
    /// Proof bytes a sent, as a share of the data it sent.
    pub proof_share: f64,
    /// Seconds until the first verified byte of a 1 MB package was stored.
    pub first_byte_seconds: f64,
    /// Seconds until the 1 MB package was complete, as the download measured it.
    pub small_total_seconds: f64,
    /// Seconds of `myconet-ctl content get` of the 1 MB package, end to end.
    pub small_cli_seconds: f64,
    /// Verified bytes the interrupted download lost at the kill, share of the package.
    pub lost_share: f64,
    /// Bytes a sent beyond one copy over both halves, share of the package (proofs,
    /// the loss, and what was in flight at the kill).
    pub resent_share: f64,
    /// Peak resident set of a's agent (serving), bytes.
    pub serve_peak_rss: u64,
    /// Peak resident set of c's agent (fetching), bytes.
    pub fetch_peak_rss: u64,
    /// Resident set of a's and c's agents before the transfers, bytes.
    pub idle_rss: [u64; 2],
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// BLAKE3 of a file through a 1 MiB buffer.
fn blake3_file(path: &Path) -> Result<blake3::Hash> {
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// A field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} for {pid}"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("status line")?
        .parse()?;
    Ok(kib * 1024)
}

/// Resets the peak resident set of `pid` (VmHWM) to its current one.
fn reset_peak(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").context("clear_refs")
}

fn get_json(chain: &ContentChain, i: usize, mri: &str, from: usize) -> Result<Value> {
    chain.get(i, mri, &[from], None)
}

/// Runs the benchmark with the binaries in `bin_dir` on a package of `bytes`.
pub fn run(bin_dir_: &Path, bytes: u64, iperf_seconds: u64) -> Result<ContentBench> {
    let iperf3 = util::tool("iperf3");
    ensure!(
        iperf3.is_file(),
        "iperf3 not found (cargo xtask setup installs it)"
    );
    let mut r = ContentBench {
        bytes,
        ..ContentBench::default()
    };
    let dir = TempDir::new("content-bench")?;
    let big = dir.path().join("big.bin");
    eprintln!("==> {bytes} random bytes");
    random_file(&big, bytes)?;

    // Raw BLAKE3 (page cache, as the add reads it) and a raw copy with fsync.
    blake3_file(&big)?;
    let t = Instant::now();
    blake3_file(&big)?;
    r.blake3_seconds = secs(t);
    let t = Instant::now();
    let copy = dir.path().join("copy.bin");
    std::fs::copy(&big, &copy)?;
    std::fs::File::open(&copy)?.sync_all()?;
    r.raw_write_seconds = secs(t);
    std::fs::remove_file(&copy)?;

    eprintln!("==> chain a — b — c, b relaying in XDP");
    let mut chain = ContentChain::start(bin_dir_, 3, "cbench", |i| {
        if i == 1 {
            vec!["--dataplane".into(), "xdp".into()]
        } else {
            Vec::new()
        }
    })?;
    let (a_pid, c_pid) = (agent_pid(&chain.agents[0])?, agent_pid(&chain.agents[2])?);
    r.idle_rss = [proc_kib(a_pid, "VmRSS")?, proc_kib(c_pid, "VmRSS")?];

    eprintln!("==> add");
    let t = Instant::now();
    let mri = chain.add(0, &[big.to_str().context("utf8")?])?;
    r.add_seconds = secs(t);

    eprintln!("==> iperf3 a → c, {iperf_seconds} s");
    let (a, c) = (chain.topo.node(0), chain.topo.node(2));
    warm_up(a, chain.overlay[2])?;
    let logs = TempDir::new("content-bench-iperf")?;
    let server_log = logs.path().join("server.json");
    let mut server = start_server(c, &iperf3, chain.overlay[2], &server_log)?;
    let report = run_client(
        a,
        &iperf3,
        chain.overlay[0],
        chain.overlay[2],
        iperf_seconds,
    )?;
    r.iperf_bps = received_bps(&report)?;
    let _ = server.wait_timeout(Duration::from_secs(5));

    eprintln!("==> fetch a → c");
    reset_peak(a_pid)?;
    reset_peak(c_pid)?;
    let t = Instant::now();
    let last = get_json(&chain, 2, &mri, 0)?;
    r.fetch_seconds = secs(t);
    ensure!(last["state"] == "done", "{last}");
    r.serve_peak_rss = proc_kib(a_pid, "VmHWM")?;
    r.fetch_peak_rss = proc_kib(c_pid, "VmHWM")?;
    let s = chain.content_stats(0)?;
    let data = content_counter(&s, "serve_data_bytes")?;
    r.proof_share = content_counter(&s, "serve_proof_bytes")? as f64 / data.max(1) as f64;

    eprintln!("==> time to first byte of a 1 MB package");
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small)?;
    random_file(&small.join("one-megabyte.bin"), 1_000_000)?;
    let small_mri = chain.add(0, &[small.to_str().context("utf8")?])?;
    let t = Instant::now();
    let last = get_json(&chain, 2, &small_mri, 0)?;
    r.small_cli_seconds = secs(t);
    r.first_byte_seconds = last["first_byte_seconds"].as_f64().unwrap_or(f64::NAN);
    r.small_total_seconds = last["elapsed_seconds"].as_f64().unwrap_or(f64::NAN);

    eprintln!("==> interrupted download: c killed half way, restarted, resumed");
    chain.ctl(2, &["content", "rm", &mri], Duration::from_secs(60))?;
    let sent_before = content_counter(&chain.content_stats(0)?, "serve_bytes")?;
    let child = Command::new(bin_dir_.join(CTL_BIN))
        .arg("--socket")
        .arg(chain.agents[2].socket_path())
        .args(["content", "get", &mri, "--from", &chain.provider(0)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let verified = util::poll(
        "half the package",
        Duration::from_secs(600),
        Duration::from_millis(5),
        || {
            let v = content_counter(&chain.content_stats(2)?, "fetch_data_bytes")?;
            Ok((v >= bytes / 2).then_some(v))
        },
    )?;
    restart(&mut chain, 2)?;
    let mut child = child;
    let _ = child.wait();
    chain.wait_routes()?;
    let last = get_json(&chain, 2, &mri, 0)?;
    let resumed = last["resumed_bytes"].as_u64().unwrap_or(0);
    r.lost_share = verified.saturating_sub(resumed) as f64 / bytes as f64;
    let sent = content_counter(&chain.content_stats(0)?, "serve_bytes")? - sent_before;
    r.resent_share = sent as f64 / bytes as f64 - 1.0;
    Ok(r)
}

fn restart(chain: &mut ContentChain, i: usize) -> Result<()> {
    let ns = chain.topo.node(i).netns();
    let agent: &mut AgentProcess = &mut chain.agents[i];
    agent.kill_and_restart(ns)
}
