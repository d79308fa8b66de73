//! Replays every fuzz target's seeds, its committed corpus (`fuzz/corpus/<target>/`)
//! and its saved crash cases (`fuzz/regressions/<target>/`) as plain tests on stable,
//! so a regression on any of them fails `cargo test` without libFuzzer. The `xdp`
//! target needs root (BPF, a network namespace), as CI has.

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn replay(target: &str) {
    let run = myconet_fuzz::target(target).expect("known target");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut count = 0;
    for (t, name, bytes) in myconet_fuzz::seeds::all() {
        if t == target {
            eprintln!("{target}: seed {name}");
            run(&bytes);
            count += 1;
        }
    }
    for dir in ["corpus", "regressions"] {
        for path in files(&root.join(dir).join(target)) {
            eprintln!("{target}: {}", path.display());
            run(&std::fs::read(&path).expect("read input"));
            count += 1;
        }
    }
    assert!(count > 0, "{target} has no inputs to replay");
}

#[test]
fn header_inputs_replay() {
    replay("header");
}

#[test]
fn session_inputs_replay() {
    replay("session");
}

#[test]
fn link_inputs_replay() {
    replay("link");
}

#[test]
fn routing_inputs_replay() {
    replay("routing");
}

#[test]
fn discovery_inputs_replay() {
    replay("discovery");
}

#[test]
fn config_inputs_replay() {
    replay("config");
}

#[test]
fn content_inputs_replay() {
    replay("content");
}

#[test]
fn xdp_inputs_replay() {
    replay("xdp");
}

#[test]
fn every_target_has_a_replay_test() {
    let names: Vec<&str> = myconet_fuzz::TARGETS.iter().map(|t| t.0).collect();
    assert_eq!(
        names,
        [
            "header",
            "session",
            "link",
            "routing",
            "discovery",
            "config",
            "content",
            "xdp"
        ],
        "add a replay test for a new target"
    );
}
