//! `kill -9` at random moments of adds and fetches leaves the store consistent.
//!
//! The test binary runs itself as a child (`MYCONET_STORE_KILL_CHILD` set) that adds,
//! fetches (from an in-memory provider), removes, pins, unpins and collects against an
//! on-disk store without pause, and is SIGKILLed after a random delay. After every kill
//! the parent opens the store and checks every invariant: the store opens (reconciling,
//! and no group committed before its fsync fails to verify again: a kill keeps the page
//! cache);
//! every complete blob re-hashes to its name and every committed group of a partial
//! blob verifies (`verify` finds nothing); complete packages read back to their hashes;
//! no file is left that no row names and nothing is left in staging; disk use is within
//! the quota and its slack; every package the child pinned (and did not start to unpin
//! or remove) is there.
//!
//! Then the same checks after kills at chosen steps: the child runs a fixed workload on
//! an empty store and SIGKILLs itself at the n-th step of the write path (the store's
//! `crash-points` feature), for n spread over every step the workload takes, so that
//! narrow windows (between a rename and a commit, a write and its commit) are hit too.
//!
//! Runs as a plain program (`harness = false`): `cargo test -p myconet-store --test
//! kill`. `MYCONET_STORE_KILLS` sets the number of kills of each kind (default 60).

mod common;

use std::{
    collections::HashSet,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use common::*;
use myconet_content::verified::GROUP_BYTES;
use myconet_store::{
    Completeness, DiskStore, Hash, Hold, MemStore, PackageId, SignedManifest, Store, StoreConfig,
    StoreError,
};

const CHILD_ENV: &str = "MYCONET_STORE_KILL_CHILD";
/// Operations the child runs before it exits by itself (the crash-point phase).
const OPS_ENV: &str = "MYCONET_STORE_KILL_OPS";
/// The workload of the crash-point phase: its seed and length.
const STEP_SEED: u64 = 1000;
const STEP_OPS: u64 = 15;
const MAX_BYTES: u64 = 12 << 20;

fn main() -> ExitCode {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        let (dir, seed) = spec.split_once(',').expect("dir,seed");
        child(Path::new(dir), seed.parse().expect("seed"));
    }
    match parent() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kill test failed: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---- the child: works until killed ----

/// A file's content is a function of its seed, so packages share files (dedup).
fn file_data(seed: u64) -> Vec<u8> {
    if seed >= 1000 {
        // The small files of many-file packages.
        return data(seed, ((seed * 7919) % (20 << 10)) as usize);
    }
    let len = match seed % 5 {
        0 => 0,
        1 => (seed * 7919) % GROUP_BYTES,
        2 => GROUP_BYTES * (1 + seed % 8),
        _ => (seed * 104_729) % (1536 << 10),
    };
    data(seed, len as usize)
}

fn package(rng: &mut Rng, salt: u64) -> (SignedManifest, Vec<(String, Vec<u8>)>) {
    // Now and then a package of many files: the path that syncs the file system once
    // instead of each file.
    let n = if rng.below(8) == 0 {
        24
    } else {
        1 + rng.below(4)
    };
    let mut files = Vec::new();
    let mut seeds = HashSet::new();
    for i in 0..n {
        let seed = if n > 4 {
            1000 + rng.below(400)
        } else {
            rng.below(40)
        };
        if seeds.insert(seed) {
            files.push((format!("dir{}/f{i}", seed % 3), file_data(seed)));
        }
    }
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(p, d)| (p.as_str(), &d[..])).collect();
    (manifest(&format!("k{salt}"), &refs), files)
}

fn log(line: &str, out: &mut std::fs::File) {
    // The page cache survives a kill -9; no fsync needed for the parent to read it.
    let _ = writeln!(out, "{line}");
}

