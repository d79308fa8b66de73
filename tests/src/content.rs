//! Content over a chain of agents: starting agents with TUN devices and dynamic routes,
//! making packages of random data (with a known plaintext sprinkled in), and driving
//! `myconet-ctl content` on the agents. Shared by the content tests, the demo and
//! `cargo xtask bench content`.

use std::{
    io::{Read, Write},
    net::Ipv6Addr,
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{
    agent::{AgentOptions, AgentProcess, CTL_BIN},
    scenario::json_str,
    topology::{Chain, Topology},
    util,
};

/// Underlay port of the content chains.
pub const PORT: u16 = 9651;
/// How long routes may take to converge along a chain.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// A marker that appears in every package these helpers make: it must never be seen
/// on a relay's wire.
pub const MARKER: &[u8] = b"MYCONET-CONTENT-PLAINTEXT-4be1";

/// A chain of agents, each with a TUN device, routing to every other node.
#[derive(Debug)]
pub struct ContentChain {
    /// Agents, by node index (dropped before the topology).
    pub agents: Vec<AgentProcess>,
    /// The namespaces and links.
    pub topo: Topology,
    /// Each node's overlay address.
    pub overlay: Vec<Ipv6Addr>,
    /// Each node's /64, `addr/64`.
    pub prefixes: Vec<String>,
}

impl ContentChain {
    /// Builds a chain of `nodes` (tag `tag`) with an agent on each; `extra(i)` are node
    /// i's extra flags. Every node names its neighbours as peers and the routing
    /// protocol spreads every /64; returns once every node routes to every other.
    pub fn start(
        bin_dir: &Path,
        nodes: usize,
        tag: &str,
        extra: impl Fn(usize) -> Vec<String>,
    ) -> Result<Self> {
        let topo = Chain::new(nodes).tag(tag).build()?;
        let mut agents = Vec::new();
        for i in 0..nodes {
            let mut extra_args = vec!["--hello-interval-ms".to_owned(), "300".to_owned()];
            extra_args.extend(extra(i));
            agents.push(AgentProcess::start(
                topo.node(i),
                bin_dir,
                AgentOptions {
                    port: PORT,
                    extra_args,
                    ..AgentOptions::default()
                },
            )?);
        }
        for (i, agent) in agents.iter().enumerate() {
            for (_, addr) in topo.node(i).neighbours() {
                agent.ctl(&["peers", "add", &addr.to_string()])?;
            }
        }
        let mut overlay = Vec::new();
        let mut prefixes = Vec::new();
        for a in &agents {
            let s = a.status()?;
            overlay.push(json_str(&s, "node_address")?.parse()?);
            prefixes.push(json_str(&s, "node_prefix")?.to_owned());
        }
        let chain = Self {
            agents,
            topo,
            overlay,
            prefixes,
        };
        chain.wait_routes()?;
        Ok(chain)
    }

    /// Waits until every node has a routing-protocol route to every other node's /64.
    pub fn wait_routes(&self) -> Result<()> {
        for (i, agent) in self.agents.iter().enumerate() {
            util::poll(
                "routes to every node",
                CONVERGE_TIMEOUT,
                Duration::from_millis(100),
                || {
                    let routes = agent.ctl_json(&["routes"])?;
                    let rows = routes["routes"].as_array().cloned().unwrap_or_default();
                    let all = self.prefixes.iter().enumerate().all(|(j, p)| {
                        j == i
                            || rows.iter().any(|r| {
                                r["prefix"] == p.as_str()
                                    && r["agent"]["origin"] == "routing"
                                    && r["in_sync"] == true
                            })
                    });
                    Ok(all.then_some(()))
                },
            )
            .with_context(|| format!("node {i}: {:?}", agent.ctl(&["routes"]).ok()))?;
        }
        Ok(())
    }

    /// `myconet-ctl <args>` on node `i` with a time limit, as the raw output (checked
    /// exit status).
    pub fn ctl(&self, i: usize, args: &[&str], timeout: Duration) -> Result<std::process::Output> {
        ctl_raw(&self.agents[i], args, timeout)
    }

    /// `content add` on node `i`; returns the MRI.
    pub fn add(&self, i: usize, args: &[&str]) -> Result<String> {
        let mut full = vec!["--json", "content", "add"];
        full.extend_from_slice(args);
        let out = self.ctl(i, &full, Duration::from_secs(300))?;
        let v: Value = serde_json::from_slice(&out.stdout).context("content add --json")?;
        Ok(json_str(&v, "mri")?.to_owned())
    }

    /// The provider argument for node `j`.
    pub fn provider(&self, j: usize) -> String {
        self.overlay[j].to_string()
    }

    /// `content get MRI --from …` on node `i` (to `out` if given); returns the last
    /// progress (state "done"), or the error.
    pub fn get(&self, i: usize, mri: &str, from: &[usize], out: Option<&Path>) -> Result<Value> {
        let mut args: Vec<String> =
            vec!["--json".into(), "content".into(), "get".into(), mri.into()];
        for &j in from {
            args.push("--from".into());
            args.push(self.provider(j));
        }
        if let Some(o) = out {
            args.push("-o".into());
            args.push(o.display().to_string());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.ctl(i, &refs, Duration::from_secs(600))?;
        last_json_line(&out.stdout)
    }

    /// `content stats` of node `i`.
    pub fn content_stats(&self, i: usize) -> Result<Value> {
        self.agents[i].ctl_json(&["content", "stats"])
    }
}

/// Runs `myconet-ctl --socket … <args>` for `agent` with a time limit.
pub fn ctl_raw(
    agent: &AgentProcess,
    args: &[&str],
    timeout: Duration,
) -> Result<std::process::Output> {
    let bin = crate::agent::bin_dir()?.join(CTL_BIN);
    let mut cmd = Command::new(bin);
    cmd.arg("--socket").arg(agent.socket_path()).args(args);
    util::run_checked(&mut cmd, timeout).map_err(|e| agent.with_log(e))
}

/// The last non-empty line of `stdout`, as JSON.
pub fn last_json_line(stdout: &[u8]) -> Result<Value> {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("no output")?;
    serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))
}

