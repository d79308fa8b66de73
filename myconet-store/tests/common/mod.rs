//! Helpers shared by the store's integration tests: deterministic data, signed
//! manifests, and fetching from a provider as the agent's shell does with the download
//! core's verified events.
#![allow(dead_code)]

use std::io::Read;

use myconet_content::{
    manifest::{AuthorKey, FileEntry, Kind, Manifest, Metadata},
    verified::{self, Verified},
};
use myconet_store::{
    BlobStatus, GroupSet, Hash, Hold, PackagePath, SignedManifest, Store, StoreError,
};
use ring::signature::Ed25519KeyPair;

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

/// A signed manifest over `files` (path, bytes), its id made unique by `salt`.
pub fn manifest(salt: &str, files: &[(&str, &[u8])]) -> SignedManifest {
    manifest_of(
        salt,
        files
            .iter()
            .map(|(p, d)| (p.to_string(), d.len() as u64, Hash::of(d)))
            .collect(),
    )
}

/// A signed manifest over (path, size, root) entries, whatever they say.
pub fn manifest_of(salt: &str, files: Vec<(String, u64, Hash)>) -> SignedManifest {
    let key = Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("key");
    let metadata = Metadata {
        title: format!("package {salt}"),
        description: "a test package".into(),
        tags: vec!["test".into()],
        language: "en".into(),
        licence: "MIT".into(),
        kind: Kind::File,
        extra: Default::default(),
    };
    let files = files
        .into_iter()
        .map(|(path, size, root)| FileEntry {
            path: PackagePath::new(path).expect("path"),
            size,
            executable: false,
            root,
        })
        .collect();
    Manifest::new(AuthorKey::of(&key), 1_700_000_000, metadata, files)
        .expect("manifest")
        .sign(&key)
        .expect("signed")
}

/// A package path.
pub fn path(p: &str) -> PackagePath {
    PackagePath::new(p).expect("path")
}

/// Stages every file and inserts the package.
pub fn add(
    store: &dyn Store,
    m: &SignedManifest,
    files: &[(&str, &[u8])],
    holds: &[Hold],
) -> myconet_store::Result<myconet_store::PackageInfo> {
    let mut staged = Vec::new();
    for (_, d) in files {
        staged.push(store.stage(&mut &d[..], d.len() as u64)?);
    }
    store.insert_package(m, staged, holds)
}

/// Encodes `groups` of `hash` from `provider` (a store with them verified).
pub fn encoded(provider: &dyn Store, hash: &Hash, groups: &GroupSet) -> Vec<u8> {
    let mut out = Vec::new();
    provider
        .encode(hash, groups, &mut out)
        .expect("provider encodes");
    out
}

/// Why a transfer stopped.
#[derive(Debug)]
pub enum TransferError {
    /// The encoding did not verify (the download core drops such a provider).
    Verify(verified::VerifyError),
    /// The store refused.
    Store(StoreError),
}

/// What the shell does with a download's events: decodes an encoded response in
/// random pieces, as `fetch::Fetch` does, and writes every verified pair and group.
pub fn transfer(
    store: &dyn Store,
    hash: &Hash,
    size: u64,
    groups: &GroupSet,
    encoded: &[u8],
    rng: &mut Rng,
) -> Result<(), TransferError> {
    let mut decoder = verified::Decoder::new(*hash, size, groups).expect("groups in range");
    let mut at = 0;
    while at < encoded.len() {
        let end = (at + 1 + rng.below(40_000) as usize).min(encoded.len());
        let mut input = &encoded[at..end];
        loop {
            match decoder.next(&mut input).map_err(TransferError::Verify)? {
                Some(Verified::Parent(p)) => {
                    store.write_parent(hash, &p).map_err(TransferError::Store)?
                }
                Some(Verified::Group { group, data, .. }) => {
                    store
                        .write_group(hash, group, data)
                        .map_err(TransferError::Store)?;
                }
                None => break,
            }
        }
        assert!(input.is_empty(), "nothing past the end of the encoding");
        at = end;
    }
    assert!(decoder.is_done());
    Ok(())
}

/// Fetches every blob of `m` from `provider` into `store`, in random request sizes and
/// splits.
pub fn fetch(
    store: &dyn Store,
    provider: &dyn Store,
    m: &SignedManifest,
    holds: &[Hold],
    rng: &mut Rng,
) -> myconet_store::Result<()> {
    store.put_manifest(m, holds)?;
    for (hash, size) in m.manifest().blobs() {
        loop {
            let want = match store.blob_status(&hash)? {
                BlobStatus::Complete { .. } => break,
                BlobStatus::Missing => return Err(StoreError::UnknownBlob(hash)),
                BlobStatus::Partial { verified, .. } => {
                    GroupSet::all(verified::group_count(size)).difference(&verified)
                }
            };
            let firsts: Vec<u64> = want.ranges().iter().map(|r| r.start).collect();
            let start = firsts[rng.below(firsts.len() as u64) as usize];
            let req = want.intersection(&GroupSet::from_range(start..start + 1 + rng.below(40)));
            let enc = encoded(provider, &hash, &req);
            match transfer(store, &hash, size, &req, &enc, rng) {
                Ok(()) => {}
                Err(TransferError::Store(e)) => return Err(e),
                Err(TransferError::Verify(e)) => panic!("an honest provider: {e}"),
            }
            if rng.below(8) == 0 {
                store.flush()?;
            }
        }
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