fn child(dir: &Path, seed: u64) -> ! {
    let mut rng = Rng(seed);
    let mut out = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.with_extension("log"))
        .expect("log");
    let store = DiskStore::open(dir, StoreConfig::with_max_bytes(MAX_BYTES)).expect("open");
    let provider = MemStore::new(StoreConfig::with_max_bytes(1 << 30)).expect("provider");
    let mut salt = seed * 1_000_000;
    let ops: Option<u64> = std::env::var(OPS_ENV).ok().and_then(|v| v.parse().ok());
    for done in 0.. {
        if ops == Some(done) {
            break;
        }
        salt += 1;
        let op = rng.below(10);
        let name = match op {
            0..=3 => "add",
            4..=7 => "fetch",
            8 => "remove/unpin",
            _ => "gc",
        };
        log(&format!("op {name}"), &mut out);
        let result = match op {
            0..=3 => {
                let (m, files) = package(&mut rng, salt);
                let pin = rng.below(4) == 0;
                let staged: Result<Vec<_>, _> = files
                    .iter()
                    .map(|(_, d)| store.stage(&mut &d[..], d.len() as u64))
                    .collect();
                staged
                    .and_then(|s| store.insert_package(&m, s, if pin { &[Hold::Pin] } else { &[] }))
                    .map(|_| {
                        if pin {
                            log(&format!("pin {}", m.id()), &mut out);
                            log(&format!("complete {}", m.id()), &mut out);
                        }
                    })
            }
            4..=7 => {
                let (m, files) = package(&mut rng, salt);
                let refs: Vec<(&str, &[u8])> =
                    files.iter().map(|(p, d)| (p.as_str(), &d[..])).collect();
                let _ = add(&provider, &m, &refs, &[]);
                let holds: &[Hold] = if rng.below(5) == 0 { &[Hold::Pin] } else { &[] };
                store.put_manifest(&m, holds).and_then(|_| {
                    if !holds.is_empty() {
                        log(&format!("pin {}", m.id()), &mut out);
                    }
                    fetch(&store, &provider, &m, holds, &mut rng)
                })
            }
            8 => {
                let pkgs = store.packages().unwrap_or_default();
                if pkgs.is_empty() {
                    Ok(())
                } else {
                    let p = &pkgs[rng.below(pkgs.len() as u64) as usize];
                    if rng.below(2) == 0 {
                        log(&format!("rm {}", p.id), &mut out);
                        store.remove(&p.id).map(|_| ())
                    } else {
                        log(&format!("unpin {}", p.id), &mut out);
                        store.release(&p.id, Hold::Pin)
                    }
                }
            }
            _ => store.gc().map(|_| ()),
        };
        match result {
            Ok(())
            | Err(StoreError::Quota { .. })
            | Err(StoreError::UnknownBlob(_))
            | Err(StoreError::AlreadyComplete(_)) => {}
            Err(e) => panic!("child: {e}"),
        }
    }
    drop(store);
    // The crash-point phase counts the steps of its workload from this.
    let _ = std::fs::write(
        dir.with_extension("steps"),
        myconet_store::crash_points_reached().to_string(),
    );
    std::process::exit(0);
}

// ---- the parent: kills and checks ----

fn parent() -> Result<(), String> {
    let kills: u64 = std::env::var("MYCONET_STORE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = tmp.path().join("store");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut rng = Rng(0x6b696c6c);
    let mut unclean = 0;
    let mut during: std::collections::BTreeMap<String, u64> = Default::default();
    for i in 0..kills {
        let mut child = Command::new(&exe)
            .env(CHILD_ENV, format!("{},{}", dir.display(), i + 1))
            .spawn()
            .map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(10 + rng.below(240)));
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("child {i} exited by itself: {status}"));
        }
        child.kill().map_err(|e| e.to_string())?; // SIGKILL
        child.wait().map_err(|e| e.to_string())?;
        // What the child was doing: the last operation it started.
        let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
        let last = log
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("op "))
            .filter(|op| *op != "(killed)")
            .unwrap_or("opening the store");
        *during.entry(last.to_owned()).or_default() += 1;
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.with_extension("log"))
            .and_then(|mut f| writeln!(f, "op (killed)"))
            .map_err(|e| e.to_string())?;
        unclean += u64::from(check(&dir, i)?);
    }
    println!(
        "kill test: {kills} random kills ({during:?}), {unclean} left the store needing reconciliation, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if unclean * 2 < kills {
        return Err(format!(
            "only {unclean} of {kills} kills landed while the store was open"
        ));
    }
    crash_points(&tmp.path().join("steps"), &exe, kills)
}

