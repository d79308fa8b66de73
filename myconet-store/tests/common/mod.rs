//! Helpers shared by the store's integration tests: deterministic data, manifests
//! (until myconet-content's manifest type lands, the store's view of one), and a
//! provider that serves verified groups.
#![allow(dead_code)]

use std::io::Read;

use myconet_store::{GroupSet, Hash, Manifest, ManifestFile, Store};

/// SplitMix64: deterministic test data and choices, no dependency.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` deterministic bytes from `seed`.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    Rng(seed).fill(&mut v);
    v
}

/// An endless reader of deterministic bytes (for large files without buffering them).
pub struct DataReader {
    rng: Rng,
    left: u64,
    carry: Vec<u8>,
}

impl DataReader {
    pub fn new(seed: u64, len: u64) -> Self {
        Self {
            rng: Rng(seed),
            left: len,
            carry: Vec::new(),
        }
    }
}

impl Read for DataReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let whole = n / 8 * 8;
        self.rng.fill(&mut buf[..whole]);
        if n > whole {
            let v = self.rng.next().to_le_bytes();
            buf[whole..n].copy_from_slice(&v[..n - whole]);
        }
        self.left -= n as u64;
        let _ = &self.carry;
        Ok(n)
    }
}

/// A manifest over `files` (path, bytes), its id made unique by `salt`.
pub fn manifest(salt: &str, files: &[(&str, &[u8])]) -> Manifest {
    manifest_of(
        salt,
        files
            .iter()
            .map(|(p, d)| (p.to_string(), d.len() as u64, Hash::of(d)))
            .collect(),
    )
}

/// A manifest over (path, size, root) entries.
pub fn manifest_of(salt: &str, mut files: Vec<(String, u64, Hash)>) -> Manifest {
    files.sort();
    let mut bytes = salt.as_bytes().to_vec();
    for (p, s, h) in &files {
        bytes.extend_from_slice(p.as_bytes());
        bytes.extend_from_slice(&s.to_le_bytes());
        bytes.extend_from_slice(h.as_bytes());
    }
    Manifest {
        id: Hash::of(&bytes),
        bytes,
        author: [7; 32],
        created: 1_700_000_000,
        kind: "file".into(),
        title: format!("package {salt}"),
        description: "test package".into(),
        tags: vec!["test".into()],
        language: Some("en".into()),
        licence: Some("MIT".into()),
        files: files
            .into_iter()
            .map(|(path, size, root)| ManifestFile {
                path,
                size,
                executable: false,
                root,
            })
            .collect(),
    }
}

/// Stages every file and inserts the package.
pub fn add(
    store: &dyn Store,
    m: &Manifest,
    files: &[(&str, &[u8])],
    holds: &[myconet_store::Hold],
) -> myconet_store::Result<myconet_store::PackageInfo> {
    let mut staged = Vec::new();
    for (_, d) in files {
        staged.push(store.stage(&mut &d[..], d.len() as u64)?);
    }
    store.insert_package(m, staged, holds)
}

/// Encodes `groups` of `hash` from `provider` (a store with the blob complete).
pub fn encoded(provider: &dyn Store, hash: &Hash, groups: &GroupSet) -> Vec<u8> {
    let mut out = Vec::new();
    provider
        .encode(hash, groups, &mut out)
        .expect("provider encodes");
    out
}

/// Feeds `bytes` to a receive in random pieces; returns the first error.
pub fn feed_all(
    store: &dyn Store,
    rx: &mut myconet_store::Receive,
    bytes: &[u8],
    rng: &mut Rng,
) -> myconet_store::Result<()> {
    let mut at = 0;
    while at < bytes.len() {
        let n = 1 + rng.below(40_000) as usize;
        let end = (at + n).min(bytes.len());
        let fed = store.feed(rx, &bytes[at..end])?;
        assert_eq!(
            fed.consumed,
            end - at,
            "the encoding has no bytes past its end here"
        );
        at = end;
    }
    Ok(())
}

/// Sum of blocks allocated to every file under `dir` (what `du` counts).
pub fn disk_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            total += disk_bytes(&e.path());
        } else {
            total += m.blocks() * 512;
        }
    }
    total
}
