//! The Myconet content store: manifests, metadata, pins and reference counts in SQLite;
//! blob data as files named by hash, each with its verified-streaming outboard.
//!
//! [`Store`] is what the agent's shell drives; [`DiskStore`] keeps everything under one
//! directory, [`MemStore`] in memory (the same logic and database, for tests). The
//! layout, schema, write order and quota are described in docs/content.md, "The store".
#![deny(missing_docs)]

mod backend;
mod core;
mod disk;
mod error;
mod mem;
mod schema;
mod store;
mod types;

pub use backend::BlobReader;
pub use core::Staged;
pub use error::{Result, StoreError};
pub use myconet_content::{GroupSet, Hash, PackageId, PackagePath, SignedManifest};
pub use store::{DiskStore, MemStore, Store};
pub use types::{
    BlobSource, BlobStatus, Completeness, Corruption, FileInfo, GcReport, Hold, OpenReport,
    PackageInfo, Problem, Protect, StoreConfig, Usage, VerifyReport,
};

/// Size of the buffers data streams through (reads of added files, staging writes).
pub(crate) const IO_BUFFER: usize = 256 * 1024;

/// How far disk use may exceed `max_bytes`: what the quota does not count exactly.
/// The write-ahead log beyond its 4 MiB cut-back between checkpoints (one commit's
/// pages: a package row with its manifest and file rows), directory blocks and inodes
/// (256 shard directories are made at open), and metadata the file system keeps per
/// file. Blob files are counted rounded up to whole blocks, so they are exact.
pub const QUOTA_SLACK: u64 = 16 * 1024 * 1024;