/// The same workload each time, from an empty store, killed at chosen steps of the
/// write path: every kind of step boundary is hit, not only the wide ones random
/// kills land in.
fn crash_points(base: &Path, exe: &Path, runs: u64) -> Result<(), String> {
    let started = Instant::now();
    let count_file = base.with_extension("steps");
    let run = |dir: &Path, at: Option<u64>| -> Result<std::process::ExitStatus, String> {
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_file(dir.with_extension("log"));
        let mut cmd = Command::new(exe);
        cmd.env(CHILD_ENV, format!("{},{STEP_SEED}", dir.display()))
            .env(OPS_ENV, STEP_OPS.to_string());
        if let Some(at) = at {
            cmd.env("MYCONET_STORE_CRASH_AT", at.to_string());
        }
        cmd.status().map_err(|e| e.to_string())
    };
    let status = run(base, None)?;
    if !status.success() {
        return Err(format!(
            "the crash-point workload failed on its own: {status}"
        ));
    }
    let total: u64 = std::fs::read_to_string(&count_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or("the workload reached no crash point (built without `crash-points`?)")?;
    let runs = runs.min(total);
    for i in 0..runs {
        // Spread over the whole workload, first and last steps included.
        let at = 1 + i * (total - 1) / (runs - 1).max(1);
        let status = run(base, Some(at))?;
        use std::os::unix::process::ExitStatusExt;
        if status.signal() != Some(libc::SIGKILL) {
            return Err(format!(
                "step {at} of {total}: the child was not killed there ({status})"
            ));
        }
        check(base, at).map_err(|e| format!("killed at step {at} of {total}: {e}"))?;
    }
    println!(
        "kill test: {runs} kills at steps spread over the {total} steps of a {STEP_OPS}-operation workload, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Opens the store after kill `i` and checks every invariant; returns whether the
/// shutdown was unclean.
fn check(dir: &Path, i: u64) -> Result<bool, String> {
    let fail = |what: String| format!("after kill {i}: {what}");
    let store = DiskStore::open(dir, StoreConfig::with_max_bytes(MAX_BYTES))
        .map_err(|e| fail(format!("open: {e}")))?;
    let report = store.open_report();
    // A kill keeps the page cache: a group committed unsynced whose bytes do not
    // verify was committed before it was written.
    if report.unsynced_groups_lost != 0 {
        return Err(fail(format!("committed groups lost to a kill: {report:?}")));
    }
    // Nor can a committed row be left without its files.
    if report.blobs_damaged != 0 {
        return Err(fail(format!(
            "committed blobs without their files: {report:?}"
        )));
    }
    let staging: Vec<PathBuf> = std::fs::read_dir(dir.join("staging"))
        .map_err(|e| fail(e.to_string()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    if !staging.is_empty() {
        return Err(fail(format!("staging not emptied: {staging:?}")));
    }
    let v = store.verify().map_err(|e| fail(format!("verify: {e}")))?;
    if !v.corrupt.is_empty() {
        return Err(fail(format!("corrupt after reopen: {:?}", v.corrupt)));
    }
    let gc = store.gc().map_err(|e| fail(format!("gc: {e}")))?;
    if gc.blobs_deleted != 0 {
        return Err(fail(format!(
            "files or rows left for GC after reconciling: {gc:?}"
        )));
    }
    for p in store.packages().map_err(|e| fail(e.to_string()))? {
        let files = store.files(&p.id).map_err(|e| fail(e.to_string()))?;
        if files.len() as u64 != p.file_count {
            return Err(fail(format!(
                "package {} half visible: {} of {} files",
                p.id,
                files.len(),
                p.file_count
            )));
        }
        let all_complete = files
            .iter()
            .all(|f| f.completeness == Completeness::Complete);
        if all_complete != (p.completeness == Completeness::Complete) {
            return Err(fail(format!(
                "package {} completeness disagrees with its files",
                p.id
            )));
        }
        for f in files
            .iter()
            .filter(|f| f.completeness == Completeness::Complete)
        {
            let (_, mut r) = store
                .open_file(&p.id, &f.path)
                .map_err(|e| fail(format!("{}: {e}", f.path)))?;
            let mut bytes = Vec::new();
            r.read_to_end(&mut bytes).map_err(|e| fail(e.to_string()))?;
            if Hash::of(&bytes) != f.hash || bytes.len() as u64 != f.size {
                return Err(fail(format!("{} does not read back to its hash", f.path)));
            }
        }
    }
    // Pinned and never unpinned or removed: must be there.
    let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
    let mut pinned = HashSet::new();
    let mut complete = HashSet::new();
    for line in log.lines() {
        match line.split_once(' ') {
            Some(("pin", id)) => {
                pinned.insert(id.to_owned());
            }
            Some(("complete", id)) => {
                complete.insert(id.to_owned());
            }
            Some(("rm" | "unpin", id)) => {
                pinned.remove(id);
                complete.remove(id);
            }
            _ => {}
        }
    }
    for id in pinned {
        let id: PackageId = id.parse().map_err(|e| fail(format!("{e}")))?;
        let Some(p) = store.package(&id).map_err(|e| fail(e.to_string()))? else {
            return Err(fail(format!("pinned package {id} is gone")));
        };
        // Added complete and pinned: only a corruption could make it partial again,
        // and verify found none.
        if complete.contains(&id.to_string()) && p.completeness != Completeness::Complete {
            return Err(fail(format!("pinned package {id} was complete and is not")));
        }
    }
    let u = store.usage().map_err(|e| fail(e.to_string()))?;
    let du = disk_bytes(dir);
    if u.used > MAX_BYTES + myconet_store::QUOTA_SLACK
        || du > MAX_BYTES + myconet_store::QUOTA_SLACK
    {
        return Err(fail(format!("over quota: {du} bytes on disk, {u:?}")));
    }
    store.close().map_err(|e| fail(e.to_string()))?;
    Ok(report.unclean)
}
