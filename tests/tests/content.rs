//! Content across the overlay: packages added on one node and fetched on others through
//! relays that forward in XDP and see nothing; several providers; a download killed
//! half way and resumed; a corrupt provider; the quota; bad input; and the agent
//! killed at random moments of adds and downloads.
//!
//! Runs as root (CI is root): namespaces, agents with TUN devices, real veths. Each
//! test builds its own chain; the data lives in the test's temporary directory.

use std::{
    net::Ipv6Addr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use myconet_testbed::{
    agent::{AgentProcess, bin_dir, counter, counter_bytes},
    content::{
        ContentChain, MARKER, PORT, content_counter, ctl_raw, package_tree, random_file, same_tree,
    },
    traffic::{Capture, CaptureOptions, Direction},
    util::{self, TempDir},
};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const D: usize = 3;

fn s(p: &Path) -> Result<&str> {
    p.to_str().context("test paths are UTF-8")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// XDP on the relays of a chain (nodes 1 .. n-1), the agent's default elsewhere.
fn xdp_relays(n: usize) -> impl Fn(usize) -> Vec<String> {
    move |i| {
        if i > 0 && i + 1 < n {
            vec!["--dataplane".into(), "xdp".into()]
        } else {
            Vec::new()
        }
    }
}

/// Bytes of a package's distinct files (the site's link duplicates index.html).
fn distinct_bytes(detail: &Value) -> Result<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for f in detail["files"].as_array().context("files")? {
        if seen.insert(f["hash"].as_str().unwrap_or("").to_owned()) {
            total += json_u64(&f["size"]);
        }
    }
    Ok(total)
}

fn json_u64(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

/// The relay counters of one node: agent data packets, XDP relays (packets, bytes).
#[derive(Debug, Clone, Copy, Default)]
struct Relay {
    rx_data: u64,
    passed_up: u64,
    redirect: u64,
    redirect_bytes: u64,
}

fn relay_counts(agent: &AgentProcess) -> Result<Relay> {
    let s = agent.stats()?;
    Ok(Relay {
        rx_data: counter(&s, "agent", "rx_data")?,
        passed_up: counter(&s, "xdp", "pass_no_neighbour")?
            + counter(&s, "xdp", "pass_slow_path")?
            + counter(&s, "xdp", "pass_too_big")?,
        redirect: counter(&s, "xdp", "redirect")? + counter(&s, "xdp", "tx")?,
        redirect_bytes: counter_bytes(&s, "xdp", "redirect")? + counter_bytes(&s, "xdp", "tx")?,
    })
}

/// A chain a — b — c — d with b and c relaying in XDP: a 200 MB package added on a is
/// fetched on d byte for byte; b's and c's XDP programs relay every byte of it while
/// their agents receive none of its packets, and the package's known plaintext never
/// appears on their links. Then the package is on a and on c, and d (after removing
/// its copy) fetches from both: each delivers a share.
#[test]
fn a_package_crosses_two_xdp_relays_encrypted_and_byte_identical() -> Result<()> {
    let started = Instant::now();
    let chain = ContentChain::start(&bin_dir()?, 4, "cchain", xdp_relays(4))?;
    let dir = TempDir::new("content-chain")?;
    let src = dir.path().join("pkg");
    let size = package_tree(&src, &[110 * MIB, 60 * MIB, 29 * MIB])?;
    let t = Instant::now();
    let mri = chain.add(A, &[s(&src)?, "--title", "chain test", "--kind", "dataset"])?;
    let add_time = t.elapsed();
    let detail = chain.agents[A].ctl_json(&["content", "info", &mri])?;
    let distinct = distinct_bytes(&detail)?;

    // Every frame on b's and c's links passes one of these taps: a's link to b (a sends
    // from its stack) and d's link from c (d's XDP passes its own traffic up). Frames
    // between b and c are the same frames, relayed in XDP on both sides, invisible to
    // taps there. The marker is in every 64 KiB of the package, so the first 20,000
    // frames of each tap (28 MB) would show it hundreds of times were it in clear.
    let taps = [
        (A, chain.topo.node(A).iface_to(B)?.name.clone()),
        (D, chain.topo.node(D).iface_to(C)?.name.clone()),
    ];
    let captures = taps
        .iter()
        .map(|(n, ifname)| {
            Capture::start(
                chain.topo.node(*n).netns(),
                ifname,
                CaptureOptions {
                    udp_dst_port: Some(PORT),
                    direction: Direction::Any,
                    max_frames: 20_000,
                    max_duration: Duration::from_secs(300),
                },
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let before = [
        relay_counts(&chain.agents[B])?,
        relay_counts(&chain.agents[C])?,
    ];
    let out = dir.path().join("out-d");
    let t = Instant::now();
    let last = chain.get(D, &mri, &[A], Some(&out))?;
    let get_time = t.elapsed();
    let after = [
        relay_counts(&chain.agents[B])?,
        relay_counts(&chain.agents[C])?,
    ];
    ensure!(last["state"] == "done", "d's download ended {last}");
    let files = same_tree(&src, &out)?;
    eprintln!(
        "{size} bytes in {files} files: add {add_time:?}, a → d {get_time:?} ({:.1} MB/s)",
        size as f64 / get_time.as_secs_f64() / 1e6
    );
    std::fs::remove_dir_all(&out)?;

    for (name, b, a) in [("b", before[0], after[0]), ("c", before[1], after[1])] {
        let rx = a.rx_data - b.rx_data;
        let up = a.passed_up - b.passed_up;
        let relayed = a.redirect - b.redirect;
        let relayed_bytes = a.redirect_bytes - b.redirect_bytes;
        eprintln!(
            "{name}: XDP relayed {relayed} packets, {relayed_bytes} bytes; passed up {up}; agent rx_data {rx}"
        );
        // Every byte of the package crossed this relay inside XDP-relayed frames (with
        // TCP, IP and overlay headers on top).
        ensure!(
            relayed_bytes > size,
            "{name}'s XDP relayed {relayed_bytes} bytes for a {size}-byte package"
        );
        // Its agent saw only what XDP passed up for want of a neighbour entry (the
        // first packets after one expired): at most a handful, against >150,000.
        ensure!(
            rx <= up && rx <= 16,
            "{name}'s agent received {rx} data packets ({up} passed up by XDP) of {relayed}"
        );
    }
    let mut frames = 0;
    for cap in captures {
        for f in cap.stop()? {
            frames += 1;
            ensure!(
                !contains(&f.data, MARKER),
                "the package's plaintext is visible on a relay's link"
            );
        }
    }
    ensure!(frames >= 20_000, "the taps saw only {frames} frames");
    let d_stats = chain.content_stats(D)?;
    ensure!(content_counter(&d_stats, "fetch_data_bytes")? == distinct);
    ensure!(content_counter(&d_stats, "fetch_providers_corrupt")? == 0);

    // The package on a and on c; d fetches from both.
    chain.get(C, &mri, &[A], None)?;
    chain.ctl(D, &["content", "rm", &mri], Duration::from_secs(30))?;
    let t = Instant::now();
    let last = chain.get(D, &mri, &[A, C], Some(&out))?;
    let two_time = t.elapsed();
    same_tree(&src, &out)?;
    let shares: Vec<(String, u64)> = last["providers"]
        .as_array()
        .context("providers")?
        .iter()
        .map(|p| {
            (
                p["address"].as_str().unwrap_or("").to_owned(),
                json_u64(&p["delivered_bytes"]),
            )
        })
        .collect();
    eprintln!("a + c → d in {two_time:?}: {shares:?}");
    ensure!(shares.len() == 2, "two providers expected: {last}");
    ensure!(
        shares.iter().map(|s| s.1).sum::<u64>() == distinct,
        "the shares do not add up to the package: {shares:?}"
    );
    for (who, bytes) in &shares {
        ensure!(
            *bytes >= distinct / 10,
            "{who} delivered only {bytes} of {distinct} bytes: {shares:?}"
        );
    }
    eprintln!("test took {:?}", started.elapsed());
    Ok(())
}

/// Starts `content get` on `agent` in the background (its output discarded).
fn spawn_ctl(agent: &AgentProcess, args: &[&str]) -> Result<Child> {
    Command::new(bin_dir()?.join("myconet-ctl"))
        .arg("--socket")
        .arg(agent.socket_path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting myconet-ctl")
}

/// Waits (bounded) for a background `myconet-ctl` to end; kills it if it does not.
fn reap(mut child: Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("myconet-ctl did not end after its agent died")
}

/// d's agent is killed (SIGKILL) half way through a download; restarted, the download
/// resumes from what its store had verified and completes, and what it fetches again
/// is measured from counters: on d, the bytes it had verified before the kill that the
/// store had not yet committed (what a crash loses); on the provider, everything sent
/// beyond one copy (proofs, the loss, and what was in flight when d died).
#[test]
fn a_download_killed_half_way_resumes_and_fetches_again_little() -> Result<()> {
    let mut chain = ContentChain::start(&bin_dir()?, 2, "cresume", |_| Vec::new())?;
    let dir = TempDir::new("content-resume")?;
    let src = dir.path().join("pkg");
    std::fs::create_dir_all(&src)?;
    random_file(&src.join("one.bin"), 120 * MIB)?;
    random_file(&src.join("two.bin"), 80 * MIB)?;
    let size = 200 * MIB;
    let mri = chain.add(A, &[s(&src)?])?;
    let get = spawn_ctl(
        &chain.agents[B],
        &["content", "get", &mri, "--from", &chain.provider(A)],
    )?;
    let verified = util::poll(
        "half the package",
        Duration::from_secs(300),
        Duration::from_millis(10),
        || {
            let v = content_counter(&chain.content_stats(B)?, "fetch_data_bytes")?;
            Ok((v >= size / 2).then_some(v))
        },
    )?;
    chain.agents[B].kill_and_restart(chain.topo.node(B).netns())?;
    reap(get)?;
    chain.wait_routes()?;
    let last = chain.get(B, &mri, &[A], Some(&dir.path().join("out")))?;
    same_tree(&src, &dir.path().join("out"))?;
    let resumed = json_u64(&last["resumed_bytes"]);
    let lost = verified.saturating_sub(resumed);
    let a = chain.content_stats(A)?;
    let sent = content_counter(&a, "serve_bytes")?;
    let data = content_counter(&a, "serve_data_bytes")?;
    let proof = content_counter(&a, "serve_proof_bytes")?;
    eprintln!(
        "verified before the kill ≥ {verified}, resumed {resumed}: lost {lost} ({:.3} %); \
         a sent {sent} bytes ({data} data in whole streams, {proof} proofs) for {size}: \
         {:.3} % beyond one copy",
        lost as f64 * 100.0 / size as f64,
        (sent as f64 / size as f64 - 1.0) * 100.0
    );
    ensure!(
        resumed >= size / 2 - size / 100,
        "only {resumed} bytes resumed"
    );
    ensure!(
        lost <= size / 100,
        "{lost} verified bytes were lost by the kill"
    );
    // Beyond one copy: proofs (0.4 %), the loss, and at most what was in flight: four
    // 1 MiB units, the driver's queue and the sockets' buffers.
    ensure!(
        sent <= size + size / 200 + size / 100 + 12 * MIB,
        "a sent {sent} bytes for a {size}-byte package"
    );
    Ok(())
}

/// A provider that serves corrupt data (a test-only fault flag flips a byte in every
/// data frame it sends) is detected, counted and dropped; the download completes from
/// the honest provider. A blob corrupted on disk is found by `content verify`.
#[test]
fn a_corrupt_provider_is_dropped_and_the_honest_one_completes() -> Result<()> {
    let chain = ContentChain::start(&bin_dir()?, 3, "ccorrupt", |i| {
        if i == C {
            vec!["--content-fault-corrupt".into()]
        } else {
            Vec::new()
        }
    })?;
    let dir = TempDir::new("content-corrupt")?;
    let src = dir.path().join("pkg");
    let size = package_tree(&src, &[24 * MIB])?;
    let mri = chain.add(A, &[s(&src)?])?;
    // c fetches honestly (its fault is in serving only).
    chain.get(C, &mri, &[A], None)?;
    // b asks the faulty c first, then a.
    let out = dir.path().join("out");
    let last = chain.get(B, &mri, &[C, A], Some(&out))?;
    same_tree(&src, &out)?;
    let b = chain.content_stats(B)?;
    let dropped: Vec<&Value> = last["providers"]
        .as_array()
        .context("providers")?
        .iter()
        .filter(|p| p["dropped"].as_str().is_some_and(|d| !d.is_empty()))
        .collect();
    eprintln!("dropped: {dropped:?}");
    ensure!(
        content_counter(&b, "fetch_providers_corrupt")? == 1,
        "b counted {} corrupt providers",
        content_counter(&b, "fetch_providers_corrupt")?
    );
    ensure!(
        dropped.len() == 1
            && dropped[0]["address"]
                .as_str()
                .is_some_and(|a| a.contains(&chain.provider(C)))
            && dropped[0]["dropped"]
                .as_str()
                .is_some_and(|d| d.contains("verification")),
        "c should be dropped for failing verification: {last}"
    );
    let _ = size;

    // A blob corrupted on a's disk: verify finds it, names it, and exits non-zero.
    let blobs = chain.agents[A].state_dir().join("store/blobs");
    let victim = find_data_file(&blobs, 24 * MIB)?;
    let mut bytes = std::fs::read(&victim)?;
    bytes[12345] ^= 0xff;
    std::fs::write(&victim, &bytes)?;
    let out = util::run_with_timeout(
        Command::new(bin_dir()?.join("myconet-ctl"))
            .arg("--socket")
            .arg(chain.agents[A].socket_path())
            .args(["--json", "content", "verify"]),
        Duration::from_secs(60),
    )?;
    ensure!(!out.status.success(), "verify of a corrupt store exited 0");
    let report: Value = serde_json::from_slice(&out.stdout).context("verify --json")?;
    ensure!(
        report["corrupt"].as_array().is_some_and(|c| c.len() == 1),
        "verify should report one corrupt file: {report}"
    );
    Ok(())
}

/// The data file of `size` bytes under the store's `blobs/`.
fn find_data_file(blobs: &Path, size: u64) -> Result<std::path::PathBuf> {
    for shard in std::fs::read_dir(blobs)? {
        let shard = shard?.path();
        if !shard.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&shard)? {
            let p = f?.path();
            if p.extension().is_some_and(|e| e == "data") && std::fs::metadata(&p)?.len() == size {
                return Ok(p);
            }
        }
    }
    bail!("no {size}-byte data file under {}", blobs.display())
}

/// A fetch beyond the store's quota fails with an error naming storage.max_bytes and
/// leaves the pinned package intact.
#[test]
fn a_fetch_beyond_the_quota_fails_clearly_and_pinned_data_stays() -> Result<()> {
    let chain = ContentChain::start(&bin_dir()?, 2, "cquota", |i| {
        if i == B {
            vec!["--storage-max-bytes".into(), "48MiB".into()]
        } else {
            Vec::new()
        }
    })?;
    let dir = TempDir::new("content-quota")?;
    let (p1, p2) = (dir.path().join("p1"), dir.path().join("p2"));
    std::fs::create_dir_all(&p1)?;
    std::fs::create_dir_all(&p2)?;
    random_file(&p1.join("small.bin"), 16 * MIB)?;
    random_file(&p2.join("large.bin"), 40 * MIB)?;
    let m1 = chain.add(A, &[s(&p1)?])?;
    let m2 = chain.add(A, &[s(&p2)?])?;
    chain.get(B, &m1, &[A], None)?;
    let err = chain
        .get(B, &m2, &[A], None)
        .expect_err("a fetch beyond the quota must fail");
    let text = format!("{err:#}");
    ensure!(
        text.contains("storage.max_bytes") && text.contains("would be exceeded"),
        "the error should name the quota: {text}"
    );
    let list = chain.agents[B].ctl_json(&["content", "ls"])?;
    let pkgs = list["packages"].as_array().context("packages")?;
    ensure!(pkgs.len() == 1 && pkgs[0]["mri"] == m1.as_str(), "{list}");
    ensure!(
        pkgs[0]["complete"] == true && pkgs[0]["pinned"] == true,
        "{list}"
    );
    let used = json_u64(&list["usage"]["used"]);
    ensure!(used <= 48 * MIB, "the store uses {used} bytes of 48 MiB");
    let out = dir.path().join("out");
    chain.ctl(
        B,
        &["content", "get", &m1, "-o", s(&out)?],
        Duration::from_secs(60),
    )?;
    same_tree(&p1, &out)?;
    Ok(())
}

/// Runs `myconet-ctl` on `agent` expecting failure; returns its stderr.
fn refused(agent: &AgentProcess, args: &[&str]) -> Result<String> {
    let out = util::run_with_timeout(
        Command::new(bin_dir()?.join("myconet-ctl"))
            .arg("--socket")
            .arg(agent.socket_path())
            .args(args),
        Duration::from_secs(60),
    )?;
    ensure!(
        !out.status.success(),
        "myconet-ctl {} succeeded: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Every bad input gets an error that says what is wrong (and a non-zero exit), and
/// none of them harms the agent.
#[test]
fn bad_input_gets_clear_errors_and_never_harms_the_agent() -> Result<()> {
    let chain = ContentChain::start(&bin_dir()?, 2, "cbad", |_| Vec::new())?;
    let dir = TempDir::new("content-bad")?;
    let good = dir.path().join("good");
    std::fs::create_dir_all(&good)?;
    std::fs::write(good.join("a.txt"), "a")?;
    let mri = chain.add(A, &[s(&good)?])?;
    let unknown = format!("mri:{}", "a".repeat(52));
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub"))?;
    std::fs::write(tree.join("sub/f"), "f")?;
    std::fs::write(dir.path().join("outside"), "x")?;
    std::os::unix::fs::symlink("../../outside", tree.join("sub/escape"))?;
    let fifo_dir = dir.path().join("fifo");
    std::fs::create_dir_all(&fifo_dir)?;
    let status = Command::new("mkfifo").arg(fifo_dir.join("p")).status()?;
    ensure!(status.success());
    let exists = dir.path().join("exists");
    std::fs::create_dir_all(&exists)?;
    std::fs::write(exists.join("a.txt"), "mine")?;
    let long = "x".repeat(300);
    let desc = "d".repeat(70_000);
    let a = &chain.agents[A];
    let provider_b = chain.provider(B);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["content", "info", "mri:nonsense"], "not an MRI"),
        (vec!["content", "info", "MRI:abc"], "starts with \"mri:\""),
        (vec!["content", "info", &unknown], "not in the store"),
        (vec!["content", "pin", &unknown], "not in the store"),
        (vec!["content", "rm", "mri:"], "not an MRI"),
        (vec!["content", "cat", &mri], "names a package"),
        (vec!["content", "get", "mri:x"], "not an MRI"),
        (vec!["content", "get", &unknown], "no provider was named"),
        (
            vec!["content", "get", &unknown, "--from", "not-an-address"],
            "not an overlay address",
        ),
        (
            vec!["content", "get", &unknown, "--from", &provider_b],
            "no provider has the manifest",
        ),
        (vec!["content", "add", "/nonexistent/file"], "No such file"),
        (vec!["content", "add", s(&tree)?], "outside the package"),
        (vec!["content", "add", s(&fifo_dir)?], "not a regular file"),
        // Unreadable (the agent keeps no CAP_DAC_OVERRIDE after set-up, so opening
        // fails; with it, reading would): the error names the file and the cause.
        (vec!["content", "add", "/proc/1/mem"], "/proc/1/mem: "),
        (vec!["content", "add", s(&good)?, "--title", &long], "title"),
        (
            vec!["content", "add", s(&good)?, "--description", &desc],
            "description",
        ),
        (
            vec!["content", "add", s(&good)?, "--kind", "movie"],
            "not a kind",
        ),
        (
            vec!["content", "add", s(&good)?, "--lang", "english please"],
            "BCP 47",
        ),
        (
            vec!["content", "add", s(&good)?, "--licence", "MIT OR"],
            "SPDX",
        ),
        (vec!["content", "add"], "PATH"),
        (vec!["content", "get"], "MRI"),
        (vec!["content", "frobnicate"], "unrecognized subcommand"),
        (
            vec!["content", "get", &mri, "-o", s(&exists)?],
            "never overwrites",
        ),
    ];
    for (args, needle) in &cases {
        let err = refused(a, args)?;
        ensure!(
            err.contains(needle),
            "myconet-ctl {}: expected {needle:?} in: {err}",
            args.join(" ")
        );
    }
    // A package path with `..` cannot even be named.
    let err = refused(a, &["content", "cat", &format!("{mri}/../etc/passwd")])?;
    ensure!(err.contains("not an MRI"), "{err}");
    // Still serving, nothing panicked.
    let mut agents = chain.agents;
    for agent in &mut agents {
        ensure!(agent.is_running()?, "an agent died");
        agent.status()?;
        let log = std::fs::read_to_string(agent.log_path())?;
        ensure!(!log.contains("panicked"), "an agent panicked:\n{log}");
    }
    Ok(())
}

/// The agent SIGKILLed at random moments of adds and downloads, 50 times; after each
/// restart the store is checked through the agent: `verify` finds nothing, every
/// package it lists as complete is complete file by file, an added package is either
/// absent or complete. At the end every download is completed and every package here
/// reads back byte for byte. (The store's own kill test, myconet-store/tests/kill.rs,
/// kills a process driving the store directly, 120 times at random moments and at
/// chosen steps of its write path; this one kills the whole agent, so it also covers
/// the shell: staging from the API, the order of the fetch core's events into the
/// store, the reconciliation at start-up and the resume from `have`.)
#[test]
fn the_agent_killed_at_random_moments_of_adds_and_gets_keeps_its_store_consistent() -> Result<()> {
    const KILLS: usize = 50;
    let started = Instant::now();
    let mut chain = ContentChain::start(&bin_dir()?, 2, "ckill", |_| Vec::new())?;
    let dir = TempDir::new("content-kill")?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos() as u64
        | 1;
    eprintln!("seed {seed}");
    let mut rng = seed;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    // Packages on a for b to fetch.
    let mut pool = Vec::new();
    for k in 0..3 {
        let p = dir.path().join(format!("pool{k}"));
        std::fs::create_dir_all(&p)?;
        random_file(&p.join("big.bin"), (6 + 2 * k) * MIB)?;
        random_file(&p.join("small.bin"), 100_000 + k * 1000)?;
        let mri = chain.add(A, &[s(&p)?])?;
        pool.push((mri, p));
    }
    let mut added: Vec<std::path::PathBuf> = Vec::new();
    let a_overlay: Ipv6Addr = chain.overlay[A];
    for i in 0..KILLS {
        let child = if i % 2 == 0 {
            let p = dir.path().join(format!("add{i}"));
            std::fs::create_dir_all(&p)?;
            for f in 0..=next(3) {
                random_file(&p.join(format!("{f}.bin")), 200_000 + next(3 * MIB))?;
            }
            added.push(p.clone());
            spawn_ctl(&chain.agents[B], &["content", "add", s(&p)?])?
        } else {
            let (mri, _) = &pool[next(pool.len() as u64) as usize];
            // Start over from nothing now and then, else every download completes.
            let info = chain.agents[B].ctl_json(&["content", "ls"])?;
            let complete = info["packages"].as_array().is_some_and(|l| {
                l.iter()
                    .any(|p| p["mri"] == mri.as_str() && p["complete"] == true)
            });
            if complete {
                chain.ctl(B, &["content", "rm", mri], Duration::from_secs(30))?;
            }
            chain.wait_routes()?;
            spawn_ctl(
                &chain.agents[B],
                &["content", "get", mri, "--from", &a_overlay.to_string()],
            )?
        };
        std::thread::sleep(Duration::from_millis(next(400)));
        chain.agents[B].kill_and_restart(chain.topo.node(B).netns())?;
        reap(child)?;
        check_store(&chain.agents[B]).with_context(|| format!("after kill {i} (seed {seed})"))?;
    }
    // Everything completes and reads back.
    chain.wait_routes()?;
    for (k, (mri, src)) in pool.iter().enumerate() {
        let out = dir.path().join(format!("out-pool{k}"));
        chain.get(B, mri, &[A], Some(&out))?;
        same_tree(src, &out)?;
    }
    let list = chain.agents[B].ctl_json(&["content", "ls"])?;
    let mut checked = 0;
    for p in list["packages"].as_array().context("packages")? {
        let mri = p["mri"].as_str().context("mri")?;
        if pool.iter().any(|(m, _)| m == mri) {
            continue;
        }
        let detail = chain.agents[B].ctl_json(&["content", "info", mri])?;
        let out = dir.path().join(format!("out-added{checked}"));
        chain.ctl(
            B,
            &["content", "get", mri, "-o", s(&out)?],
            Duration::from_secs(60),
        )?;
        let names: Vec<&str> = detail["files"]
            .as_array()
            .context("files")?
            .iter()
            .filter_map(|f| f["path"].as_str())
            .collect();
        let src = added
            .iter()
            .find(|p| {
                let mut have: Vec<String> = std::fs::read_dir(p)
                    .map(|d| {
                        d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                have.sort();
                have == names && same_tree(p, &out).is_ok()
            })
            .with_context(|| format!("{mri} matches no added tree"))?;
        let _ = src;
        checked += 1;
    }
    eprintln!(
        "{KILLS} kills; {checked} added packages survived and read back; took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// The store's invariants, seen through the agent.
fn check_store(agent: &AgentProcess) -> Result<()> {
    let v = ctl_raw(
        agent,
        &["--json", "content", "verify"],
        Duration::from_secs(60),
    )?;
    let v: Value = serde_json::from_slice(&v.stdout)?;
    ensure!(
        v["corrupt"].as_array().is_none_or(Vec::is_empty),
        "verify found corruption: {v}"
    );
    let list = agent.ctl_json(&["content", "ls"])?;
    for p in list["packages"].as_array().context("packages")? {
        let mri = p["mri"].as_str().context("mri")?;
        let detail = agent.ctl_json(&["content", "info", mri])?;
        let files = detail["files"].as_array().context("files")?;
        let all = files.iter().all(|f| f["complete"] == true);
        ensure!(
            (p["complete"] == true) == all,
            "{mri} is listed complete={} but its files say {all}: {detail}",
            p["complete"]
        );
        let verified: u64 = files.iter().map(|f| json_u64(&f["verified_bytes"])).sum();
        ensure!(
            verified <= json_u64(&p["total_size"]),
            "{mri}: more verified than its size"
        );
    }
    let usage = &list["usage"];
    ensure!(
        json_u64(&usage["staging_bytes"]) == 0,
        "staging left after a restart: {usage}"
    );
    Ok(())
}

/// What one hostile connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hostile {
    /// Asks for a whole blob and never reads.
    Stall,
    /// Asks for a whole blob and reads one byte per tick.
    SlowReader,
    /// Sends a request one byte per tick (slowloris).
    Trickle,
    /// Asks one small question, reads the answer, then says nothing.
    Idle,
}

/// A hostile requester's connection, opened from node `from`'s namespace (so its source
/// is that node's overlay address, which the overlay authenticates).
struct HostileConn {
    kind: Hostile,
    stream: std::net::TcpStream,
    /// The request written a byte per tick (trickle) and how much of it went.
    pending: Vec<u8>,
    sent: usize,
    closed: Option<Duration>,
}

/// Whether the server closed or reset `stream` (seen without reading from it).
fn peer_closed(stream: &std::net::TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; no wait.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Reads one whole frame (blocking, bounded by the stream's read timeout).
fn read_one_frame(stream: &mut std::net::TcpStream) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut header = [0u8; 8];
    stream.read_exact(&mut header)?;
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok([&header[..], &body].concat())
}

/// The agent's resident memory in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    line.split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()
        .context("VmRSS")
}

/// How many of `pid`'s open files are `path` (or what was `path`, deleted since).
fn open_count(pid: u32, path: &Path) -> Result<usize> {
    let want = path.display().to_string();
    let mut n = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(fd?.path()) else {
            continue;
        };
        let t = target.display().to_string();
        if t == want || t == format!("{want} (deleted)") {
            n += 1;
        }
    }
    Ok(n)
}

/// Hostile requesters cannot hold the provider's connections, memory or files: from b,
/// one node opens all 8 connections it may to a's content port and stalls them four
/// ways (asks for a whole 24 MiB blob and never reads; reads a byte per tick; sends a
/// request a byte per tick; asks once and then says nothing). a closes each within its
/// deadline (short ones set in its config: 2 s for a request, 3 s idle, 4 s without a
/// byte taken), counts each reason, lets go of the stalled blob's file while those
/// connections are still open, and keeps its memory bounded, while c fetches a package
/// through the remaining slot byte for byte; afterwards b gets all its slots back.
#[test]
fn hostile_requesters_are_cut_off_by_the_deadlines_and_an_honest_one_is_served() -> Result<()> {
    use myconet_content::{
        GroupSet, Hash,
        verified::group_count,
        wire::{HaveTarget, Message},
    };
    use std::io::{Read, Write};

    let dir = TempDir::new("content-hostile")?;
    let config = dir.path().join("a.toml");
    std::fs::write(
        &config,
        "[content]\nmax_connections = 9\nrequest_timeout_secs = 2\nidle_timeout_secs = 3\n\
         write_timeout_secs = 4\n",
    )?;
    let cfg = s(&config)?.to_owned();
    let chain = ContentChain::start(&bin_dir()?, 3, "chostile", move |i| {
        if i == A {
            vec!["--config".into(), cfg.clone()]
        } else {
            Vec::new()
        }
    })?;
    let stall_src = dir.path().join("stall");
    std::fs::create_dir_all(&stall_src)?;
    let stall_size = 24 * MIB;
    random_file(&stall_src.join("big.bin"), stall_size)?;
    let stall_mri = chain.add(A, &[s(&stall_src)?])?;
    let honest_src = dir.path().join("honest");
    package_tree(&honest_src, &[8 * MIB])?;
    let honest_mri = chain.add(A, &[s(&honest_src)?])?;
    let info = chain.agents[A].ctl_json(&["content", "info", &stall_mri])?;
    let file = &info["files"][0];
    let blob: Hash = file["hash"]
        .as_str()
        .context("hash")?
        .parse()
        .map_err(|e| anyhow::anyhow!("blob hash: {e:?}"))?;
    ensure!(json_u64(&file["size"]) == stall_size, "{info}");
    let data_file = find_data_file(&chain.agents[A].state_dir().join("store/blobs"), stall_size)?;
    let a_pid = chain.agents[A].pid();
    let whole = Message::GetGroups {
        id: 1,
        blob,
        size: stall_size,
        groups: GroupSet::all(group_count(stall_size)),
    }
    .to_bytes();
    let have = Message::GetHave {
        id: 1,
        target: HaveTarget::Blob {
            hash: blob,
            size: stall_size,
        },
    }
    .to_bytes();
    let a_addr = std::net::SocketAddr::from((
        chain.overlay[A],
        myconet_agent::shell::content::settings::DEFAULT_CONTENT_PORT,
    ));
    let connect = |n: usize| -> Result<Vec<std::net::TcpStream>> {
        chain.topo.node(B).netns().run_in(|| {
            (0..n)
                .map(|_| {
                    std::net::TcpStream::connect_timeout(&a_addr, Duration::from_secs(10))
                        .context("connecting to a's content port")
                })
                .collect::<Result<Vec<_>>>()
        })?
    };
    let baseline_rss = rss_kib(a_pid)?;
    let before = chain.content_stats(A)?;

    let kinds = [
        Hostile::Stall,
        Hostile::Stall,
        Hostile::Stall,
        Hostile::Stall,
        Hostile::SlowReader,
        Hostile::Trickle,
        Hostile::Trickle,
        Hostile::Idle,
    ];
    let started = Instant::now();
    let mut conns = Vec::new();
    for (kind, mut stream) in kinds.into_iter().zip(connect(kinds.len())?) {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut pending = Vec::new();
        match kind {
            Hostile::Stall | Hostile::SlowReader => stream.write_all(&whole)?,
            Hostile::Trickle => pending = have.clone(),
            Hostile::Idle => {
                stream.write_all(&have)?;
                let reply = read_one_frame(&mut stream)?;
                ensure!(reply[1] == 0x84, "a have reply, got type {:#x}", reply[1]);
            }
        }
        stream.set_nonblocking(true)?;
        conns.push(HostileConn {
            kind,
            stream,
            pending,
            sent: 0,
            closed: None,
        });
    }

    // The honest node fetches meanwhile, through the slot the hostile one left.
    let honest_out = dir.path().join("honest-out");
    let (peak_rss, released_while_stalled) = std::thread::scope(|scope| -> Result<_> {
        let honest = scope.spawn(|| chain.get(C, &honest_mri, &[A], Some(&honest_out)));
        let mut peak = baseline_rss;
        let mut released = false;
        let limit = Duration::from_secs(30);
        while conns.iter().any(|c| c.closed.is_none()) && started.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(250));
            for c in conns.iter_mut().filter(|c| c.closed.is_none()) {
                match c.kind {
                    Hostile::Trickle
                        if c.sent < c.pending.len()
                            && c.stream.write(&c.pending[c.sent..=c.sent]).is_ok() =>
                    {
                        c.sent += 1;
                    }
                    Hostile::SlowReader => {
                        let _ = c.stream.read(&mut [0u8; 1]);
                    }
                    _ => {}
                }
                if peer_closed(&c.stream) {
                    c.closed = Some(started.elapsed());
                }
            }
            peak = peak.max(rss_kib(a_pid)?);
            // Once the stalled streams have opened the blob, a lets go of its file
            // while they are still open.
            let stalled_open = conns
                .iter()
                .any(|c| c.kind == Hostile::Stall && c.closed.is_none());
            let streams = content_counter(&chain.content_stats(A)?, "serve_groups_requests")?
                - content_counter(&before, "serve_groups_requests")?;
            if stalled_open && streams >= 5 && open_count(a_pid, &data_file)? == 0 {
                released = true;
            }
        }
        let got = honest
            .join()
            .map_err(|_| anyhow::anyhow!("the honest get panicked"))?;
        got.context("the honest node's fetch during the attack")?;
        Ok((peak, released))
    })?;
    for c in &conns {
        eprintln!("{:?}: closed after {:?}", c.kind, c.closed);
    }
    // Each deadline plus a margin for a loaded machine.
    for c in &conns {
        let bound = match c.kind {
            Hostile::Trickle => Duration::from_secs(2 + 8),
            Hostile::Idle => Duration::from_secs(3 + 8),
            Hostile::Stall | Hostile::SlowReader => Duration::from_secs(4 + 8),
        };
        ensure!(
            c.closed.is_some_and(|t| t <= bound),
            "a held a {:?} connection for {:?} (bound {bound:?})",
            c.kind,
            c.closed
        );
    }
    same_tree(&honest_src, &honest_out)?;
    let after = chain.content_stats(A)?;
    let moved = |name: &str| -> Result<u64> {
        Ok(content_counter(&after, name)? - content_counter(&before, name)?)
    };
    eprintln!(
        "timeouts: request {} idle {} write {} rate {}; rss {} -> {} KiB",
        moved("serve_timeouts_request")?,
        moved("serve_timeouts_idle")?,
        moved("serve_timeouts_write")?,
        moved("serve_timeouts_rate")?,
        baseline_rss,
        peak_rss
    );
    ensure!(moved("serve_timeouts_request")? >= 2, "{after}");
    ensure!(moved("serve_timeouts_idle")? >= 1, "{after}");
    ensure!(
        moved("serve_timeouts_write")? + moved("serve_timeouts_rate")? >= 5,
        "{after}"
    );
    ensure!(
        released_while_stalled,
        "a kept the stalled blob's file open for as long as the stalled connections"
    );
    // Memory: what the stalls and the honest fetch cost a stays small (each stalled
    // connection buffers at most one 256 KiB batch and one frame).
    ensure!(
        peak_rss.saturating_sub(baseline_rss) < 64 << 10,
        "a's RSS grew from {baseline_rss} KiB to {peak_rss} KiB"
    );
    // The slots are free again: b's node may open all 8 and is answered on each.
    let refused = content_counter(&after, "serve_connections_refused")?;
    for mut stream in connect(8)? {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(&have)?;
        let reply = read_one_frame(&mut stream)?;
        ensure!(reply[1] == 0x84, "a have reply, got type {:#x}", reply[1]);
    }
    ensure!(
        content_counter(&chain.content_stats(A)?, "serve_connections_refused")? == refused,
        "a refused one of b's connections after the deadlines freed them"
    );
    Ok(())
}
