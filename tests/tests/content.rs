//! Content across the overlay: packages added on one node and fetched on another
//! through relays that forward in XDP and see nothing.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use myconet_testbed::{
    agent::bin_dir,
    content::{ContentChain, content_counter, package_tree, same_tree},
    util::TempDir,
};

#[test]
fn smoke_two_nodes() -> Result<()> {
    let chain = ContentChain::start(&bin_dir()?, 2, "csmoke", |_| Vec::new())?;
    let dir = TempDir::new("content-smoke")?;
    let src = dir.path().join("pkg");
    let size = package_tree(&src, &[3 << 20, 1 << 20])?;
    let t = Instant::now();
    let mri = chain.add(0, &[src.to_str().context("utf8")?, "--title", "smoke"])?;
    eprintln!("add {size} bytes in {:?}: {mri}", t.elapsed());
    let t = Instant::now();
    let out = dir.path().join("out");
    let last = chain.get(1, &mri, &[0], Some(&out))?;
    eprintln!("get in {:?}: {last}", t.elapsed());
    let files = same_tree(&src, &out)?;
    ensure!(files > 5);
    let s = chain.content_stats(0)?;
    eprintln!("{s}");
    ensure!(content_counter(&s, "serve_data_bytes")? >= size - (1 << 20));
    let _ = Duration::ZERO;
    Ok(())
}
