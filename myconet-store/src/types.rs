//! The plain values the [`Store`](crate::Store) API takes and returns.

use std::{fmt, sync::Arc};

use myconet_content::{GroupSet, PackagePath, manifest::Kind, verified::Outboard};

use crate::{BlobReader, Hash, PackageId};

/// Why a package is kept. A package with no hold is *cached*: the least recently used
/// cached packages are evicted when room is needed. A held package is never evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Hold {
    /// The user pinned it.
    Pin,
    /// This node is one of the package's responsible replica holders.
    Replica,
}

impl Hold {
    /// The integer stored in the `holds.reason` column.
    pub(crate) fn code(self) -> i64 {
        match self {
            Hold::Pin => 1,
            Hold::Replica => 2,
        }
    }

    /// The hold stored as `code`, if this build knows it.
    pub(crate) fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(Hold::Pin),
            2 => Some(Hold::Replica),
            _ => None,
        }
    }
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hold::Pin => "pinned",
            Hold::Replica => "replica",
        })
    }
}

/// Whether every byte of a package (or blob) is here and verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completeness {
    /// Every byte is here and verified.
    Complete,
    /// Only part of it is.
    Partial {
        /// Bytes verified so far.
        verified_bytes: u64,
    },
}

/// A package as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageInfo {
    /// Its id (the hash of its signed manifest).
    pub id: PackageId,
    /// Title from the manifest.
    pub title: String,
    /// Kind from the manifest.
    pub kind: Kind,
    /// Sum of its files' sizes.
    pub total_size: u64,
    /// Number of files.
    pub file_count: u64,
    /// Complete, or how much of it is verified.
    pub completeness: Completeness,
    /// Why it is kept; empty for a cached package.
    pub holds: Vec<Hold>,
    /// When this store first stored it, seconds since the Unix epoch.
    pub added_at: u64,
    /// Bytes its distinct blobs take on disk (data and outboards, rounded up to file
    /// system blocks; a partial blob counts at its full size because its room is
    /// reserved). A blob shared with another package counts in both.
    pub disk_bytes: u64,
}

/// One file of a stored package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// Path inside the package.
    pub path: PackagePath,
    /// Size in bytes.
    pub size: u64,
    /// Executable bit.
    pub executable: bool,
    /// Root hash of its data (the blob's name).
    pub hash: Hash,
    /// Complete, or how much of it is verified.
    pub completeness: Completeness,
}

/// What the store has of one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobStatus {
    /// Nothing.
    Missing,
    /// Some verified groups; room for the whole blob is reserved.
    Partial {
        /// Blob size.
        size: u64,
        /// The chunk groups verified here (committed or about to be).
        verified: GroupSet,
    },
    /// Every byte, verified.
    Complete {
        /// Blob size.
        size: u64,
    },
}

/// How the store's bytes are used, against its quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// The quota, `storage.max_bytes`.
    pub max_bytes: u64,
    /// Everything counted against the quota: the sum of the fields below.
    pub used: u64,
    /// Blobs of held (pinned or replica) packages.
    pub held_bytes: u64,
    /// Blobs only cached packages use (evictable unless in use).
    pub cached_bytes: u64,
    /// Room reserved for the unverified rest of partial blobs (included in
    /// `held_bytes`/`cached_bytes` by the package that reserved it; shown apart).
    pub reserved_bytes: u64,
    /// Data being staged for an add, not yet committed.
    pub staging_bytes: u64,
    /// The SQLite database and its write-ahead log.
    pub database_bytes: u64,
    /// What disk use may exceed `max_bytes` by (see [`crate::QUOTA_SLACK`]).
    pub slack: u64,
}

/// One problem [`Store::verify`](crate::Store::verify) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    /// The blob.
    pub hash: Hash,
    /// What is wrong.
    pub problem: Problem,
    /// Bytes of it that still verify and are kept (the rest can be fetched again).
    pub verified_bytes_kept: u64,
    /// The packages that use it.
    pub packages: Vec<PackageId>,
}

