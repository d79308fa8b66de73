//! [`StoreError`]: everything the store refuses or fails at, each naming what is wrong.

use std::{io, path::PathBuf};

use myconet_content::{GroupSet, verified::VerifyError};

use crate::{Hash, PackageId};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Storing this would take the store past its quota, even after evicting every
    /// cached package that may be evicted.
    #[error(
        "storage.max_bytes ({max_bytes} bytes) would be exceeded: {needed} more bytes are \
         needed, {used} are in use and at most {evictable} of them could be freed by \
         evicting cached packages (pinned, replicated and in-use data is never evicted)"
    )]
    Quota {
        /// The configured quota, `storage.max_bytes`.
        max_bytes: u64,
        /// Bytes in use when the request came.
        used: u64,
        /// Bytes the request needs.
        needed: u64,
        /// Bytes that evicting every evictable package would have freed.
        evictable: u64,
    },
    /// No package with this id is in the store.
    #[error("package {0} is not in the store")]
    UnknownPackage(PackageId),
    /// The package has no file at this path.
    #[error("package {package} has no file {path:?}")]
    UnknownFile {
        /// The package.
        package: PackageId,
        /// The path asked for.
        path: String,
    },
    /// No blob with this hash is in the store.
    #[error("blob {0} is not in the store")]
    UnknownBlob(Hash),
    /// The blob is in the store but not every byte of it is verified yet.
    #[error("blob {0} is not complete: only verified ranges of it can be read")]
    Incomplete(Hash),
    /// A read asked for groups the store has not verified.
    #[error("groups {groups} of blob {hash} are not verified in this store")]
    NotVerified {
        /// The blob.
        hash: Hash,
        /// The groups asked for that are not verified here.
        groups: GroupSet,
    },
    /// A blob asked to take verified groups is already complete.
    #[error("blob {0} is already complete")]
    AlreadyComplete(Hash),
    /// A row of the store's database holds a value this build cannot read.
    #[error("the store's database holds an invalid {0}")]
    BadRow(&'static str),
    /// A verified group handed to the store that does not fit the blob: its index or
    /// length is wrong for the blob's size.
    #[error("group {group} of {len} bytes does not fit blob {hash}")]
    GroupOutOfRange {
        /// The blob.
        hash: Hash,
        /// The group index.
        group: u64,
        /// Bytes handed in.
        len: u64,
    },
    /// A verified proof pair handed to the store whose offset is outside the blob's
    /// outboard.
    #[error("proof pair at outboard offset {offset} does not fit blob {hash}")]
    ParentOutOfRange {
        /// The blob.
        hash: Hash,
        /// The pair's offset.
        offset: u64,
    },
    /// The store's own copy of a blob failed verification while being read: run
    /// `verify` to find and mark what is corrupt.
    #[error("the stored copy of blob {hash} is corrupt: {error}")]
    LocalCorrupt {
        /// The blob.
        hash: Hash,
        /// What failed.
        error: VerifyError,
    },
    /// The data handed to the store ended before its declared size.
    #[error("the data ended after {actual} bytes but {declared} were declared")]
    DataTooShort {
        /// The size the caller declared.
        declared: u64,
        /// Bytes there were.
        actual: u64,
    },
    /// The data handed to the store went on past its declared size.
    #[error("the data is longer than the {declared} bytes declared")]
    DataTooLong {
        /// The size the caller declared.
        declared: u64,
    },
    /// A manifest names a file whose data was neither staged nor already complete here.
    #[error("file {path:?} (blob {hash}) was not staged and is not complete in the store")]
    MissingData {
        /// The file's path in the manifest.
        path: String,
        /// The file's root hash.
        hash: Hash,
    },
    /// A manifest and the staged data disagree about a file's size.
    #[error("file {path:?}: the manifest says {manifest} bytes, the staged data has {staged}")]
    ManifestSizeMismatch {
        /// The file's path in the manifest.
        path: String,
        /// Size in the manifest.
        manifest: u64,
        /// Size of the staged data with the same root hash.
        staged: u64,
    },
    /// A manifest claims a size for a root hash that cannot be true: the blob of that
    /// root here has another size.
    #[error("file {path:?}: root {hash} cannot be a {size}-byte file")]
    ImpossibleFile {
        /// The file's path in the manifest.
        path: String,
        /// The root hash claimed.
        hash: Hash,
        /// The size claimed.
        size: u64,
    },
    /// A [`Staged`](crate::Staged) blob was handed to a store other than the one that
    /// staged it.
    #[error("staged blob {0} belongs to another store")]
    ForeignStaged(Hash),
    /// Another process has this store open.
    #[error("the store at {} is in use by another process", dir.display())]
    Locked {
        /// The store's directory.
        dir: PathBuf,
    },
    /// The database was written by a newer version of Myconet.
    #[error("the store's schema is version {found}; this build knows versions up to {known}")]
    SchemaTooNew {
        /// Schema version found in the database.
        found: i64,
        /// Newest schema version this build knows.
        known: i64,
    },
    /// SQLite could not put the database in write-ahead-log mode (the file system does
    /// not support the shared memory it needs).
    #[error("the store's database cannot use a write-ahead log here (journal mode {0})")]
    NoWal(String),
    /// A file system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading data handed to the store failed.
    #[error("reading the data to add: {0}")]
    Read(#[source] io::Error),
    /// Writing staged data failed (the disk is full, or failing).
    #[error("writing staged data: {0}")]
    Staging(#[source] io::Error),
    /// Writing data out of the store failed.
    #[error("writing data out of the store: {0}")]
    Write(#[source] io::Error),
    /// The database failed.
    #[error("store database: {0}")]
    Database(#[from] rusqlite::Error),
}

/// Shorthand for results of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Wraps an [`io::Error`] with what was being done to which path.
pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io { op, path, source }
}
