//! The store's throughput against the raw work it cannot avoid, side by side in one run
//! on the same bytes, reported as ratios (the store part of `cargo xtask bench content`).
//!
//! ```text
//! cargo run --release -p myconet-store --example store_bench -- [--mib 1024] [--rounds 3] [--dir DIR] [--json FILE]
//! ```
//!
//! A file of random bytes is written once (so it is in the page cache for every case),
//! then each round runs, in turn:
//! - `blake3`: read the file and hash it (`blake3::Hasher`, one thread): the floor of
//!   any verified add;
//! - `write`: read the file and write a copy, then fsync it: the floor of storing it;
//! - `add`: `stage_file` + `insert_package` into a fresh disk store (hash tree, data and
//!   outboard written, fsynced, renamed, committed);
//! - `serve`: encode the whole blob with proofs from the store (`encode`) into a sink;
//! - `fetch`: the receiving side of a transfer: the blob's encoding (written to a file
//!   beforehand, so in the page cache) read in 1 MiB pieces, decoded and verified,
//!   every pair and group written to a second store (`write_parent`, `write_group`,
//!   batch commits) until complete.
//!
//! Memory: the process's peak resident set is reset before the store's cases and read
//! after each (`/proc/self/clear_refs`, `VmHWM`): large files must not balloon RAM.
//!
//! `--site-files N` adds a case: a site of N files (sizes 1 KiB to 40 KiB, 20 KiB on
//! average: 10,000 make about 200 MB) staged from memory and inserted as one package.

use std::{
    fs::File,
    io::{self, Read, Write},
    path::{Path, PathBuf},
    time::Instant,
};

use myconet_content::{
    GroupSet, PackagePath,
    manifest::{AuthorKey, FileEntry, Kind, Manifest, Metadata},
    verified::{self, Verified},
};
use myconet_store::{DiskStore, Hash, Store, StoreConfig};
use ring::signature::Ed25519KeyPair;

const BUF: usize = 256 * 1024;