/// A named counter of `content stats --json`.
pub fn content_counter(stats: &Value, name: &str) -> Result<u64> {
    let list = stats["counters"]
        .as_array()
        .with_context(|| format!("no counters in {stats}"))?;
    let c = list
        .iter()
        .find(|c| c["name"] == name)
        .with_context(|| format!("no content counter {name:?} in {stats}"))?;
    Ok(match &c["value"] {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(s) => s.parse().unwrap_or(0),
        _ => 0,
    })
}

/// Writes `size` random bytes to `path`, with [`MARKER`] every 64 KiB.
pub fn random_file(path: &Path, size: u64) -> Result<()> {
    let mut src = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    let mut f = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut buf = vec![0u8; 64 << 10];
    let mut left = size;
    while left > 0 {
        let n = buf.len().min(usize::try_from(left).unwrap_or(buf.len()));
        src.read_exact(&mut buf[..n])?;
        if n > MARKER.len() * 2 {
            buf[n / 2..n / 2 + MARKER.len()].copy_from_slice(MARKER);
        }
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// Makes a package tree under `dir`: random binaries of the given sizes (`bin/N.bin`)
/// and a small website (`site/…`, text that repeats [`MARKER`], a stylesheet, images,
/// a link inside the tree). Returns the total size of its files.
pub fn package_tree(dir: &Path, binaries: &[u64]) -> Result<u64> {
    let mut total = 0;
    std::fs::create_dir_all(dir.join("bin"))?;
    for (i, &size) in binaries.iter().enumerate() {
        random_file(&dir.join(format!("bin/{i}.bin")), size)?;
        total += size;
    }
    let site = dir.join("site");
    std::fs::create_dir_all(site.join("css"))?;
    std::fs::create_dir_all(site.join("img"))?;
    std::fs::create_dir_all(site.join("about"))?;
    let mut page = String::from("<!doctype html><title>Myconet</title>\n");
    for i in 0..2000 {
        page.push_str(&format!(
            "<p>{} paragraph {i}</p>\n",
            String::from_utf8_lossy(MARKER)
        ));
    }
    let files: [(&str, &[u8]); 3] = [
        ("index.html", page.as_bytes()),
        ("css/site.css", b"body { font-family: sans-serif }\n"),
        ("about/index.html", b"<p>about</p>\n"),
    ];
    for (p, data) in files {
        std::fs::write(site.join(p), data)?;
        total += data.len() as u64;
    }
    for i in 0..4u64 {
        let size = 20_000 + i * 7_001;
        random_file(&site.join(format!("img/{i}.png")), size)?;
        total += size;
    }
    // A link inside the tree: added as the file it names.
    std::os::unix::fs::symlink("../index.html", site.join("about/home.html"))?;
    total += page.len() as u64;
    Ok(total)
}

/// Checks that every file under `want` is under `got` with the same bytes (links in
/// `want` compared as the files they name), and `got` has nothing more.
pub fn same_tree(want: &Path, got: &Path) -> Result<u64> {
    let mut files = 0;
    let mut want_names: Vec<_> = std::fs::read_dir(want)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    want_names.sort();
    let mut got_names: Vec<_> = std::fs::read_dir(got)
        .with_context(|| format!("reading {}", got.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    got_names.sort();
    ensure!(
        want_names == got_names,
        "{} holds {got_names:?}, expected {want_names:?}",
        got.display()
    );
    for name in want_names {
        let (w, g) = (want.join(&name), got.join(&name));
        let meta = std::fs::metadata(&w)?;
        if meta.is_dir() {
            files += same_tree(&w, &g)?;
        } else {
            ensure!(
                std::fs::symlink_metadata(&g)?.is_file(),
                "{} is not a regular file",
                g.display()
            );
            same_file(&w, &g)?;
            files += 1;
        }
    }
    Ok(files)
}

fn same_file(a: &Path, b: &Path) -> Result<()> {
    let (ma, mb) = (std::fs::metadata(a)?, std::fs::metadata(b)?);
    if ma.len() != mb.len() {
        bail!(
            "{} is {} bytes, {} is {}",
            b.display(),
            mb.len(),
            a.display(),
            ma.len()
        );
    }
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0u64;
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(());
        }
        fb.read_exact(&mut bb[..n])?;
        ensure!(
            ba[..n] == bb[..n],
            "{} differs from {} near byte {at}",
            b.display(),
            a.display()
        );
        at += n as u64;
    }
}
