//! The [`Store`] trait, and its two implementations: [`DiskStore`] and [`MemStore`].

use std::{
    io::{Read, Write},
    path::Path,
};

use myconet_content::verified::VerifiedParent;
use rusqlite::Connection;

use crate::{
    BlobReader, BlobSource, BlobStatus, FileInfo, GcReport, GroupSet, Hash, Hold, OpenReport,
    PackageId, PackageInfo, PackagePath, Result, SignedManifest, Staged, StoreConfig, Usage,
    VerifyReport,
    core::Core,
    disk::{DATABASE, DiskBackend},
    error::io_err,
    mem::MemBackend,
};

/// What the agent's shell needs of a content store. Every method is blocking (disk
/// I/O): call it from a blocking thread. Methods take `&self`; a store is shared
/// between threads and serialises its own writes.
///
/// Adding a package: [`stage`](Self::stage) (or [`stage_file`](Self::stage_file)) each
/// file, build and sign the manifest from the staged roots, then
/// [`insert_package`](Self::insert_package): the package appears whole or not at all.
///
/// Fetching one: [`put_manifest`](Self::put_manifest) reserves room for every blob it
/// lacks; the fetch then fills those blobs with verified ranges; the package is
/// complete when they all are.
pub trait Store: Send + Sync {
    /// Streams exactly `size` bytes from `data` into staging, hashing them, after
    /// reserving their room against the quota (evicting cached packages if needed).
    /// Fails if `data` holds fewer or more bytes than `size`.
    fn stage(&self, data: &mut dyn Read, size: u64) -> Result<Staged>;

    /// [`stage`](Self::stage) of a file, its size taken when it is opened.
    fn stage_file(&self, path: &Path) -> Result<Staged>;

    /// Stores a package whose every file is either in `staged` or already complete
    /// here, with `holds` (none: cached). One commit makes it visible, complete; an
    /// error leaves the store as it was. Adding a package already here adds the holds.
    fn insert_package(
        &self,
        manifest: &SignedManifest,
        staged: Vec<Staged>,
        holds: &[Hold],
    ) -> Result<PackageInfo>;

    /// Stores a package's manifest to fetch its data: blobs not here are created
    /// partial and their whole room is reserved now, so a fetch that starts never
    /// runs out of quota. Refused with [`StoreError::Quota`](crate::StoreError::Quota)
    /// if the room cannot be made.
    fn put_manifest(&self, manifest: &SignedManifest, holds: &[Hold]) -> Result<PackageInfo>;

    /// What the store has of a blob.
    fn blob_status(&self, hash: &Hash) -> Result<BlobStatus>;

    /// The groups of each distinct blob of a package that are verified here: what a
    /// download resumes from (`fetch::Fetch::handle_local`).
    fn have(&self, id: &PackageId) -> Result<Vec<(Hash, GroupSet)>>;

    /// Stores a verified proof pair of a partial blob (`fetch::Event::Parent`). The
    /// caller vouches that it came out of a `verified::Decoder` for this blob; the
    /// store checks that it fits and writes it at its place. A complete blob ignores it.
    fn write_parent(&self, hash: &Hash, parent: &VerifiedParent) -> Result<()>;

    /// Stores a verified group of a partial blob (`fetch::Event::Group`), after the
    /// pairs that prove it. Same contract as [`write_parent`](Self::write_parent).
    /// Groups are committed in batches (and at once when the blob is whole); returns
    /// whether the blob is now complete.
    fn write_group(&self, hash: &Hash, group: u64, data: &[u8]) -> Result<bool>;

    /// Commits every verified group not committed yet (call it now and then, and when
    /// a transfer stops, so that a crash loses little).
    fn flush(&self) -> Result<()>;

    /// What the store has of a blob (complete or partial), to serve verified groups
    /// of it with proofs at the caller's pace.
    fn source(&self, hash: &Hash) -> Result<BlobSource>;

    /// Encodes `groups` of a blob with their proofs into `out`; refused unless every
    /// group is verified here. Each group is checked against the hash as it is read.
    fn encode(&self, hash: &Hash, groups: &GroupSet, out: &mut dyn Write) -> Result<()>;

    /// Reads a complete blob (and counts as an access of the packages using it).
    fn open_blob(&self, hash: &Hash) -> Result<BlobReader>;

    /// Reads a complete file of a package, by path (an access of the package).
    fn open_file(&self, id: &PackageId, path: &PackagePath) -> Result<(FileInfo, BlobReader)>;

    /// Every package, oldest first.
    fn packages(&self) -> Result<Vec<PackageInfo>>;

    /// One package, `None` if not here.
    fn package(&self, id: &PackageId) -> Result<Option<PackageInfo>>;

    /// A package's signed manifest bytes, `None` if not here.
    fn manifest(&self, id: &PackageId) -> Result<Option<Vec<u8>>>;

    /// A package's files, sorted by path, with what is here of each.
    fn files(&self, id: &PackageId) -> Result<Vec<FileInfo>>;

    /// Adds a reason to keep a package (pin, replica).
    fn hold(&self, id: &PackageId, hold: Hold) -> Result<()>;

    /// Drops one reason to keep a package; with none left it is cached (evictable).
    fn release(&self, id: &PackageId, hold: Hold) -> Result<()>;

    /// Removes a package whatever holds it; blobs no other package uses are deleted.
    /// Returns the bytes freed.
    fn remove(&self, id: &PackageId) -> Result<u64>;

    /// Marks a package used now (for least-recently-used eviction).
    fn touch(&self, id: &PackageId) -> Result<()>;

    /// Bytes in use against the quota.
    fn usage(&self) -> Result<Usage>;

