//! The narrow seam to `myconet-content` while its `verified` and `manifest` modules are
//! being written: the store's view of a manifest, and blob hashing. Everything else in
//! the store goes through these few items, so switching them over is local.

use std::io::{self, Read, Write};

use crate::Hash;

/// A package's id: the BLAKE3 hash of its signed manifest bytes.
pub type PackageId = Hash;

/// What the store needs from a verified, signed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The package id.
    pub id: PackageId,
    /// The signed manifest bytes, exactly as they hash to `id`.
    pub bytes: Vec<u8>,
    /// The author's Ed25519 public key.
    pub author: [u8; 32],
    /// Creation time the author wrote, seconds since the Unix epoch.
    pub created: u64,
    /// Kind of content, lowercase (`file`, `site`, …).
    pub kind: String,
    /// Title.
    pub title: String,
    /// Description.
    pub description: String,
    /// Tags.
    pub tags: Vec<String>,
    /// BCP 47 language tag.
    pub language: Option<String>,
    /// SPDX licence expression.
    pub licence: Option<String>,
    /// The files, sorted by path, paths unique.
    pub files: Vec<ManifestFile>,
}

/// One file of a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    /// Normalised relative path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Executable bit.
    pub executable: bool,
    /// Verified-streaming root of the data.
    pub root: Hash,
}

/// Bytes of the outboard (hash tree) kept next to a blob of `size` bytes.
pub(crate) fn outboard_size(_size: u64) -> u64 {
    0
}

/// Reads exactly `size` bytes from `data`, copying them to `data_out` and the outboard
/// to `outboard_out`, and returns the root hash. Errors with
/// [`io::ErrorKind::UnexpectedEof`] if `data` ends early.
pub(crate) fn import(
    data: &mut dyn Read,
    size: u64,
    data_out: &mut dyn Write,
    _outboard_out: &mut dyn Write,
) -> io::Result<Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; crate::IO_BUFFER];
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = data.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        hasher.update(&buf[..n]);
        data_out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(hasher.finalize().into())
}