struct Args {
    mib: u64,
    site_files: u64,
    rounds: usize,
    dir: Option<PathBuf>,
    json: Option<PathBuf>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        mib: 1024,
        site_files: 0,
        rounds: 3,
        dir: None,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--mib" => a.mib = value()?.parse().map_err(|e| format!("--mib: {e}"))?,
            "--site-files" => {
                a.site_files = value()?.parse().map_err(|e| format!("--site-files: {e}"))?
            }
            "--rounds" => a.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--dir" => a.dir = Some(value()?.into()),
            "--json" => a.json = Some(value()?.into()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.mib == 0 || a.rounds == 0 {
        return Err("--mib and --rounds must be positive".into());
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("store_bench: {e}");
        std::process::exit(1);
    }
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) this process used so far.
fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Wall and CPU seconds of one case.
struct Clock(Instant, f64);

impl Clock {
    fn start() -> Self {
        Clock(Instant::now(), cpu_secs())
    }
    fn stop(self, wall: &mut Vec<f64>, cpu: &mut Vec<f64>) {
        wall.push(self.0.elapsed().as_secs_f64());
        cpu.push(cpu_secs() - self.1);
    }
}

fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Fast deterministic bytes (xorshift), written in fixed buffers.
fn make_source(path: &Path, bytes: u64) -> io::Result<()> {
    let mut f = File::create(path)?;
    let mut buf = vec![0u8; BUF];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut left = bytes;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let n = BUF.min(left as usize);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

fn raw_hash(path: &Path) -> io::Result<Hash> {
    let mut f = File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; BUF];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

fn raw_write(path: &Path, dest: &Path) -> io::Result<()> {
    let mut f = File::open(path)?;
    let mut out = File::create(dest)?;
    let mut buf = vec![0u8; BUF];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    out.sync_all()
}

fn signed(root: Hash, size: u64) -> Result<myconet_content::SignedManifest, String> {
    let key = Ed25519KeyPair::from_seed_unchecked(&[1; 32]).map_err(|e| e.to_string())?;
    let file = FileEntry {
        path: PackagePath::new("data.bin").map_err(|e| e.to_string())?,
        size,
        executable: false,
        root,
    };
    let metadata = Metadata {
        title: "bench".into(),
        kind: Kind::Dataset,
        ..Metadata::default()
    };
    Manifest::new(AuthorKey::of(&key), 0, metadata, vec![file])
        .and_then(|m| m.sign(&key))
        .map_err(|e| e.to_string())
}

struct Sink(u64);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the whole encoding of a blob (data and proofs) to `path`, as a sender would
/// send it.
fn encode_to(from: &DiskStore, hash: &Hash, size: u64, path: &Path) -> Result<(), String> {
    let all = GroupSet::all(verified::group_count(size));
    let f = File::create(path).map_err(|e| e.to_string())?;
    let mut out = io::BufWriter::with_capacity(BUF, f);
    from.encode(hash, &all, &mut out)
        .map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())
}

/// The receiving side of a transfer: the encoding read as it would arrive (1 MiB
/// pieces), decoded and verified, every pair and group written to the store.
fn fetch_into(encoding: &Path, to: &DiskStore, hash: &Hash, size: u64) -> Result<(), String> {
    let all = GroupSet::all(verified::group_count(size));
    let mut dec = verified::Decoder::new(*hash, size, &all).map_err(|e| e.to_string())?;
    let mut f = File::open(encoding).map_err(|e| e.to_string())?;
    let mut piece = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut piece).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        let mut input = &piece[..n];
        while let Some(item) = dec.next(&mut input).map_err(|e| e.to_string())? {
            match item {
                Verified::Parent(p) => to.write_parent(hash, &p).map_err(|e| e.to_string())?,
                Verified::Group { group, data, .. } => {
                    to.write_group(hash, group, data)
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }
    to.flush().map_err(|e| e.to_string())?;
    match to.blob_status(hash).map_err(|e| e.to_string())? {
        myconet_store::BlobStatus::Complete { .. } => Ok(()),
        other => Err(format!("fetch ended {other:?}")),
    }
}

/// Imports a site of `n` files as one package and prints how long it took.
fn site(dir: &Path, n: u64, config: &StoreConfig) -> Result<(), String> {
    let store_dir = dir.join("site");
    let store = DiskStore::open(&store_dir, config.clone()).map_err(|e| e.to_string())?;
    let key = Ed25519KeyPair::from_seed_unchecked(&[2; 32]).map_err(|e| e.to_string())?;
    let t = Clock::start();
    let mut staged = Vec::with_capacity(n as usize);
    let mut files = Vec::with_capacity(n as usize);
    let mut bytes = 0u64;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut buf = Vec::new();
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 1024 + (x % (39 * 1024)) as usize;
        buf.clear();
        buf.extend((0..len).map(|j| (j as u64 ^ x ^ i) as u8));
        let s = store
            .stage(&mut &buf[..], len as u64)
            .map_err(|e| e.to_string())?;
        files.push(FileEntry {
            path: PackagePath::new(format!("d{}/page{i}.html", i % 100))
                .map_err(|e| e.to_string())?,
            size: len as u64,
            executable: false,
            root: s.hash(),
        });
        staged.push(s);
        bytes += len as u64;
    }
    let staged_at = t.0.elapsed().as_secs_f64();
    let metadata = Metadata {
        title: "site".into(),
        kind: Kind::Site,
        ..Metadata::default()
    };
    let m = Manifest::new(AuthorKey::of(&key), 0, metadata, files)
        .and_then(|m| m.sign(&key))
        .map_err(|e| e.to_string())?;
    store
        .insert_package(&m, staged, &[])
        .map_err(|e| e.to_string())?;
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    t.stop(&mut wall, &mut cpu);
    println!(
        "site: {n} files, {:.0} MB, imported in {:.2} s ({:.2} s staging, {:.2} s insert), {:.2} CPU s",
        bytes as f64 / 1e6,
        wall[0],
        staged_at,
        wall[0] - staged_at,
        cpu[0]
    );
    drop(store);
    std::fs::remove_dir_all(&store_dir).map_err(|e| e.to_string())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn run() -> Result<(), String> {
    let a = args()?;
    let bytes = a.mib << 20;
    let tmp;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
            tmp.path().to_path_buf()
        }
    };
    let e = |e: io::Error| e.to_string();
    let source = dir.join("source.bin");
    println!("store_bench: {} MiB in {}", a.mib, dir.display());
    make_source(&source, bytes).map_err(e)?;
    let baseline_rss = rss_kib("VmRSS:");
    let cases = ["blake3", "write", "add", "serve", "fetch"];
    let mut secs: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut peak = vec![0u64; cases.len()];
    let config = StoreConfig::with_max_bytes(4 * bytes + (1 << 30));
    for round in 0..a.rounds {
        let t = Clock::start();
        let root = raw_hash(&source).map_err(e)?;
        t.stop(&mut secs[0], &mut cpu[0]);

        let t = Clock::start();
        raw_write(&source, &dir.join("copy.bin")).map_err(e)?;
        t.stop(&mut secs[1], &mut cpu[1]);
        std::fs::remove_file(dir.join("copy.bin")).map_err(e)?;

        let store_dir = dir.join(format!("store{round}"));
        let fetch_dir = dir.join(format!("fetched{round}"));
        {
            let store = DiskStore::open(&store_dir, config.clone()).map_err(|e| e.to_string())?;
            reset_peak();
            let t = Clock::start();
            let staged = store.stage_file(&source).map_err(|e| e.to_string())?;
            if staged.hash() != root {
                return Err("the store's root differs from BLAKE3".into());
            }
            let m = signed(root, bytes)?;
            store
                .insert_package(&m, vec![staged], &[])
                .map_err(|e| e.to_string())?;
            t.stop(&mut secs[2], &mut cpu[2]);
            peak[2] = peak[2].max(rss_kib("VmHWM:"));

            reset_peak();
            let t = Clock::start();
            let mut sink = Sink(0);
            store
                .encode(
                    &root,
                    &GroupSet::all(verified::group_count(bytes)),
                    &mut sink,
                )
                .map_err(|e| e.to_string())?;
            t.stop(&mut secs[3], &mut cpu[3]);
            peak[3] = peak[3].max(rss_kib("VmHWM:"));

            let encoding = dir.join("encoding.bin");
            encode_to(&store, &root, bytes, &encoding)?;
            let to = DiskStore::open(&fetch_dir, config.clone()).map_err(|e| e.to_string())?;
            to.put_manifest(&m, &[]).map_err(|e| e.to_string())?;
            reset_peak();
            let t = Clock::start();
            fetch_into(&encoding, &to, &root, bytes)?;
            t.stop(&mut secs[4], &mut cpu[4]);
            peak[4] = peak[4].max(rss_kib("VmHWM:"));
        }
        std::fs::remove_file(dir.join("encoding.bin")).map_err(e)?;
        std::fs::remove_dir_all(&store_dir).map_err(e)?;
        std::fs::remove_dir_all(&fetch_dir).map_err(e)?;
        println!("  round {} done", round + 1);
    }
    if a.site_files > 0 {
        site(&dir, a.site_files, &config)?;
    }
    let mib = a.mib as f64;
    let med: Vec<f64> = secs.iter_mut().map(|v| median(v)).collect();
    let cpu_med: Vec<f64> = cpu.iter_mut().map(|v| median(v)).collect();
    println!(
        "\n{:<8} {:>8} {:>10} {:>9} {:>9} {:>10} {:>13} {:>13}",
        "case", "MiB/s", "vs blake3", "vs write", "seconds", "CPU s", "CPU/blake3", "peak RSS MiB"
    );
    for (i, c) in cases.iter().enumerate() {
        let rss = if peak[i] > 0 {
            format!("{:.1}", peak[i] as f64 / 1024.0)
        } else {
            "-".into()
        };
        println!(
            "{:<8} {:>8.0} {:>10.2} {:>9.2} {:>9.2} {:>10.2} {:>13.2} {:>13}",
            c,
            mib / med[i],
            med[0] / med[i],
            med[1] / med[i],
            med[i],
            cpu_med[i],
            cpu_med[i] / cpu_med[0],
            rss
        );
    }
    println!(
        "(medians of {} rounds; \"vs\" columns are throughput against the raw case, CPU/blake3 is CPU time against raw hashing; baseline RSS {:.1} MiB)",
        a.rounds,
        baseline_rss as f64 / 1024.0
    );
    std::fs::remove_file(&source).map_err(e)?;
    if let Some(path) = a.json {
        let mut j = format!("{{\"mib\":{},\"rounds\":{},\"cases\":{{", a.mib, a.rounds);
        for (i, c) in cases.iter().enumerate() {
            j += &format!(
                "{}\"{c}\":{{\"seconds\":{:.4},\"cpu_seconds\":{:.4},\"mib_per_s\":{:.1},\"vs_blake3\":{:.3},\"vs_write\":{:.3},\"peak_rss_kib\":{}}}",
                if i > 0 { "," } else { "" },
                med[i],
                cpu_med[i],
                mib / med[i],
                med[0] / med[i],
                med[1] / med[i],
                peak[i]
            );
        }
        j += "}}\n";
        std::fs::write(&path, j).map_err(e)?;
        println!("saved {}", path.display());
    }
    Ok(())
}