    /// Deletes blobs and files nothing uses, and evicts cached packages while use is
    /// over the quota (never held or protected ones).
    fn gc(&self) -> Result<GcReport>;

    /// Re-hashes every complete blob; a corrupt one is reported and made partial (so
    /// it is never served, and can be fetched again), a wrong outboard is rewritten.
    fn verify(&self) -> Result<VerifyReport>;
}

/// Implements [`Store`] for a wrapper around [`Core`] by forwarding.
macro_rules! forward_store {
    ($t:ty) => {
        impl Store for $t {
            fn stage(&self, data: &mut dyn Read, size: u64) -> Result<Staged> {
                self.core.stage(data, size)
            }
            fn stage_file(&self, path: &Path) -> Result<Staged> {
                self.core.stage_file(path)
            }
            fn insert_package(
                &self,
                manifest: &SignedManifest,
                staged: Vec<Staged>,
                holds: &[Hold],
            ) -> Result<PackageInfo> {
                self.core.insert_package(manifest, staged, holds)
            }
            fn put_manifest(
                &self,
                manifest: &SignedManifest,
                holds: &[Hold],
            ) -> Result<PackageInfo> {
                self.core.put_manifest(manifest, holds)
            }
            fn blob_status(&self, hash: &Hash) -> Result<BlobStatus> {
                self.core.blob_status(hash)
            }
            fn have(&self, id: &PackageId) -> Result<Vec<(Hash, GroupSet)>> {
                self.core.have(id)
            }
            fn write_parent(&self, hash: &Hash, parent: &VerifiedParent) -> Result<()> {
                self.core.write_parent(hash, parent)
            }
            fn write_group(&self, hash: &Hash, group: u64, data: &[u8]) -> Result<bool> {
                self.core.write_group(hash, group, data)
            }
            fn flush(&self) -> Result<()> {
                self.core.flush()
            }
            fn source(&self, hash: &Hash) -> Result<BlobSource> {
                self.core.source(hash)
            }
            fn encode(&self, hash: &Hash, groups: &GroupSet, out: &mut dyn Write) -> Result<()> {
                self.core.encode(hash, groups, out)
            }
            fn open_blob(&self, hash: &Hash) -> Result<BlobReader> {
                self.core.open_blob(hash)
            }
            fn open_file(
                &self,
                id: &PackageId,
                path: &PackagePath,
            ) -> Result<(FileInfo, BlobReader)> {
                self.core.open_file(id, path)
            }
            fn packages(&self) -> Result<Vec<PackageInfo>> {
                self.core.packages()
            }
            fn package(&self, id: &PackageId) -> Result<Option<PackageInfo>> {
                self.core.package(id)
            }
            fn manifest(&self, id: &PackageId) -> Result<Option<Vec<u8>>> {
                self.core.manifest(id)
            }
            fn files(&self, id: &PackageId) -> Result<Vec<FileInfo>> {
                self.core.files(id)
            }
            fn hold(&self, id: &PackageId, hold: Hold) -> Result<()> {
                self.core.hold(id, hold)
            }
            fn release(&self, id: &PackageId, hold: Hold) -> Result<()> {
                self.core.release(id, hold)
            }
            fn remove(&self, id: &PackageId) -> Result<u64> {
                self.core.remove(id)
            }
            fn touch(&self, id: &PackageId) -> Result<()> {
                self.core.touch(id)
            }
            fn usage(&self) -> Result<Usage> {
                self.core.usage()
            }
            fn gc(&self) -> Result<GcReport> {
                self.core.gc()
            }
            fn verify(&self) -> Result<VerifyReport> {
                self.core.verify()
            }
        }
    };
}

/// A store in one directory: `store.sqlite` and `blobs/`. One process at a time.
pub struct DiskStore {
    core: Core<DiskBackend>,
}

impl DiskStore {
    /// Opens (creating) the store in `dir`. After an unclean shutdown this reconciles
    /// files with the database first ([`open_report`](Self::open_report) says what it
    /// found). Fails with [`StoreError::Locked`](crate::StoreError::Locked) if another
    /// process has it open.
    pub fn open(dir: &Path, config: StoreConfig) -> Result<Self> {
        let backend = DiskBackend::open(dir, config.max_bytes)?;
        let path = dir.join(DATABASE);
        let conn = Connection::open(&path).map_err(|e| match e {
            rusqlite::Error::SqliteFailure(_, _) => crate::StoreError::Database(e),
            other => io_err("opening", &path)(std::io::Error::other(other.to_string())),
        })?;
        Ok(Self {
            core: Core::open(backend, conn, false, config)?,
        })
    }

    /// What opening found and repaired.
    pub fn open_report(&self) -> OpenReport {
        self.core.open_report()
    }

    /// The quota it was opened with.
    pub fn max_bytes(&self) -> u64 {
        self.core.max_bytes()
    }

    /// Writes what is only in memory and marks the shutdown clean, so the next open
    /// skips reconciling. Dropping the store does this too.
    pub fn close(self) -> Result<()> {
        self.core.close()
    }
}

forward_store!(DiskStore);

/// A store in memory, for tests of code that drives a [`Store`]: the same logic and
/// schema (SQLite in memory), quota included.
pub struct MemStore {
    core: Core<MemBackend>,
}

impl MemStore {
    /// An empty store with this configuration.
    pub fn new(config: StoreConfig) -> Result<Self> {
        let conn = Connection::open_in_memory()?;
        Ok(Self {
            core: Core::open(MemBackend::default(), conn, true, config)?,
        })
    }
}

forward_store!(MemStore);
