//! The store's view of a manifest, until `myconet-content`'s manifest types land: the
//! few fields the store indexes and the file tree. Only `insert_package_rows` and the
//! file checks in `core` read it, so switching to the real type is local.

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