/// What is wrong with a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// Its data file is missing.
    Missing,
    /// Its data file has the wrong length.
    WrongLength {
        /// Length found.
        found: u64,
    },
    /// Some of its data (or a partial blob's verified groups) no longer verifies
    /// against its name.
    DataMismatch,
    /// Its data is right but the outboard (hash tree) was not; the outboard was
    /// rewritten from the data, so nothing is lost.
    OutboardRepaired,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing => f.write_str("data file missing"),
            Problem::WrongLength { found } => write!(f, "data file is {found} bytes"),
            Problem::DataMismatch => f.write_str("data no longer verifies against the blob's hash"),
            Problem::OutboardRepaired => f.write_str("outboard was wrong and is rewritten"),
        }
    }
}

/// The result of [`Store::verify`](crate::Store::verify).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    /// Blobs re-hashed.
    pub blobs_checked: u64,
    /// Bytes re-hashed.
    pub bytes_checked: u64,
    /// What was found wrong. A blob with wrong data is no longer complete: what still
    /// verifies of it is kept and the rest can be fetched again.
    pub corrupt: Vec<Corruption>,
}

/// The result of [`Store::gc`](crate::Store::gc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GcReport {
    /// Cached packages evicted to bring use under the quota.
    pub packages_evicted: u64,
    /// Blobs deleted because no package used them any more.
    pub blobs_deleted: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
}

/// What opening the store found and repaired after an unclean shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenReport {
    /// Whether the last session ended without closing the store (a crash or a kill).
    pub unclean: bool,
    /// Half-written files of adds in flight at the crash, deleted.
    pub staging_files_deleted: u64,
    /// Blob files no database row names (written before a crash, never committed, or
    /// left after a committed delete), deleted.
    pub orphan_files_deleted: u64,
    /// Blobs whose files had gone missing or had the wrong length, now partial.
    pub blobs_damaged: u64,
    /// Blob rows no package used any more, deleted.
    pub blobs_collected: u64,
    /// Groups of partial blobs committed before their bytes were fsynced, verified
    /// again against the root.
    pub unsynced_groups_checked: u64,
    /// Of those, groups that no longer verified (lost to a power loss): to fetch again.
    pub unsynced_groups_lost: u64,
}

/// A callback that says whether a package is in use outside the store (being fetched,
/// served, or about to be referenced) and so must not be evicted. Called with the
/// store's lock held: it must be quick and must not call back into the store.
pub type Protect = Arc<dyn Fn(&PackageId) -> bool + Send + Sync>;

/// How a store is opened.
#[derive(Clone)]
pub struct StoreConfig {
    /// The quota: bytes the store may use, counted as [`Usage::used`].
    pub max_bytes: u64,
    /// Packages the shell is using; never evicted while it says so.
    pub protect: Option<Protect>,
}

impl StoreConfig {
    /// A store of `max_bytes`, protecting nothing beyond holds.
    pub fn with_max_bytes(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            protect: None,
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("max_bytes", &self.max_bytes)
            .field("protect", &self.protect.is_some())
            .finish()
    }
}

/// What the store has of one blob, to serve verified groups of it at the shell's pace
/// with [`verified::Encoder`](myconet_content::verified::Encoder) (or in one go with
/// [`Store::encode`](crate::Store::encode)). The readers hold the files open.
#[derive(Debug)]
pub struct BlobSource {
    /// The blob's hash.
    pub hash: Hash,
    /// Its size.
    pub size: u64,
    /// The groups that may be served.
    pub verified: GroupSet,
    /// Its data.
    pub data: BlobReader,
    /// Its outboard.
    pub outboard: Outboard<BlobReader>,
}

impl BlobSource {
    /// Whether its data or outboard file was removed (or replaced) since it was opened:
    /// see [`BlobReader::is_unlinked`].
    pub fn is_unlinked(&self) -> bool {
        self.data.is_unlinked() || self.outboard.data().is_unlinked()
    }
}
