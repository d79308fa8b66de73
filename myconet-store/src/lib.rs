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
mod partial;
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

/// The buffer for streaming `len` bytes: no bigger than the data (a site of 10,000
/// small files must not allocate 10,000 full buffers), at least a page.
pub(crate) fn io_buffer_for(len: u64) -> usize {
    usize::try_from(len).map_or(IO_BUFFER, |l| l.clamp(4096, IO_BUFFER))
}

/// How far disk use may exceed `max_bytes`: what the quota does not count exactly.
/// The write-ahead log beyond its 4 MiB cut-back between checkpoints (one commit's
/// pages: a package row with its manifest and file rows), directory blocks and inodes
/// (256 shard directories are made at open), and metadata the file system keeps per
/// file. Blob files are counted rounded up to whole blocks, so they are exact.
pub const QUOTA_SLACK: u64 = 16 * 1024 * 1024;

/// A step of the write path where the kill test may stop the process, to check that
/// a `kill -9` between any two steps leaves the store consistent. With the
/// `crash-points` feature and `MYCONET_STORE_CRASH_AT=n` set, the n-th step reached
/// (counting from 1) SIGKILLs the process. Without the feature it is nothing.
#[inline(always)]
pub(crate) fn crash_point() {
    #[cfg(feature = "crash-points")]
    crash::point();
}

/// Crash points reached so far by this process (`crash-points` feature, for the kill
/// test).
#[cfg(feature = "crash-points")]
pub use crash::reached as crash_points_reached;

#[cfg(feature = "crash-points")]
mod crash {
    use std::sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    };

    static REACHED: AtomicU64 = AtomicU64::new(0);
    static TARGET: OnceLock<Option<u64>> = OnceLock::new();

    /// Steps reached so far by this process.
    pub fn reached() -> u64 {
        REACHED.load(Ordering::SeqCst)
    }

    pub(crate) fn point() {
        let at = TARGET.get_or_init(|| {
            std::env::var("MYCONET_STORE_CRASH_AT")
                .ok()
                .and_then(|v| v.parse().ok())
        });
        let n = REACHED.fetch_add(1, Ordering::SeqCst) + 1;
        if *at == Some(n) {
            // SAFETY: signals this process; kill(2) touches no memory of ours.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}
